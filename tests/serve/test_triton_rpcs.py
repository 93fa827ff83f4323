"""Triton's extensions of the Open Inference Protocol on the serve port: ModelConfig,
ModelStatistics, ModelStreamInfer and Triton's NOT_FOUND wording, through stubs generated from
protos/inference and through a stock ``tritonclient.grpc`` in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

import export.onnx as exp
from contract._proto.inference import model_config_pb2 as mc
from contract.repository import read_config
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve.runtime import load_repository
from tests.serve.conftest import CLASSES, INPUT_SIZE, Gate, running

CODE = grpc.StatusCode
MODEL = "resnext_mini"


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SIZE)).astype(np.float32)


def infer_request(x: np.ndarray, model: str = MODEL, **kwargs) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, **kwargs)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return request


def logits_of(response: kpb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))


def call_error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, **kw)
    return info.value


@pytest.fixture(scope="module")
def triton_repo(exported, tmp_path_factory):
    """resnext_mini exported with --triton (max_batch_size 4)."""
    root = tmp_path_factory.mktemp("triton") / "models"
    code = exp.main([MODEL, "--checkpoint", exported.checkpoints[MODEL], "--out", str(root), "--triton",
                     "--max-batch-size", "4", "--threads", "1", "--no-progress", "--val-samples", "0",
                     "--latency-runs", "0"])
    assert code == 0
    return root


@pytest.fixture
def stub_for():
    channels = []

    def make(port: int) -> kpb_grpc.GRPCInferenceServiceStub:
        channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return kpb_grpc.GRPCInferenceServiceStub(channels[-1])
    yield make
    for c in channels:
        c.close()


# --------------------------------------------------------------------------- ModelConfig


def test_model_config_auto_completed_without_config_pbtxt(repo, stub_for):
    """What Triton completes for a bare model.onnx, with this server's own limits in it."""
    with running(repo, max_batch=6, batch_timeout_ms=1.5) as (_, port):
        stub = stub_for(port)
        config = stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL)).config
        assert stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL, version="1")).config == config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        MODEL, "onnxruntime_onnx", "onnxruntime", 6)
    (inp,) = config.input
    assert (inp.name, inp.data_type, inp.format, list(inp.dims)) == (
        "input", mc.TYPE_FP32, mc.ModelInput.FORMAT_NCHW, INPUT_SIZE)
    (out,) = config.output
    assert (out.name, list(out.dims), out.label_filename) == ("logits", [len(CLASSES)], "labels.txt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    (group,) = config.instance_group
    assert (group.count, group.kind) == (1, mc.ModelInstanceGroup.KIND_CPU)
    assert config.version_policy.latest.num_versions == 1


def test_model_config_from_config_pbtxt(triton_repo, stub_for):
    on_disk = read_config(triton_repo / MODEL / "config.pbtxt")
    repo = load_repository(str(triton_repo), providers="cpu", threads=1)
    with running(repo, max_batch=16) as (_, port):
        config = stub_for(port).ModelConfig(kpb.ModelConfigRequest(name=MODEL)).config
    assert config.max_batch_size == 4  # the file's, not --max-batch
    # Everything the file says is answered as it says it; what it leaves out, Triton's completion.
    completed = mc.ModelConfig()
    completed.CopyFrom(config)
    assert not on_disk.backend and not on_disk.instance_group and not on_disk.HasField("version_policy")
    for name in ("backend", "instance_group", "version_policy"):
        completed.ClearField(name)
    assert completed == on_disk
    assert config.backend == "onnxruntime" and config.version_policy.latest.num_versions == 1


def test_model_config_of_pinned_versions_names_them(exported, tmp_path, stub_for):
    root = tmp_path / "models"
    shutil.copytree(f"{exported.root}/{MODEL}", root / MODEL)
    shutil.copytree(root / MODEL / "1", root / MODEL / "2")
    shutil.copytree(root / MODEL / "1", root / MODEL / "3")
    repo = load_repository(str(root), providers="cpu", threads=1, models=[f"{MODEL}:1", f"{MODEL}:2"])
    with running(repo) as (_, port):
        config = stub_for(port).ModelConfig(kpb.ModelConfigRequest(name=MODEL)).config
    assert list(config.version_policy.specific.versions) == [1, 2]


@pytest.mark.parametrize("request_, code, message", [
    (kpb.ModelConfigRequest(name="no-such-model"), CODE.NOT_FOUND,
     "Request for unknown model: 'no-such-model' is not found; this server serves: densenet_mini, resnext_mini"),
    (kpb.ModelConfigRequest(name=MODEL, version="7"), CODE.NOT_FOUND,
     "Request for unknown model: 'resnext_mini' version 7 is not found"),
    (kpb.ModelConfigRequest(name=MODEL, version="x"), CODE.INVALID_ARGUMENT, "positive integer"),
])
def test_model_config_errors(server, stub_for, request_, code, message):
    err = call_error(stub_for(server[1]).ModelConfig, request_)
    assert err.code() == code and message in err.details()


# --------------------------------------------------------------------------- ModelStatistics


def test_server_metadata_advertises_the_extensions(server, stub_for):
    extensions = stub_for(server[1]).ServerMetadata(kpb.ServerMetadataRequest()).extensions
    assert {"classification", "model_configuration", "statistics"} <= set(extensions)


def test_model_statistics_count_requests_executions_and_batches(exported, stub_for):
    repo = load_repository(exported.root, providers="cpu", threads=1)
    with running(repo, max_batch=8) as (_, port):
        stub = stub_for(port)
        before = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL)).model_stats
        assert [(s.name, s.version, s.inference_count, s.execution_count, s.last_inference) for s in before] == [
            (MODEL, "1", 0, 0, 0)]
        started_ms = time.time() * 1e3
        for n in (3, 1, 2):
            stub.ModelInfer(infer_request(inputs(n)))
        (s,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL, version="1")).model_stats
        other = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="densenet_mini")).model_stats[0]
        everything = stub.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
    assert s.inference_count == 6  # rows, whichever batches they ran in
    assert s.execution_count == sum(b.compute_infer.count for b in s.batch_stats) >= 3
    assert sum(b.batch_size * b.compute_infer.count for b in s.batch_stats) == 6
    assert all(b.compute_infer.ns > 0 and b.compute_input.count == b.compute_infer.count for b in s.batch_stats)
    stats = s.inference_stats
    assert stats.success.count == 3 and stats.fail.count == 0
    for d in (stats.queue, stats.compute_input, stats.compute_infer, stats.compute_output):
        assert d.count == 3
    assert stats.success.ns >= stats.compute_infer.ns > 0
    assert started_ms - 1 <= s.last_inference <= time.time() * 1e3 + 1
    assert (other.inference_count, other.inference_stats.success.count) == (0, 0)  # per model
    assert sorted((m.name, m.version) for m in everything) == [("densenet_mini", "1"), (MODEL, "1")]


