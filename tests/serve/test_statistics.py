"""serve.statistics (Triton's ModelStatistics) with hand numbers: figures add up per model
version, durations in nanoseconds, one execution per batch."""
from __future__ import annotations

from serve.statistics import Statistics


def test_figures_add_up_per_version():
    s = Statistics()
    s.executed("m", 1, 4, 0.002)
    s.executed("m", 1, 1, 0.0005)
    s.executed("m", 1, 4, 0.003)
    s.succeeded("m", 1, 0.010, 0.001, 0.002, 0.003, 0.0001)
    s.succeeded("m", 1, 0.020, 0.002, 0.004, 0.006, 0.0002)
    s.failed("m", 1, 0.5)
    s.succeeded("m", 2, 1.0, 0.0, 0.0, 0.0, 0.0)

    one = s.get("m", 1)
    assert (one.execution_count, one.inference_count) == (3, 9)
    assert {size: (d.count, d.ns) for size, d in one.batches.items()} == {4: (2, 5_000_000), 1: (1, 500_000)}
    assert (one.success.count, one.success.ns) == (2, 30_000_000)
    assert (one.queue.count, one.queue.ns) == (2, 6_000_000)
    assert (one.compute_input.ns, one.compute_infer.ns, one.compute_output.ns) == (3_000_000, 9_000_000, 300_000)
    assert (one.fail.count, one.fail.ns) == (1, 500_000_000)
    assert one.last_inference > 0
    two = s.get("m", 2)
    assert (two.success.count, two.success.ns, two.execution_count) == (1, 1_000_000_000, 0)
    assert s.held() == [("m", 1), ("m", 2)]

    s.drop("m", 1)  # an unloaded version starts over
    assert s.get("m", 1).success.count == 0 and s.held() == [("m", 2)]


def test_durations_round_to_the_nearest_nanosecond():
    s = Statistics()
    s.succeeded("m", 1, 1.001, 0.0, 0.0, 0.0, 0.0)  # 1.001 * 1e9 is 1000999999.99... in binary
    assert s.get("m", 1).success.ns == 1_001_000_000


def test_a_negative_duration_counts_as_zero():
    s = Statistics()  # clocks read on two threads can cross by a hair
    s.succeeded("m", 1, 0.001, -1e-9, 0.0, 0.0, 0.0)
    got = s.get("m", 1)
    assert got.compute_input.count == 1 and got.compute_input.ns == 0
