"""The Open Inference Protocol (KServe v2, Triton's gRPC API): ``inference.GRPCInferenceService``.

Registered by :func:`serve.server.create_server` on the same server and port as
``zoo.serving.v1.Classifier`` (:mod:`serve.classifier`), so a stock ``tritonclient.grpc`` client
(or any client built from ``protos/inference/grpc_predict_v2.proto``) works unchanged. Both
translate their protocol to one :class:`serve.core.ServingCore`: ModelInfer shares the
Classifier's batchers, metrics, ``--max-concurrency`` slots, bearer-token check, model names
(``NAME:VERSION`` in ``model_name`` too) and error table; each row of a request joins its
model's dynamic batcher like one Classify request. Triton's extensions are served the same way:
ModelStreamInfer (ModelInfer per message, answered in order, errors in ``error_message``),
ModelConfig, ModelStatistics and the repository RPCs, each a call to the core
(:meth:`ServingCore.model_config`, :meth:`ServingCore.statistics_of`,
:meth:`ServingCore.repository_index`, :meth:`ServingCore.request_load` / ``request_unload``).

Every model looks as Triton shows an ONNX export with ``config.pbtxt``::

    input   "input"   FP32 [-1, C, H, W]   (also FP16 raw, or UINT8 [-1, H, W, C] raw pixels that
                                            are preprocessed like a decoded image: serve only)
    output  "logits"  FP32 [-1, classes]   or, requested with parameter classification=k,
                      BYTES [-1, k] of "score:index:label", best first (Triton's format)

A request's batch may hold at most the model's ``max_batch_size`` from ``config.pbtxt`` when the
model directory has one, else the server's ``--max-batch``. Raw inputs (``raw_input_contents``)
are answered with ``raw_output_contents``, typed ``contents`` with typed contents. Each answer
carries the parameter ``server_pid`` (int64): the process that ran it, which shows where a load
balancer or ``--workers`` sent it. Request-level parameters are ignored; shared-memory
parameters are refused (INVALID_ARGUMENT). Imports neither torch nor zoo.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import numpy as np

from contract.metadata import INPUT_NAME, OUTPUT_NAME
from serve import preprocess
from serve._proto.inference import grpc_predict_v2_pb2 as pb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from serve.core import ServingCore, Submitted, deadline_of
from serve.errors import RequestError, shown, status_of
from serve.runtime import Model
from serve.streams import pipelined


SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "zoo-serve"
# Triton's names for what it serves beyond the core protocol.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
PLATFORM = "onnxruntime_onnx"  # what Triton reports for the same model.onnx
CLASSIFICATION = "classification"
PID_PARAMETER = "server_pid"
# Accepted input datatypes -> little-endian numpy dtype on the wire.
DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
# The protocol's typed-contents field per accepted datatype (FP16 travels raw only).
TYPED_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_SAME_HOST = ("tensors sharing memory with a client on the same host are out of scope; send them in "
              "raw_input_contents or contents")
_WHY = {"system shared memory": _SAME_HOST, "CUDA shared memory": _SAME_HOST,
        "tracing": "per-request timings are in ModelStatistics, the Prometheus metrics and GetLatencyReport",
        "changing log settings": "the log is configured when the server starts"}
_OUTPUT_PARAMETERS_IGNORED = ("binary_data",)  # an HTTP-protocol hint some clients send over gRPC too


def _server_version() -> str:
    try:
        return importlib.metadata.version("zoo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def parse_version(version: str) -> int:
    """A protocol version string -> the repository's int (0: the newest loaded)."""
    if version == "":
        return 0
    if version.isdigit() and int(version) > 0:
        return int(version)
    raise RequestError(_INVALID, f"invalid model version {shown(version)}: empty (the newest) or a positive integer")


