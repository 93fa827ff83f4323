"""KServe's own SDK clients, unchanged, against a real ``python -m serve``: ``InferenceRESTClient``
(the Open Inference Protocol's REST API on the HTTP port) and ``InferenceGRPCClient`` (its gRPC
API), run by the Python of .venv-kserve (``make kserve-env``; kserve pins a protobuf that this
project's stubs refuse, so it cannot be imported here) or ``$ZOO_KSERVE_PYTHON``. Their answers
are checked against onnxruntime run here on the same model file."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from tests.serve.conftest import INPUT_SIZE
from tests.serve.test_http import _serve_process, _stop

MODEL = "resnext_mini"
CLIENT_TIMEOUT_S = 300  # generous: kserve imports for seconds on a busy machine; only a hang fails it

KSERVE_CLIENTS = r"""
import asyncio, json, sys
import grpc, httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

http_url, grpc_address, model, path = sys.argv[1:5]
x = np.load(path)


def request(binary):
    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id=f"kserve-{binary}")


def answer(result):
    (out,) = result.outputs
    return dict(model=result.model_name, id=result.id, name=out.name, datatype=out.datatype, shape=list(out.shape),
                logits=out.as_numpy().tolist())


async def rest():
    out = {}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        out["live"] = await client.is_server_live(http_url)
        out["ready"] = await client.is_server_ready(http_url)
        out["model_ready"] = await client.is_model_ready(http_url, model)
        out["unknown_model_ready"] = await client.is_model_ready(http_url, "no-such-model")
        for binary in (True, False):
            out[f"infer_{binary}"] = answer(await client.infer(http_url, request(binary), model_name=model))
        try:
            await client.infer(http_url, request(True), model_name="no-such-model")
            out["unknown_model_infer"] = None
        except httpx.HTTPStatusError as e:
            out["unknown_model_infer"] = [e.response.status_code, e.response.json()]
    finally:
        await client.close()
    # The REST client has no metadata calls: read with httpx (its transport) into KServe's own
    # data models of the answers, which refuse a missing or mistyped field.
    async with httpx.AsyncClient(timeout=60) as h:
        server = (await h.get(f"{http_url}/v2")).json()
        out["server_metadata"] = ServerMetadataResponse.model_validate(server).model_dump()
        meta = (await h.get(f"{http_url}/v2/models/{model}")).json()
        out["model_metadata"] = ModelMetadataResponse.model_validate(meta).model_dump()
    return out


async def grpc_client():
    out = {}
    async with InferenceGRPCClient(grpc_address, retries=0, timeout=60) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready(model)
        out["infer"] = answer(await client.infer(request(True)))
        out["unknown_model_ready"] = await client.is_model_ready("no-such-model")
        try:
            await client.infer(InferRequest(model_name="no-such-model", infer_inputs=request(True).inputs))
            out["unknown_model_infer"] = None
        except grpc.RpcError as e:
            out["unknown_model_infer"] = [e.code().name, e.details()]
    return out


print(json.dumps({"rest": asyncio.run(rest()), "grpc": asyncio.run(grpc_client())}))
"""


@pytest.fixture(scope="module")
def clients(kserve_python, exported, tmp_path_factory):
    """One run of KServe's clients against ``python -m serve``: (their answers, onnxruntime's logits)."""
    work = tmp_path_factory.mktemp("kserve-clients")
    # flat colours plus noise: rows a random-init net tells apart (noise alone lands in one class)
    rng = np.random.default_rng(5)
    x = (rng.uniform(-3, 3, (3, 3, 1, 1)) + 0.5 * rng.standard_normal((3, *INPUT_SIZE))).astype(np.float32)
    np.save(work / "x.npy", x)
    session = ort.InferenceSession(os.path.join(exported.root, MODEL, "1", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    proc, ready, _ = _serve_process("--model-dir", exported.root, "--model", MODEL, "--port", "0", "--http-port", "0",
                                    "--threads", "1", "--drain-delay", "0")
    try:
        result = subprocess.run([kserve_python, "-c", KSERVE_CLIENTS, ready.http_url, ready.address, MODEL,
                                 str(work / "x.npy")], cwd=str(work), capture_output=True, text=True,
                                timeout=CLIENT_TIMEOUT_S)
    finally:
        assert _stop(proc) == 0
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), want


def _check_infer(got: dict, want: np.ndarray, request_id: str) -> None:
    assert (got["model"], got["id"], got["name"], got["datatype"]) == (MODEL, request_id, "logits", "FP32")
    assert got["shape"] == list(want.shape)
    logits = np.asarray(got["logits"], np.float32)
    np.testing.assert_array_equal(logits.argmax(1), want.argmax(1))
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_kserve_rest_client(clients):
    out, want = clients
    rest = out["rest"]
    assert rest["live"] is True and rest["ready"] is True
    assert rest["model_ready"] is True and rest["unknown_model_ready"] is False
    _check_infer(rest["infer_True"], want, "kserve-True")  # binary tensor data
    _check_infer(rest["infer_False"], want, "kserve-False")  # JSON tensors
    status, body = rest["unknown_model_infer"]
    assert status == 404 and "'no-such-model'" in body["error"]
    assert rest["server_metadata"]["name"] == "zoo-serve"
    meta = rest["model_metadata"]
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *INPUT_SIZE]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, want.shape[1]]}]


def test_kserve_grpc_client(clients):
    out, want = clients
    answers = out["grpc"]
    assert answers["live"] is True and answers["ready"] is True and answers["model_ready"] is True
    _check_infer(answers["infer"], want, "kserve-True")
    assert answers["unknown_model_ready"] is False
    code, details = answers["unknown_model_infer"]
    assert code == "NOT_FOUND" and "'no-such-model'" in details
