"""The HTTP port (serve/http.py) beside gRPC: the Open Inference Protocol's REST API through plain
HTTP and through a stock ``tritonclient.http`` and Triton's ``image_client.py -i http`` in
subprocesses, the curl-able classify route, errors and their statuses, limits, auth, TLS, the
drain, and the README's curl examples run with real curl against a real server."""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.errors import HTTP_STATUS
from serve.ready import ReadyLine, parse_ready_line
from serve.server import create_server
from tests.serve.conftest import CLASSES, INPUT_SIZE, REPO_ROOT, Gate, png_bytes, random_image, running

MODEL = "resnext_mini"
TOKEN = "http-token"
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def web(repo):
    """A server with HTTP on a free port: (server, grpc port, http base url)."""
    with running(repo, http_port=0) as (server, port):
        yield server, port, f"http://127.0.0.1:{server.http_port}"


def fetch(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one real HTTP request; an error status is an answer, not a raise."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def fetch_json(url: str, doc: dict | None = None, **kw) -> tuple[int, dict]:
    body = None if doc is None else json.dumps(doc).encode()
    status, _, raw = fetch(url, body, {"Content-Type": "application/json"} if body else None, **kw)
    return status, json.loads(raw) if raw else {}


def grpc_infer(port: int, x: np.ndarray, classification: int | None = None) -> kpb.ModelInferResponse:
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    if classification:
        request.outputs.add(name="logits").parameters["classification"].int64_param = classification
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def grpc_logits(port: int, x: np.ndarray) -> np.ndarray:
    out = grpc_infer(port, x)
    return np.frombuffer(out.raw_output_contents[0], "<f4").reshape(list(out.outputs[0].shape))


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SIZE)).astype(np.float32)


# --------------------------------------------------------------------------- health and metadata


def test_health_metadata_and_ready(web):
    _, _, url = web
    assert fetch(f"{url}/v2/health/live")[0] == 200
    assert fetch(f"{url}/v2/health/ready")[0] == 200
    status, meta = fetch_json(f"{url}/v2")
    assert status == 200 and meta["name"] == "zoo-serve" and "classification" in meta["extensions"]
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        status, meta = fetch_json(url + path)
        assert status == 200, meta
        assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *INPUT_SIZE]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
    assert fetch(f"{url}/v2/models/{MODEL}/ready")[0] == 200
    assert fetch(f"{url}/v2/models/{MODEL}/versions/7/ready")[0] == 400
    status, body = fetch_json(f"{url}/v2/models/resnext/ready")
    assert status == 400 and "not ready" in body["error"]


@pytest.mark.parametrize("name, version, status, code", [
    ("no-such-model", "", 404, grpc.StatusCode.NOT_FOUND),
    ("resnext", "", 404, grpc.StatusCode.NOT_FOUND),  # an abbreviation: the message names the served model
    (MODEL, "9", 404, grpc.StatusCode.NOT_FOUND),
    (MODEL, "x", 400, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_metadata_errors_carry_the_grpc_message_with_triton_status(web, name, version, status, code):
    _, port, url = web
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(kpb.ModelMetadataRequest(name=name,
                                                                                              version=version))
    assert info.value.code() == code
    got, body = fetch_json(f"{url}/v2/models/{name}" + (f"/versions/{version}" if version else ""))
    assert (got, body) == (status, {"error": info.value.details()})


# --------------------------------------------------------------------------- inference


def test_infer_json_and_binary_match_grpc(web):
    _, port, url = web
    x = inputs(2, seed=1)
    want = grpc_logits(port, x)
    doc = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.tolist()}]}  # nested lists, as numpy's tolist() writes them
    status, got = fetch_json(f"{url}/v2/models/{MODEL}/infer", doc)
    assert status == 200, got
    assert got["model_name"] == MODEL and got["model_version"] == "1" and got["id"] == "r1"
    assert got["parameters"]["server_pid"] == os.getpid()
    (out,) = got["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, len(CLASSES)])
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(2, -1), want)

    # Triton's binary tensor data extension, both ways
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = fetch(f"{url}/v2/models/{MODEL}/versions/1/infer", head + x.tobytes(),
                                  {HEADER: str(len(head)), "Content-Type": "application/octet-stream"})
    assert status == 200, body
    n = int(headers[HEADER])
    answer = json.loads(body[:n])
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": want.nbytes}
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(want.shape), want)


