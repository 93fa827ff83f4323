"""The gRPC server: the ``zoo.serving.v1.Classifier`` servicer, health, reflection, auth, metrics.

The Open Inference Protocol (``inference.GRPCInferenceService``, :mod:`serve.kserve`) is served
on the same server and port, over the same batchers, metrics and limits.

Tests and ``python -m serve`` build it the same way::

    repo = load_repository("models", providers="cpu", threads=1)
    server, port = create_server(repo, "127.0.0.1:0")
    server.start()
    ...
    server.stop(grace=5)

Every client mistake leaves through ``context.abort(code, "what was wrong")`` with a specific
code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAUTHENTICATED);
INTERNAL is kept for the server's own failures. Imports neither torch nor zoo.
"""
from __future__ import annotations

import hmac
import logging
import queue
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve import preprocess
from serve._proto.inference import grpc_predict_v2_pb2 as kserve_pb
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.batching import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from serve.metrics import UNKNOWN_MODEL, Metrics
from serve.runtime import Model, Repository

log = logging.getLogger(__name__)

# Every default in one place (the CLI shows them in --help).
DEFAULT_MAX_BATCH = 16
# 0: a batch is what queued while the model was busy; a request that finds it idle runs at once
# (Triton's default max_queue_delay too). python -m bench.serve, resnext_mini, one server each:
# 0 ms gave lone p50 2.8 ms vs 5.5 ms with 2 ms, and 502 vs 463 QPS at 16 clients (mean batch
# 6.8 both). Waiting pays only when requests arrive spread out and throughput beats latency.
DEFAULT_BATCH_TIMEOUT_MS = 0.0
DEFAULT_MAX_CONCURRENCY = 64  # Classify and ModelInfer calls + ClassifyStream streams in flight at once
DEFAULT_TOP_K = 5
MAX_MESSAGE_BYTES = 16 * 2**20  # a 12 MP JPEG is ~5 MB; larger messages get RESOURCE_EXHAUSTED
# RPCs beyond --max-concurrency that the thread pool still takes, so health checks, reflection
# and ListModels answer while Classify is saturated (and our own RESOURCE_EXHAUSTED can be sent
# instead of grpc's terse one).
EXTRA_RPCS = 16
# A stream keeps at most this many of its requests between arrival and answer (backpressure
# through gRPC flow control instead of an unbounded buffer); the factor lets one batch run
# while the next gathers.
STREAM_WINDOW_FACTOR = 2
CLASSIFIER_SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
KSERVE_SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Health checks stay open under --auth-token-file (load balancers and orchestrators probe them),
# and so do the Open Inference Protocol's own two (liveness and readiness probes use them).
OPEN_METHODS = (f"/{health.SERVICE_NAME}/", f"/{KSERVE_SERVICE}/ServerLive", f"/{KSERVE_SERVICE}/ServerReady")
_NO_DEADLINE_S = 1e6  # grpc reports a call without deadline as one ~infinitely far away


class RequestError(Exception):
    """A request that cannot be answered: its gRPC code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Job:
    """A request between submission to its model's batcher and its answer."""

    request: Any  # pb.ClassifyRequest
    model: Model
    top_k: int
    pending: Any  # batching.Pending
    t0: float
    decode_s: float
    preprocess_s: float


