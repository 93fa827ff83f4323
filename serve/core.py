"""The serving core every protocol calls: model names, concurrency slots, running a request, draining.

A protocol's servicer (:mod:`serve.classifier`, :mod:`serve.kserve`) only translates its
messages to these calls and the core's answers back; what a request may name, how many may run
at once, how a row reaches its model's batcher and what an error looks like to the client are
decided here once (errors: :mod:`serve.errors`).

Naming, the same in every protocol: a model is ``NAME`` (the newest version served) or
``NAME:VERSION``, as ``python -m serve --model`` names them; a separate version field says the
same. A name that abbreviates a served model (``resnext50`` for ``resnext50_32x4d``) is refused
with the canonical name in the message, never guessed: a request names one model exactly.
Imports neither torch nor zoo.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from PIL import Image

from contract import repository as layout
from contract.names import split_model_ref
from serve import preprocess, runtime
from serve.batching import BatchResult, Pending
from serve.errors import RequestError, shown, status_of, unknown_model
from serve.metrics import UNKNOWN_MODEL, Metrics
from serve.model_control import ModelControl, describe
from serve.runtime import CUDA, Model, Repository
from serve.statistics import ModelStatistics, Statistics

_NO_DEADLINE_S = 1e6  # grpc reports a call without deadline as one ~infinitely far away
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic``'s clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else time.monotonic() + remaining


def split_model(name: str, version: int = 0) -> tuple[str, int]:
    """``("NAME", VERSION)`` for ``NAME:VERSION`` with a positive VERSION; any other name as it
    is (it then names no served model). A version given both ways must agree."""
    base, named = split_model_ref(name)
    if named is None:
        return name, version
    if version and version != named:
        raise RequestError(_INVALID, f"model {shown(name)} names version {named} but the request's version is "
                                     f"{version}")
    return base, named


def _abbreviates(requested: str, full: str) -> bool:
    return bool(requested) and (full == requested or full.startswith(requested + "_"))


@dataclass
class Submitted:
    """A request's rows queued on its model's batcher (:meth:`ServingCore.begin`)."""

    model: Model
    pending: list[Pending]
    started: float  # the request's arrival, time.perf_counter()
    submitted: float  # its first row queued


@dataclass
class Row:
    """One input's answer from its model's batcher."""

    logits: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int


class ServingCore:
    """What every protocol shares; made by :func:`serve.server.create_server`.

    Args:
        repository: the loaded models.
        metrics: Prometheus series and the latency report.
        default_model: the model for requests that name none (None: they must name one).
        max_concurrency: calls (and streams) in flight at once; beyond it RESOURCE_EXHAUSTED.
        stream_window: requests a stream keeps between arrival and answer.
        max_image_pixels: largest decoded image accepted.
        max_batch: the server's ``--max-batch`` (the batch limit of models without config.pbtxt).
        statistics: per model version, Triton's figures (the batchers' model calls record their
            executions into it: :meth:`Statistics.executed`, from :mod:`serve.model_control`).
        batch_timeout_s: the batchers' wait for a batch to fill (``--batch-timeout-ms``).
        model_control: Triton's ``--model-control-mode`` (:class:`serve.model_control.ModelControl`,
            ``models`` here, loads, unloads and retires versions and owns their batchers).
    """

    def __init__(self, repository: Repository, metrics: Metrics, default_model: str | None, max_concurrency: int,
                 stream_window: int, max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS, max_batch: int = 1,
                 statistics: Statistics | None = None, batch_timeout_s: float = 0.0,
                 model_control: str = "none") -> None:
        self.repo, self.metrics = repository, metrics
        self.statistics = statistics if statistics is not None else Statistics()
        self.models = ModelControl(repository, metrics, self.statistics, mode=model_control, max_batch=max_batch,
                                   batch_timeout_s=batch_timeout_s, max_queue=max_concurrency * stream_window)
        self.default_model = default_model
        self.max_concurrency, self.stream_window = max_concurrency, stream_window
        self.max_image_pixels = max_image_pixels
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.stopping = False  # set when the drain begins: readiness probes say no from then on
        for m in repository.all():
            if "flops" in m.meta:
                metrics.set_flops(m.name, m.version, m.meta["flops"])

    # ------------------------------------------------------------------ names

    def label(self, name: str) -> str:
        """The metrics label for a requested name: the served name, else a fixed one (a client
        cannot grow the series with names of its own)."""
        try:
            name = split_model(name)[0]
        except RequestError:
            pass
        name = name or (self.default_model or "")
        return name if name in self.repo.models else UNKNOWN_MODEL

    def resolve(self, name: str, version: int = 0) -> Model:
        """The served model a request names; RequestError (NOT_FOUND, INVALID_ARGUMENT) says why
        not. Looks in the in-memory table only: a name never reaches the filesystem."""
        name, version = split_model(name, version)
        if not name:
            if self.default_model is None:
                raise RequestError(_INVALID, f"request names no model and this server serves several; "
                                             f"set model to one of: {', '.join(self.repo.names())}")
            name = self.default_model
        if version < 0:
            raise RequestError(_INVALID, f"invalid version {version}: 0 (newest) or a positive integer")
        model = self.repo.get(name, version)
        if model is not None:
            return model
        if name in self.repo.models:
            raise RequestError(_NOT_FOUND, self._version_missing(name, version))
        canonical = [m for m in self.repo.names()
                     if _abbreviates(name, m) or _abbreviates(name, str(self.repo.get(m).meta["model"]))]
        if canonical:
            raise RequestError(_NOT_FOUND, f"{unknown_model(name)}; models are named exactly: "
                                           f"{' or '.join(repr(c) for c in canonical)} is served under that name")
        raise RequestError(_NOT_FOUND, f"{unknown_model(name)}; this server serves: {', '.join(self.repo.names())}")

    def _version_missing(self, name: str, version: int) -> str:
        loaded = sorted(self.repo.models[name])
        serving = ", ".join(describe(self.repo.models[name][v]) for v in loaded)
        message = (f"Request for unknown model: {shown(name)} version {version} is not found (loaded: "
                   f"{', '.join(map(str, loaded))}); serving {serving}")
        if version in self.repo.on_disk.get(name, ()):
            return message + f"; version {version} is in the repository: start the server with --model {name}:{version}"
        return message + f"; the server serves other versions when started with --model {name}:VERSION (repeatable)"

    def statistics_of(self, name: str, version: int = 0) -> list[tuple[Model, ModelStatistics]]:
        """Each loaded version's :class:`ModelStatistics` that ``name`` and ``version`` select:
        an empty name every model, version 0 every loaded version of the name; RequestError as
        :meth:`resolve` for a name or version not served."""
        if not name:
            if version:
                raise RequestError(_INVALID, f"version {version} without a model name: name a model, or neither")
            chosen = self.repo.all()
        else:
            base, named = split_model(name, version)
            if named:
                chosen = [self.resolve(base, named)]
            else:
                chosen = [m for _, m in sorted(self.repo.models.get(base, {}).items())] or [self.resolve(base)]
        return [(m, self.statistics.get(m.name, m.version)) for m in chosen]

    def model_config(self, model: Model) -> layout.ModelConfig:
        """Triton's ModelConfig of a served version: its config.pbtxt when the repository has one,
        completed as Triton completes a config for an ONNX model (what the file leaves out);
        without one, the config Triton would complete for that model.onnx from nothing. Either
        way ``max_batch_size``, the input's format and dims are what this server accepts."""
        labels = os.path.join(self.repo.root, model.name, layout.LABELS_FILE)
        delay_us = round(self.models.batch_timeout_s * 1e6)
        auto = layout.triton_config(model.name, model.input_size, len(model.labels), self.models.batch_limit(model),
                                    delay_us, label_file=layout.LABELS_FILE if os.path.isfile(labels) else "")
        auto.backend = "onnxruntime"
        group = auto.instance_group.add(name=model.name, count=len(model.sessions))
        if model.provider == CUDA:
            group.kind = group.KIND_GPU
            group.gpus.append(0)
        else:
            group.kind = group.KIND_CPU
        loaded = sorted(self.repo.models.get(model.name, {model.version: model}))
        on_disk = self.repo.on_disk.get(model.name, loaded)
        if len(loaded) == 1 and loaded[-1] == max(on_disk, default=loaded[-1]):
            auto.version_policy.latest.num_versions = 1  # Triton's default policy
        else:  # pinned with --model NAME:VERSION
            auto.version_policy.specific.versions.extend(loaded)
        if model.config is None:
            return auto
        config = layout.ModelConfig()
        config.CopyFrom(model.config)
        for name in ("name", "platform", "backend"):
            if not getattr(config, name):
                setattr(config, name, getattr(auto, name))
        for name in ("version_policy", "dynamic_batching"):
            if not config.HasField(name) and not (name == "dynamic_batching" and config.HasField("sequence_batching")):
                getattr(config, name).CopyFrom(getattr(auto, name))
        for name in ("input", "output", "instance_group"):
            if not len(getattr(config, name)):
                getattr(config, name).extend(getattr(auto, name))
        for group in config.instance_group:  # completed as runtime.instance_count reads it
            if not group.count:
                group.count = runtime.group_count(group)
        return config

    def twin_of(self, name: str) -> str | None:
        """The served model that stands for ``name``'s dense twin (metadata zoo.dense_twin): the
        served model exported from that registry name, the one also named so when several are;
        None when the twin is not served or which one it is stays ambiguous."""
        twin = self.repo.get(name).meta.get("dense_twin")
        if not twin:
            return None
        found = [n for n in self.repo.names() if n != name and self.repo.get(n).meta["model"] == twin]
        if twin in found:
            return twin
        return found[0] if len(found) == 1 else None

    def latency_report(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """For each served name: :meth:`Metrics.report` plus ``flops`` and ``dense_twin`` from the
        newest loaded version's metadata (0 and "" when the export does not say) and, against the
        twin when it is served (``twin_model``), ``flops_ratio``, ``latency_ratio`` (inference p50,
        this model over its twin) and ``gap`` = latency_ratio / flops_ratio, as bench.latency
        defines them; each 0 where a figure it needs is unknown. Each model's window is read once,
        so a ratio agrees with the percentiles reported beside it."""
        windows: dict[str, dict[str, Any]] = {}

        def window(n: str) -> dict[str, Any]:
            if n not in windows:
                windows[n] = self.metrics.report(n)
            return windows[n]

        out = []
        for name in names:
            meta = self.repo.get(name).meta
            r = dict(window(name), model=name, flops=meta.get("flops", 0), dense_twin=meta.get("dense_twin", ""),
                     twin_model="", flops_ratio=0.0, latency_ratio=0.0, gap=0.0)
            twin = self.twin_of(name)
            if twin is not None:
                theirs, twin_flops = window(twin), self.repo.get(twin).meta.get("flops", 0)
                mine_p50, their_p50 = r["inference"][50], theirs["inference"][50]
                r["twin_model"] = twin
                r["flops_ratio"] = r["flops"] / twin_flops if r["flops"] and twin_flops else 0.0
                r["latency_ratio"] = mine_p50 / their_p50 if r["count"] and theirs["count"] and their_p50 else 0.0
                if r["flops_ratio"] and r["latency_ratio"]:
                    r["gap"] = r["latency_ratio"] / r["flops_ratio"]
            out.append(r)
        return out

    # ------------------------------------------------------------------ limits

    def acquire(self, name: str) -> Callable[[], None]:
        """A concurrency slot, or RequestError RESOURCE_EXHAUSTED; the returned release frees it
        once however often it is called."""
        if not self.slots.acquire(blocking=False):
            self.metrics.count(self.label(name), grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {self.max_concurrency} requests already in flight "
                               f"(--max-concurrency {self.max_concurrency}); retry later")
        lock, released = threading.Lock(), [False]

        def release() -> None:
            with lock:
                if not released[0]:
                    released[0] = True
                    self.slots.release()
        return release

    def acquire_for(self, context: grpc.ServicerContext, name: str) -> Callable[[], None]:
        """:meth:`acquire` for a gRPC call: aborts it when busy, frees the slot at the call's end
        at the latest (a handler cut short by cancellation frees it too)."""
        try:
            release = self.acquire(name)
        except RequestError as e:
            context.abort(e.code, e.message)
        context.add_callback(release)
        return release

    def unary(self, context: grpc.ServicerContext, name: str, what: str, request_id: str,
              answer: Callable[[float | None, float], Any]) -> Any:
        """One unary inference call (Classify, ModelInfer) for model ``name``: a concurrency slot,
        ``answer(deadline, started)`` for the response, and any failure as the client's status
        (:func:`serve.errors.status_of`), counted, then the call aborted with it."""
        started = time.perf_counter()
        release = self.acquire_for(context, name)
        deadline = deadline_of(context)
        try:
            result = answer(deadline, started)
        except Exception as e:
            result = status_of(e, what, request_id)
        finally:
            release()
        if isinstance(result, RequestError):
            self.metrics.count(self.label(name), result.code.name)
            context.abort(result.code, result.message)
        return result

    # ------------------------------------------------------------------ running

    def transform(self, image: Image.Image, model: Model) -> np.ndarray:
        """A decoded image as the model's input ``[C, H, W]`` (InputError for a bad image)."""
        return preprocess.val_transform(image, model.input_size, model.mean, model.std, model.crop_pct,
                                        self.max_image_pixels)

    def submit(self, model: Model, x: np.ndarray, deadline: float | None,
               is_active: Callable[[], bool] | None = None, inline: bool = False) -> Pending:
        """Queue one input ``[C, H, W]`` on its model's batcher. Raises the batcher's QueueFull or
        ShuttingDown (:func:`serve.errors.status_of` turns them into the client's answer).
        ``inline``: when the model is idle and nothing waits, the input claims it and runs on the
        thread that waits for it (:meth:`serve.batching.Pending.wait`), which must then wait."""
        return self.models.batcher_of(model).submit(x, deadline, is_active, may_claim=inline)

    def wait(self, pending: Pending, deadline: float | None) -> BatchResult:
        """The batch result of a submitted input. Raises DeadlineExceeded, ShuttingDown, or what
        the model raised."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return pending.wait(timeout)

    def run(self, model: Model, batch: np.ndarray, deadline: float | None,
            is_active: Callable[[], bool] | None = None, started: float | None = None) -> Row:
        """Each row of ``batch [N, C, H, W]`` through the model's batcher: logits ``[N, classes]``,
        the longest queue and inference time, the largest batch a row ran in. ``started``: when
        the request arrived (``time.perf_counter``), for its statistics; None: now."""
        return self.finish(self.begin(model, batch, deadline, is_active, started), deadline)

    def begin(self, model: Model, batch: np.ndarray, deadline: float | None,
              is_active: Callable[[], bool] | None = None, started: float | None = None,
              inline: bool = False) -> Submitted:
        """The first half of :meth:`run`: the rows queued, not waited for (a stream queues its
        next request while an earlier one runs). ``inline``: a request of one row may claim the
        idle model (:meth:`submit`); rows of a larger one always queue, together: a row that
        claimed the model would run only once :meth:`finish` reached it, after the rows queued
        before it, which the worker cannot run while the claim holds the model."""
        submitted = time.perf_counter()
        job = Submitted(model, [], submitted if started is None else started, submitted)
        inline = inline and len(batch) == 1
        try:
            for row in batch:
                job.pending.append(self.submit(model, row, deadline, is_active, inline))
        except BaseException:
            self.abandon(job)
            raise
        return job

    def abandon(self, job: Submitted) -> None:
        """Rows still queued are skipped instead of run for nobody; the request counts as failed."""
        for p in job.pending:
            p.abandoned = True
        if self.models.serving(job.model):
            self.statistics.failed(job.model.name, job.model.version, time.perf_counter() - job.started)

    def finish(self, job: Submitted, deadline: float | None) -> Row:
        """The second half of :meth:`run`."""
        try:
            results = [self.wait(p, deadline) for p in job.pending]
        except BaseException:
            self.abandon(job)
            raise
        answered = time.perf_counter()
        # Most calls have one row: a view of it, not np.stack's copy.
        logits = results[0].logits[None] if len(results) == 1 else np.stack([r.logits for r in results])
        out = Row(logits.astype(np.float32, copy=False), max(r.queue_s for r in results),
                  max(r.inference_s for r in results), max(r.batch_size for r in results))
        done = time.perf_counter()
        if self.models.serving(job.model):
            self.statistics.succeeded(job.model.name, job.model.version, done - job.started,
                                      job.submitted - job.started, out.queue_s, out.inference_s, done - answered)
        return out