def test_classification_parameter_json(web):
    _, port, url = web
    x = inputs(2, seed=2)
    raw = grpc_infer(port, x, classification=3).raw_output_contents[0]
    items, at = [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at:at + 4], "little")
        items.append(raw[at + 4:at + 4 + size].decode())
        at += 4 + size
    want = items
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
           "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}
    status, got = fetch_json(f"{url}/v2/models/{MODEL}/infer", doc)
    assert status == 200, got
    (out,) = got["outputs"]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 3])
    assert out["data"] == want
    assert out["data"][0].split(":")[2] == CLASSES[int(out["data"][0].split(":")[1])]


BAD_INFER = {
    "not json": (b"{nope", {}, 400, "not JSON"),
    "too few values": (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *INPUT_SIZE],
                                               "data": [0.5] * 10}]}).encode(), {}, 400,
                       f"has 10 values in data; shape [1, 3, 32, 32] FP32 needs {3 * 32 * 32:,}"),
    "wrong input name": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, *INPUT_SIZE],
                                                 "data": [0.5] * (3 * 32 * 32)}]}).encode(), {}, 400,
                         "takes one input named 'input'"),
    "uint8 over 255": (json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                               "data": [300] * 12}]}).encode(), {}, 400, "not integers 0 .. 255"),
    "binary size past the body": (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1],
                                                          "parameters": {"binary_data_size": 99}}]}).encode(),
                                  "header", 400, "runs past"),
    "header length past the body": (b"{}", {HEADER: "500"}, 400, "is not a length within"),
    "unknown output parameter": (json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                                         "shape": [1, *INPUT_SIZE], "data": [0.0] * 3072}],
                                             "outputs": [{"name": "logits", "parameters": {"top": 2}}]}).encode(),
                                 {}, 400, "unknown output parameter 'top'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INFER))
def test_bad_infer_requests_answer_400_with_the_reason(web, case):
    body, headers, status, message = BAD_INFER[case]
    if headers == "header":
        headers = {HEADER: str(len(body))}
    got, _, raw = fetch(f"{web[2]}/v2/models/{MODEL}/infer", body, headers)
    assert got == status and message in json.loads(raw)["error"], raw


def test_unknown_model_infer_is_404_and_counted(web):
    server, _, url = web
    before = server.metrics.registry.get_sample_value("zoo_serve_requests_total",
                                                      {"model": "unknown", "code": "NOT_FOUND"}) or 0
    status, body = fetch_json(f"{url}/v2/models/nope/infer", {"inputs": []})
    assert status == 404 and "'nope'" in body["error"]
    after = server.metrics.registry.get_sample_value("zoo_serve_requests_total",
                                                     {"model": "unknown", "code": "NOT_FOUND"})
    assert after == before + 1


def test_config_and_stats_answer_what_grpc_answers(web):
    _, port, url = web
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        config = stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL)).config
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
    status, got = fetch_json(f"{url}/v2/models/{MODEL}/config")
    assert status == 200 and got["name"] == MODEL and got["max_batch_size"] == config.max_batch_size
    assert [(i["name"], i["data_type"], i["dims"]) for i in got["input"]] == [
        (i.name, "TYPE_FP32", [int(d) for d in i.dims]) for i in config.input]
    status, got = fetch_json(f"{url}/v2/models/{MODEL}/stats")
    assert status == 200
    (mine,) = got["model_stats"]
    assert (mine["name"], mine["version"]) == (MODEL, stats.version)
    assert mine["inference_count"] >= stats.inference_count  # integers as numbers, not strings
    status, got = fetch_json(f"{url}/v2/models/stats")
    assert status == 200 and {m["name"] for m in got["model_stats"]} == {"resnext_mini", "densenet_mini"}
    assert fetch_json(f"{url}/v2/models/nope/config")[0] == 404


