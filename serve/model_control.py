"""Repository control: which model versions are served, and the lifetime of their batchers.

Triton's ``--model-control-mode``: ``none`` serves the models loaded at start; ``poll`` follows
the repository (:meth:`ModelControl.poll`); ``explicit`` loads and unloads on a client's request
(:meth:`ModelControl.request_load`). A load warms the new files up before one swap of the
version table, so readers see the old set or the new one; a version replaced or unloaded keeps
its batcher :data:`RETIRE_AFTER_S` so what named it still runs on it. Statistics and metric
series belong to the loaded instance of a version, as in Triton. Imports neither torch nor zoo.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Callable

import grpc
import numpy as np

from contract import repository as layout
from contract.names import is_model_name
from serve import runtime
from serve.batching import Batcher
from serve.errors import RequestError, shown, unknown_model
from serve.metrics import Metrics
from serve.runtime import Model, Repository, RepositoryError
from serve.statistics import Statistics

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# A version replaced or unloaded keeps its batcher this long: a request that looked the model up
# just before the swap still queues on it and is answered by the version it named, and what is
# queued runs; then the batcher closes and its session is freed.
RETIRE_AFTER_S = 5.0
log = logging.getLogger("serve")


def describe(model: Model) -> str:
    """``NAME:VERSION PRECISION``: what the ready line and messages say a model serves as."""
    return f"{model.name}:{model.version} {model.meta['precision']}"


class ModelControl:
    """The served versions of ``repository`` (its ``models`` table, swapped here) and a batcher
    for each; made by :class:`serve.core.ServingCore`, which reads both on every request.

    Args:
        repository: the loaded models.
        metrics, statistics: the figures a version's batcher records and a reload starts over.
        mode: one of :data:`MODEL_CONTROL_MODES`.
        max_batch: the server's ``--max-batch`` (the batch limit of models without config.pbtxt).
        batch_timeout_s: the batchers' wait for a batch to fill (``--batch-timeout-ms``).
        max_queue: rows a batcher holds waiting.
    """

    def __init__(self, repository: Repository, metrics: Metrics, statistics: Statistics, *, mode: str,
                 max_batch: int, batch_timeout_s: float, max_queue: int) -> None:
        if mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"Invalid model_control: {mode!r} (one of {', '.join(MODEL_CONTROL_MODES)})")
        self.repo, self.metrics, self.statistics, self.mode = repository, metrics, statistics, mode
        self.max_batch, self.batch_timeout_s, self.max_queue = max_batch, batch_timeout_s, max_queue
        self.batchers: dict[tuple[str, int], Batcher] = {}  # the served (name, version)s' batchers
        self.warmed, self.warmup_s = 0, 0.0  # models warmed up so far, and the seconds it took
        # Called with (name, serving) when a model is loaded or unloaded: health per model.
        self.on_change: Callable[[str, bool], None] = lambda name, serving: None
        self.failures: dict[str, str] = {}  # name -> why its last load failed (RepositoryIndex)
        self._load_lock = threading.Lock()  # one load or unload at a time
        self._failed_files: dict[str, str] = {}  # poll: name -> the files a load failed on
        self._retiring: list[tuple[threading.Timer, Batcher]] = []
        # Every batcher made here, by id of its Model, until it is closed.
        self._own: dict[int, tuple[Model, Batcher]] = {}
        self._own_lock = threading.Lock()

    def batch_limit(self, model: Model) -> int:
        """Rows one request may carry: config.pbtxt's max_batch_size, else ``--max-batch``."""
        return model.max_batch_size or self.max_batch

    def serving(self, model: Model) -> bool:
        """Whether ``model`` is the instance loaded under its version now. Statistics belong to a
        loaded instance, as in Triton (its InferenceStatsAggregator is a member of the Model): a
        request still finishing on a retired one counts for nobody, not for its successor."""
        return (self.repo.models.get(model.name) or {}).get(model.version) is model

    def batcher_of(self, model: Model) -> Batcher:
        """The batcher of the instance a request looked up, retiring or not."""
        with self._own_lock:
            own = self._own.get(id(model))
        return own[1] if own is not None else self.batchers[(model.name, model.version)]

    def start(self) -> None:
        """Warm up and serve every model the repository loaded at start."""
        for m in self.repo.all():
            self.batchers[(m.name, m.version)] = self.start_model(m)

    def start_model(self, model: Model) -> Batcher:
        """Warm ``model`` up (:func:`serve.runtime.warm_up`: batch 1 and its batch limit, or
        config.pbtxt's model_warmup; not when the repository's ``warmup`` is off, and then its
        first requests at each batch size pay onnxruntime's first-run setup) and give it its
        batcher (returned); it serves once it is in the table. A request keeps the Model it looked
        up, so it queues on that object's batcher even when a reload swapped another file in under
        the same version number meanwhile."""
        if self.repo.warmup:
            began = time.perf_counter()
            runtime.warm_up(model, (1, self.batch_limit(model)), os.path.join(self.repo.root, model.name))
            self.warmed, self.warmup_s = self.warmed + 1, self.warmup_s + time.perf_counter() - began

        def run(batch: np.ndarray, instance: int = 0) -> np.ndarray:
            start = time.perf_counter()
            out = model.run(batch, instance)
            if self.serving(model):
                self.statistics.executed(model.name, model.version, len(batch), time.perf_counter() - start)
            return out

        # inline: a unary call that finds its model idle runs it on its own handler thread (no hand-off
        # to the batcher's thread and back); with several instances the batcher's workers run every
        # batch, and with a batch timeout every call waits for its batch to fill, as it asks.
        batcher = Batcher(
            [functools.partial(run, instance=i) for i in range(len(model.sessions))], max_batch=self.max_batch,
            timeout_s=self.batch_timeout_s, max_queue=self.max_queue, name=f"{model.name}:{model.version}",
            on_batch=lambda n, name=model.name: self.metrics.observe_batch(name, n),
            inline=len(model.sessions) == 1 and self.batch_timeout_s == 0)
        with self._own_lock:
            self._own[id(model)] = (model, batcher)  # the model held: its id is not reused meanwhile
        return batcher

    def _start_figures(self, model: Model) -> None:
        """A freshly loaded version's statistics and FLOPs series start over, as a reload in
        Triton starts its statistics over, whatever a version of that number left behind."""
        self.statistics.drop(model.name, model.version)
        self.metrics.drop_version(model.name, model.version)
        if "flops" in model.meta:
            self.metrics.set_flops(model.name, model.version, model.meta["flops"])

    def load(self, name: str) -> list[Model]:
        """Load or reload ``name`` from the repository: the versions its directory and
        version_policy give now; new or replaced files are loaded and warmed up before the swap,
        unchanged ones kept. Returns the versions now served. On any failure nothing changes
        (what served goes on serving) and RepositoryError says why (also kept for
        RepositoryIndex and logged)."""
        with self._load_lock:
            fresh: list[Model] = []
            try:
                versions, available = runtime.load_versions(self.repo, name)
                for model in versions.values():
                    if id(model) not in self._own:
                        self.start_model(model)
                        fresh.append(model)
            except RepositoryError as e:
                for model in fresh:
                    with self._own_lock:
                        self._own.pop(id(model))[1].close()
                self.failures[name] = str(e)
                log.error("loading model %s failed; %s: %s", shown(name),
                          "the loaded versions go on serving" if name in self.repo.models else "not loaded", e)
                raise
            old = self.repo.models.get(name) or {}
            self.repo.on_disk[name] = available
            self.repo.models[name] = dict(versions)  # one assignment: readers see the old or the new set
            for model in fresh:
                self._start_figures(model)
            for version, model in versions.items():
                self.batchers[(name, version)] = self.batcher_of(model)
            for version in set(old) - set(versions):
                self.batchers.pop((name, version), None)
            self.failures.pop(name, None)
            for version, model in old.items():
                if versions.get(version) is not model:
                    self._retire(model)
        if fresh:
            log.info("model %s: serving %s", name, ", ".join(describe(versions[v]) for v in sorted(versions)))
        self.on_change(name, True)
        return [versions[v] for v in sorted(versions)]

    def unload(self, name: str) -> bool:
        """Stop serving ``name`` (requests already queued finish); False when it was not loaded."""
        with self._load_lock:
            old = self.repo.models.pop(name, None)
            self.failures.pop(name, None)
            for version in old or ():
                self.batchers.pop((name, version), None)
        if old is None:
            return False
        for model in old.values():
            self._retire(model)
        log.info("model %s: unloaded", name)
        self.on_change(name, False)
        return True

    def request_load(self, name: str) -> list[Model]:
        """A client's RepositoryModelLoad: :meth:`load`, in explicit mode only; RequestError
        says why not (another mode, a name the repository lacks, a load that failed)."""
        self._explicit_only()
        if not is_model_name(name) or not os.path.isdir(os.path.join(self.repo.root, name)):
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"{unknown_model(name)} in the model repository; it holds: "
                               f"{', '.join(layout.model_names(self.repo.root)) or 'nothing'}")
        try:
            return self.load(name)
        except RepositoryError as e:
            kept = ", ".join(describe(m) for m in self.repo.all() if m.name == name)
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"failed to load {shown(name)}: {e}"
                                                                    + (f"; still serving {kept}" if kept else ""))

    def request_unload(self, name: str) -> None:
        """A client's RepositoryModelUnload: :meth:`unload`, in explicit mode only (a name not
        loaded is no error, as in Triton)."""
        self._explicit_only()
        self.unload(name)

    def _explicit_only(self) -> None:
        if self.mode != "explicit":
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"explicit model load / unload is not allowed: this server runs with "
                               f"--model-control-mode {self.mode} (--model-control-mode explicit allows it)")

    def poll(self) -> None:
        """One look at the repository (``--model-control-mode poll``): a new model or version,
        a replaced model.onnx or config.pbtxt is loaded, a removed one unloaded. A load that
        fails leaves what served serving (and is logged once): it is tried again when the files
        change again."""
        on_disk = set(layout.model_names(self.repo.root))
        for name in sorted(set(self.repo.models) - on_disk):
            self.unload(name)
        for name in sorted(on_disk):
            if self._changed(name):
                try:
                    self.load(name)
                except RepositoryError:
                    self._failed_files[name] = self._fingerprint(name)
                else:
                    self._failed_files.pop(name, None)

    def _fingerprint(self, name: str) -> str:
        model_dir = os.path.join(self.repo.root, name)
        parts = [repr(runtime.file_signature(os.path.join(model_dir, layout.CONFIG_FILE)))]
        for v in layout.versions(model_dir):
            parts.append(f"{v}:{runtime.file_signature(layout.model_file(model_dir, v))}")
        return ";".join(parts)

    def _changed(self, name: str) -> bool:
        if name in self._failed_files:
            return self._failed_files[name] != self._fingerprint(name)
        loaded = self.repo.models.get(name)
        if not loaded:
            return True
        model_dir = os.path.join(self.repo.root, name)
        try:
            config = runtime.read_triton_config(model_dir)
        except RepositoryError:
            return True  # load() says why, once
        wanted = runtime.policy_versions(config, layout.versions(model_dir))
        if config != next(iter(loaded.values())).config or sorted(loaded) != wanted:
            return True
        return any(m.signature != runtime.file_signature(layout.model_file(model_dir, v)) for v, m in loaded.items())

    def repository_index(self, ready_only: bool = False) -> list[tuple[str, str, str, str]]:
        """``(name, version, state, reason)`` for each model of the repository and each loaded
        version, as Triton's RepositoryIndex: READY, or UNAVAILABLE with why (unloaded, or the
        failed load's message) and no version."""
        out = []
        names = set(self.repo.models) | set(layout.model_names(self.repo.root))
        for name in sorted(names):
            versions = self.repo.models.get(name) or {}
            for v in sorted(versions):
                out.append((name, str(v), "READY", ""))
            if not versions and not ready_only:
                out.append((name, "", "UNAVAILABLE", self.failures.get(name, "unloaded")))
        return out

    def _retire(self, model: Model) -> None:
        """Close ``model``'s batcher :data:`RETIRE_AFTER_S` from now (it is out of the table)."""
        with self._own_lock:
            own = self._own.get(id(model))
        if own is None:
            return
        batcher = own[1]

        def close() -> None:
            batcher.close(timeout=30.0)
            if self.repo.get(model.name, model.version) is None:  # not reloaded under the same version
                self.statistics.drop(model.name, model.version)
                self.metrics.drop_version(model.name, model.version)
            with self._own_lock:
                self._own.pop(id(model), None)  # the session is freed with the last reference

        timer = threading.Timer(RETIRE_AFTER_S, close)
        timer.daemon = True
        with self._own_lock:
            self._retiring = [(t, b) for t, b in self._retiring if t.is_alive()] + [(timer, batcher)]
        timer.start()

    def close(self) -> None:
        """Close every batcher, retired ones too (what is queued runs first)."""
        with self._own_lock:
            retiring, self._retiring = self._retiring, []
        for timer, batcher in retiring:
            timer.cancel()
            batcher.close(timeout=5.0)
        for batcher in list(self.batchers.values()):
            batcher.close(timeout=5.0)
        with self._own_lock:
            own, self._own = list(self._own.values()), {}
        for _, batcher in own:
            batcher.close(timeout=5.0)