def test_model_statistics_count_failures(exported, stub_for):
    repo = load_repository(exported.root, providers="cpu", threads=1, models=[MODEL])
    model = repo.get(MODEL)
    gate = Gate(model.run)
    model.run = gate
    with running(repo, max_batch=1) as (_, port):
        stub = stub_for(port)
        gate.open.clear()
        blocker = stub.ModelInfer.future(infer_request(inputs(1)), timeout=60)
        assert gate.entered.wait(30)
        err = call_error(stub.ModelInfer, infer_request(inputs(1)), timeout=0.3)
        assert err.code() == CODE.DEADLINE_EXCEEDED
        gate.open.set()
        blocker.result()
        end = time.monotonic() + 30  # the server notices the expired call on its own time; only a hang fails
        while True:
            (s,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL)).model_stats
            if s.inference_stats.fail.count or time.monotonic() > end:
                break
            time.sleep(0.05)
    assert (s.inference_stats.success.count, s.inference_stats.fail.count) == (1, 1)
    assert s.inference_count == 1  # the expired request never ran


@pytest.mark.parametrize("request_, code, message", [
    (kpb.ModelStatisticsRequest(name="no-such-model"), CODE.NOT_FOUND,
     "Request for unknown model: 'no-such-model' is not found"),
    (kpb.ModelStatisticsRequest(name=MODEL, version="2"), CODE.NOT_FOUND,
     "Request for unknown model: 'resnext_mini' version 2 is not found"),
    (kpb.ModelStatisticsRequest(version="1"), CODE.INVALID_ARGUMENT, "without a model name"),
])
def test_model_statistics_errors(server, stub_for, request_, code, message):
    err = call_error(stub_for(server[1]).ModelStatistics, request_)
    assert err.code() == code and message in err.details()


# --------------------------------------------------------------------------- ModelStreamInfer


def test_stream_answers_in_order_with_ids_and_errors_keep_it_open(server, stub_for, repo):
    xs = [inputs(n, seed=n) for n in (1, 2, 1)]
    requests = [infer_request(xs[0], id="a"), infer_request(xs[1], model="no-such-model", id="b"),
                infer_request(xs[1], id="c", model_version="9"), infer_request(xs[2], model="densenet_mini", id="d"),
                infer_request(xs[1], id="e")]
    answers = list(stub_for(server[1]).ModelStreamInfer(iter(requests), timeout=60))
    assert [a.infer_response.id for a in answers] == ["a", "b", "c", "d", "e"]
    assert [bool(a.error_message) for a in answers] == [False, True, True, False, False]
    assert answers[1].error_message.startswith("Request for unknown model: 'no-such-model' is not found")
    assert "version 9 is not found" in answers[2].error_message
    for answer, x, name in ((answers[0], xs[0], MODEL), (answers[3], xs[2], "densenet_mini"),
                            (answers[4], xs[1], MODEL)):
        assert answer.infer_response.model_name == name
        want = repo.get(name).run(x)
        np.testing.assert_allclose(logits_of(answer.infer_response), want, rtol=1e-5, atol=1e-5)