def test_repository_control_answers_what_grpc_answers(web, copy_repo):
    """Index, unload and load over HTTP are the gRPC calls: the same index, the same effect, the
    same refusals (with Triton's statuses)."""
    from serve.runtime import load_repository
    local = load_repository(str(copy_repo), providers="cpu", threads=1)
    with running(local, http_port=0, model_control="explicit") as (server, port):
        url = f"http://127.0.0.1:{server.http_port}"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(kpb.RepositoryIndexRequest())
            with pytest.raises(grpc.RpcError) as unknown:
                stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="no-such-model"))
        status, got = fetch_json(f"{url}/v2/repository/index", {})
        assert status == 200 and len(got) == 2
        assert got == [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                       for m in index.models]
        assert fetch_json(f"{url}/v2/repository/models/densenet_mini/unload", {})[0] == 200
        assert fetch(f"{url}/v2/models/densenet_mini/ready")[0] == 400
        status, got = fetch_json(f"{url}/v2/repository/index", {"ready": True})
        assert status == 200 and [m["name"] for m in got] == ["resnext_mini"]
        assert fetch_json(f"{url}/v2/repository/models/densenet_mini/load", {})[0] == 200
        assert fetch(f"{url}/v2/models/densenet_mini/ready")[0] == 200
        status, body = fetch_json(f"{url}/v2/repository/models/no-such-model/load", {})
        assert (status, body["error"]) == (404, unknown.value.details())
    # the shared server runs without model control: refused as over gRPC
    with grpc.insecure_channel(f"127.0.0.1:{web[1]}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                kpb.RepositoryModelUnloadRequest(model_name=MODEL))
    status, body = fetch_json(f"{web[2]}/v2/repository/models/{MODEL}/unload", {})
    assert (status, body["error"]) == (HTTP_STATUS[refused.value.code()], refused.value.details())
    assert fetch(f"{web[2]}/v2/models/{MODEL}/ready")[0] == 200


def test_server_faults_answer_500_with_a_request_id_and_no_details(web, monkeypatch):
    _, _, url = web
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *INPUT_SIZE], "data": [0.0] * 3072}]}

    def broken(*_args):
        raise ValueError("secret detail of the server")
    monkeypatch.setattr("serve.http.infer_response", broken)  # a fault in the HTTP side's own code
    status, body = fetch_json(f"{url}/v2/models/{MODEL}/infer", doc)
    assert status == 500 and body["error"].startswith("internal error (request id ")
    assert "secret" not in body["error"]


# --------------------------------------------------------------------------- the classify route


def test_classify_route_answers_what_grpc_answers(web):
    _, port, url = web
    image = png_bytes(random_image(5))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        want = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(image=image, model=MODEL, top_k=3))
    status, headers, body = fetch(f"{url}/v1/models/{MODEL}:classify?top_k=3", image,
                                  {"Content-Type": "image/png", "X-Request-Id": "abc"})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    got = json.loads(body)
    assert [c["label"] for c in got["classes"]] == [c.label for c in want.classes]
    assert [c["index"] for c in got["classes"]] == [c.index for c in want.classes]
    np.testing.assert_allclose([c["score"] for c in got["classes"]], [c.score for c in want.classes], rtol=1e-6)
    assert got["model"] == MODEL and got["version"] == "1" and got["provider"] == want.provider
    assert got["requestId"] == "abc" and got["batchSize"] >= 1
    assert set(got["timing"]) == {"decodeUs", "preprocessUs", "queueUs", "inferenceUs", "totalUs"}
    assert int(got["timing"]["totalUs"]) >= int(got["timing"]["inferenceUs"]) > 0
    status, _, body = fetch(f"{url}/v1/models/{MODEL}:1:classify", image)  # NAME:VERSION, as everywhere
    assert status == 200 and json.loads(body)["version"] == "1"


@pytest.mark.parametrize("path, body, status, message", [
    (f"/v1/models/{MODEL}:classify", b"not an image", 400, "not a readable image"),
    (f"/v1/models/{MODEL}:classify", b"", 400, "no input"),
    (f"/v1/models/{MODEL}:classify?top_k=-1", b"x", 400, "invalid top_k -1"),
    (f"/v1/models/{MODEL}:classify?top_k=two", b"x", 400, "top_k and version are integers"),
    ("/v1/models/resnext:classify", b"x", 404, "'resnext_mini' is served under that name"),
])
def test_classify_route_errors(web, path, body, status, message):
    got, _, raw = fetch(web[2] + path, body, {"Content-Type": "image/png"}, method="POST")
    assert got == status and message in json.loads(raw)["error"], raw


def test_list_models_and_latency_report_for_the_page(web):
    _, _, url = web
    fetch(f"{url}/v1/models/{MODEL}:classify", png_bytes(random_image(6)))
    status, models = fetch_json(f"{url}/v1/models")
    assert status == 200
    names = {m["name"]: m for m in models["models"]}
    assert set(names) == {"resnext_mini", "densenet_mini"}
    assert names[MODEL]["inputSize"] == [str(d) for d in INPUT_SIZE] and names[MODEL]["labels"] == CLASSES
    status, report = fetch_json(f"{url}/v1/latency?model={MODEL}")
    assert status == 200
    (mine,) = report["models"]
    assert mine["model"] == MODEL and int(mine["count"]) >= 1 and mine["total"]["p50Us"] > 0
    assert fetch_json(f"{url}/v1/latency?model=nope")[0] == 404


