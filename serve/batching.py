"""Dynamic batching: gather concurrent requests for one model into one onnxruntime call.

One worker thread per model takes the oldest waiting request, then gathers more until the batch
holds ``max_batch`` or ``timeout_s`` has passed since that oldest request *arrived* (so a lone
request never waits longer than the timeout, and one that already queued behind a running batch
waits no extra). Requests whose deadline has passed, or whose caller went away, are dropped
before the batch runs. The queue is bounded: a full queue is refused, never grown. While one
batch runs, the next one gathers in the queue, which is what makes batching pay off under load.
``max_batch=1`` turns batching off (each request runs alone, at once). With several model
instances (Triton's ``instance_group`` count: one onnxruntime session each), each has a worker of
its own on the one queue, and as many batches run at once as there are instances: a worker gathers
its batch while the others run theirs. A request that finds its
model idle and nothing queued runs on the thread that waits for it (no hand-over to the worker and
back: two thread wake-ups, and on few cores the scheduling jitter that comes with them); batching
happens only under contention, as with Triton's default ``max_queue_delay`` of 0 (``inline=True``,
one instance only, and a submit that may claim: the server's unary calls, never a stream's
read-ahead). One model call per instance runs at a time either way. A model call that raises
is logged here, once for its whole batch, under a request id per request; each caller gets
:class:`BatchFailed` with its own id (:mod:`serve.errors` answers INTERNAL with that id and logs
nothing more).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue is at capacity."""


class DeadlineExceeded(Exception):
    """The request's deadline passed (or its caller cancelled) before it ran."""


class ShuttingDown(Exception):
    """The batcher was closed before the request ran."""


