"""The Open Inference Protocol (``inference.GRPCInferenceService``) on the serve port: every RPC
through stubs generated from protos/inference/grpc_predict_v2.proto, and through a stock
``tritonclient.grpc`` in a subprocess; raw and typed contents, the classification extension,
bad input, limits, auth, and a repository written by ``export --triton``."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

import export.onnx as exp
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import load_repository
from tests.serve.conftest import CLASSES, INPUT_SIZE, REPO_ROOT, SERVE_MODELS, random_image, running, tensor_request

CODE = grpc.StatusCode
MODEL = "resnext_mini"
TOKEN = "kserve-token"


@pytest.fixture(scope="module")
def kserve(server):
    """A stub for the shared test server, and that server."""
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel), server[0]


def infer_request(x: np.ndarray, model: str = MODEL, datatype: str = "FP32", raw: bool = True,
                  classification: int | None = None, **kwargs) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, **kwargs)
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    elif datatype == "UINT8":
        tensor.contents.uint_contents.extend(x.ravel().tolist())
    if classification is not None:
        request.outputs.add(name="logits").parameters["classification"].int64_param = classification
    return request


def logits_of(response: kpb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    assert (out.name, out.datatype) == ("logits", "FP32")
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[0], "<f4")
    else:
        values = np.asarray(out.contents.fp32_contents, np.float32)
    return values.reshape(list(out.shape))


def bytes_elements(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        items.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return items


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SIZE)).astype(np.float32)


def call_error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, **kw)
    return info.value


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_never_imports_torch_zoo_or_tritonclient():
    code = ("import sys, serve.kserve, serve.server\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zoo', 'tritonclient'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- health and metadata


def test_live_ready_and_model_ready(kserve):
    stub, _ = kserve
    assert stub.ServerLive(kpb.ServerLiveRequest()).live
    assert stub.ServerReady(kpb.ServerReadyRequest()).ready
    for name in SERVE_MODELS:
        assert stub.ModelReady(kpb.ModelReadyRequest(name=name)).ready
        assert stub.ModelReady(kpb.ModelReadyRequest(name=name, version="1")).ready
        assert not stub.ModelReady(kpb.ModelReadyRequest(name=name, version="2")).ready
    assert not stub.ModelReady(kpb.ModelReadyRequest(name="no-such-model")).ready
    err = call_error(stub.ModelReady, kpb.ModelReadyRequest(name=MODEL, version="latest"))
    assert err.code() == CODE.INVALID_ARGUMENT and "positive integer" in err.details()


def test_server_metadata_advertises_classification(kserve):
    meta = kserve[0].ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "zoo-serve" and meta.version and "classification" in meta.extensions


@pytest.mark.parametrize("name", SERVE_MODELS)
def test_model_metadata(kserve, name):
    stub, _ = kserve
    meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name=name))
    assert (meta.name, list(meta.versions), meta.platform) == (name, ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, *INPUT_SIZE])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, len(CLASSES)])]
    assert stub.ModelMetadata(kpb.ModelMetadataRequest(name=name, version="1")).name == name


@pytest.mark.parametrize("request_, code, message", [
    (kpb.ModelMetadataRequest(name="no-such-model"), CODE.NOT_FOUND,
     "Request for unknown model: 'no-such-model' is not found"),
    (kpb.ModelMetadataRequest(name=MODEL, version="7"), CODE.NOT_FOUND, "version 7 is not found"),
    (kpb.ModelMetadataRequest(name=MODEL, version="-1"), CODE.INVALID_ARGUMENT, "positive integer"),
    (kpb.ModelMetadataRequest(), CODE.INVALID_ARGUMENT, "names no model"),  # two models served: name one
])
def test_model_metadata_errors(kserve, request_, code, message):
    err = call_error(kserve[0].ModelMetadata, request_)
    assert err.code() == code and message in err.details()


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name", SERVE_MODELS)
def test_infer_fp32_matches_onnxruntime(kserve, repo, name, n, raw):
    stub, _ = kserve
    x = inputs(n, seed=n)
    response = stub.ModelInfer(infer_request(x, model=name, raw=raw, id=f"req-{n}"))
    assert (response.model_name, response.model_version, response.id) == (name, "1", f"req-{n}")
    assert bool(response.raw_output_contents) == raw  # answered the way it was asked
    assert response.parameters["server_pid"].int64_param == os.getpid()
    assert_close(logits_of(response), repo.get(name).session.run(["logits"], {"input": x})[0])


def test_infer_requests_join_the_dynamic_batcher(repo):
    with running(repo, batch_timeout_ms=500.0) as (server, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            futures = [stub.ModelInfer.future(infer_request(inputs(2, seed=i))) for i in range(3)]
            for i, f in enumerate(futures):
                assert_close(logits_of(f.result(timeout=30)),
                             repo.get(MODEL).session.run(["logits"], {"input": inputs(2, seed=i)})[0])
        report = server.metrics.report(MODEL)
        assert report["total_requests"] == 3 and report["mean_batch_size"] > 2  # rows of several requests ran together


def test_infer_fp16_and_uint8_pixels(kserve, server):
    stub, _ = kserve
    x = inputs(2, seed=5).astype(np.float16)
    half = logits_of(stub.ModelInfer(infer_request(x, datatype="FP16")))
    full = logits_of(stub.ModelInfer(infer_request(x.astype(np.float32))))
    assert_close(half, full)
    pixels = np.stack([random_image(1), random_image(2)])  # [2, H, W, 3] uint8
    for raw in (True, False):
        by_kserve = logits_of(stub.ModelInfer(infer_request(pixels, datatype="UINT8", raw=raw)))
        with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:  # the Classify path preprocesses the same
            classify = pb_grpc.ClassifierStub(channel).Classify
            for i in range(2):
                r = classify(tensor_request(pixels[i], model=MODEL, return_logits=True))
                assert_close(by_kserve[i], np.asarray(r.logits, np.float32))


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_classification_extension(kserve, repo, raw):
    stub, _ = kserve
    x = inputs(3, seed=9)
    logits = repo.get(MODEL).session.run(["logits"], {"input": x})[0]
    response = stub.ModelInfer(infer_request(x, raw=raw, classification=4))
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "BYTES", [3, 4])
    items = bytes_elements(response.raw_output_contents[0]) if raw else list(out.contents.bytes_contents)
    assert len(items) == 12
    for row in range(3):
        want = np.argsort(-logits[row], kind="stable")[:4]
        parsed = [s.decode().split(":") for s in items[row * 4:(row + 1) * 4]]
        assert [int(p[1]) for p in parsed] == list(want)  # best first
        for (score, index, label), i in zip(parsed, want):
            assert label == CLASSES[i] and score == f"{float(logits[row, i]):f}"  # Triton's std::to_string
    everything = stub.ModelInfer(infer_request(x, classification=100))  # capped at the number of classes
    assert list(everything.outputs[0].shape) == [3, len(CLASSES)]


# --------------------------------------------------------------------------- errors


def _with(request: kpb.ModelInferRequest, edit) -> kpb.ModelInferRequest:
    edit(request)
    return request


X1 = inputs(1)
BAD_REQUESTS = {
    "datatype": (infer_request(X1.astype(np.int64), datatype="INT64"), CODE.INVALID_ARGUMENT,
                 "datatype 'INT64' is not supported"),
    "shape": (infer_request(inputs(1)[:, :, :16, :16]), CODE.INVALID_ARGUMENT,
              "shape [1, 3, 16, 16] does not fit model 'resnext_mini': expected FP32 [N, 3, 32, 32]"),
    "rank": (infer_request(X1[0]), CODE.INVALID_ARGUMENT, "shape [3, 32, 32] does not fit"),
    "byte count": (_with(infer_request(X1), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 100)),
                   CODE.INVALID_ARGUMENT, "has 100 bytes of raw contents; shape [1, 3, 32, 32] FP32 needs 12,288"),
    "typed count": (_with(infer_request(X1, raw=False), lambda r: r.inputs[0].contents.fp32_contents.pop()),
                    CODE.INVALID_ARGUMENT,
                    "has 3,071 values in contents.fp32_contents; shape [1, 3, 32, 32] FP32 needs 3,072"),
    "typed in the wrong field": (_with(infer_request(X1, raw=False), lambda r: (
        r.inputs[0].contents.ClearField("fp32_contents"), r.inputs[0].contents.fp64_contents.extend([0.0] * 3072))),
        CODE.INVALID_ARGUMENT, "has 0 values in contents.fp32_contents"),
    "raw and typed": (_with(infer_request(X1), lambda r: r.inputs[0].contents.fp32_contents.append(1.0)),
                      CODE.INVALID_ARGUMENT, "use one or the other"),
    "typed FP16": (infer_request(X1.astype(np.float16), datatype="FP16", raw=False), CODE.INVALID_ARGUMENT,
                   "FP16 input 'input' must travel in raw_input_contents"),
    "unknown model": (infer_request(X1, model="no-such-model"), CODE.NOT_FOUND,
                      "Request for unknown model: 'no-such-model' is not found; this server serves: densenet_mini, "
                      "resnext_mini"),
    "unknown version": (infer_request(X1, model_version="3"), CODE.NOT_FOUND, "version 3 is not found"),
    "input name": (_with(infer_request(X1), lambda r: setattr(r.inputs[0], "name", "image")),
                   CODE.INVALID_ARGUMENT, "takes one input named 'input'; the request has 'image'"),
    "no input": (kpb.ModelInferRequest(model_name=MODEL), CODE.INVALID_ARGUMENT, "the request has none"),
    "unknown output": (_with(infer_request(X1), lambda r: r.outputs.add(name="probs")), CODE.INVALID_ARGUMENT,
                       "unknown output 'probs'"),
    "classification 0": (_with(infer_request(X1), lambda r: r.outputs.add(name="logits").parameters[
        "classification"].CopyFrom(kpb.InferParameter(int64_param=0))), CODE.INVALID_ARGUMENT, "at least 1"),
    "classification string": (_with(infer_request(X1), lambda r: r.outputs.add(name="logits").parameters[
        "classification"].CopyFrom(kpb.InferParameter(string_param="3"))), CODE.INVALID_ARGUMENT, "must be an integer"),
    "shared memory": (_with(infer_request(X1), lambda r: r.inputs[0].parameters["shared_memory_region"].CopyFrom(
        kpb.InferParameter(string_param="r"))), CODE.INVALID_ARGUMENT, "shared-memory inputs are not supported"),
    "batch too large": (infer_request(inputs(17)), CODE.INVALID_ARGUMENT,
                        "batch size 17 is over the limit of model 'resnext_mini': at most 16 per request "
                        "(the server's --max-batch 16)"),
    "NaN": (infer_request(np.full((1, *INPUT_SIZE), np.nan, np.float32)), CODE.INVALID_ARGUMENT,
            "3072 NaN or Inf value(s)"),
    "pixels shape": (infer_request(np.zeros((1, 8, 8, 2), np.uint8), datatype="UINT8"), CODE.INVALID_ARGUMENT,
                     "expected UINT8 [N, H, W, C] raw pixels with C = 1, 3 or 4"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_infer_request(kserve, case):
    stub, server = kserve
    request, code, message = BAD_REQUESTS[case]
    err = call_error(stub.ModelInfer, request)
    assert err.code() == code and message in err.details(), err.details()
    assert stub.ModelInfer(infer_request(X1)).outputs  # and the server keeps serving


def test_infer_counted_in_metrics(kserve):
    stub, server = kserve
    before = server.metrics.report(MODEL)["total_requests"]
    stub.ModelInfer(infer_request(X1))
    call_error(stub.ModelInfer, infer_request(X1.astype(np.int64), datatype="INT64"))
    assert server.metrics.report(MODEL)["total_requests"] == before + 1
    assert server.metrics.registry.get_sample_value("zoo_serve_requests_total",
                                                    {"model": MODEL, "code": "INVALID_ARGUMENT"}) >= 1


def test_infer_shares_max_concurrency(repo):
    with running(repo, max_concurrency=1) as (server, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert server.core.slots.acquire(blocking=False)  # the one slot, as a Classify call in flight
            try:
                err = call_error(stub.ModelInfer, infer_request(X1))
                assert err.code() == CODE.RESOURCE_EXHAUSTED and "--max-concurrency 1" in err.details()
            finally:
                server.core.slots.release()
            assert stub.ModelInfer(infer_request(X1)).outputs


def test_bearer_token(repo):
    with running(repo, token=TOKEN) as (_, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            err = call_error(stub.ModelInfer, infer_request(X1))
            assert err.code() == CODE.UNAUTHENTICATED and "authorization: Bearer" in err.details()
            err = call_error(stub.ModelMetadata, kpb.ModelMetadataRequest(name=MODEL))
            assert err.code() == CODE.UNAUTHENTICATED
            auth = [("authorization", f"Bearer {TOKEN}")]
            assert stub.ModelInfer(infer_request(X1), metadata=auth).outputs
            # Liveness and readiness stay open, like grpc.health.v1 (probes carry no token).
            assert stub.ServerLive(kpb.ServerLiveRequest()).live and stub.ServerReady(kpb.ServerReadyRequest()).ready


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        r = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "inference.GRPCInferenceService" in {s.name for s in answer.list_services_response.service}


# --------------------------------------------------------------------------- a Triton model repository


@pytest.fixture(scope="module")
def triton_repo(exported, tmp_path_factory):
    """resnext_mini exported with --triton (max_batch_size 4): the directory Triton would load."""
    root = tmp_path_factory.mktemp("triton") / "models"
    code = exp.main([MODEL, "--checkpoint", exported.checkpoints[MODEL], "--out", str(root), "--triton",
                     "--max-batch-size", "4", "--threads", "1", "--no-progress", "--val-samples", "0",
                     "--latency-runs", "0"])
    assert code == 0
    return root


def test_serves_the_triton_repository_layout(triton_repo):
    model_dir = triton_repo / MODEL
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert "max_batch_size: 4" in (model_dir / "config.pbtxt").read_text()
    repo = load_repository(str(triton_repo), providers="cpu", threads=1)
    assert repo.get(MODEL).max_batch_size == 4
    with running(repo, max_batch=16) as (_, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(infer_request(inputs(4), model="")).model_name == MODEL  # the only model
            err = call_error(stub.ModelInfer, infer_request(inputs(5)))  # config.pbtxt's limit, not --max-batch
            assert err.code() == CODE.INVALID_ARGUMENT
            assert f"at most 4 per request (max_batch_size in {model_dir / 'config.pbtxt'})" in err.details()


# --------------------------------------------------------------------------- a stock Triton client

# tritonclient's own generated `inference.*` messages cannot share a process with serve's (one
# protobuf descriptor pool, the same full names), so the stock client runs in a subprocess that
# imports nothing from this repository.
TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

url, model, path = sys.argv[1:4]
token = sys.argv[4] if len(sys.argv) > 4 else None
headers = {"authorization": f"Bearer {token}"} if token else None
client = tg.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready(model, headers=headers)}
meta = client.get_model_metadata(model, headers=headers)
out["metadata"] = [meta.name, meta.platform, list(meta.versions),
                   [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
                   [[t.name, t.datatype, list(t.shape)] for t in meta.outputs]]
out["extensions"] = list(client.get_server_metadata(headers=headers).extensions)
x = np.load(path)
inp = tg.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(model, [inp], outputs=[tg.InferRequestedOutput("logits")], request_id="t1", headers=headers)
out["logits"] = result.as_numpy("logits").tolist()
out["id"] = result.get_response().id
result = client.infer(model, [inp], outputs=[tg.InferRequestedOutput("logits", class_count=3)], headers=headers)
out["classes"] = [[s.decode() for s in row] for row in result.as_numpy("logits")]
errors = {}
for case, kwargs in {"unknown model": dict(model_name="no-such-model"), "no token": dict(headers=None)}.items():
    try:
        client.infer(**{"model_name": model, "inputs": [inp], "headers": headers, **kwargs})
        errors[case] = None
    except InferenceServerException as e:
        errors[case] = [e.status(), e.message()]
out["errors"] = errors
print(json.dumps(out))
"""