def test_page_and_static_files_are_served(web):
    _, _, url = web
    status, headers, body = fetch(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for ref in re.findall(rb'(?:src|href)="(/static/[^"]+)"', body):
        assert fetch(url + ref.decode())[0] == 200, ref
    assert len(re.findall(rb'(?:src|href)="/static/', body)) >= 2  # the script and the style sheet
    assert b"http://" not in body and b"https://" not in body  # nothing from a CDN: works offline


# --------------------------------------------------------------------------- limits, auth, TLS, drain


def test_body_over_the_message_limit_is_413(repo):
    with running(repo, http_port=0, max_message_bytes=64 * 1024) as (server, _):
        status, _, raw = fetch(f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}:classify",
                               b"\0" * (65 * 1024))
    assert status == 413 and "over the server's limit of 65,536 bytes" in json.loads(raw)["error"]


def test_busy_server_answers_429(repo):
    model = repo.get(MODEL)
    gate = Gate(model.run)
    original, model.run = model.run, gate
    try:
        with running(repo, http_port=0, max_concurrency=1, max_batch=1) as (server, _):
            url = f"http://127.0.0.1:{server.http_port}/v1/models/{MODEL}:classify"
            gate.open.clear()
            first = threading.Thread(target=fetch, args=(url, png_bytes(random_image(1))))
            first.start()
            assert gate.entered.wait(60)  # generous: only a hang fails it
            status, _, raw = fetch(url, png_bytes(random_image(2)))
            gate.open.set()
            first.join(60)
    finally:
        model.run = original
        gate.open.set()
    assert status == 429 and "--max-concurrency 1" in json.loads(raw)["error"]


def test_bearer_token_and_tls(repo, tls_files):
    tls = ((tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes())
    context = ssl.create_default_context(cafile=str(tls_files / "cert.pem"))
    with running(repo, http_port=0, tls=tls, token=TOKEN) as (server, _):
        url = f"https://127.0.0.1:{server.http_port}"
        assert fetch(f"{url}/v2/health/ready", context=context)[0] == 200  # probes stay open
        status, _, raw = fetch(f"{url}/v2/models/{MODEL}", context=context)
        assert status == 401 and "missing 'Authorization: Bearer <token>'" in json.loads(raw)["error"]
        status, _, raw = fetch(f"{url}/v2/models/{MODEL}", headers={"Authorization": "Bearer wrong"},
                               context=context)
        assert status == 401 and "invalid bearer token" in json.loads(raw)["error"]
        status, _, raw = fetch(f"{url}/v2/models/{MODEL}", headers={"Authorization": f"Bearer {TOKEN}"},
                               context=context)
        assert status == 200 and json.loads(raw)["name"] == MODEL
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # TLS only: plaintext gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=30).read()


def test_drain_turns_ready_off_then_refuses(repo):
    server, _ = create_server(repo, http_port=0)
    server.start()
    url = f"http://127.0.0.1:{server.http_port}"
    try:
        assert fetch(f"{url}/v2/health/ready")[0] == 200
        stopper = threading.Thread(target=server.stop, kwargs=dict(grace=1.0, drain_delay=30.0))
        stopper.start()
        for _ in range(600):  # generous: only a hang fails it
            if server.core.stopping:
                break
            threading.Event().wait(0.05)
        assert fetch(f"{url}/v2/health/ready")[0] == 503  # draining: still answering, not ready
        assert fetch(f"{url}/v2/health/live")[0] == 200
        server.stop_now()
        stopper.join(60)
        assert not stopper.is_alive()
        with pytest.raises(urllib.error.URLError):  # stopped: nothing listens
            urllib.request.urlopen(f"{url}/v2/health/live", timeout=30).read()
    finally:
        server.stop(grace=0)


def test_a_kept_alive_connection_after_the_stop_began_gets_503_then_a_clean_close(repo):
    """A client that holds a keep-alive connection (every HTTP client library pools them) and sends
    after the stop began: a 503 with the reason as JSON on that same connection (it may retry
    elsewhere), never an answer from a server that is going away, and once stopped a closed
    connection, never a hang."""
    server, _ = create_server(repo, http_port=0)
    server.start()
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *INPUT_SIZE],
                       "data": inputs(1).ravel().tolist()}]}
    body, headers = json.dumps(doc).encode(), {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)  # generous: only a hang fails it
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["model_name"] == MODEL
        kept = conn.sock
        server.begin_stop(grace=5.0)  # returns once new requests are refused
        for method, path, payload in (("POST", f"/v2/models/{MODEL}/infer", body), ("GET", f"/v2/models/{MODEL}", None),
                                      ("GET", "/v2/health/ready", None)):
            conn.request(method, path, payload, headers)
            answer = conn.getresponse()
            raw = answer.read()
            assert conn.sock is kept, "the kept connection was dropped and a new one made"
            assert answer.status == 503 and answer.getheader("Content-Type", "").startswith("application/json"), path
            if path != "/v2/health/ready":
                assert "shutting down" in json.loads(raw)["error"], raw
        with pytest.raises(ConnectionRefusedError):  # nothing takes a new connection
            socket.create_connection(("127.0.0.1", server.http_port), timeout=60).close()
        server.stop(grace=5.0)
        with pytest.raises(ConnectionError):  # closed by the server: not a timeout, not an answer
            conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
            conn.getresponse()
    finally:
        conn.close()
        server.stop(grace=0)


