"""gRPC on one asyncio event loop: the hot calls run on the loop, the rest on worker threads.

grpc's synchronous server gives every call a thread of its own: under load (sixteen clients of one
model) the handler threads, the thread that polls grpc's queue and the batcher pass the GIL and
the cores back and forth (about 19 context switches per answer on the handler threads alone, from
``/proc/PID/task/*/status``), and the server spent ~2.8 ms of CPU per answer. With ``grpc.aio``, one
event loop takes every call; a call that only waits for its batch (``ModelInfer``) waits on the loop
as a future the batcher resolves, with no thread of its own: ~2.1 ms per answer on the same load
(docs/serving.md has the figures, ``python -m bench.serve`` measures them).

Every other handler stays as it is written (synchronous: ``context.abort`` raises, the request
stream is an iterator, a response stream is a generator): :func:`adapt` runs it on a worker thread
with :class:`CallContext`, the part of ``grpc.ServicerContext`` the handlers use. :class:`LoopThread`
runs the loop beside the caller's threads, so :class:`serve.server.Server` keeps its blocking
start / stop / wait API.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from typing import Any, Callable, Coroutine, Iterator

import grpc


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self, name: str = "grpc-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` on the loop; its future (never blocks: safe from a signal handler)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result (never from the loop's own thread)."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread; what is still scheduled is dropped."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self.loop.close()


class Wakeups:
    """Callbacks other threads hand to one event loop, run there in bursts: the loop is woken
    (``call_soon_threadsafe``: a write to its self-pipe and a read) once per burst, not once per
    callback, so a batch of sixteen answers costs the loop one wake-up. :meth:`of` gives a loop's."""

    _of: dict[asyncio.AbstractEventLoop, Wakeups] = {}
    _of_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[Callable[[], Any]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Wakeups:
        wakeups = cls._of.get(loop)
        if wakeups is None:
            with cls._of_lock:
                for old in [k for k in cls._of if k.is_closed()]:  # loops of stopped servers
                    del cls._of[old]
                wakeups = cls._of.setdefault(loop, cls(loop))
        return wakeups

    def call(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop soon (from any thread)."""
        with self._lock:
            self._ready.append(callback)
            if len(self._ready) > 1:  # a wake-up is on its way: it runs this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: its calls are gone, nothing waits
            pass

    def _run(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for callback in ready:
            callback()


class Aborted(Exception):
    """Raised by :meth:`CallContext.abort` on the worker thread; the call ends with its status
    (grpc's synchronous ``context.abort`` raises too, so code after it never runs)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class CallContext:
    """What a synchronous handler uses of ``grpc.ServicerContext``, for a call on the asyncio server.

    ``is_active`` turns false and the ``add_callback`` callbacks run (once) when the call ends:
    answered, failed, or cancelled by the client or the server's stop, as with grpc's own
    synchronous server (a cancelled call's thread finds out from ``is_active``)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], Any]] | None = []  # None: the call ended

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return self._callbacks is not None

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        """Run ``callback`` when the call ends; False (not registered) when it already has."""
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def end(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()


class CallEnded(Exception):
    """The call ended (answered, cancelled, or the server stopped) while its handler's thread
    waited for the loop to read or write on it."""


def _on_loop(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, call: CallContext) -> Any:
    """Run ``coro`` (a read or write of ``call``) on ``loop`` from a worker thread and wait for it,
    for as long as the call lasts: a thread left waiting on a loop that stopped would hold the
    process at exit (the pool's threads are joined then)."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    while True:
        try:
            return future.result(_POLL_S)
        except concurrent.futures.TimeoutError:
            if not call.is_active() or not loop.is_running():
                future.cancel()
                raise CallEnded("the call ended") from None


_POLL_S = 0.25  # how often a waiting worker thread looks whether its call ended


class _Requests:
    """A call's request stream as a blocking iterator, for a handler on a worker thread."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop, call: CallContext) -> None:
        self._context, self._loop, self._call = context, loop, call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        message = _on_loop(self._context.read(), self._loop, self._call)
        if message is grpc.aio.EOF:
            raise StopIteration
        return message


def _sync_behaviour(fn: Callable[..., Any], pool: concurrent.futures.Executor, request_streaming: bool,
                    response_streaming: bool) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``fn``, a synchronous handler, as a coroutine function that runs it on ``pool``."""

    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        call = CallContext(context)
        argument = _Requests(context, loop, call) if request_streaming else request

        def respond() -> Any:
            if not response_streaming:
                return fn(argument, call)
            responses = fn(argument, call)
            try:
                for response in responses:  # each written before the next is made: flow control holds the handler
                    _on_loop(context.write(response), loop, call)
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # a generator's finally blocks run now, on this thread
            return None

        try:
            return await loop.run_in_executor(pool, respond)
        except Aborted as e:
            await context.abort(e.code, e.details)
        finally:
            call.end()

    return behaviour


def adapt(handler: grpc.RpcMethodHandler, pool: concurrent.futures.Executor) -> grpc.RpcMethodHandler:
    """``handler`` for the asyncio server: a synchronous behaviour runs on ``pool`` with a
    :class:`CallContext`; a coroutine function (a handler written for the loop) is kept."""
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
    attribute, make = kinds[streaming]
    fn = getattr(handler, attribute)
    if not inspect.iscoroutinefunction(fn):
        fn = _sync_behaviour(fn, pool, *streaming)
    return make(fn, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class Registrar:
    """Takes a generated ``add_*Servicer_to_server(servicer, registrar)`` call and registers that
    service's handlers, adapted (:func:`adapt`), on the asyncio ``server``."""

    def __init__(self, server: grpc.aio.Server, pool: concurrent.futures.Executor) -> None:
        self.server, self.pool = server, pool

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive by name in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        adapted = {name: adapt(h, self.pool) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, adapted),))
