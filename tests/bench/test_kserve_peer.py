"""The KServe peer of the benchmark (bench/serve/peer.py, bench/serve/kserve_model.py): KServe's
real model server in .venv-kserve on an exported mini model, driven by this project's own Open
Inference Protocol stubs, its answers checked against onnxruntime; serve's session options
reaching the peer's session; one clear error without KServe. Skipped without ``make kserve-env``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from bench.serve.config import BenchError
from bench.serve.peer import MODEL_SCRIPT, serve_session_options, start_kserve
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, exported  # noqa: F401  (the session's exported models)

MODEL = "resnext_mini"
READY_TIMEOUT_S = 300  # generous: KServe imports for seconds on a busy machine; only a hang fails it


@pytest.fixture(scope="module")
def model_path(exported) -> str:  # noqa: F811
    return os.path.join(exported.root, MODEL, "1", "model.onnx")


def _infer(address: str, x: np.ndarray) -> kpb.ModelInferResponse:
    request = kpb.ModelInferRequest(model_name=MODEL, id="peer-1")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(address) as channel:
        return kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_peer_answers_model_infer_as_onnxruntime_does(kserve_python, model_path):
    # flat colours plus noise reach more than one class of a random-init net (noise alone: one)
    rng = np.random.default_rng(1)
    x = (rng.uniform(-3, 3, (3, 3, 1, 1)) + 0.5 * rng.standard_normal((3, *INPUT_SIZE))).astype(np.float32)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.abs(want[0] - want[1]).max() > 1e-2  # the rows differ, so an answer for another row shows
    peer = start_kserve(kserve_python, model_path, MODEL, threads=1)
    try:
        assert peer.wait_ready(time.monotonic() + READY_TIMEOUT_S) == peer.port
        assert peer.grpc_address == f"127.0.0.1:{peer.port}" and peer.http_address.startswith("http://127.0.0.1:")
        answer = _infer(peer.grpc_address, x)
        assert answer.model_name == MODEL and answer.id == "peer-1"
        (out,) = answer.outputs
        assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", list(want.shape))
        got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(want.shape)
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # its HTTP port too, for a REST client: JSON tensors in, JSON tensors out
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        request = urllib.request.Request(f"{peer.http_address}/v2/models/{MODEL}/infer", json.dumps(doc).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            (out,) = json.loads(r.read())["outputs"]
        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert peer.cpu_seconds() > 0
    finally:
        peer.stop()
    assert peer.proc.returncode is not None
    assert not _listening(peer.port) and not _listening(peer.http_port)


PARENT = r"""
import sys, time
from bench.serve.peer import start_kserve
peer = start_kserve(*sys.argv[1:4], threads=1)
peer.wait_ready(time.monotonic() + float(sys.argv[4]))
print(peer.proc.pid, peer.port, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_the_peer_stops_when_the_benchmark_dies(kserve_python, model_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, kserve_python, model_path, MODEL, str(READY_TIMEOUT_S)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid, port = map(int, parent.stdout.readline().split())
    finally:
        parent.kill()  # SIGKILL: no stop() runs
        parent.wait()
    # The leader thread shows as a zombie while the other threads are still being torn down (and
    # hold the sockets): wait for both. Generous: only a peer that never stops fails it.
    for _ in range(600):
        if _gone(pid) and not _listening(port):
            break
        time.sleep(0.1)
    else:
        if not _gone(pid):
            os.kill(pid, 9)
        pytest.fail(f"the KServe peer (pid {pid}) outlived the process that started it, or its port {port} stayed open")


SESSION_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import kserve_model
for spec in json.loads(sys.argv[2]):
    opts = kserve_model.session_options(spec)
    print(json.dumps(dict(intra=opts.intra_op_num_threads, inter=opts.inter_op_num_threads,
                          level=int(opts.graph_optimization_level), mode=int(opts.execution_mode),
                          config={key: opts.get_session_config_entry(key) for key in spec["config"]})))
"""


def test_serve_session_options_reach_the_peer_session(kserve_python):
    specs = [serve_session_options(threads) for threads in (1, 3)]
    # a config entry set as serve may set one, to see entries pass too
    specs[1]["config"].setdefault("session.intra_op.allow_spinning", "0")
    result = subprocess.run([kserve_python, "-c", SESSION_PROBE, os.path.dirname(MODEL_SCRIPT), json.dumps(specs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]
    assert got == [dict(intra=spec["intra_op_num_threads"], inter=spec["inter_op_num_threads"],
                        level=spec["graph_optimization_level"], mode=spec["execution_mode"], config=spec["config"])
                   for spec in specs]
    assert [spec["intra_op_num_threads"] for spec in specs] == [1, 3]
    assert specs[0]["graph_optimization_level"] == 99  # ORT_ENABLE_ALL, as serve sets it


def test_without_kserve_one_bench_error(tmp_path, model_path):
    with pytest.raises(BenchError, match=r"^no KServe Python at .*: run `make kserve-env`"):
        start_kserve(str(tmp_path / "missing" / "python"), model_path, MODEL, threads=1)
    if subprocess.run([sys.executable, "-c", "import kserve"], capture_output=True).returncode == 0:
        pytest.skip("this Python has kserve")
    with pytest.raises(BenchError, match=r"has no kserve: run `make kserve-env`$"):
        start_kserve(sys.executable, model_path, MODEL, threads=1)