def test_taken_http_port_is_one_clear_error(repo, web):
    taken = web[0].http_port
    with pytest.raises(RuntimeError, match=rf"cannot listen on 127.0.0.1:{taken} \(--http-port\)"):
        create_server(repo, "127.0.0.1:0", http_port=taken)


# --------------------------------------------------------------------------- stock clients, unchanged

TRITON_HTTP_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

url, model, path = sys.argv[1:4]
client = th.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready(model)}
meta = client.get_model_metadata(model)
out["metadata"] = [meta["name"], meta["inputs"], meta["outputs"]]
out["extensions"] = client.get_server_metadata()["extensions"]
out["config"] = client.get_model_config(model)
x = np.load(path)
for binary in (True, False):
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(model, [inp], outputs=[th.InferRequestedOutput("logits", binary_data=binary)],
                          request_id="t1")
    out[f"logits_{binary}"] = result.as_numpy("logits").tolist()
    result = client.infer(model, [inp], outputs=[th.InferRequestedOutput("logits", binary_data=binary,
                                                                         class_count=3)])
    out[f"classes_{binary}"] = [[s.decode() if isinstance(s, bytes) else s for s in row]
                                for row in result.as_numpy("logits")]
result = client.infer(model, [inp])  # no outputs named: Triton's client asks for binary_data_output
out["logits_default"] = result.as_numpy("logits").tolist()
out["statistics"] = client.get_inference_statistics(model)
try:
    client.infer("no-such-model", [inp])
    out["error"] = None
except InferenceServerException as e:
    out["error"] = [e.status(), e.message()]
print(json.dumps(out))
"""


def _needs_tritonclient_http() -> None:
    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("geventhttpclient") is None:
        pytest.skip("tritonclient.http is not installed (pip install -e '.[dev]')")


def test_stock_tritonclient_http(web, repo, tmp_path):
    _needs_tritonclient_http()
    _, port, url = web
    x = inputs(3, seed=4)
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", TRITON_HTTP_CLIENT, url.removeprefix("http://"), MODEL,
                             str(tmp_path / "x.npy")], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["metadata"][0] == MODEL and out["metadata"][1][0]["shape"] == [-1, *INPUT_SIZE]
    assert "classification" in out["extensions"]
    assert out["config"]["name"] == MODEL and out["config"]["input"][0]["data_type"] == "TYPE_FP32"
    want = grpc_logits(port, x)
    for key in ("logits_True", "logits_False", "logits_default"):
        np.testing.assert_array_equal(np.asarray(out[key], np.float32), want, err_msg=key)
    for key in ("classes_True", "classes_False"):
        for row, strings in enumerate(out[key]):
            assert [int(s.split(":")[1]) for s in strings] == list(np.argsort(-want[row], kind="stable")[:3])
    (stats,) = out["statistics"]["model_stats"]
    assert stats["name"] == MODEL and stats["inference_count"] >= 12
    assert out["error"][0] == "404" and "'no-such-model'" in out["error"][1]


@pytest.mark.parametrize("flags", [[], ["-a"]], ids=["sync", "async"])
def test_triton_image_client_over_http(web, tmp_path, flags):
    _needs_tritonclient_http()
    if importlib.util.find_spec("attrdict") is None:
        pytest.skip("attrdict is not installed (pip install -e '.[dev]'): image_client.py -i http reads through it")
    _, port, url = web
    image = random_image(9, 32, 32)
    (tmp_path / "img.png").write_bytes(png_bytes(image))
    script = os.path.join(REPO_ROOT, "tests", "triton_examples", "image_client.py")
    result = subprocess.run([sys.executable, script, "-i", "http", "-u", url.removeprefix("http://"), "-m", MODEL,
                             "-c", "3", "-s", "NONE", *flags, str(tmp_path / "img.png")],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS" in result.stdout
    # image_client sends the raw pixels it scaled itself (NONE: as they are, CHW float): the
    # same tensor over gRPC ranks the same classes
    x = np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None])
    want = np.argsort(-grpc_logits(port, x)[0], kind="stable")[:3]
    printed = [int(m) for m in re.findall(r"^\s+[-\d.]+ \((\d+)\) = ", result.stdout, re.M)]
    assert printed == list(want), result.stdout


# --------------------------------------------------------------------------- the README's curl lines


def readme_curl_commands() -> list[str]:
    """The curl commands of the README's HTTP section (continuation lines joined)."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## HTTP.*?(?=^## )", text, re.S | re.M)
    assert section, "README has no '## HTTP' section"
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", section.group(0), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("curl "):
                commands.append(command.strip())
    return commands