def _shown(name: str, limit: int = 80) -> str:
    """A client-supplied name, quoted and bounded, for messages."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else time.monotonic() + remaining


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """``zoo.serving.v1.Classifier`` over a loaded :class:`Repository`."""

    def __init__(self, repository: Repository, batchers: dict[tuple[str, int], Batcher], metrics: Metrics,
                 default_model: str | None, max_concurrency: int, stream_window: int,
                 max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS) -> None:
        self.repo, self.batchers, self.metrics = repository, batchers, metrics
        self.max_image_pixels = max_image_pixels
        self.default_model = default_model
        self.max_concurrency = max_concurrency
        self.stream_window = stream_window
        self._slots = threading.BoundedSemaphore(max_concurrency)

    # ------------------------------------------------------------------ helpers

    def _label(self, name: str) -> str:
        """The metrics label for a requested name: the name if served, else a fixed one."""
        name = name or (self.default_model or "")
        return name if name in self.repo.models else UNKNOWN_MODEL

    def _acquire(self, context: grpc.ServicerContext, name: str) -> Callable[[], None]:
        if not self._slots.acquire(blocking=False):
            self.metrics.count(self._label(name), grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy: {self.max_concurrency} requests already in flight "
                          f"(--max-concurrency {self.max_concurrency}); retry later")
        lock, released = threading.Lock(), [False]

        def release() -> None:  # once, from whichever comes first: the handler or the RPC's end
            with lock:
                if not released[0]:
                    released[0] = True
                    self._slots.release()
        context.add_callback(release)
        return release

    def _resolve(self, name: str, version: int) -> Model:
        served = ", ".join(self.repo.names())
        if not name:
            if self.default_model is None:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"request names no model and this server serves several; set model to one of: {served}")
            name = self.default_model
        if version < 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid version {version}: 0 (newest) or a positive integer")
        model = self.repo.get(name, version)  # the in-memory table only: a name never reaches the filesystem
        if model is None:
            if name in self.repo.models:
                loaded = ", ".join(str(v) for v in sorted(self.repo.models[name]))
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"model {_shown(name)} has no version {version} loaded (loaded: {loaded})")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model {_shown(name)}; this server serves: {served}")
        return model

    def _prepare(self, request: Any, deadline: float | None, is_active: Callable[[], bool] | None,
                 t0: float) -> _Job:
        """Resolve, decode, preprocess and queue one request."""
        model = self._resolve(request.model, request.version)
        if request.top_k < 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid top_k {request.top_k}: 0 (= {DEFAULT_TOP_K}) or positive")
        top_k = min(request.top_k or DEFAULT_TOP_K, len(model.labels))
        which = request.WhichOneof("input")
        t = time.perf_counter()
        try:
            if which is None:
                raise preprocess.InputError("request has no input: set image (encoded bytes) or tensor")
            if which == "image":
                image = preprocess.decode_image(request.image, self.max_image_pixels)
            else:
                tensor = request.tensor
                kind, array = preprocess.parse_tensor(tensor.shape, tensor.dtype, tensor.data, model.input_size,
                                                      self.max_image_pixels)
                image = preprocess.image_from_pixels(array) if kind == "pixels" else None
            decode_s, t = time.perf_counter() - t, time.perf_counter()
            if image is None:  # a model-ready tensor: nothing to preprocess
                x, preprocess_s = array, 0.0
            else:
                x = preprocess.val_transform(image, model.input_size, model.mean, model.std, model.crop_pct,
                                            self.max_image_pixels)
                preprocess_s = time.perf_counter() - t
        except preprocess.InputError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        batcher = self.batchers[(model.name, model.version)]
        try:
            pending = batcher.submit(x, deadline, is_active)
        except QueueFull as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}; retry later") from None
        except ShuttingDown as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return _Job(request, model, top_k, pending, t0, decode_s, preprocess_s)

    def _complete(self, job: _Job, deadline: float | None) -> Any:
        """Wait for the job's batch and build its response."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            result = job.pending.wait(timeout)
        except DeadlineExceeded as e:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except ShuttingDown as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        model, request = job.model, job.request
        probs = _softmax(result.logits)
        top = np.argsort(-probs, kind="stable")[:job.top_k]
        total_s = time.perf_counter() - job.t0
        response = pb.ClassifyResponse(
            classes=[pb.Class(index=int(i), label=model.labels[i], score=float(probs[i])) for i in top],
            model=model.name, version=model.version, provider=model.provider, batch_size=result.batch_size,
            request_id=request.request_id,
            timing=pb.Timing(decode_us=round(job.decode_s * 1e6), preprocess_us=round(job.preprocess_s * 1e6),
                             queue_us=round(result.queue_s * 1e6), inference_us=round(result.inference_s * 1e6),
                             total_us=round(total_s * 1e6)))
        if request.return_logits:
            response.logits.extend(result.logits.tolist())
        self.metrics.observe(model.name, total_s, result.queue_s, result.inference_s, result.batch_size)
        return response

    def _answer(self, request: Any, context: grpc.ServicerContext, t0: float) -> Any:
        """The response, or a RequestError (INTERNAL for the server's own failures)."""
        deadline = _deadline(context)
        try:
            return self._complete(self._prepare(request, deadline, context.is_active, t0), deadline)
        except RequestError as e:
            return e
        except Exception as e:  # a bug or a model failure, never the client's input
            log.exception("Classify failed")
            return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ RPCs

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        release = self._acquire(context, request.model)
        try:
            answer = self._answer(request, context, t0)
        finally:
            release()
        if isinstance(answer, RequestError):
            self.metrics.count(self._label(request.model), answer.code.name)
            context.abort(answer.code, answer.message)
        return answer

    def ClassifyStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        release = self._acquire(context, "")
        try:
            yield from self._stream(request_iterator, context)
        finally:
            release()

    def _stream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        deadline = _deadline(context)
        jobs: queue.Queue = queue.Queue(maxsize=self.stream_window)
        end = object()

        def put(entry: Any) -> bool:
            while context.is_active():
                try:
                    jobs.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            # Decode, preprocess and queue each request as it arrives, while the loop below
            # answers earlier ones: the client's pipelining reaches the batcher.
            try:
                for index, request in enumerate(request_iterator):
                    t0 = time.perf_counter()
                    try:
                        entry = (index, request, self._prepare(request, deadline, context.is_active, t0))
                    except RequestError as e:
                        entry = (index, request, e)
                    except Exception as e:
                        log.exception("ClassifyStream item failed")
                        entry = (index, request, RequestError(grpc.StatusCode.INTERNAL,
                                                              f"internal error: {type(e).__name__}: {e}"))
                    if not put(entry):
                        return
            except Exception:  # the client went away mid-stream: nothing left to answer
                log.debug("ClassifyStream request stream ended", exc_info=True)
            finally:
                put(end)

        threading.Thread(target=read, name="classify-stream-reader", daemon=True).start()
        while True:
            try:
                entry = jobs.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if entry is end:
                return
            index, request, job = entry
            if isinstance(job, _Job):
                try:
                    answer = self._complete(job, deadline)
                except RequestError as e:
                    answer = e
                except Exception as e:
                    log.exception("ClassifyStream item failed")
                    answer = RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            else:
                answer = job
            if isinstance(answer, RequestError):
                self.metrics.count(self._label(request.model), answer.code.name)
                yield pb.ClassifyStreamResponse(index=index, request_id=request.request_id,
                                                error=pb.ItemError(code=answer.code.value[0], message=answer.message))
            else:
                yield pb.ClassifyStreamResponse(index=index, request_id=request.request_id, response=answer)

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        infos = []
        for m in self.repo.all():
            infos.append(pb.ModelInfo(
                name=m.name, version=m.version, labels=m.labels, input_size=list(m.input_size), mean=m.mean,
                std=m.std, crop_pct=m.crop_pct, precision=m.meta["precision"], norm=m.meta["norm"],
                provider=m.provider, max_batch=self.batchers[(m.name, m.version)].max_batch,
                is_default=m.name == self.default_model, source=m.meta["source"]))
        return pb.ListModelsResponse(models=infos, default_model=self.default_model or "")

    def GetLatencyReport(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.model and request.model not in self.repo.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {_shown(request.model)}; "
                                                     f"this server serves: {', '.join(self.repo.names())}")
        names = [request.model] if request.model else self.repo.names()
        out = []
        for name in names:
            r = self.metrics.report(name)
            pct = {k: pb.Percentiles(p50_us=r[k][50], p90_us=r[k][90], p99_us=r[k][99])
                   for k in ("total", "queue", "inference")}
            out.append(pb.ModelLatency(model=name, count=r["count"], window=self.metrics.window,
                                       mean_batch_size=r["mean_batch_size"], total_requests=r["total_requests"],
                                       **pct))
        return pb.LatencyReportResponse(models=out)


