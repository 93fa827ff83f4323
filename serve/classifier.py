"""``zoo.serving.v1.Classifier`` over the serving core: Classify, ClassifyStream, ListModels,
GetLatencyReport. Translates its messages to :class:`serve.core.ServingCore` calls and back;
every failure leaves through :func:`serve.errors.status_of`. Imports neither torch nor zoo.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import numpy as np

from serve import preprocess
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.batching import Pending
from serve.core import ServingCore, deadline_of, split_model
from serve.errors import RequestError, status_of, unknown_model
from serve.runtime import Model
from serve.streams import pipelined


SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
DEFAULT_TOP_K = 5


@dataclass
class _Job:
    """A request between submission to its model's batcher and its answer."""

    request: Any  # pb.ClassifyRequest
    model: Model
    top_k: int
    pending: Pending
    t0: float
    decode_s: float
    preprocess_s: float


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """``zoo.serving.v1.Classifier`` over ``core``."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def _prepare(self, request: Any, deadline: float | None, is_active: Callable[[], bool] | None,
                 t0: float, inline: bool = False) -> _Job:
        """Resolve, decode, preprocess and queue one request (``inline``: it may claim the idle
        model, :meth:`serve.core.ServingCore.submit`: only for a caller that waits for it at once,
        never a stream's read-ahead)."""
        core = self.core
        model = core.resolve(request.model, request.version)
        if request.top_k < 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"invalid top_k {request.top_k}: 0 (= {DEFAULT_TOP_K}) or positive")
        top_k = min(request.top_k or DEFAULT_TOP_K, len(model.labels))
        which = request.WhichOneof("input")
        t = time.perf_counter()
        if which is None:
            raise preprocess.InputError("request has no input: set image (encoded bytes) or tensor")
        if which == "image":
            image = preprocess.decode_image(request.image, core.max_image_pixels)
        else:
            tensor = request.tensor
            kind, array = preprocess.parse_tensor(tensor.shape, tensor.dtype, tensor.data, model.input_size,
                                                  core.max_image_pixels)
            image = preprocess.image_from_pixels(array) if kind == "pixels" else None
        decode_s, t = time.perf_counter() - t, time.perf_counter()
        if image is None:  # a model-ready tensor: nothing to preprocess
            x, preprocess_s = array, 0.0
        else:
            x = core.transform(image, model)
            preprocess_s = time.perf_counter() - t
        pending = core.submit(model, x, deadline, is_active, inline)
        return _Job(request, model, top_k, pending, t0, decode_s, preprocess_s)

    def _complete(self, job: _Job, deadline: float | None) -> Any:
        """Wait for the job's batch and build its response."""
        result = self.core.wait(job.pending, deadline)
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
        self.core.metrics.observe(model.name, total_s, result.queue_s, result.inference_s, result.batch_size)
        return response

    # ------------------------------------------------------------------ RPCs

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.core.unary(context, request.model, "Classify", request.request_id, lambda deadline, t0: (
            self._complete(self._prepare(request, deadline, context.is_active, t0, inline=True), deadline)))

    def ClassifyStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
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
            return status_of(e, "ClassifyStream item", request.request_id)

        # An abandoned job needs nothing: its queued row checks context.is_active itself.
        for index, request, answer in pipelined(request_iterator, context, self.core.stream_window, "classify-stream",
                                                prepare, lambda job: self._complete(job, deadline), fail,
                                                abandon=lambda job: None):
            if isinstance(answer, RequestError):
                self.core.metrics.count(self.core.label(request.model), answer.code.name)
                yield pb.ClassifyStreamResponse(index=index, request_id=request.request_id,
                                                error=pb.ItemError(code=answer.code.value[0], message=answer.message))
            else:
                yield pb.ClassifyStreamResponse(index=index, request_id=request.request_id, response=answer)

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        core, infos = self.core, []
        for m in core.repo.all():
            infos.append(pb.ModelInfo(
                name=m.name, version=m.version, labels=m.labels, input_size=list(m.input_size), mean=m.mean,
                std=m.std, crop_pct=m.crop_pct, precision=m.meta["precision"], norm=m.meta["norm"],
                provider=m.provider, max_batch=core.models.batchers[(m.name, m.version)].max_batch,
                is_default=m.name == core.default_model, source=m.meta["source"]))
        return pb.ListModelsResponse(models=infos, default_model=core.default_model or "")

    def GetLatencyReport(self, request: Any, context: grpc.ServicerContext) -> Any:
        core = self.core
        try:
            name = split_model(request.model)[0] if request.model else ""
        except RequestError as e:
            context.abort(e.code, e.message)
        if name and name not in core.repo.models:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"{unknown_model(name)}; this server serves: {', '.join(core.repo.names())}")
        out = []
        for r in core.latency_report([name] if name else core.repo.names()):
            pct = {k: pb.Percentiles(p50_us=r[k][50], p90_us=r[k][90], p99_us=r[k][99])
                   for k in ("total", "queue", "inference")}
            out.append(pb.ModelLatency(model=r["model"], count=r["count"], window=core.metrics.window,
                                       mean_batch_size=r["mean_batch_size"], total_requests=r["total_requests"],
                                       flops=r["flops"], dense_twin=r["dense_twin"], twin_model=r["twin_model"],
                                       flops_ratio=r["flops_ratio"], latency_ratio=r["latency_ratio"], gap=r["gap"],
                                       **pct))
        return pb.LatencyReportResponse(models=out)