def test_stream_holds_back_a_client_that_sends_faster_than_the_model(exported, stub_for):
    """Flow control: with the model stopped, the server reads at most its window of requests."""
    repo = load_repository(exported.root, providers="cpu", threads=1, models=[MODEL])
    model = repo.get(MODEL)
    gate = Gate(model.run)
    model.run = gate
    sent = []

    def produce():
        for i in range(200):
            sent.append(i)
            yield infer_request(inputs(1), id=str(i))

    with running(repo, max_batch=1) as (server, port):
        window = server.core.stream_window
        gate.open.clear()
        answers = stub_for(port).ModelStreamInfer(produce(), timeout=60)
        assert gate.entered.wait(30)
        queued = server.core.models.batchers[(MODEL, 1)]._queue
        end = time.monotonic() + 30  # gRPC buffers what the client sends; wait until it sent all (only a hang fails)
        while len(sent) < 200 and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.5)  # time for a reader without a bound to run ahead; no assertion on time
        # Every request is at the server's door, yet it queued only its window, plus the one the
        # answering loop waits on and the one the reader holds until the window has room.
        assert queued.qsize() <= window + 2
        gate.open.set()
        ids = [a.infer_response.id for a in answers]
    assert ids == [str(i) for i in range(200)] and window < 200


# --------------------------------------------------------------------------- a stock Triton client

TRITON_CLIENT = r"""
import json, queue, sys
from functools import partial
import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

url, model, path = sys.argv[1:4]
client = tg.InferenceServerClient(url)
out = {}
config = client.get_model_config(model, as_json=True)["config"]
out["config"] = [config["name"], config["platform"], config["max_batch_size"], config["input"][0]["format"],
                 [int(d) for d in config["input"][0]["dims"]]]
x = np.load(path)
inp = tg.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
client.infer(model, [inp])
stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
out["stats"] = [stats["name"], stats["version"], int(stats["inference_count"]),
                int(stats["inference_stats"]["success"]["count"])]
try:
    client.get_model_config("no-such-model")
except InferenceServerException as e:
    out["not_found"] = [e.status(), e.message()]
answers = queue.Queue()
client.start_stream(partial(lambda q, result, error: q.put((result, error)), answers))
client.async_stream_infer(model, [inp], request_id="s1")
client.async_stream_infer("no-such-model", [inp], request_id="s2")
client.async_stream_infer(model, [inp], request_id="s3")
got = [answers.get(timeout=60) for _ in range(3)]
client.stop_stream()
out["stream"] = [[r.get_response().id, r.as_numpy("logits").tolist()] if e is None else [None, e.message()]
                 for r, e in got]
print(json.dumps(out))
"""


def test_stock_tritonclient(repo, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:  # importing it here would clash with serve's messages
        pytest.skip("tritonclient is not installed (it is in the dev extra)")
    x = inputs(2, seed=5)
    np.save(tmp_path / "x.npy", x)
    with running(repo, max_batch=8) as (_, port):
        result = subprocess.run([sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{port}", MODEL,
                                 str(tmp_path / "x.npy")], cwd=str(tmp_path), capture_output=True, text=True,
                                timeout=120)  # only a hang reaches it
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["config"] == [MODEL, "onnxruntime_onnx", 8, "FORMAT_NCHW", INPUT_SIZE]
    assert out["stats"] == [MODEL, "1", 2, 1]
    assert out["not_found"][0] == "StatusCode.NOT_FOUND"
    assert out["not_found"][1].startswith("Request for unknown model: 'no-such-model' is not found")
    want = repo.get(MODEL).run(x)
    (id1, l1), (id2, error), (id3, l3) = out["stream"]
    assert (id1, id2, id3) == ("s1", None, "s3")
    assert error.startswith("Request for unknown model: 'no-such-model' is not found")
    for got in (l1, l3):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, what", [
    ("SystemSharedMemoryStatus", "system shared memory"), ("SystemSharedMemoryRegister", "system shared memory"),
    ("SystemSharedMemoryUnregister", "system shared memory"), ("CudaSharedMemoryStatus", "CUDA shared memory"),
    ("CudaSharedMemoryRegister", "CUDA shared memory"), ("CudaSharedMemoryUnregister", "CUDA shared memory"),
    ("TraceSetting", "tracing"), ("LogSettings", "changing log settings")])
def test_rpcs_not_served_say_so_and_why(server, stub_for, method, what):
    request = getattr(kpb, f"{method}Request")()
    err = call_error(getattr(stub_for(server[1]), method), request)
    assert err.code() == CODE.UNIMPLEMENTED
    assert err.details().startswith(f"{what} is not supported by this server: ")
    assert len(err.details()) > len(f"{what} is not supported by this server: ") + 20  # a reason follows
