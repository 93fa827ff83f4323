"""The gRPC server's lifecycle: build, start, drain, stop; health, reflection, auth, metrics.

It serves ``zoo.serving.v1.Classifier`` (:mod:`serve.classifier`) and the Open Inference
Protocol (``inference.GRPCInferenceService``, :mod:`serve.kserve`) on one port, both over one
:class:`serve.core.ServingCore` (names, limits, metrics; its ``models`` the served versions and their
batchers); with ``http_port``, the same
core answers HTTP/REST and the web page on a second port (:mod:`serve.http`).

Tests and ``python -m serve`` build it the same way::

    repo = load_repository("models", providers="cpu", threads=1)
    server, port = create_server(repo, "127.0.0.1:0")
    server.start()
    ...
    server.stop(grace=5)

Every client mistake leaves through ``context.abort(code, "what was wrong")`` with a specific
code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAUTHENTICATED);
INTERNAL is kept for the server's own failures (:mod:`serve.errors`). Imports neither torch nor zoo.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve import classifier, kserve, preprocess
from serve.core import ServingCore
from serve.statistics import Statistics
from serve.http import HttpServer
from serve.metrics import Metrics
from serve.runtime import Repository, RepositoryError

log = logging.getLogger("serve")

# Every default in one place (the CLI shows them in --help).
DEFAULT_MAX_BATCH = 16
# 0: a batch is what queued while the model was busy; a request that finds it idle runs at once
# (Triton's default max_queue_delay too). Waiting pays only when requests arrive spread out and
# throughput matters more than latency; the README gives bench.serve's figures for both settings.
DEFAULT_BATCH_TIMEOUT_MS = 0.0
DEFAULT_POLL_SECS = 15.0  # Triton's --repository-poll-secs default
# Sessions per model (config.pbtxt's instance_group overrides it per model).
DEFAULT_INSTANCES = 1
DEFAULT_MAX_CONCURRENCY = 64  # Classify and ModelInfer calls + ClassifyStream streams in flight at once
MAX_MESSAGE_BYTES = 16 * 2**20  # a 12 MP JPEG is ~5 MB; larger messages get RESOURCE_EXHAUSTED
# RPCs beyond --max-concurrency that the thread pool still takes, so health checks, reflection
# and ListModels answer while Classify is saturated (and our own RESOURCE_EXHAUSTED can be sent
# instead of grpc's terse one).
EXTRA_RPCS = 16
# A stream keeps at most this many of its requests between arrival and answer (backpressure
# through gRPC flow control instead of an unbounded buffer); the factor lets one batch run
# while the next gathers.
STREAM_WINDOW_FACTOR = 2
CLASSIFIER_SERVICE = classifier.SERVICE
KSERVE_SERVICE = kserve.SERVICE
# Health checks stay open under --auth-token-file (load balancers and orchestrators probe them),
# and so do the Open Inference Protocol's own two (liveness and readiness probes use them).
OPEN_METHODS = (f"/{health.SERVICE_NAME}/", f"/{KSERVE_SERVICE}/ServerLive", f"/{KSERVE_SERVICE}/ServerReady")


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
    """The running parts: the gRPC server, the serving core, health. Made by :func:`create_server`."""

    def __init__(self, grpc_server: grpc.Server, core: ServingCore, health_servicer: Any,
                 metrics_address: tuple[str, int] | None, http: HttpServer | None = None,
                 poll_secs: float | None = None) -> None:
        self._poll_secs = poll_secs  # --model-control-mode poll
        self._poller: threading.Thread | None = None
        self.grpc_server, self.core, self.health, self.metrics = grpc_server, core, health_servicer, core.metrics
        self.http = http  # the HTTP/REST port (serve.http), or None when it is off
        self.http_port: int | None = http.port if http is not None else None
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
        return self.core.repo

    @property
    def default_model(self) -> str | None:
        return self.core.default_model

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
        if self.http is not None:
            self.http.start()
        if self._poll_secs is not None:
            self._poller = threading.Thread(target=self._poll, name="repository-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        """``--model-control-mode poll``: follow the repository until the drain begins."""
        while not self._end_drain.wait(self._poll_secs) and not self.core.stopping:
            try:
                self.core.models.poll()
            except Exception:  # e.g. the repository directory itself vanished: say so, keep serving
                log.exception("polling the model repository %s failed", self.core.repo.root)

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
                self.core.stopping = True
        if not first:
            self._end_drain.set()
            _wait(self._grpc_stop_called)
            return
        try:
            if drain_delay > 0:
                _wait(self._end_drain, drain_delay)
        finally:  # whatever interrupts the drain, the server still stops
            if self.http is not None:
                self.http.begin_stop()
            with self._lock:  # a stop_now() either comes before (no grace) or sees the stop called
                self._grpc_stopped = self.grpc_server.stop(0 if self._hurry else grace)
                self._grpc_stop_called.set()

    def stop_now(self) -> None:
        """Skip what is left of the drain and of the grace: calls in flight are cancelled.

        From any thread but a signal handler (it takes locks the interrupted thread may hold):
        ``python -m serve`` calls it from a watcher thread on a second SIGTERM/SIGINT.
        """
        with self._lock:
            self._hurry = True
            called = self._grpc_stop_called.is_set()
        self._end_drain.set()
        if called:
            self.grpc_server.stop(0)

    def stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """:meth:`begin_stop`, wait for in-flight calls to finish, then release everything.
        Returns once all of that is done, whichever caller did it."""
        self.begin_stop(grace, drain_delay)
        if self.http is not None:  # its requests in flight finish while gRPC's do
            self.http.stop(0 if self._hurry else grace, hurried=lambda: self._hurry)
        assert self._grpc_stopped is not None
        _wait(self._grpc_stopped)
        with self._lock:
            closing, self._closing = self._closing, True
        if closing:
            _wait(self._closed)
            return
        try:
            if self._poller is not None:
                self._poller.join(30)  # a load under way finishes before the batchers close
            self.core.models.close()
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
                  max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS, reuse_port: bool = False,
                  http_port: int | None = None, model_control: str = "none",
                  poll_secs: float = DEFAULT_POLL_SECS) -> tuple[Server, int]:
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
        http_port: serve HTTP/REST and the web page (:mod:`serve.http`) on this port of the same
            host (0: a free one; ``server.http_port``), with the same TLS, token and size limit;
            None: off.
        model_control: Triton's ``--model-control-mode``: ``none`` (the repository as loaded),
            ``poll`` (the repository is looked at every ``poll_secs`` and followed), ``explicit``
            (RepositoryModelLoad / RepositoryModelUnload; ``repository`` may then be empty).
        poll_secs: seconds between two looks at the repository in ``poll`` mode.

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
    if not poll_secs > 0:
        raise ValueError(f"Invalid poll_secs: {poll_secs} (more than 0)")
    names = repository.names()
    if not names and model_control != "explicit":
        raise ValueError("the repository holds no models")
    if default_model is not None and default_model not in repository.models:
        raise ValueError(f"default model {default_model!r} is not served; models: {', '.join(names)}")
    if default_model is None and len(names) == 1:
        default_model = names[0]
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not reuse_port and port_text.isdigit() and int(port_text) and not _can_bind(host, int(port_text)):
        raise RuntimeError(f"cannot listen on {address}: the port is taken "
                           "or the host is not an address of this machine")

    metrics = Metrics()
    stream_window = max(4, STREAM_WINDOW_FACTOR * max_batch)
    core = ServingCore(repository, metrics, default_model, max_concurrency, stream_window,
                       max_image_pixels, max_batch, Statistics(), batch_timeout_ms / 1e3, model_control)
    try:
        core.models.start()  # warmed up before the server listens
    except RepositoryError as e:
        core.models.close()
        raise ValueError(str(e)) from None

    workers = max_concurrency + EXTRA_RPCS
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # Off: a second server on a taken port must fail, not share it.
               ("grpc.so_reuseport", 1 if reuse_port else 0)]
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=options, maximum_concurrent_rpcs=workers)
    classifier.pb_grpc.add_ClassifierServicer_to_server(classifier.ClassifierServicer(core), server)
    kserve.pb_grpc.add_GRPCInferenceServiceServicer_to_server(kserve.KServeServicer(core), server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ["", CLASSIFIER_SERVICE, KSERVE_SERVICE, *names]:
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    def model_health(name: str, serving: bool) -> None:  # per model, as it is loaded and unloaded
        status = health_pb2.HealthCheckResponse
        health_servicer.set(name, status.SERVING if serving and not core.stopping else status.NOT_SERVING)
    core.models.on_change = model_health
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
        core.models.close()
        raise RuntimeError(f"cannot listen on {address}: the port is taken "
                           "or the host is not an address of this machine")
    http = None
    if http_port is not None:
        try:
            http = HttpServer(core, host, http_port, workers=workers, max_body=max_message_bytes, tls=tls, token=token,
                              reuse_port=reuse_port)
        except (OSError, ssl.SSLError) as e:
            server.stop(None)
            core.models.close()
            raise RuntimeError(f"cannot listen on {host}:{http_port} (--http-port): {e.strerror or e}") from None
    metrics_address = (host, metrics_port) if metrics_port is not None else None
    return Server(server, core, health_servicer, metrics_address, http,
                  poll_secs if model_control == "poll" else None), port
