"""The dynamic batcher on its own: gathering, routing, timeouts, deadlines, bounds, shutdown."""
from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np
import pytest

from serve import batching
from serve.batching import BatchFailed, Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from serve.errors import status_of

# How long a test waits for an answer that should come at once: a bound only a hang reaches.
HANG_S = 60


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


def test_lone_request_runs_alone_once_its_window_closes(make):
    rec = Recorder()
    b = make(rec, max_batch=16, timeout_s=0.05)
    result = b.submit(np.ones(2)).wait(HANG_S)  # a batcher that waited for a full batch would hang here
    assert result.batch_size == 1 and rec.sizes == [1]


def test_request_arriving_within_the_window_joins_the_batch(make):
    rec = Recorder()
    # A window no test outlives: the batch can only start because the second request filled it.
    b = make(rec, max_batch=2, timeout_s=3600.0)
    first, second = b.submit(np.full(1, 1.0)), b.submit(np.full(1, 2.0))
    assert [first.wait(HANG_S).logits[0], second.wait(HANG_S).logits[0]] == [1.0, 2.0]
    assert rec.sizes == [2]


def test_max_batch_one_runs_immediately(make):
    rec = Recorder()
    # Without batching the window is never waited for; were it, an hour-long one would be a hang.
    b = make(rec, max_batch=1, timeout_s=3600.0)
    results = [b.submit(np.full(1, float(i))) for i in range(5)]
    assert [r.wait(HANG_S).logits[0] for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rec.sizes == [1] * 5


class _Clock:
    """``time`` for the batcher, with a clock the test can move forward: an hour can pass while
    the model is busy without the test taking an hour."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    def __getattr__(self, name):
        return getattr(time, name)


def test_requests_that_waited_behind_a_busy_model_run_as_soon_as_it_is_free(make, monkeypatch):
    """The batch window counts from the oldest request's arrival: requests that queued while the
    model was busy for longer than the window run together the moment it is free, rather than
    waiting out a fresh window."""
    clock = _Clock()
    monkeypatch.setattr(batching, "time", clock)
    gate = threading.Event()
    rec = Recorder(gate)
    window = 600.0  # were it waited again after the model is free, the waits below would see a hang
    b = make(rec, max_batch=4, timeout_s=window)
    blockers = [b.submit(np.full(1, 100.0)) for _ in range(4)]  # a full batch starts at once
    assert rec.started.wait(HANG_S)
    queued = [b.submit(np.full(1, float(i))) for i in range(3)]  # too few to fill a batch
    clock.ahead = window + 1.0  # ... and they have waited longer than the window
    gate.set()
    for item in blockers:
        item.wait(HANG_S)
    results = [item.wait(HANG_S) for item in queued]
    assert [r.logits[0] for r in results] == [0.0, 1.0, 2.0]
    assert [r.batch_size for r in results] == [3, 3, 3] and rec.sizes == [4, 3]


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


# -0.5: a deadline already gone gives up at once, with no error of another kind.
@pytest.mark.parametrize("timeout", [0.05, -0.5])
def test_waiter_that_gives_up_is_skipped(make, timeout):
    gate = threading.Event()
    rec = Recorder(gate)
    b = make(rec, max_batch=8, timeout_s=0.0)
    first = b.submit(np.full(1, 1.0))
    assert rec.started.wait(5)
    late = b.submit(np.full(1, 5.0))
    with pytest.raises(DeadlineExceeded):
        late.wait(timeout)
    gate.set()
    assert first.wait(HANG_S).logits[0] == 1.0
    assert first.wait(HANG_S).logits[0] == 1.0  # a second wait answers at once, as the first
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


def test_model_failure_reaches_every_caller_of_the_batch_and_the_log_once(make, caplog):
    """Three requests queued behind a busy model run as one batch; when it raises, each caller
    hears of it at once, under a request id of its own. A caller left out would only hear of it at
    its deadline, an hour away, so the waits below would end in DeadlineExceeded instead. The
    server log gets one record for the failure, with the traceback and the three ids, however many
    callers there are and after each was answered (:func:`serve.errors.status_of`)."""
    busy, release = threading.Event(), threading.Event()
    boom = RuntimeError("onnxruntime exploded")
    sizes: list[int] = []

    def model(x):
        sizes.append(len(x))
        if len(sizes) == 1:  # the batch that keeps the model busy
            busy.set()
            assert release.wait(HANG_S)
        elif len(sizes) == 2:
            raise boom
        return np.stack([[float(v.sum()), 0.0] for v in x])
    b = make(model, max_batch=8, timeout_s=0.0)
    b.submit(np.ones(1))
    assert busy.wait(HANG_S)
    queued = [b.submit(np.ones(1), deadline=time.monotonic() + 3600) for _ in range(3)]
    with caplog.at_level(logging.DEBUG):
        release.set()
        failures = []
        for item in queued:
            with pytest.raises(BatchFailed) as info:
                item.wait(HANG_S)
            assert info.value.__cause__ is boom
            failures.append(info.value)
        answers = [status_of(f, "Classify", "client-7") for f in failures]
    assert sizes == [1, 3]
    ids = [f.request_id for f in failures]
    assert len(set(ids)) == 3
    for request_id, answer in zip(ids, answers):
        assert answer.code.name == "INTERNAL"
        assert answer.message == f"internal error (request id {request_id}; the server log has the details)"
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.exc_info[1] is boom
    match = re.fullmatch(r"model: batch of 3 failed \(request ids (\w+), (\w+), (\w+)\)", record.getMessage())
    assert match and match.groups() == tuple(ids)
    assert b.submit(np.full(1, 5.0)).wait(HANG_S).logits[0] == 5.0  # and the worker lives on


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
    with pytest.raises(ValueError, match="no model instance"):
        Batcher([])
    with pytest.raises(ValueError, match="single model instance"):
        Batcher([Recorder(), Recorder()], inline=True)


# ------------------------------------------------------------------ instances: one worker per model instance


def test_instances_run_batches_at_once_each_answer_its_own(make):
    # Each instance's call waits until the other one is inside its own: only instances that run
    # at the same time get past the barrier (one at a time, the first call would break it).
    barrier = threading.Barrier(2, timeout=HANG_S)
    instances = [Recorder(), Recorder()]

    def at_once(rec):
        def run(x):
            barrier.wait()
            return rec(x)
        return run
    b = make([at_once(r) for r in instances], max_batch=1, timeout_s=0.0)  # two batches of one
    assert b.instances == 2
    items = [b.submit(np.full(2, float(i))) for i in range(2)]
    assert [it.wait(HANG_S).logits[0] for it in items] == [0.0, 2.0]
    assert [r.sizes for r in instances] == [[1], [1]]
    barrier.reset()
    # Under load every answer is its own input's, whichever instance ran it.
    b2 = make([Recorder(), Recorder(), Recorder()], max_batch=3, timeout_s=0.0)
    results = [b2.submit(np.full(2, float(i))) for i in range(50)]
    assert [r.wait(HANG_S).logits[0] for r in results] == [2.0 * i for i in range(50)]
    assert sum(len(r.sizes) for r in b2.runs) <= 50 and sum(sum(r.sizes) for r in b2.runs) == 50


def test_close_with_instances_runs_queued_stops_every_worker_then_refuses(make):
    gate = threading.Event()
    instances = [Recorder(gate), Recorder(gate)]
    b = make(instances, max_batch=2, timeout_s=0.0)
    items = [b.submit(np.full(1, float(i))) for i in range(7)]
    threading.Timer(0.05, gate.set).start()
    b.close(timeout=HANG_S)
    assert [it.wait(1).logits[0] for it in items] == [float(i) for i in range(7)]
    assert not any(t.is_alive() for t in b._threads)
    with pytest.raises(ShuttingDown):
        b.submit(np.ones(1))


# ------------------------------------------------------------------ inline: an idle model runs on the caller's thread


class ThreadRecorder(Recorder):
    """A Recorder that also notes which thread ran each call."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__(gate)
        self.threads: list[threading.Thread] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread())
        return super().__call__(x)