# --------------------------------------------------------------------------- auth


def _aborting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) as ``handler`` that fails every call."""
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer TOKEN`` metadata on every call except health checks."""

    def __init__(self, token: str, open_methods: tuple[str, ...] = OPEN_METHODS) -> None:
        if not token:
            raise ValueError("the bearer token is empty")
        self._expected = f"Bearer {token}".encode()
        self._open = open_methods

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        if handler_call_details.method.startswith(self._open):
            return continuation(handler_call_details)
        value = None
        for key, v in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                value = v.encode() if isinstance(v, str) else v
        if value is not None and hmac.compare_digest(value, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
            return None
        message = ("missing 'authorization: Bearer <token>' metadata" if value is None
                   else "invalid bearer token in 'authorization' metadata")
        return _aborting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


# --------------------------------------------------------------------------- server


class Server:
    """The running parts: the gRPC server, batchers, health, metrics. Made by :func:`create_server`."""

    def __init__(self, grpc_server: grpc.Server, servicer: ClassifierServicer, health_servicer: Any,
                 metrics: Metrics, metrics_address: tuple[str, int] | None, kserve: Any = None) -> None:
        self.grpc_server, self.servicer, self.health, self.metrics = grpc_server, servicer, health_servicer, metrics
        self.kserve = kserve  # the serve.kserve.KServeServicer on the same port
        self._metrics_address = metrics_address
        self.metrics_port: int | None = None
        self._stop_begun = False
        self._end_drain = threading.Event()  # set: what is left of the drain is skipped
        self._hurry = False  # stop_now(): no drain, no grace
        self._grpc_stopped: threading.Event | None = None  # grpc's own, set once every call ended
        self._grpc_stop_called = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        self._lock = threading.Lock()

    @property
    def repository(self) -> Repository:
        return self.servicer.repo

    @property
    def hurried(self) -> bool:
        """True when :meth:`stop_now` cut the drain and grace short."""
        return self._hurry

    def start(self) -> None:
        if self._metrics_address is not None:
            host, port = self._metrics_address
            try:
                self.metrics_port = self.metrics.serve_http(host, port)
            except OSError as e:  # e.g. the port is taken: name it, not just "[Errno 98]"
                raise RuntimeError(f"cannot serve metrics on {host}:{port} (--metrics-port): "
                                   f"{e.strerror or e}") from None
        self.grpc_server.start()

    def begin_stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """Health turns NOT_SERVING now; after ``drain_delay`` seconds new calls are refused and
        in-flight ones get ``grace`` seconds (None: none, they are cancelled). Returns once new
        calls are refused; a call while another is draining ends the drain there.

        Why the delay: gRPC's core holds calls that reached the server but that its Python loop
        has not yet taken for a handler (one is taken at a time), and cancels them when stop()
        begins: a client that sent its call before the signal would get CANCELLED. Serving on for
        a moment lets every call already sent reach a handler and, given a ``grace`` longer than
        a call, finish; it is also the window in which balancers that watch health move traffic
        elsewhere. A call that reaches the server in the instant its listener closes still gets
        CANCELLED or UNAVAILABLE: gRPC's own shutdown, with nothing half-done on the server.
        """
        with self._lock:
            first = not self._stop_begun
            self._stop_begun = True
            if first:
                self.health.enter_graceful_shutdown()
                if self.kserve is not None:
                    self.kserve.stopping = True
        if not first:
            self._end_drain.set()
            _wait(self._grpc_stop_called)
            return
        try:
            if drain_delay > 0:
                _wait(self._end_drain, drain_delay)
        finally:  # whatever interrupts the drain, the server still stops
            self._grpc_stopped = self.grpc_server.stop(0 if self._hurry else grace)
            self._grpc_stop_called.set()

    def stop_now(self) -> None:
        """Skip what is left of the drain and of the grace: calls in flight are cancelled.

        Safe from a signal handler (it never waits): ``python -m serve`` calls it on a second
        SIGTERM/SIGINT.
        """
        self._hurry = True
        self._end_drain.set()
        if self._grpc_stop_called.is_set():
            self.grpc_server.stop(0)

    def stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """:meth:`begin_stop`, wait for in-flight calls to finish, then release everything.
        Returns once all of that is done, whichever caller did it."""
        self.begin_stop(grace, drain_delay)
        assert self._grpc_stopped is not None
        _wait(self._grpc_stopped)
        with self._lock:
            closing, self._closing = self._closing, True
        if closing:
            _wait(self._closed)
            return
        try:
            for batcher in self.servicer.batchers.values():
                batcher.close(timeout=5.0)
            self.metrics.close()
        finally:
            self._closed.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def _wait(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` in short slices. A signal the kernel delivers to another thread (gRPC
    and onnxruntime have many) reaches Python's handler only once the main thread wakes up; a
    long wait would hold back, say, the second SIGTERM that ends the drain."""
    end = None if timeout is None else time.monotonic() + timeout
    while not event.wait(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic()))):
        if end is not None and time.monotonic() >= end:
            return False
    return True


def _can_bind(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now. Checked before gRPC binds: its C core would log a
    failed bind to stderr itself before the one clear line the CLI prints."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, IndexError):
        return True  # not resolvable here: gRPC reports it
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
        try:
            sock.bind(sockaddr)
        except OSError:
            return False
    return True


def create_server(repository: Repository, address: str = "127.0.0.1:0", *, max_batch: int = DEFAULT_MAX_BATCH,
                  batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                  default_model: str | None = None, tls: tuple[bytes, bytes] | None = None, token: str | None = None,
                  metrics_port: int | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                  max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS, reuse_port: bool = False) -> tuple[Server, int]:
    """Build (not start) a server for ``repository`` bound to ``address``.

    Args:
        repository: the loaded models (:func:`serve.runtime.load_repository`).
        address: ``HOST:PORT``; port 0 picks a free one (returned).
        max_batch: requests per onnxruntime call at most; 1 turns batching off.
        batch_timeout_ms: longest a request waits for its batch to fill.
        max_concurrency: Classify and ModelInfer calls plus ClassifyStream streams in flight; beyond it
            RESOURCE_EXHAUSTED.
        default_model: the model for requests that name none (default: the only one, if one).
        tls: ``(private key PEM, certificate chain PEM)``: serve TLS instead of plaintext.
        token: require ``authorization: Bearer TOKEN`` (health checks stay open).
        metrics_port: serve Prometheus ``/metrics`` on the same host (0: a free port); None: off.
        max_message_bytes: largest request or response message.
        max_image_pixels: largest decoded image accepted (checked before decoding).
        reuse_port: share ``address`` with other processes that set it too (SO_REUSEPORT; the
            kernel spreads new connections over them: ``python -m serve --workers N``). Off, a
            taken port is an error.

    Returns:
        ``(server, port)``.

    Raises:
        ValueError: a bad argument (message names it); RuntimeError: the address cannot be bound.
    """
    for flag, value, low in (("max_batch", max_batch, 1), ("max_concurrency", max_concurrency, 1),
                             ("max_message_bytes", max_message_bytes, 1024)):
        if value < low:
            raise ValueError(f"Invalid {flag}: {value} (at least {low})")
    if batch_timeout_ms < 0:
        raise ValueError(f"Invalid batch_timeout_ms: {batch_timeout_ms} (at least 0)")
    names = repository.names()
    if not names:
        raise ValueError("the repository holds no models")
    if default_model is not None and default_model not in repository.models:
        raise ValueError(f"default model {default_model!r} is not served; models: {', '.join(names)}")
    if default_model is None and len(names) == 1:
        default_model = names[0]
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not reuse_port and port_text.isdigit() and int(port_text) and not _can_bind(host, int(port_text)):
        raise RuntimeError(f"cannot listen on {address}: the port is taken or the host is not an address of this machine")

    metrics = Metrics()
    stream_window = max(4, STREAM_WINDOW_FACTOR * max_batch)
    batchers = {}
    for m in repository.all():
        batchers[(m.name, m.version)] = Batcher(
            m.run, max_batch=max_batch, timeout_s=batch_timeout_ms / 1e3,
            max_queue=max_concurrency * stream_window, name=f"{m.name}:{m.version}",
            on_batch=lambda n, name=m.name: metrics.observe_batch(name, n))
    servicer = ClassifierServicer(repository, batchers, metrics, default_model, max_concurrency, stream_window,
                                  max_image_pixels)

    workers = max_concurrency + EXTRA_RPCS
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # Off: a second server on a taken port must fail, not share it.
               ("grpc.so_reuseport", 1 if reuse_port else 0)]
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=options, maximum_concurrent_rpcs=workers)
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    from serve import kserve  # here, not at the top: serve.kserve builds on this module
    kserve_servicer = kserve.KServeServicer(servicer, max_batch)
    kserve.pb_grpc.add_GRPCInferenceServiceServicer_to_server(kserve_servicer, server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ["", CLASSIFIER_SERVICE, KSERVE_SERVICE, *names]:
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((CLASSIFIER_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)

    try:
        if tls is not None:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's message only says "Failed to bind"; its C core logged the reason
        port = 0
    if port == 0:  # older grpc versions report a failed bind as port 0 instead of raising
        for batcher in batchers.values():
            batcher.close()
        raise RuntimeError(f"cannot listen on {address}: the port is taken or the host is not an address of this machine")
    metrics_address = (host, metrics_port) if metrics_port is not None else None
    return Server(server, servicer, health_servicer, metrics, metrics_address, kserve_servicer), port
