"""The dynamic batcher on its own: gathering, routing, timeouts, deadlines, bounds, shutdown."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serve.batching import Batcher, DeadlineExceeded, QueueFull, ShuttingDown


class Recorder:
    """A fake model: logits = [sum of the input, batch position]; records the batch sizes."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.seen: list[float] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.sizes.append(len(x))
        self.seen.extend(float(v.sum()) for v in x)
        return np.stack([[float(v.sum()), i] for i, v in enumerate(x)])


@pytest.fixture
def make():
    made = []

    def _make(run, **kw):
        b = Batcher(run, **kw)
        made.append(b)
        return b
    yield _make
    for b in made:
        b.close(timeout=5)


def test_gathers_up_to_max_batch_and_routes_each_result(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=4, timeout_s=0.05)
    first = b.submit(np.full(2, 100.0))
    assert rec.started.wait(5)  # the worker is busy with `first`: the next ten queue up
    items = [b.submit(np.full(2, float(i))) for i in range(10)]
    gate.set()
    assert first.wait(5).batch_size == 1
    for i, item in enumerate(items):
        result = item.wait(5)
        assert result.logits[0] == 2.0 * i  # its own input's answer
        assert result.batch_size == (4 if i < 8 else 2)
        assert result.queue_s >= 0 and result.inference_s >= 0
    assert rec.sizes == [1, 4, 4, 2]


def test_lone_request_waits_at_most_the_timeout(make):
    b = make(Recorder(), max_batch=16, timeout_s=0.05)
    t = time.monotonic()
    result = b.submit(np.ones(2)).wait(5)
    elapsed = time.monotonic() - t
    assert result.batch_size == 1
    assert 0.045 <= result.queue_s < 0.5 and elapsed < 1.0


def test_max_batch_one_runs_immediately(make):
    rec = Recorder()
    b = make(rec, max_batch=1, timeout_s=10.0)  # the timeout is irrelevant without batching
    t = time.monotonic()
    results = [b.submit(np.full(1, float(i))) for i in range(5)]
    assert [r.wait(5).logits[0] for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert time.monotonic() - t < 2.0 and rec.sizes == [1] * 5


def test_expired_requests_are_dropped_before_running(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=8, timeout_s=0.0)
    blocker = b.submit(np.full(1, 1.0))
    assert rec.started.wait(5)
    doomed = b.submit(np.full(1, 7.0), deadline=time.monotonic() + 0.05)
    cancelled = b.submit(np.full(1, 8.0), is_active=lambda: False)
    alive = b.submit(np.full(1, 9.0), deadline=time.monotonic() + 60)
    time.sleep(0.1)
    gate.set()
    blocker.wait(5)
    assert alive.wait(5).logits[0] == 9.0
    for item in (doomed, cancelled):
        with pytest.raises(DeadlineExceeded):
            item.wait(5)
    assert 7.0 not in rec.seen and 8.0 not in rec.seen


def test_waiter_that_gives_up_is_skipped(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=8, timeout_s=0.0)
    b.submit(np.full(1, 1.0))
    assert rec.started.wait(5)
    late = b.submit(np.full(1, 5.0))
    with pytest.raises(DeadlineExceeded):
        late.wait(0.05)
    gate.set()
    b.close(timeout=5)
    assert 5.0 not in rec.seen


def test_queue_is_bounded(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=1, timeout_s=0.0, max_queue=2)
    b.submit(np.ones(1))
    assert rec.started.wait(5)
    b.submit(np.ones(1))
    b.submit(np.ones(1))
    with pytest.raises(QueueFull, match="2 requests already waiting"):
        b.submit(np.ones(1))
    gate.set()


def test_model_failure_reaches_every_caller_of_the_batch(make):
    def broken(x):
        raise RuntimeError("onnxruntime exploded")
    b = make(broken, max_batch=4, timeout_s=0.0)
    with pytest.raises(RuntimeError, match="exploded"):
        b.submit(np.ones(1)).wait(5)
    with pytest.raises(RuntimeError, match="exploded"):  # and the worker lives on
        b.submit(np.ones(1)).wait(5)


def test_close_runs_queued_then_refuses(make):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=2, timeout_s=0.0)
    items = [b.submit(np.full(1, float(i))) for i in range(3)]
    threading.Timer(0.05, gate.set).start()
    b.close(timeout=5)
    assert [it.wait(1).logits[0] for it in items] == [0.0, 1.0, 2.0]
    with pytest.raises(ShuttingDown):
        b.submit(np.ones(1))


@pytest.mark.parametrize("kw,match", [({"max_batch": 0}, "max_batch: 0"), ({"timeout_s": -1}, "timeout_s: -1")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Batcher(Recorder(), **kw)