def test_inline_request_on_an_idle_model_runs_on_the_callers_thread(make):
    rec = ThreadRecorder()
    b = make(rec, max_batch=8, timeout_s=3600.0, inline=True)
    for i in range(3):  # sequential: the model is idle each time
        result = b.submit(np.full(2, float(i))).wait(HANG_S)
        assert result.logits[0] == 2.0 * i and result.batch_size == 1
    assert rec.threads == [threading.current_thread()] * 3
    assert rec.sizes == [1, 1, 1]


def test_inline_requests_batch_on_the_worker_under_contention(make):
    gate = threading.Event()
    rec = ThreadRecorder(gate)
    b = make(rec, max_batch=4, timeout_s=0.0, inline=True)
    first = b.submit(np.full(2, 100.0))  # claims the idle model; runs when its caller waits
    runner = threading.Thread(target=first.wait, args=(HANG_S,))
    runner.start()
    assert rec.started.wait(HANG_S)
    items = [b.submit(np.full(2, float(i))) for i in range(6)]  # the model is busy: these queue
    assert b._queue.qsize() == 6
    gate.set()
    runner.join(HANG_S)
    for i, item in enumerate(items):
        result = item.wait(HANG_S)
        assert result.logits[0] == 2.0 * i
        assert result.batch_size == (4 if i < 4 else 2)
    assert rec.sizes == [1, 4, 2]
    assert rec.threads[0] is runner and all(t is b._threads[0] for t in rec.threads[1:])
    assert b.submit(np.ones(2)).wait(HANG_S).batch_size == 1  # idle again: inline again
    assert rec.threads[-1] is threading.current_thread()


