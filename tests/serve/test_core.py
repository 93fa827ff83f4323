"""The serving core: one naming rule for every protocol, one answer for the server's own failures,
and servicers that depend on the core only (no import circle)."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import load_repository
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, running, tensor_request

CODE = grpc.StatusCode
X = np.zeros(INPUT_SIZE, np.float32)


def _infer(model: str, version: str = "") -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, model_version=version, raw_input_contents=[X[None].tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, *INPUT_SIZE])
    return request


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("module, forbidden", [
    ("serve.core", ("serve.server", "serve.classifier", "serve.kserve")),
    ("serve.model_control", ("serve.core", "serve.server", "serve.classifier", "serve.kserve")),
    ("serve.classifier", ("serve.server", "serve.kserve")),
    ("serve.kserve", ("serve.server", "serve.classifier")),
    ("serve.ready", ("grpc", "serve.server", "serve.core", "onnxruntime")),
])
def test_each_protocol_depends_on_the_core_only(module, forbidden):
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m in {forbidden!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# --------------------------------------------------------------------------- names


def test_name_colon_version_resolves_in_every_protocol(server):
    _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        response = s.Classify(tensor_request(X, model="resnext_mini:1"), timeout=30)
        assert (response.model, response.version) == ("resnext_mini", 1)
        assert s.Classify(tensor_request(X, model="resnext_mini:1", version=1), timeout=30).version == 1
        (item,) = s.ClassifyStream(iter([tensor_request(X, model="densenet_mini:1")]), timeout=30)
        assert (item.response.model, item.response.version) == ("densenet_mini", 1)
        answer = k.ModelInfer(_infer("resnext_mini:1"), timeout=30)
        assert (answer.model_name, answer.model_version) == ("resnext_mini", "1")
        assert k.ModelReady(kpb.ModelReadyRequest(name="resnext_mini:1"), timeout=30).ready
        assert not k.ModelReady(kpb.ModelReadyRequest(name="resnext_mini:2"), timeout=30).ready
        assert k.ModelMetadata(kpb.ModelMetadataRequest(name="densenet_mini:1"), timeout=30).name == "densenet_mini"
        assert s.GetLatencyReport(pb.LatencyReportRequest(model="resnext_mini:1"), timeout=30).models[0].model \
            == "resnext_mini"

        e = _error(lambda: s.Classify(tensor_request(X, model="resnext_mini:1", version=2), timeout=30))
        assert e.code() == CODE.INVALID_ARGUMENT and "names version 1 but the request's version is 2" in e.details()
        e = _error(lambda: k.ModelInfer(_infer("resnext_mini:1", version="2"), timeout=30))
        assert e.code() == CODE.INVALID_ARGUMENT and "names version 1" in e.details()
        # Not a version: the whole text is a name, and no served one.
        for name in ("resnext_mini:0", "resnext_mini:01", "resnext_mini:", ":1", "resnext_mini:x"):
            e = _error(lambda: s.Classify(tensor_request(X, model=name), timeout=30))
            assert e.code() == CODE.NOT_FOUND, name
            assert f"Request for unknown model: {name!r} is not found" in e.details(), name


@pytest.fixture(scope="module")
def versions_repo(exported, tmp_path_factory):
    """resnext_mini at versions 1 and 2, and a copy served under a longer canonical name."""
    root = tmp_path_factory.mktemp("versions") / "models"
    shutil.copytree(f"{exported.root}/resnext_mini", root / "resnext_mini")
    shutil.copytree(root / "resnext_mini" / "1", root / "resnext_mini" / "2")
    shutil.copytree(f"{exported.root}/resnext_mini", root / "resnext_mini_32x4d")
    return root


def test_a_version_not_loaded_says_what_is_served_and_how_to_serve_it(versions_repo):
    repo = load_repository(str(versions_repo), providers="cpu", threads=1, models=["resnext_mini"])
    assert sorted(repo.models["resnext_mini"]) == [2]  # the newest only
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        for e in (_error(lambda: s.Classify(tensor_request(X, model="resnext_mini", version=1), timeout=30)),
                  _error(lambda: k.ModelInfer(_infer("resnext_mini:1"), timeout=30))):
            assert e.code() == CODE.NOT_FOUND
            assert e.details() == ("Request for unknown model: 'resnext_mini' version 1 is not found (loaded: 2); "
                                   "serving resnext_mini:2 fp32; version 1 is in the repository: start the server with "
                                   "--model resnext_mini:1")
        e = _error(lambda: s.Classify(tensor_request(X, model="resnext_mini:7"), timeout=30))
        assert e.details().endswith("the server serves other versions when started with --model resnext_mini:VERSION "
                                    "(repeatable)")
    both = load_repository(str(versions_repo), providers="cpu", threads=1, models=["resnext_mini:1", "resnext_mini:2"])
    with running(both) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        assert s.Classify(tensor_request(X, model="resnext_mini:1"), timeout=30).version == 1
        assert s.Classify(tensor_request(X, model="resnext_mini"), timeout=30).version == 2


def test_an_abbreviated_name_is_refused_with_the_canonical_one(versions_repo):
    repo = load_repository(str(versions_repo), providers="cpu", threads=1, models=["resnext_mini_32x4d"])
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        want = ("Request for unknown model: 'resnext' is not found; models are named exactly: 'resnext_mini_32x4d' "
                "is served under that name")
        for e in (_error(lambda: s.Classify(tensor_request(X, model="resnext"), timeout=30)),
                  _error(lambda: k.ModelInfer(_infer("resnext"), timeout=30))):
            assert (e.code(), e.details()) == (CODE.NOT_FOUND, want)
        # The metadata's architecture name counts too: this copy's model is resnext_mini.
        e = _error(lambda: s.Classify(tensor_request(X, model="resnext_mini"), timeout=30))
        assert "'resnext_mini_32x4d' is served under that name" in e.details()
        e = _error(lambda: s.Classify(tensor_request(X, model="resnext_min"), timeout=30))
        assert e.details() == "Request for unknown model: 'resnext_min' is not found; this server serves: " \
                              "resnext_mini_32x4d"


# --------------------------------------------------------------------------- the server's own failures


def _failing_session():
    """A real onnxruntime session that fails every run of a zoo model: its input has another name."""
    graph = helper.make_graph([helper.make_node("Identity", ["other"], ["logits"])], "g",
                              [helper.make_tensor_value_info("other", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                providers=["CPUExecutionProvider"])


INTERNAL_RE = re.compile(r"internal error \(request id ([0-9a-f]{16}); the server log has the details\)")


def test_an_internal_error_shows_the_client_a_request_id_and_the_log_the_traceback(exported, caplog):
    repo = load_repository(exported.root, providers="cpu", threads=1, models=["resnext_mini"])
    with caplog.at_level(logging.ERROR), running(repo) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Broken once serving: a model that fails its warmup is not served at all.
        repo.models["resnext_mini"][1].session = _failing_session()
        s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        messages = [_error(lambda: s.Classify(tensor_request(X), timeout=30)),
                    _error(lambda: k.ModelInfer(_infer("resnext_mini"), timeout=30))]
        (item,) = s.ClassifyStream(iter([tensor_request(X)]), timeout=30)
    details = [(e.code(), e.details()) for e in messages] + [(CODE.INTERNAL, item.error.message)]
    assert item.error.code == CODE.INTERNAL.value[0]
    ids = []
    for code, message in details:
        match = INTERNAL_RE.fullmatch(message)
        assert code == CODE.INTERNAL and match, message  # nothing of the exception: no type, no text
        ids.append(match.group(1))
    assert len(set(ids)) == 3
    log = caplog.text
    for request_id in ids:
        assert f"request id {request_id}" in log
    assert "Traceback" in log and "other" in log  # onnxruntime's own complaint, for the operator


def test_an_unknown_model_control_mode_is_one_clear_error(repo):
    from serve.server import create_server

    with pytest.raises(ValueError, match=r"Invalid model_control: 'bogus' \(one of none, poll, explicit\)"):
        create_server(repo, "127.0.0.1:0", model_control="bogus")
