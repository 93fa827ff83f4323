"""Request metrics: Prometheus series and a bounded window of recent latencies per model.

One call, :meth:`Metrics.observe`, feeds both the Prometheus histograms (scraped on
``--metrics-port``) and the window ``GetLatencyReport`` computes p50/p90/p99 from, so the two
always describe the same requests. Each server owns its own registry (tests run several).
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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


class Metrics:
    """Prometheus series for one server, plus latency windows."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.registry = CollectorRegistry()
        self.window = window
        self.requests = Counter("zoo_serve_requests", "Classify and ModelInfer requests by model and gRPC status code",
                                ["model", "code"], registry=self.registry)
        self.total = Histogram("zoo_serve_request_latency_seconds", "Server-side latency of successful requests",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("zoo_serve_queue_latency_seconds", "Time a request waited for its batch to run",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("zoo_serve_inference_latency_seconds",
                                   "onnxruntime time of the batch a request ran in", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("zoo_serve_batch_size", "Requests per onnxruntime call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        # One series per loaded model version; versions exported before zoo.flops have none.
        self.flops = Gauge("zoo_serve_model_flops", "FLOPs of one forward pass at batch 1 and the model's input "
                           "size (a multiply-add counts as 2), from its export", ["model", "version"],
                           registry=self.registry)
        self._lock = threading.Lock()
        self._windows: dict[str, collections.deque[tuple[float, float, float, int]]] = {}
        self._counts: dict[str, int] = collections.Counter()
        # Per model, the labelled series observe() updates: labels() takes a lock and builds a
        # key on every call, on every request's path. Series are never removed, so they keep.
        self._series: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._http: Any = None

    def count(self, model: str, code: str) -> None:
        """One finished request with status ``code`` (e.g. ``"OK"``, ``"INVALID_ARGUMENT"``)."""
        self.requests.labels(model or UNKNOWN_MODEL, code).inc()

    def observe(self, model: str, total_s: float, queue_s: float, inference_s: float, batch_size: int) -> None:
        """One successful request: counted, into the histograms and the model's window."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = (self.requests.labels(model or UNKNOWN_MODEL, "OK"),
                                            self.total.labels(model), self.queue.labels(model),
                                            self.inference.labels(model))
        ok, total, queued, inference = series
        ok.inc()
        total.observe(total_s)
        queued.observe(queue_s)
        inference.observe(inference_s)
        with self._lock:
            win = self._windows.get(model)
            if win is None:
                win = self._windows[model] = collections.deque(maxlen=self.window)
            win.append((total_s, queue_s, inference_s, batch_size))
            self._counts[model] += 1

    def set_flops(self, model: str, version: int, flops: int) -> None:
        self.flops.labels(model, str(version)).set(flops)

    def drop_version(self, model: str, version: int) -> None:
        """Remove an unloaded version's series (a scrape lists what is loaded)."""
        with contextlib.suppress(KeyError):
            self.flops.remove(model, str(version))

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def report(self, model: str) -> dict[str, Any]:
        """``{"count", "total_requests", "total"|"queue"|"inference": {p50, p90, p99} in us,
        "mean_batch_size"}`` over the model's window (zeros when it is empty)."""
        with self._lock:
            samples = list(self._windows.get(model, ()))
            served = self._counts.get(model, 0)
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