def test_a_request_the_worker_holds_is_not_overtaken_by_a_later_claim(make):
    """A request the worker has taken off the queue (the queue is empty) and not yet run goes
    first: one submitted as the model comes free queues behind it instead of claiming the model
    and overtaking it."""
    gate = threading.Event()
    rec = ThreadRecorder(gate)
    b = make(rec, max_batch=4, timeout_s=0.0, inline=True)
    first = b.submit(np.full(2, 100.0))  # claims the idle model
    queued = b.submit(np.full(2, 1.0), may_claim=False)  # queues; the worker takes it and waits for the model
    end = time.monotonic() + HANG_S
    while b._queue.qsize():
        assert time.monotonic() < end, "the worker never took the queued request"
        time.sleep(0.001)
    gate.set()
    first.wait(HANG_S)  # runs on this thread and gives the model back...
    later = b.submit(np.full(2, 2.0))  # ...and this, submitted at once, finds it free: it must still queue
    assert queued.wait(HANG_S).logits[0] == 2.0
    assert later.wait(HANG_S).logits[0] == 4.0
    assert rec.seen == [200.0, 2.0, 4.0]
    assert rec.threads[0] is threading.current_thread() and all(t is b._threads[0] for t in rec.threads[1:])


def test_inline_failure_is_reported_like_a_batch_failure(make, caplog):
    boom = RuntimeError("onnxruntime exploded")
    calls: list[int] = []

    def model(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise boom
        return np.stack([[float(v.sum()), 0.0] for v in x])
    b = make(model, max_batch=8, timeout_s=0.0, inline=True)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BatchFailed) as info:
            b.submit(np.ones(1)).wait(HANG_S)
        answer = status_of(info.value, "Classify", "client-7")
    assert info.value.__cause__ is boom
    request_id = info.value.request_id
    assert answer.code.name == "INTERNAL"
    assert answer.message == f"internal error (request id {request_id}; the server log has the details)"
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.exc_info[1] is boom
    assert record.getMessage() == f"model: batch of 1 failed (request id {request_id})"
    assert b.submit(np.full(1, 5.0)).wait(HANG_S).logits[0] == 5.0  # the model was given back


def test_inline_request_abandoned_or_expired_gives_the_model_back(make):
    rec = ThreadRecorder()
    b = make(rec, max_batch=8, timeout_s=0.0, inline=True)
    b.submit(np.ones(1)).abandoned = True  # claimed the model, never waited for
    late = b.submit(np.ones(1), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        late.wait(HANG_S)
    assert rec.sizes == []  # neither ran
    # Both gave the model back: this one runs inline instead of queueing behind a claim that never ends.
    assert b.submit(np.full(1, 3.0)).wait(HANG_S).logits[0] == 3.0
    assert rec.threads == [threading.current_thread()]