def test_readme_curl_examples_run(web, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install -y curl)")
    _, _, url = web
    commands = readme_curl_commands()
    assert len(commands) >= 4, commands
    (tmp_path / "cat.jpg").write_bytes(png_bytes(random_image(3, 48, 64), "JPEG"))
    for command in commands:
        argv = [a.replace("127.0.0.1:8000", url.removeprefix("http://")) for a in shlex.split(command)]
        argv = [a.replace("resnext50_32x4d", MODEL) for a in argv]
        # --fail-with-body: an error status fails the example too
        result = subprocess.run([argv[0], "--silent", "--show-error", "--fail-with-body", *argv[1:]],
                                cwd=str(tmp_path), capture_output=True, timeout=60)
        assert result.returncode == 0, (command, result.stdout[-1000:], result.stderr[-1000:])
        if "-o " not in command:
            json.loads(result.stdout)  # every example answers JSON


# --------------------------------------------------------------------------- python -m serve


def _serve_process(*argv: str) -> tuple[subprocess.Popen, ReadyLine, list[str]]:
    """``python -m serve ARGV`` until its (workers') ready line: (process, parsed line, lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        ready = parse_ready_line(line)
        if ready is not None and not line.startswith("[worker"):
            return proc, ready, lines
    proc.kill()
    raise AssertionError(f"no ready line: {lines} {proc.stderr.read()}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    try:
        return proc.wait(60)  # generous: only a hang fails it
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ready_line_names_the_http_port_that_answers(exported, workers):
    argv = ["--model-dir", exported.root, "--model", MODEL, "--port", "0", "--threads", "1", "--drain-delay", "0"]
    proc, ready, _ = _serve_process(*argv, "--workers", str(workers))
    try:
        assert ready.http_port not in (None, ready.port) and ready.http_url.startswith("http://127.0.0.1:")
        pids = set()
        for seed in range(6 if workers > 1 else 1):  # fresh connections: the kernel spreads them
            x = inputs(1, seed)
            doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *INPUT_SIZE],
                               "data": x.ravel().tolist()}]}
            status, got = fetch_json(f"{ready.http_url}/v2/models/{MODEL}/infer", doc)
            assert status == 200, got
            pids.add(got["parameters"]["server_pid"])
        assert pids <= (set(ready.pids) if workers > 1 else {proc.pid})
    finally:
        assert _stop(proc) == 0
    proc, ready, _ = _serve_process(*argv, "--no-http")
    try:
        assert ready.http_port is None
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize("argv, message", [
    (["--port", "9000", "--http-port", "9000"], "--http-port 9000 is the gRPC --port too"),
    (["--port", "0", "--http-port", "70000"], "Invalid --http-port: 70000"),
    (["--port", "0", "--http-port", "0", "--no-http"], "--http-port and --no-http exclude each other"),
])
def test_http_port_option_errors_are_one_line(exported, argv, message):
    result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", exported.root, *argv], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_taken_http_port_stops_the_start_with_one_line(exported, web):
    taken = web[0].http_port
    result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", exported.root, "--port", "0",
                             "--http-port", str(taken), "--threads", "1"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m serve: error: cannot listen on 127.0.0.1:{taken} (--http-port): Address already in use"]