class BatchFailed(Exception):
    """The model call of the request's batch raised (the ``__cause__``). The batcher has logged it,
    traceback and all, under ``request_id`` among the ids of the whole batch."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the model failed on this request's batch (request id {request_id})")
        self.request_id = request_id


def new_request_id() -> str:
    """The id that ties an INTERNAL answer to its server log record (here, not in
    :mod:`serve.errors`, which imports this module)."""
    return uuid.uuid4().hex[:16]


@dataclass
class BatchResult:
    logits: np.ndarray  # this request's row, [classes]
    batch_size: int
    queue_s: float  # arrival -> its batch started running
    inference_s: float  # the batch's onnxruntime call


class Pending:
    """A submitted request: :meth:`wait` returns its :class:`BatchResult` or raises."""

    __slots__ = ("x", "deadline", "is_active", "enqueued", "_done", "_result", "_error", "_abandoned", "_inline")

    def __init__(self, x: np.ndarray, deadline: float | None, is_active: Callable[[], bool] | None) -> None:
        self.x = x
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.is_active = is_active
        self.enqueued = time.monotonic()
        # A latch: held until _finish releases it. A bare lock, not an Event: an Event is a
        # Condition with a lock of its own, and its wait builds a waiter lock each time; on every
        # request's path, under the GIL all threads share.
        self._done = threading.Lock()
        self._done.acquire()
        self._result: BatchResult | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        # The batcher whose idle model this request claimed at submit: wait() runs it on the calling thread.
        self._inline: Batcher | None = None

    @property
    def abandoned(self) -> bool:
        """The waiter gave up: skip it."""
        return self._abandoned

    @abandoned.setter
    def abandoned(self, value: bool) -> None:
        self._abandoned = value
        inline, self._inline = (self._inline, None) if value else (None, self._inline)
        if inline is not None:  # nobody will wait() to run it: give the model back
            self._finish(error=DeadlineExceeded("abandoned before it ran"))
            inline._release()

    def expired(self, now: float) -> bool:
        if self.abandoned or (self.deadline is not None and now >= self.deadline):
            return True
        return self.is_active is not None and not self.is_active()

    def _finish(self, result: BatchResult | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        with contextlib.suppress(RuntimeError):  # finished before: only the answer is replaced
            self._done.release()

    def wait(self, timeout: float | None = None) -> BatchResult:
        """Block until the batch ran. Raises DeadlineExceeded when ``timeout`` passes first."""
        inline, self._inline = self._inline, None
        if inline is not None:
            inline._run_inline(self, timeout)
        elif self._done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._done.release()  # stays open: a later wait returns at once, as an Event's would
        else:
            self.abandoned = True
            raise DeadlineExceeded("deadline exceeded while waiting in the batch queue")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


_STOP = object()


class Batcher:
    """Runs ``run(batch [N, ...]) -> [N, classes]`` on one worker thread per model instance for submitted items.

    Args:
        run: the model call (one onnxruntime ``session.run``), or one per instance (a sequence):
            each gets a worker thread, and they run at once.
        max_batch: largest batch; 1 disables batching.
        timeout_s: longest wait for a batch to fill, counted from its oldest request's arrival.
        max_queue: requests that may wait at once; beyond it :meth:`submit` raises QueueFull.
        on_batch: called with each batch's size after it ran (metrics).
        name: for the thread name and logs.
        inline: a request that finds the model idle and nothing queued runs on the thread that waits for it.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray] | Sequence[Callable[[np.ndarray], np.ndarray]],
                 max_batch: int = 16, timeout_s: float = 0.002,
                 max_queue: int = 1024, on_batch: Callable[[int], None] | None = None, name: str = "model",
                 inline: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"Invalid max_batch: {max_batch} (at least 1)")
        if timeout_s < 0:
            raise ValueError(f"Invalid timeout_s: {timeout_s} (at least 0)")
        runs = list(run) if isinstance(run, Sequence) else [run]
        if not runs:
            raise ValueError("Invalid run: no model instance")
        if inline and len(runs) > 1:
            raise ValueError("inline runs need a single model instance")
        self.runs, self.max_batch, self.timeout_s = runs, max_batch, timeout_s
        self.on_batch = on_batch
        self.name = name
        self.inline = inline
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._idle = threading.Condition()
        self._busy = False  # a model call (or a claim on the idle model by a submitted request) is under way
        # inline: requests queued or taken off the queue by the worker and not yet gathered into a
        # batch. A submit claims the model only when this is 0: one it finds empty would overtake a
        # request the worker holds while it waits for the model.
        self._ahead = 0
        self._running = len(runs)  # workers not stopped yet
        self._threads = [threading.Thread(target=self._loop, args=(r,), daemon=True,
                                          name=f"batcher-{name}" + (f"-{i}" if len(runs) > 1 else ""))
                         for i, r in enumerate(runs)]
        for t in self._threads:
            t.start()

    @property
    def instances(self) -> int:
        """Model calls that may run at once."""
        return len(self.runs)

    def submit(self, x: np.ndarray, deadline: float | None = None,
               is_active: Callable[[], bool] | None = None, may_claim: bool = True) -> Pending:
        """Queue one input (no batch axis). ``deadline`` is a ``time.monotonic()`` time.
        ``may_claim``: on an ``inline`` batcher, the request may claim the idle model (its
        caller must then :meth:`Pending.wait` for it, or mark it abandoned: until then nothing
        else runs); False: it always queues."""
        if self._closed:
            raise ShuttingDown("server is shutting down")
        item = Pending(x, deadline, is_active)
        if self.inline:
            with self._idle:
                if may_claim and not self._busy and not self._ahead:
                    self._busy = True
                    item._inline = self
                    return item
                self._put(item)
                self._ahead += 1
        else:
            self._put(item)
        return item

    def _put(self, item: Pending) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"{self.name}: {self._queue.maxsize} requests already waiting") from None

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the worker; later submits raise ShuttingDown."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:  # one for each worker: a worker that takes it stops taking work
            self._queue.put(_STOP)
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._idle:  # a request claimed before the close still runs on its caller's thread
            self._idle.wait_for(lambda: not self._busy, None if end is None else max(0.0, end - time.monotonic()))

    def _claim(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not self._busy)
            self._busy = True

    def _release(self) -> None:
        with self._idle:
            self._busy = False
            self._idle.notify_all()

    def _run_inline(self, item: Pending, timeout: float | None) -> None:
        """Run ``item`` (whose submit claimed the idle model) on the calling thread."""
        try:
            start = time.monotonic()
            if (timeout is not None and timeout <= 0) or item.expired(start):
                item._finish(error=DeadlineExceeded("deadline exceeded while waiting in the batch queue"))
            else:
                self._run([item], self.runs[0])
                # The queued path answers DEADLINE_EXCEEDED when the wait outlasts the deadline: so does this one.
                if timeout is not None and time.monotonic() - start > timeout and item._error is None:
                    item._finish(error=DeadlineExceeded("deadline exceeded while the model ran"))
        finally:
            self._release()

    # ------------------------------------------------------------------ worker

    def _gather(self, first: Pending) -> tuple[list[Pending], bool]:
        batch, stop = [first], False
        until = first.enqueued + self.timeout_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _loop(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            if not self.inline:  # several instances run at once: no claim on "the" model
                stop = self._take(first, run)
                continue
            self._claim()  # waits out a request running on its caller's thread; meanwhile the batch grows
            try:
                stop = self._take(first, run)
            finally:
                self._release()
        with self._idle:
            self._running -= 1
            if self._running:  # the last worker to stop fails what slipped in behind the stop marks
                return
        # Closed: nothing new arrives (submit refuses), fail whatever slipped in.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item._finish(error=ShuttingDown("server is shutting down"))

    def _take(self, first: Pending, run: Callable[[np.ndarray], np.ndarray]) -> bool:
        """Gather a batch behind ``first``, drop the expired, run the rest. True: the batcher was closed."""
        batch, stop = self._gather(first)
        if self.inline:  # the model is claimed: nothing submitted now can overtake these
            with self._idle:
                self._ahead -= len(batch)
        now = time.monotonic()
        live = []
        for item in batch:
            if item.expired(now):
                item._finish(error=DeadlineExceeded("deadline exceeded while waiting in the batch queue"))
            else:
                live.append(item)
        if live:
            self._run(live, run)
        return stop

    def _run(self, items: list[Pending], run: Callable[[np.ndarray], np.ndarray]) -> None:
        start = time.monotonic()
        try:
            x = items[0].x[None] if len(items) == 1 else np.stack([it.x for it in items])
            logits = run(x)
        except Exception as e:  # the model failed: every caller of this batch hears about it
            ids = [new_request_id() for _ in items]
            # One record for the batch: N callers must not log the same traceback N times.
            log.error("%s: batch of %d failed (request id%s %s)", self.name, len(items), "s" if len(ids) > 1 else "",
                      ", ".join(ids), exc_info=e)
            for item, request_id in zip(items, ids):
                failure = BatchFailed(request_id)  # one per caller: threads raising one object tangle its traceback
                failure.__cause__ = e
                item._finish(error=failure)
            return
        elapsed = time.monotonic() - start
        if self.on_batch is not None:
            self.on_batch(len(items))
        for i, item in enumerate(items):
            item._finish(BatchResult(logits=logits[i], batch_size=len(items),
                                     queue_s=start - item.enqueued, inference_s=elapsed))