def run_triton_client(port: int, x: np.ndarray, tmp_path, token: str | None = None) -> dict:
    path = tmp_path / "x.npy"
    np.save(path, x)
    argv = [sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{port}", MODEL, str(path)] + ([token] if token else [])
    result = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_stock_tritonclient(triton_repo, tmp_path):
    """The whole flow a Triton user runs, unchanged, against `export --triton` + `serve` with auth on."""
    if importlib.util.find_spec("tritonclient") is None:  # find_spec: importing it here would clash (see above)
        pytest.skip("tritonclient is not installed (it is in the dev extra)")
    repo = load_repository(str(triton_repo), providers="cpu", threads=1)
    x = inputs(4, seed=3)
    with running(repo, token=TOKEN) as (_, port):
        out = run_triton_client(port, x, tmp_path, token=TOKEN)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["metadata"] == [MODEL, "onnxruntime_onnx", ["1"], [["input", "FP32", [-1, *INPUT_SIZE]]],
                               [["logits", "FP32", [-1, len(CLASSES)]]]]
    assert "classification" in out["extensions"]
    want = repo.get(MODEL).session.run(["logits"], {"input": x})[0]
    assert_close(np.asarray(out["logits"], np.float32), want)
    assert out["id"] == "t1"
    for row, strings in enumerate(out["classes"]):
        assert [int(s.split(":")[1]) for s in strings] == list(np.argsort(-want[row], kind="stable")[:3])
        assert all(s.split(":")[2] == CLASSES[int(s.split(":")[1])] for s in strings)
    assert out["errors"]["unknown model"][0] == "StatusCode.NOT_FOUND"
    assert out["errors"]["no token"][0] == "StatusCode.UNAUTHENTICATED"


def test_concurrent_kserve_and_classify_clients(kserve, server, repo):
    """Both APIs at once on one port, each caller gets its own answer."""
    stub, _ = kserve
    failures: list[str] = []

    def kserve_client(seed: int) -> None:
        x = inputs(2, seed=100 + seed)
        got = logits_of(stub.ModelInfer(infer_request(x)))
        want = repo.get(MODEL).session.run(["logits"], {"input": x})[0]
        if not np.allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
            failures.append(f"kserve {seed}")

    def classify_client(seed: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
            r = pb_grpc.ClassifierStub(channel).Classify(tensor_request(inputs(1, seed=seed)[0], model=MODEL))
            if not r.classes:
                failures.append(f"classify {seed}")

    threads = [threading.Thread(target=f, args=(i,)) for i in range(6) for f in (kserve_client, classify_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
