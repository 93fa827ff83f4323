"""The serving core every protocol calls: models, batchers, metrics, concurrency slots, draining.

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

import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
from PIL import Image

from contract.names import split_model_ref
from serve import preprocess
from serve.batching import Batcher, BatchResult, Pending
from serve.errors import RequestError
from serve.metrics import UNKNOWN_MODEL, Metrics
from serve.runtime import Model, Repository

_NO_DEADLINE_S = 1e6  # grpc reports a call without deadline as one ~infinitely far away
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def shown(name: str, limit: int = 80) -> str:
    """A client-supplied name, quoted and bounded, for messages."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


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


def describe(model: Model) -> str:
    """``NAME:VERSION PRECISION``: what the ready line and messages say a model serves as."""
    return f"{model.name}:{model.version} {model.meta['precision']}"


def _abbreviates(requested: str, full: str) -> bool:
    return bool(requested) and (full == requested or full.startswith(requested + "_"))


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
        batchers: one per ``(name, version)`` of ``repository``.
        metrics: Prometheus series and the latency report.
        default_model: the model for requests that name none (None: they must name one).
        max_concurrency: calls (and streams) in flight at once; beyond it RESOURCE_EXHAUSTED.
        stream_window: requests a stream keeps between arrival and answer.
        max_image_pixels: largest decoded image accepted.
        max_batch: the server's ``--max-batch`` (the batch limit of models without config.pbtxt).
    """

    def __init__(self, repository: Repository, batchers: dict[tuple[str, int], Batcher], metrics: Metrics,
                 default_model: str | None, max_concurrency: int, stream_window: int,
                 max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS, max_batch: int = 1) -> None:
        self.repo, self.batchers, self.metrics = repository, batchers, metrics
        self.default_model = default_model
        self.max_concurrency, self.stream_window = max_concurrency, stream_window
        self.max_image_pixels, self.max_batch = max_image_pixels, max_batch
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.stopping = False  # set when the drain begins: readiness probes say no from then on

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
        served = ", ".join(self.repo.names())
        if not name:
            if self.default_model is None:
                raise RequestError(_INVALID, f"request names no model and this server serves several; "
                                             f"set model to one of: {served}")
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
            raise RequestError(_NOT_FOUND, f"unknown model {shown(name)}: models are named exactly; "
                                           f"{' or '.join(repr(c) for c in canonical)} is served under that name")
        raise RequestError(_NOT_FOUND, f"unknown model {shown(name)}; this server serves: {served}")

    def _version_missing(self, name: str, version: int) -> str:
        loaded = sorted(self.repo.models[name])
        serving = ", ".join(describe(self.repo.models[name][v]) for v in loaded)
        message = (f"model {shown(name)} has no version {version} loaded (loaded: {', '.join(map(str, loaded))}); "
                   f"serving {serving}")
        if version in self.repo.on_disk.get(name, ()):
            return message + f"; version {version} is in the repository: start the server with --model {name}:{version}"
        return message + f"; the server serves other versions when started with --model {name}:VERSION (repeatable)"

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

    def batch_limit(self, model: Model) -> int:
        """Rows one request may carry: config.pbtxt's max_batch_size, else ``--max-batch``."""
        return model.max_batch_size or self.max_batch

    # ------------------------------------------------------------------ running

    def transform(self, image: Image.Image, model: Model) -> np.ndarray:
        """A decoded image as the model's input ``[C, H, W]`` (InputError for a bad image)."""
        return preprocess.val_transform(image, model.input_size, model.mean, model.std, model.crop_pct,
                                        self.max_image_pixels)

    def submit(self, model: Model, x: np.ndarray, deadline: float | None,
               is_active: Callable[[], bool] | None = None) -> Pending:
        """Queue one input ``[C, H, W]`` on its model's batcher. Raises the batcher's QueueFull or
        ShuttingDown (:func:`serve.errors.status_of` turns them into the client's answer)."""
        return self.batchers[(model.name, model.version)].submit(x, deadline, is_active)

    def wait(self, pending: Pending, deadline: float | None) -> BatchResult:
        """The batch result of a submitted input. Raises DeadlineExceeded, ShuttingDown, or what
        the model raised."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return pending.wait(timeout)

    def run(self, model: Model, batch: np.ndarray, deadline: float | None,
            is_active: Callable[[], bool] | None = None) -> Row:
        """Each row of ``batch [N, C, H, W]`` through the model's batcher: logits ``[N, classes]``,
        the longest queue and inference time, the largest batch a row ran in."""
        pending: list[Pending] = []
        try:
            for row in batch:
                pending.append(self.submit(model, row, deadline, is_active))
            results = [self.wait(p, deadline) for p in pending]
        except BaseException:
            for p in pending:  # rows still queued are skipped instead of run for nobody
                p.abandoned = True
            raise
        logits = np.stack([r.logits for r in results]).astype(np.float32, copy=False)
        return Row(logits, max(r.queue_s for r in results), max(r.inference_s for r in results),
                   max(r.batch_size for r in results))
