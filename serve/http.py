"""HTTP beside gRPC: the Open Inference Protocol's REST API, a classify route, and the web page.

Served on ``--http-port`` by the same process and the same :class:`serve.core.ServingCore` as
the gRPC port: the same batchers, ``--max-concurrency`` slots, metrics, latency report, model
names and error table. The handlers translate HTTP to the gRPC servicers' own messages and call
those servicers (:mod:`serve.kserve`, :mod:`serve.classifier`) through :class:`_Call`, a stand-in
for a gRPC context, so a request is validated, run and counted by the same code on both ports.

Routes (Triton's and KServe's REST API, version 2)::

    GET  /v2/health/live | /v2/health/ready          200, or 503 while draining (open under a token)
    GET  /v2                                          server metadata
    GET  /v2/models/{m}[/versions/{v}][/ready]        model metadata; readiness (200 or 400)
    POST /v2/models/{m}[/versions/{v}]/infer          JSON tensors, or Triton's binary tensor data
                                                      extension (Inference-Header-Content-Length)
    GET  /v2/models/{m}[/versions/{v}]/config|stats   Triton's model configuration and statistics
    POST /v2/repository/index, /v2/repository/models/{m}/load|unload

and for people with an image and curl, and for the page::

    POST /v1/models/{m}:classify?top_k=K    body: the encoded image; answers ClassifyResponse as
                                            protobuf's JSON mapping
    GET  /v1/models, /v1/latency[?model=m]  ListModels, GetLatencyReport (protobuf's JSON mapping)
    GET  /                                  the page (serve/static: no CDN, works offline)

Errors answer ``{"error": "..."}`` with the HTTP status of the gRPC code
(:data:`serve.errors.HTTP_STATUS`); a body over ``--max-message-mb`` gets 413.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc
import numpy as np
import orjson
from aiohttp import web
from google.protobuf import json_format

from serve import classifier, kserve
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.zoo.serving.v1 import classifier_pb2 as cpb
from serve.core import ServingCore
from serve.errors import HTTP_STATUS, RequestError, shown, status_of

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
BINARY_SIZE = "binary_data_size"
# Paths a client may use without the bearer token: probes, and the page itself (it holds no data;
# what it fetches asks for the token like any client).
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/", "/static/")
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_JSON_TYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


class _Call:
    """What a gRPC servicer asks of its context, for one HTTP request: ``abort`` raises the
    RequestError the handler turns into a status; callbacks (a concurrency slot's release) run
    when the request ends; no deadline; active while the client's connection is open."""

    def __init__(self, request: web.Request) -> None:
        self._transport = request.transport
        self._callbacks: list[Callable[[], None]] = []

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RequestError(code, details)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    def set_code(self, code: grpc.StatusCode) -> None:  # the generated base class's unimplemented methods
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def end(self) -> None:
        for callback in self._callbacks:
            callback()


def error_response(status: int, message: str) -> web.Response:
    # Exactly "application/json", without aiohttp's "; charset=utf-8": KServe's REST client reads
    # the error message only under that content type (JSON is UTF-8 by definition).
    return web.Response(body=json.dumps({"error": message}).encode(), status=status, content_type="application/json")


def plain(message: Any) -> dict[str, Any]:
    """A protobuf message as Triton's REST API writes it: field names as in the .proto, integers
    as JSON numbers, an InferParameter as its value, unset message fields left out."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _plain_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_plain_value(field, v) for v in value]
        elif field.message_type is not None and not message.HasField(field.name):
            continue
        elif field.containing_oneof is not None and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _plain_value(field, value)
    return out


def _plain_value(field: Any, value: Any) -> Any:
    if field.message_type is None:
        if field.enum_type is not None:
            return field.enum_type.values_by_number[value].name
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if "parameter_choice" in field.message_type.oneofs_by_name:  # InferParameter, ModelRepositoryParameter
        which = value.WhichOneof("parameter_choice")
        return getattr(value, which) if which else None
    return plain(value)


def proto_json(message: Any) -> dict[str, Any]:
    """Protobuf's canonical JSON mapping (lowerCamelCase names, 64-bit integers as strings), every
    field present: what a gRPC-JSON gateway answers for the same message."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


# --------------------------------------------------------------------------- infer translation


def _parameter(target: Any, key: str, value: Any) -> None:
    """A JSON parameter into a protobuf parameter map (InferParameter or ModelRepositoryParameter)."""
    field = ("bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int)
             else "double_param" if isinstance(value, float) else "string_param" if isinstance(value, str) else None)
    entry = target[key]
    if field is None or field not in entry.DESCRIPTOR.fields_by_name:
        del target[key]
        raise RequestError(_INVALID, f"parameter {shown(key)} must be a boolean, integer or string")
    setattr(entry, field, value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(_INVALID, f"{what} must be a JSON object")
    return value


def _json_data(tensor: dict[str, Any], name: str, datatype: str, shape: list[int]) -> bytes:
    """A tensor's JSON ``data`` as the little-endian bytes the gRPC servicer reads."""
    if datatype not in _JSON_TYPES:
        return b""  # the servicer names the datatypes it takes
    if "data" not in tensor:
        raise RequestError(_INVALID, f"input {shown(name)} has neither data nor parameters.{BINARY_SIZE}")
    try:
        values = np.asarray(tensor["data"], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise RequestError(_INVALID, f"input {shown(name)} data must be numbers (a flat or nested list)") from None
    count = int(np.prod(shape)) if shape else 1
    if values.size != count:
        raise RequestError(_INVALID, f"input {shown(name)} has {values.size:,} values in data; shape "
                                     f"{kserve._shape_text(shape)} {datatype} needs {count:,}")
    if datatype == "UINT8" and values.size and (values.min() < 0 or values.max() > 255
                                                or not np.array_equal(values, np.round(values))):
        raise RequestError(_INVALID, f"UINT8 input {shown(name)} holds values that are not integers 0 .. 255")
    return values.astype(kserve.DATATYPES[datatype]).tobytes()


def infer_request(body: bytes, header_length: str | None, model: str, version: str) -> tuple[Any, dict[str, bool]]:
    """An HTTP infer request -> the gRPC ``ModelInferRequest`` (every input as raw contents) and,
    per requested output name, whether to answer it as binary data; key "" for outputs the
    request does not list."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(_INVALID, f"{HEADER_LENGTH} {shown(header_length)} is not a length within the "
                                         f"{len(body):,}-byte body")
        head, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)  # a JSON tensor is thousands of numbers: orjson parses them ~5x faster
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(_INVALID, f"the request is not JSON: {e}") from None
    doc = _object(doc, "the request")
    request = kpb.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    offset = 0
    for tensor in doc.get("inputs") or []:
        tensor = _object(tensor, "each input")
        name, datatype = str(tensor.get("name", "")), str(tensor.get("datatype", ""))
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise RequestError(_INVALID, f"input {shown(name)} shape must be a list of integers")
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        parameters = _object(tensor.get("parameters") or {}, f"input {shown(name)} parameters")
        size = parameters.get(BINARY_SIZE)
        for key, value in parameters.items():
            if key != BINARY_SIZE:
                _parameter(entry.parameters, key, value)
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise RequestError(_INVALID, f"input {shown(name)} {BINARY_SIZE} {size!r} runs past the "
                                             f"{len(binary):,} bytes of binary data after the JSON header")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        else:
            request.raw_input_contents.append(_json_data(tensor, name, datatype, [int(d) for d in shape]))
    if offset != len(binary):
        raise RequestError(_INVALID, f"{len(binary) - offset:,} bytes of binary data follow the JSON header "
                                     f"that no input's {BINARY_SIZE} accounts for")
    request_parameters = _object(doc.get("parameters") or {}, "the request's parameters")
    binary_outputs = {"": bool(request_parameters.get("binary_data_output", False))}
    for out in doc.get("outputs") or []:
        out = _object(out, "each output")
        name = str(out.get("name", ""))
        entry = request.outputs.add(name=name)
        parameters = _object(out.get("parameters") or {}, f"output {shown(name)} parameters")
        binary_outputs[name] = bool(parameters.get("binary_data", binary_outputs[""]))
        for key, value in parameters.items():
            if key != "binary_data":
                _parameter(entry.parameters, key, value)
    return request, binary_outputs


def infer_response(response: Any, binary_outputs: dict[str, bool]) -> web.Response:
    """A gRPC ``ModelInferResponse`` as Triton's REST answer: JSON, then the binary outputs."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["parameters"] = plain(response)["parameters"]
    chunks, outputs = [], []
    for i, out in enumerate(response.outputs):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": [int(d) for d in out.shape]}
        raw = response.raw_output_contents[i]
        if binary_outputs.get(out.name, binary_outputs[""]):
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        elif out.datatype == "BYTES":
            items, at = [], 0
            while at < len(raw):
                n = int.from_bytes(raw[at:at + 4], "little")
                items.append(raw[at + 4:at + 4 + n].decode("utf-8", "replace"))
                at += 4 + n
            entry["data"] = items
        else:
            entry["data"] = np.frombuffer(raw, kserve.DATATYPES[out.datatype])  # orjson writes the array
        outputs.append(entry)
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return web.Response(body=head, content_type="application/json")
    return web.Response(body=b"".join([head, *chunks]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(head))})


# --------------------------------------------------------------------------- the application


class HttpApi:
    """The handlers: each parses its request, calls a gRPC servicer method in the worker pool
    (they block on the batchers), and writes the answer."""

    def __init__(self, core: ServingCore, pool: futures.ThreadPoolExecutor, token: str | None,
                 max_body: int) -> None:
        self.core, self.pool, self.max_body = core, pool, max_body
        self.kserve = kserve.KServeServicer(core)
        self.classifier = classifier.ClassifierServicer(core)
        self._expected = f"Bearer {token}".encode() if token else None
        self.inflight = 0
        self.refusing = False  # set once the server stops taking new requests

    async def call(self, request: web.Request, method: Callable[[Any, Any], Any], message: Any) -> Any:
        """``method(message, context)`` in the pool; a RequestError leaves as the HTTP error."""
        call = _Call(request)

        def run() -> Any:
            try:
                return method(message, call)
            except NotImplementedError:  # a method the gRPC servicer leaves to its generated base
                raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"{request.path} is not served by this server")
            finally:
                call.end()
        return await asyncio.get_running_loop().run_in_executor(self.pool, run)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path
        is_open = path in OPEN_PATHS or path.startswith("/static/")
        if self.refusing and not path.startswith("/v2/health/"):
            return error_response(503, "server is shutting down; retry on another replica")
        if self._expected is not None and not is_open:
            value = request.headers.get("Authorization")
            if value is None:
                return error_response(401, "missing 'Authorization: Bearer <token>' header")
            if not hmac.compare_digest(value.encode(), self._expected):
                return error_response(401, "invalid bearer token in the 'Authorization' header")
        self.inflight += 1
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(HTTP_STATUS.get(e.code, 500), e.message)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body over the server's limit of {self.max_body:,} bytes "
                                       "(--max-message-mb)")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.reason)
        except Exception as e:  # the server's own fault: logged under a request id, answered without details
            answer = status_of(e, f"HTTP {request.method} {path}", request.headers.get("X-Request-Id", ""))
            return error_response(HTTP_STATUS.get(answer.code, 500), answer.message)
        finally:
            self.inflight -= 1

    # ------------------------------------------------------------------ health and metadata

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self.core.stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer = self.kserve.ServerMetadata(kpb.ServerMetadataRequest(), None)
        return web.json_response(plain(answer))

    def _model(self, request: web.Request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.call(request, self.kserve.ModelMetadata, kpb.ModelMetadataRequest(name=name,
                                                                                              version=version))
        return web.json_response(plain(answer))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        answer = await self.call(request, self.kserve.ModelReady, kpb.ModelReadyRequest(name=name, version=version))
        if answer.ready:
            return web.json_response({"name": name, "ready": True})
        return error_response(400, f"model {shown(name)}" + (f" version {shown(version)}" if version else "")
                              + " is not ready")

    async def _kserve_json(self, request: web.Request, method: str, message: Any, key: str | None = None) -> Any:
        answer = await self.call(request, self._require(method), message)
        return web.json_response(plain(getattr(answer, key) if key else answer))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        return await self._kserve_json(request, "ModelConfig", kpb.ModelConfigRequest(name=name, version=version),
                                       "config")

    async def model_stats(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return await self._kserve_json(request, "ModelStatistics",
                                       kpb.ModelStatisticsRequest(name=name, version=version))

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        message = kpb.RepositoryIndexRequest(ready=bool(doc.get("ready", False)))
        answer = await self.call(request, self._require("RepositoryIndex"), message)
        return web.json_response(plain(answer)["models"])

    async def repository_load(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        message = kpb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        for key, value in _object(doc.get("parameters") or {}, "parameters").items():
            _parameter(message.parameters, key, value if key != "config" or isinstance(value, str)
                       else json.dumps(value))
        await self.call(request, self._require("RepositoryModelLoad"), message)
        return web.json_response({})

    async def repository_unload(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        message = kpb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        for key, value in _object(doc.get("parameters") or {}, "parameters").items():
            _parameter(message.parameters, key, value)
        await self.call(request, self._require("RepositoryModelUnload"), message)
        return web.json_response({})

    def _require(self, method: str) -> Callable[[Any, Any], Any]:
        fn = getattr(self.kserve, method, None)
        if fn is None:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by this server")
        return fn

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        if not body.strip():
            return {}
        try:
            return _object(json.loads(body), "the request")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(_INVALID, f"the request is not JSON: {e}") from None

    # ------------------------------------------------------------------ inference

    async def infer(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        body = await request.read()
        message, binary_outputs = infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
        answer = await self.call(request, self.kserve.ModelInfer, message)
        return infer_response(answer, binary_outputs)

    async def classify(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            top_k = int(query.get("top_k", "0"))
            version = int(query.get("version", "0"))
        except ValueError:
            raise RequestError(_INVALID, "top_k and version are integers") from None
        body = await request.read()
        message = cpb.ClassifyRequest(model=request.match_info["model"], version=version, top_k=top_k,
                                      request_id=request.headers.get("X-Request-Id", "")[:200],
                                      return_logits=query.get("logits", "") in ("1", "true"))
        if body:
            message.image = body
        answer = await self.call(request, self.classifier.Classify, message)
        return web.json_response(proto_json(answer))

    async def list_models(self, request: web.Request) -> web.Response:
        answer = await self.call(request, self.classifier.ListModels, cpb.ListModelsRequest())
        return web.json_response(proto_json(answer))

    async def latency(self, request: web.Request) -> web.Response:
        message = cpb.LatencyReportRequest(model=request.query.get("model", ""))
        answer = await self.call(request, self.classifier.GetLatencyReport, message)
        return web.json_response(proto_json(answer))

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC_DIR, "index.html"))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=self.max_body)
        r = app.router
        r.add_get("/", self.index)
        r.add_static("/static/", STATIC_DIR)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.model_stats)  # every model's, as Triton answers it
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_post(base + "/infer", self.infer)
            r.add_get(base + "/config", self.model_config)
            r.add_get(base + "/stats", self.model_stats)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.repository_load)
        r.add_post("/v2/repository/models/{model}/unload", self.repository_unload)
        r.add_post("/v1/models/{model}:classify", self.classify)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/latency", self.latency)
        return app


# --------------------------------------------------------------------------- lifecycle


def _ssl_context(tls: tuple[bytes, bytes]) -> ssl.SSLContext:
    """A server context from PEM bytes (``(key, certificate chain)``, as gRPC takes them)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # ssl loads a key and certificate from files only: written to a private file read at once.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "server.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(tls[0] + b"\n" + tls[1])
        context.load_cert_chain(path)
    return context


class HttpServer:
    """The HTTP port of a :class:`serve.server.Server`.

    aiohttp runs on its own event loop in its own thread: the gRPC side is a thread pool and the
    core blocks (a request waits on its batcher), so the loop only parses and writes while each
    core call runs in a thread pool of the gRPC side's size; the loop never blocks, and
    ``Server.start``/``stop`` stay plain calls from any thread.

    The socket is bound here (a taken port fails while the server is built, with the gRPC
    port's message) and listens from :meth:`start`.
    """

    def __init__(self, core: ServingCore, host: str, port: int, *, workers: int, max_body: int,
                 tls: tuple[bytes, bytes] | None = None, token: str | None = None, reuse_port: bool = False) -> None:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        self.sock = socket.socket(family, kind, proto)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind(sockaddr)
            self.ssl_context = _ssl_context(tls) if tls is not None else None
        except BaseException:
            self.sock.close()
            raise
        self.port = int(self.sock.getsockname()[1])
        self.scheme = "https" if tls is not None else "http"
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http")
        self.api = HttpApi(core, self.pool, token, max_body)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-loop", daemon=True)
        self._thread.start()
        self._on_loop(self._start())

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.api.app(), handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)  # stop() has waited for requests in flight
        await self._runner.setup()
        self._site = web.SockSite(self._runner, self.sock, ssl_context=self.ssl_context)
        await self._site.start()

    def _on_loop(self, coroutine: Any, timeout: float | None = None) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def begin_stop(self) -> None:
        """New connections and new requests are refused from now on (503); requests in flight go on."""
        if self._loop is None:
            return

        async def close() -> None:
            self.api.refusing = True
            site, self._site = self._site, None  # once: Server.begin_stop and stop() both call here
            if site is not None:
                await site.stop()
        self._on_loop(close())

    def stop(self, grace: float | None, hurried: Callable[[], bool] = lambda: False) -> None:
        """:meth:`begin_stop`, wait up to ``grace`` seconds for requests in flight (less once
        ``hurried()`` turns true), then close."""
        if self._loop is None:
            self.sock.close()
            self.pool.shutdown(wait=False)
            return
        self.begin_stop()
        end = time.monotonic() + (grace or 0.0)
        while self.api.inflight and time.monotonic() < end and not hurried():
            time.sleep(0.02)
        if self._runner is not None:
            self._on_loop(self._runner.cleanup(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()
