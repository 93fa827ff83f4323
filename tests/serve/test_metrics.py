"""serve.metrics with hand numbers: each Prometheus series gets its own figure of a request, and
the latency window (GetLatencyReport's source) keeps the same requests, per model."""
from __future__ import annotations

import numpy as np
import pytest

from serve.metrics import PERCENTILES, Metrics


def test_each_series_and_the_window_get_their_own_figure():
    m = Metrics(window=3)
    # (total, queue, inference, batch size): four requests of one model, one of another.
    rows = [(0.010, 0.001, 0.004, 1), (0.020, 0.002, 0.005, 2), (0.030, 0.003, 0.006, 4), (0.040, 0.004, 0.007, 8)]
    for r in rows:
        m.observe("a", *r)
    m.observe("b", 0.5, 0.25, 0.125, 16)
    m.count("a", "INVALID_ARGUMENT")
    value = m.registry.get_sample_value
    for name, column in (("request", 0), ("queue", 1), ("inference", 2)):
        series = f"zoo_serve_{name}_latency_seconds"
        assert value(f"{series}_count", {"model": "a"}) == 4
        assert value(f"{series}_sum", {"model": "a"}) == pytest.approx(sum(r[column] for r in rows))
        assert value(f"{series}_sum", {"model": "b"}) == pytest.approx((0.5, 0.25, 0.125)[column])
    assert value("zoo_serve_requests_total", {"model": "a", "code": "OK"}) == 4
    assert value("zoo_serve_requests_total", {"model": "a", "code": "INVALID_ARGUMENT"}) == 1
    assert value("zoo_serve_requests_total", {"model": "b", "code": "OK"}) == 1

    report = m.report("a")  # the window holds the last three of "a" only
    assert report["count"] == 3 and report["total_requests"] == 4
    for key, column in (("total", 0), ("queue", 1), ("inference", 2)):
        expected = np.percentile([r[column] * 1e6 for r in rows[1:]], PERCENTILES)
        assert [report[key][p] for p in PERCENTILES] == pytest.approx(expected.tolist())
    assert report["mean_batch_size"] == pytest.approx((2 + 4 + 8) / 3)


def test_a_model_not_served_yet_reports_zeros():
    report = Metrics().report("nothing")
    assert report["count"] == 0 and report["total_requests"] == 0 and report["mean_batch_size"] == 0.0
    assert all(v == 0.0 for key in ("total", "queue", "inference") for v in report[key].values())


def test_buckets_are_cumulative_and_a_value_on_a_bound_counts_in_it():
    m = Metrics()
    # Request latencies: 1 ms exactly (a bound: its bucket, Prometheus's "le"), 1.5 ms, 20 s (past the last bound).
    for total in (0.001, 0.0015, 20.0):
        m.observe("a", total, 0.0, 0.0, 1)
    for size in (1, 5, 5, 16):  # batch sizes: 5 falls between the bounds 4 and 6
        m.observe_batch("a", size)
    m.count("b", "NOT_FOUND")  # a model with failures only
    value = m.registry.get_sample_value
    bucket = "zoo_serve_request_latency_seconds_bucket"
    assert value(bucket, {"model": "a", "le": "0.0005"}) == 0
    assert value(bucket, {"model": "a", "le": "0.001"}) == 1
    assert value(bucket, {"model": "a", "le": "0.002"}) == 2
    assert value(bucket, {"model": "a", "le": "10.0"}) == 2
    assert value(bucket, {"model": "a", "le": "+Inf"}) == 3
    assert value("zoo_serve_request_latency_seconds_count", {"model": "a"}) == 3
    sizes = "zoo_serve_batch_size_bucket"
    assert [value(sizes, {"model": "a", "le": le}) for le in ("1.0", "4.0", "6.0", "12.0", "16.0", "+Inf")] == \
        [1, 1, 3, 3, 4, 4]
    assert value("zoo_serve_batch_size_sum", {"model": "a"}) == 27
    assert value("zoo_serve_requests_total", {"model": "b", "code": "NOT_FOUND"}) == 1
    assert value("zoo_serve_request_latency_seconds_count", {"model": "b"}) is None  # no latencies of failures
    assert value("zoo_serve_batch_size_count", {"model": "b"}) is None
