"""gRPC on one event loop (serve/rpc.py): ModelInfer waits for its batch without a thread, a
cancelled call gives back what it held, synchronous handlers keep grpc's synchronous contract,
and the batcher wakes the loop once per burst of answers."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.rpc import Aborted, CallContext, LoopThread, Wakeups
from serve.runtime import load_repository
from tests.serve.conftest import INPUT_SIZE, Gate, running, tensor_request
from tests.serve.test_triton_rpcs import MODEL, infer_request, inputs, logits_of

CODE = grpc.StatusCode
HANG_S = 60  # bounds only a hang reaches


def threads() -> int:
    return threading.active_count()


@pytest.fixture
def gated(exported):
    """A repository whose resnext_mini records each batch's size and can be held."""
    repo = load_repository(exported.root, providers="cpu", threads=1, models=[MODEL])
    model = repo.get(MODEL)
    gate, sizes = Gate(model.run), []
    model.run = lambda x, *instance: (sizes.append(len(x)), gate(x, *instance))[1]
    return repo, gate, sizes


def wait_until(predicate, what: str) -> None:
    end = time.monotonic() + HANG_S
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_model_infer_waits_for_its_batch_without_a_thread(gated):
    repo, gate, sizes = gated
    with running(repo, max_batch=16) as (server, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        x = inputs(25, seed=3)
        gate.open.clear()
        blocker = stub.ModelInfer.future(infer_request(x[:1]), timeout=HANG_S)
        assert gate.entered.wait(HANG_S)  # the model is busy: what comes next waits in the queue
        before = threads()
        calls = [stub.ModelInfer.future(infer_request(x[i:i + 1]), timeout=HANG_S) for i in range(1, 25)]
        queue = server.core.batchers[(MODEL, 1)]._queue
        wait_until(lambda: queue.qsize() == 24, "the calls never reached the queue")
        assert threads() - before < 4, "waiting ModelInfer calls hold threads"
        gate.open.set()
        answers = [blocker.result()] + [c.result() for c in calls]
    assert sizes[0] == 1 and sum(sizes) == 25 and max(sizes) > 1  # the waiting calls ran batched
    want = gate.run(x)
    for i, answer in enumerate(answers):  # each answer is its own input's
        np.testing.assert_allclose(logits_of(answer)[0], want[i], rtol=1e-4, atol=1e-4)


def test_a_cancelled_model_infer_is_skipped_and_frees_its_slot(gated):
    repo, gate, sizes = gated
    with running(repo, max_batch=16, max_concurrency=2) as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        x = inputs(3, seed=4)
        gate.open.clear()
        blocker = stub.ModelInfer.future(infer_request(x[:1]), timeout=HANG_S)
        assert gate.entered.wait(HANG_S)
        queue = server.core.batchers[(MODEL, 1)]._queue
        doomed = stub.ModelInfer.future(infer_request(x[1:2]), timeout=HANG_S)
        wait_until(lambda: queue.qsize() == 1, "the call never reached the queue")
        doomed.cancel()

        def refused() -> bool:  # a call taken now waits for the held model until its deadline
            try:
                stub.ModelInfer(infer_request(x[2:3]), timeout=0.3)
            except grpc.RpcError as e:
                assert e.code() in (CODE.RESOURCE_EXHAUSTED, CODE.DEADLINE_EXCEEDED), e
                return e.code() == CODE.RESOURCE_EXHAUSTED
            return False
        wait_until(lambda: not refused(), "the cancelled call kept its concurrency slot")
        gate.open.set()
        blocker.result()
        assert sizes == [1], "the cancelled (or expired) call's row ran for nobody"
        answer = stub.ModelInfer(infer_request(x[2:3]), timeout=HANG_S)
    np.testing.assert_allclose(logits_of(answer)[0], gate.run(x[2:3])[0], rtol=1e-4, atol=1e-4)
    assert sizes == [1, 1]


def test_a_cancelled_stream_ends_its_handler_and_frees_its_slot(repo):
    """ClassifyStream is a synchronous handler on a worker thread: cancelling the call ends it
    there and gives its concurrency slot back."""
    with running(repo, max_concurrency=1) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        hold = threading.Event()
        x = np.zeros(INPUT_SIZE, np.float32)

        def requests():
            yield tensor_request(x, model=MODEL)
            hold.wait(HANG_S)

        stream = s.ClassifyStream(requests(), timeout=HANG_S)
        assert next(stream).WhichOneof("result") == "response"  # the stream holds the only slot
        stream.cancel()
        end = time.monotonic() + HANG_S
        while True:
            try:
                assert s.Classify(tensor_request(x, model=MODEL), timeout=HANG_S).classes
                break
            except grpc.RpcError as e:
                assert e.code() == CODE.RESOURCE_EXHAUSTED, e
                assert time.monotonic() < end, "the cancelled stream kept its concurrency slot"
                time.sleep(0.05)
        hold.set()


def test_call_context_ends_once_running_its_callbacks():
    call = CallContext(context=None)
    ran = []
    assert call.is_active()
    assert call.add_callback(lambda: ran.append("a")) and call.add_callback(lambda: ran.append("b"))
    call.end()
    call.end()
    assert ran == ["a", "b"] and not call.is_active()
    assert call.add_callback(lambda: ran.append("late")) is False and ran == ["a", "b"]
    with pytest.raises(Aborted) as info:
        call.abort(CODE.NOT_FOUND, "no such model")
    assert (info.value.code, info.value.details) == (CODE.NOT_FOUND, "no such model")


def test_wakeups_run_every_callback_in_order_with_one_wake_per_burst():
    loop_thread = LoopThread("test-loop")
    try:
        loop = loop_thread.loop
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakes.append(1), real(*a, **k))[1]
        wakeups = Wakeups.of(loop)
        assert Wakeups.of(loop) is wakeups
        busy, ran = threading.Event(), []
        real(busy.wait, HANG_S)  # the loop is busy while the burst arrives
        for i in range(50):
            wakeups.call(lambda i=i: ran.append(i))
        busy.set()
        wait_until(lambda: len(ran) == 50, "callbacks were lost")
        assert ran == list(range(50)) and len(wakes) == 1
        wakeups.call(lambda: ran.append(50))  # after the burst: woken again
        wait_until(lambda: len(ran) == 51, "a callback after the burst was lost")
        assert len(wakes) == 2
    finally:
        loop_thread.close()


def test_loop_thread_runs_coroutines_and_closes():
    loop_thread = LoopThread("test-loop")

    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name
    assert loop_thread.run(where(), timeout=HANG_S) == "test-loop"
    loop_thread.close()
    assert loop_thread.loop.is_closed()
    loop_thread.close()  # twice is harmless