def serialize_bytes(items: list[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def classification_strings(logits: np.ndarray, labels: list[str], k: int) -> list[list[bytes]]:
    """Per row, the top ``k`` classes as Triton writes them: ``b"%f:index:label"``, best first.

    Triton formats the output value with C++ ``std::to_string`` (printf ``%f``) and sorts by
    value (raw logits here, not probabilities); ties keep index order.
    """
    out = []
    for row in logits:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([f"{float(row[i]):f}:{int(i)}:{labels[i]}".encode() for i in top])
    return out


@dataclass
class _Job:
    """A ModelInfer request whose rows are queued: what is needed to answer it."""

    request: Any
    model: Model
    raw: bool
    k: int | None
    t0: float
    submitted: Submitted


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the models, batchers and limits of ``core``."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self.version = _server_version()
        self.pid = os.getpid()  # per servicer: each --workers process builds its own

    # ------------------------------------------------------------------ health and metadata

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Every model is loaded (and has run once) before the server starts listening; from a
        # SIGTERM on (the drain) it is not ready, as health says NOT_SERVING.
        return pb.ServerReadyResponse(ready=not self.core.stopping)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            version = parse_version(request.version)
        except RequestError as e:
            context.abort(e.code, e.message)
        try:
            self.core.resolve(request.name, version)
        except RequestError:  # not served (or named several ways at once): not ready, as Triton answers
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=list(EXTENSIONS))

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self.core.resolve(request.name, parse_version(request.version))
        except RequestError as e:
            context.abort(e.code, e.message)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(v) for v in sorted(self.core.repo.models[model.name])], platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, *model.input_size])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, len(model.labels)])])

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self.core.resolve(request.name, parse_version(request.version))
        except RequestError as e:
            context.abort(e.code, e.message)
        return pb.ModelConfigResponse(config=self.core.model_config(model))

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            chosen = self.core.statistics_of(request.name, parse_version(request.version))
        except RequestError as e:
            context.abort(e.code, e.message)
        response = pb.ModelStatisticsResponse()
        for model, s in chosen:
            out = response.model_stats.add(name=model.name, version=str(model.version),
                                           last_inference=s.last_inference, inference_count=s.inference_count,
                                           execution_count=s.execution_count)
            for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                d = getattr(s, key)
                getattr(out.inference_stats, key).MergeFrom(pb.StatisticDuration(count=d.count, ns=d.ns))
            for size in sorted(s.batches):
                d = s.batches[size]
                # onnxruntime copies input and output inside its run: counted, no time of their own
                out.batch_stats.add(batch_size=size, compute_infer=pb.StatisticDuration(count=d.count, ns=d.ns),
                                    compute_input=pb.StatisticDuration(count=d.count),
                                    compute_output=pb.StatisticDuration(count=d.count))
        return response

    # ------------------------------------------------------------------ repository control

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._one_repository(request.repository_name, context)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=name, version=version, state=state, reason=reason)
            for name, version, state, reason in self.core.models.repository_index(request.ready)])

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._one_repository(request.repository_name, context)
        if request.parameters:
            context.abort(_INVALID, f"load parameters ({', '.join(sorted(shown(k) for k in request.parameters))}) "
                                    "are not supported: a model loads from its files in the repository")
        try:
            self.core.models.request_load(request.model_name)
        except RequestError as e:
            context.abort(e.code, e.message)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._one_repository(request.repository_name, context)
        try:
            self.core.models.request_unload(request.model_name)
        except RequestError as e:
            context.abort(e.code, e.message)
        return pb.RepositoryModelUnloadResponse()

    def _one_repository(self, name: str, context: grpc.ServicerContext) -> None:
        if name:  # Triton's name for one of several repositories; this server has one, unnamed
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown repository {shown(name)}: this server serves one "
                                                     "model repository; leave repository_name empty")

    # ------------------------------------------------------------------ not served

    def _unimplemented(self, context: grpc.ServicerContext, what: str) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by this server: {_WHY[what]}")

    def SystemSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "system shared memory")

    def SystemSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "system shared memory")

    def SystemSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "system shared memory")

    def CudaSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "CUDA shared memory")

    def CudaSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "CUDA shared memory")

    def CudaSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "CUDA shared memory")

    def TraceSetting(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "tracing")

    def LogSettings(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented(context, "changing log settings")

    # ------------------------------------------------------------------ inference

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.core.unary(context, request.model_name, "ModelInfer", request.id, lambda deadline, t0: (
            self._complete(self._prepare(request, deadline, context.is_active, t0, inline=True), deadline)))

    def ModelStreamInfer(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Answers in request order; a request that fails is answered with its error_message and
        the stream goes on. At most ``stream_window`` requests wait between arrival and answer:
        beyond that the stream is not read, and gRPC's flow control holds the client back."""
        release = self.core.acquire_for(context, "")
        try:
            yield from self._stream(request_iterator, context)
        finally:
            release()

    def _stream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        deadline = deadline_of(context)

        def prepare(request: Any) -> _Job:
            return self._prepare(request, deadline, context.is_active, time.perf_counter())

        def fail(e: Exception, request: Any) -> RequestError:
            return status_of(e, "ModelStreamInfer item", request.id)

        for _, request, answer in pipelined(request_iterator, context, self.core.stream_window, "model-stream",
                                            prepare, lambda job: self._complete(job, deadline), fail,
                                            abandon=lambda job: self.core.abandon(job.submitted)):
            if isinstance(answer, RequestError):
                self.core.metrics.count(self.core.label(request.model_name), answer.code.name)
                yield pb.ModelStreamInferResponse(
                    error_message=answer.message,
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         model_version=request.model_version, id=request.id))
            else:
                yield pb.ModelStreamInferResponse(infer_response=answer)

    def _prepare(self, request: Any, deadline: float | None, is_active: Callable[[], bool], t0: float,
                 inline: bool = False) -> _Job:
        """A request checked and its rows queued on the model's batcher (``inline``: a row may
        claim the idle model, :meth:`serve.core.ServingCore.submit`: only for a caller that
        waits for it at once, never a stream's read-ahead)."""
        model = self.core.resolve(request.model_name, parse_version(request.model_version))
        raw = len(request.raw_input_contents) > 0
        batch = self._input(request, model, raw)
        k = self._classification(request)
        return _Job(request, model, raw, k, t0, self.core.begin(model, batch, deadline, is_active, t0, inline))

    def _complete(self, job: _Job, deadline: float | None) -> Any:
        """The answer of a prepared request, once its rows ran."""
        request, model, raw, k, t0 = job.request, job.model, job.raw, job.k, job.t0
        row = self.core.finish(job.submitted, deadline)
        logits = row.logits

        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        response.parameters[PID_PARAMETER].int64_param = self.pid
        out = response.outputs.add(name=OUTPUT_NAME)
        if k is None:
            out.datatype, out.shape[:] = "FP32", list(logits.shape)
            if raw:
                response.raw_output_contents.append(logits.astype("<f4").tobytes())
            else:
                out.contents.fp32_contents.extend(logits.ravel().tolist())
        else:
            k = min(k, len(model.labels))
            rows = classification_strings(logits, model.labels, k)
            out.datatype, out.shape[:] = "BYTES", [len(rows), k]
            flat = [s for row in rows for s in row]
            if raw:
                response.raw_output_contents.append(serialize_bytes(flat))
            else:
                out.contents.bytes_contents.extend(flat)
        self.core.metrics.observe(model.name, time.perf_counter() - t0, row.queue_s, row.inference_s, row.batch_size)
        return response

    def _input(self, request: Any, model: Model, raw: bool) -> np.ndarray:
        """The request's one input as a model-ready float32 batch ``[N, C, H, W]``."""
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
            names = [t.name for t in request.inputs]
            raise RequestError(_INVALID, f"model {shown(model.name)} takes one input named {INPUT_NAME!r}; "
                                         f"the request has {', '.join(shown(n) for n in names) or 'none'}")
        tensor = request.inputs[0]
        for key in tensor.parameters:
            if key.startswith("shared_memory"):
                raise RequestError(_INVALID, "shared-memory inputs are not supported by this server: "
                                             "send the tensor in raw_input_contents or contents")
        if raw and len(request.raw_input_contents) != len(request.inputs):
            raise RequestError(_INVALID, f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                                         f"{len(request.inputs)} input(s): one per input, in input order")
        if raw and tensor.HasField("contents"):
            raise RequestError(_INVALID, f"input {INPUT_NAME!r} sets contents although the request uses "
                                         "raw_input_contents: use one or the other")
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise RequestError(_INVALID, f"input {INPUT_NAME!r} datatype {shown(datatype)} is not supported: expected "
                                         "FP32 [N, C, H, W] (also FP16, or UINT8 [N, H, W, C] pixels)")
        shape = list(tensor.shape)  # int64s: Python ints already
        limit = self.core.models.batch_limit(model)
        c, h, w = model.input_size
        if datatype == "UINT8":
            fits = len(shape) == 4 and shape[3] in (1, 3, 4) and min(shape) >= 1
            expected = "[N, H, W, C] raw pixels with C = 1, 3 or 4"
        else:
            fits = len(shape) == 4 and shape[0] >= 1 and shape[1:] == [c, h, w]
            expected = f"[N, {c}, {h}, {w}]"
        if not fits:
            raise RequestError(_INVALID, f"input {INPUT_NAME!r} shape {_shape_text(shape)} does not fit model "
                                         f"{shown(model.name)}: expected {datatype} {expected}, N = 1 .. {limit}")
        if shape[0] > limit:
            raise RequestError(_INVALID, f"batch size {shape[0]} is over the limit of model {shown(model.name)}: "
                                         f"at most {limit} per request ({self._limit_source(model)}); "
                                         "split the batch")
        if datatype == "UINT8" and shape[1] * shape[2] > self.core.max_image_pixels:
            raise RequestError(_INVALID, f"UINT8 images too large: {shape[2]}x{shape[1]} pixels, the limit is "
                                         f"{self.core.max_image_pixels:,}")
        count = math.prod(shape)
        dtype = DATATYPES[datatype]
        if raw:
            data = request.raw_input_contents[0]
            if len(data) != count * dtype.itemsize:
                raise RequestError(_INVALID, f"input {INPUT_NAME!r} has {len(data):,} bytes of raw contents; shape "
                                             f"{_shape_text(shape)} {datatype} needs {count * dtype.itemsize:,}")
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            field = TYPED_FIELDS.get(datatype)
            if field is None:
                raise RequestError(_INVALID, f"{datatype} input {INPUT_NAME!r} must travel in raw_input_contents "
                                             "(the protocol has no typed contents for it)")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise RequestError(_INVALID, f"input {INPUT_NAME!r} has {len(values):,} values in contents.{field}; "
                                             f"shape {_shape_text(shape)} {datatype} needs {count:,}")
            if datatype == "UINT8":
                wide = np.asarray(values, dtype=np.uint32)
                if wide.size and int(wide.max()) > 255:
                    raise RequestError(_INVALID, f"UINT8 input {INPUT_NAME!r} holds values over 255")
                array = wide.astype(np.uint8).reshape(shape)
            else:
                array = np.asarray(values, dtype=np.float32).reshape(shape)
        if datatype == "UINT8":
            return self._pixels(array, model)
        batch = np.array(array, dtype=np.float32)  # a writable copy: frombuffer views are read-only
        bad = int(np.count_nonzero(~np.isfinite(batch)))
        if bad:
            raise RequestError(_INVALID, f"input {INPUT_NAME!r} holds {bad} NaN or Inf value(s); "
                                         "expected finite numbers")
        return batch

    def _limit_source(self, model: Model) -> str:
        if model.max_batch_size:
            return f"max_batch_size in {os.path.join(self.core.repo.root, model.name, 'config.pbtxt')}"
        return f"the server's --max-batch {self.core.models.max_batch}"

    def _pixels(self, pixels: np.ndarray, model: Model) -> np.ndarray:
        try:
            return np.stack([self.core.transform(preprocess.image_from_pixels(p), model) for p in pixels])
        except preprocess.InputError as e:
            raise RequestError(_INVALID, str(e)) from None

    def _classification(self, request: Any) -> int | None:
        """The requested top k (the classification extension), or None for plain logits."""
        seen, k = set(), None
        for out in request.outputs:
            if out.name != OUTPUT_NAME:
                raise RequestError(_INVALID, f"unknown output {shown(out.name)}: "
                                             f"the model's output is {OUTPUT_NAME!r}")
            if out.name in seen:
                raise RequestError(_INVALID, f"output {OUTPUT_NAME!r} is requested twice")
            seen.add(out.name)
            for key, param in out.parameters.items():
                if key == CLASSIFICATION:
                    which = param.WhichOneof("parameter_choice")
                    if which not in ("int64_param", "uint64_param"):
                        raise RequestError(_INVALID, f"output parameter {CLASSIFICATION!r} must be an integer "
                                                     f"(int64_param), got {which or 'nothing'}")
                    k = int(getattr(param, which))
                    if k < 1:
                        raise RequestError(_INVALID, f"output parameter {CLASSIFICATION!r} is {k}: the number of "
                                                     "classes to return, at least 1")
                elif key.startswith("shared_memory"):
                    raise RequestError(_INVALID, "shared-memory outputs are not supported by this server")
                elif key not in _OUTPUT_PARAMETERS_IGNORED:
                    raise RequestError(_INVALID, f"unknown output parameter {shown(key)}: this server knows "
                                                 f"{CLASSIFICATION!r}")
        return k
