"""Triton's per-model statistics (ModelStatistics), kept by the serving core and answered by the
Open Inference Protocol's ModelStatistics and the HTTP port's ``/stats``."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field



@dataclass
class Duration:
    """How often something happened and how long it took in all (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        if seconds > 0:  # int(x + 0.5): round() costs twice as much, on every request's path
            self.ns += int(seconds * 1e9 + 0.5)


@dataclass
class ModelStatistics:
    """One model version's cumulative statistics, as Triton's ModelStatistics defines them.

    Per request (a ModelInfer or Classify call; a stream counts each of its requests): success,
    fail (total time in the server), queue (its longest row's wait for a batch), compute_input
    (parsing, decoding, preprocessing), compute_infer (the onnxruntime call of its batch),
    compute_output (gathering its rows). Per execution (one onnxruntime call): execution_count,
    inference_count (+ its batch size), ``batches[size]`` (the call's time; onnxruntime copies
    the input and output inside that call, so a batch's compute_input and compute_output are
    counted with no time of their own). ``last_inference``: milliseconds since the epoch.
    """

    last_inference: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)


class Statistics:
    """:class:`ModelStatistics` per ``(name, version)``, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, int], ModelStatistics] = {}

    def _of(self, name: str, version: int) -> ModelStatistics:
        s = self._models.get((name, version))
        if s is None:  # not setdefault: that builds a ModelStatistics (seven objects) on every call
            s = self._models[(name, version)] = ModelStatistics()
        return s

    def executed(self, name: str, version: int, batch_size: int, seconds: float) -> None:
        with self._lock:
            s = self._of(name, version)
            s.execution_count += 1
            s.inference_count += batch_size
            s.last_inference = int(time.time() * 1e3)
            s.batches.setdefault(batch_size, Duration()).add(seconds)

    def succeeded(self, name: str, version: int, total_s: float, input_s: float, queue_s: float, infer_s: float,
                  output_s: float) -> None:
        with self._lock:
            s = self._of(name, version)
            s.success.add(total_s)
            s.queue.add(queue_s)
            s.compute_input.add(input_s)
            s.compute_infer.add(infer_s)
            s.compute_output.add(output_s)

    def failed(self, name: str, version: int, total_s: float) -> None:
        with self._lock:
            self._of(name, version).fail.add(total_s)

    def drop(self, name: str, version: int) -> None:
        """Forget an unloaded version (Triton reports loaded models only)."""
        with self._lock:
            self._models.pop((name, version), None)

    def held(self) -> list[tuple[str, int]]:
        """The (name, version) pairs with figures kept."""
        with self._lock:
            return sorted(self._models)

    def get(self, name: str, version: int) -> ModelStatistics:
        """A copy of ``(name, version)``'s figures (zeros before its first request)."""
        with self._lock:
            s = self._models.get((name, version)) or ModelStatistics()
            return ModelStatistics(s.last_inference, s.inference_count, s.execution_count,
                                   *(Duration(d.count, d.ns) for d in (s.success, s.fail, s.queue, s.compute_input,
                                                                       s.compute_infer, s.compute_output)),
                                   batches={k: Duration(d.count, d.ns) for k, d in s.batches.items()})
