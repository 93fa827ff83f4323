"""Request metrics: Prometheus series and a bounded window of recent latencies per model.

One call, :meth:`Metrics.observe`, feeds both the Prometheus histograms (scraped on
``--metrics-port``) and the window ``GetLatencyReport`` computes p50/p90/p99 from, so the two
always describe the same requests. Each server owns its own registry (tests run several).
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import threading
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Recent successful requests kept per model for GetLatencyReport.
LATENCY_WINDOW = 2048
# Seconds: 100 us .. 10 s, dense where small models on a CPU live (0.5 - 20 ms).
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 5e-2,
                   7.5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
# The model label of requests that named no served model (keeps the label set bounded: model
# names come from clients).
UNKNOWN_MODEL = "unknown"
PERCENTILES = (50, 90, 99)


# What the window keeps per request: (total_s, queue_s, inference_s, batch_size).
_FIELDS = ("total", "queue", "inference", "batch_size")
# The histograms: (name, help, bucket bounds); a model's figures keep them in this order.
_HISTOGRAMS = (
    ("zoo_serve_request_latency_seconds", "Server-side latency of successful requests", LATENCY_BUCKETS),
    ("zoo_serve_queue_latency_seconds", "Time a request waited for its batch to run", LATENCY_BUCKETS),
    ("zoo_serve_inference_latency_seconds", "onnxruntime time of the batch a request ran in", LATENCY_BUCKETS),
    ("zoo_serve_batch_size", "Requests per onnxruntime call", BATCH_BUCKETS),
)
_TOTAL, _QUEUE, _INFERENCE, _BATCH = range(len(_HISTOGRAMS))
_REQUESTS = ("zoo_serve_requests", "Classify and ModelInfer requests by model and gRPC status code")


class _Figures:
    """One model's counts: requests per status code, and per histogram the observations in each
    bucket (not cumulative; the last is +Inf) and their sum."""

    __slots__ = ("codes", "buckets", "sums")

    def __init__(self) -> None:
        self.codes: dict[str, int] = collections.Counter()
        self.buckets = [[0] * (len(bounds) + 1) for _, _, bounds in _HISTOGRAMS]
        self.sums = [0.0] * len(_HISTOGRAMS)

    def add(self, which: int, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's "le" (a value on a bound counts in it).
        self.buckets[which][bisect.bisect_left(_HISTOGRAMS[which][2], value)] += 1
        self.sums[which] += value


class _Collector:
    """The request counter and histograms, as a scrape finds them (Prometheus's Counter and
    Histogram classes take two locks and scan the buckets in Python per observation: four
    observations a request; here one lock, a bisection each, and the sums made at scrape time)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        with self.metrics._lock:
            figures = {m: (dict(f.codes), [list(b) for b in f.buckets], list(f.sums))
                       for m, f in self.metrics._figures.items()}
        requests = CounterMetricFamily(*_REQUESTS, labels=["model", "code"])
        for model, (codes, _, _) in figures.items():
            for code, n in codes.items():
                requests.add_metric([model, code], n)
        yield requests
        for i, (name, help_text, bounds) in enumerate(_HISTOGRAMS):
            family = HistogramMetricFamily(name, help_text, labels=["model"])
            for model, (codes, buckets, sums) in figures.items():
                if i != _BATCH and not codes.get("OK"):  # a model with failures only has no latencies
                    continue
                if i == _BATCH and not any(buckets[i]):
                    continue
                cumulative = list(itertools.accumulate(buckets[i]))
                family.add_metric([model], [(floatToGoString(b), n) for b, n in zip(bounds, cumulative)]
                                  + [("+Inf", cumulative[-1])], sums[i])
            yield family


class Metrics:
    """Prometheus series for one server, plus latency windows."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.registry = CollectorRegistry()
        self.window = window
        # One series per loaded model version; versions exported before zoo.flops have none.
        self.flops = Gauge("zoo_serve_model_flops", "FLOPs of one forward pass at batch 1 and the model's input "
                           "size (a multiply-add counts as 2), from its export", ["model", "version"],
                           registry=self.registry)
        self._lock = threading.Lock()
        self._figures: dict[str, _Figures] = {}
        self._windows: dict[str, collections.deque[tuple[float, float, float, int]]] = {}
        self.registry.register(_Collector(self))
        self._http: Any = None

    def _of(self, model: str) -> _Figures:
        """``model``'s figures (under the lock)."""
        figures = self._figures.get(model)
        if figures is None:
            figures = self._figures[model] = _Figures()
        return figures

    def count(self, model: str, code: str) -> None:
        """One finished request with status ``code`` (e.g. ``"OK"``, ``"INVALID_ARGUMENT"``)."""
        with self._lock:
            self._of(model or UNKNOWN_MODEL).codes[code] += 1

    def observe(self, model: str, total_s: float, queue_s: float, inference_s: float, batch_size: int) -> None:
        """One successful request: counted, into the histograms and the model's window."""
        with self._lock:
            figures = self._of(model or UNKNOWN_MODEL)
            figures.codes["OK"] += 1
            figures.add(_TOTAL, total_s)
            figures.add(_QUEUE, queue_s)
            figures.add(_INFERENCE, inference_s)
            win = self._windows.get(model)
            if win is None:
                win = self._windows[model] = collections.deque(maxlen=self.window)
            win.append((total_s, queue_s, inference_s, batch_size))

    def set_flops(self, model: str, version: int, flops: int) -> None:
        self.flops.labels(model, str(version)).set(flops)

    def drop_version(self, model: str, version: int) -> None:
        """Remove an unloaded version's series (a scrape lists what is loaded)."""
        with contextlib.suppress(KeyError):
            self.flops.remove(model, str(version))

    def observe_batch(self, model: str, size: int) -> None:
        with self._lock:
            self._of(model).add(_BATCH, size)

    def report(self, model: str) -> dict[str, Any]:
        """``{"count", "total_requests", "total"|"queue"|"inference": {p50, p90, p99} in us,
        "mean_batch_size"}`` over the model's window (zeros when it is empty)."""
        with self._lock:
            samples = list(self._windows.get(model, ()))
            figures = self._figures.get(model)
            served = figures.codes["OK"] if figures is not None else 0
        out: dict[str, Any] = {"count": len(samples), "total_requests": served}
        columns = np.array(samples, dtype=np.float64).reshape(-1, len(_FIELDS))
        for i, key in enumerate(_FIELDS[:3]):
            if samples:
                out[key] = dict(zip(PERCENTILES, np.percentile(columns[:, i] * 1e6, PERCENTILES).tolist()))
            else:
                out[key] = dict.fromkeys(PERCENTILES, 0.0)
        out["mean_batch_size"] = float(columns[:, 3].mean()) if samples else 0.0
        return out

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (0: a free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
