"""Security of serving: loopback by default, a token on every RPC but health, TLS with a
self-signed certificate, ``torch.load(weights_only=True)`` everywhere, and no request path that
reaches the filesystem."""
from __future__ import annotations

import ast
import builtins
import io
import os
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from tests.reliability.conftest import INPUT_SIZE, REPO_ROOT, ServeProcess, report, running
from tests.serve.conftest import tensor_request

CODE = grpc.StatusCode
TOKEN = "s3cret-token"


def _listening_addresses(pid: int) -> list[str]:
    """``HEXADDR:PORT`` of every listening TCP socket of process ``pid`` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    out.append(fields[1])
    return out


def test_default_bind_is_loopback(exported):
    with ServeProcess("--model-dir", exported.root, "--port", "0", "--threads", "1", "--metrics-port", "0") as server:
        assert server.host == "127.0.0.1", server.line
        listening = _listening_addresses(server.pid)
        assert server.terminate() == 0
    assert len(listening) >= 3, listening  # gRPC, HTTP and metrics
    # 127.0.0.1, ::ffff:127.0.0.1 (IPv4-mapped) and ::1, in /proc's byte order
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
    assert all(a.startswith(loopback) for a in listening), listening
    report(f"security: default `python -m serve` listens only on loopback ({len(listening)} sockets: "
           f"gRPC + HTTP + metrics)")


def _reflection_list(channel, metadata=()):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        metadata=metadata, timeout=10)
    return [s.name for r in answers for s in r.list_services_response.service]


def test_token_on_every_rpc_and_tls(repo, tls_files):
    key, cert = (tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes()
    x = np.zeros(INPUT_SIZE, np.float32)
    infer = kpb.ModelInferRequest(model_name="resnext_mini", raw_input_contents=[x[None].tobytes()])
    infer.inputs.add(name="input", datatype="FP32", shape=[1, *INPUT_SIZE])
    with running(repo, tls=(key, cert), token=TOKEN) as (_, port):
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
            calls = {
                "Classify": lambda md: s.Classify(tensor_request(x, model="resnext_mini"), metadata=md, timeout=10),
                "ClassifyStream": lambda md: list(s.ClassifyStream(iter([tensor_request(x, model="resnext_mini")]),
                                                                   metadata=md, timeout=10)),
                "ListModels": lambda md: s.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
                "GetLatencyReport": lambda md: s.GetLatencyReport(pb.LatencyReportRequest(), metadata=md, timeout=10),
                "ModelInfer": lambda md: k.ModelInfer(infer, metadata=md, timeout=10),
                "ModelMetadata": lambda md: k.ModelMetadata(kpb.ModelMetadataRequest(name="resnext_mini"),
                                                            metadata=md, timeout=10),
                "ModelReady": lambda md: k.ModelReady(kpb.ModelReadyRequest(name="resnext_mini"), metadata=md,
                                                      timeout=10),
                "ServerMetadata": lambda md: k.ServerMetadata(kpb.ServerMetadataRequest(), metadata=md, timeout=10),
                "reflection": lambda md: _reflection_list(channel, md),
            }
            good = [("authorization", f"Bearer {TOKEN}")]
            for name, call in calls.items():
                assert call(good), name  # with the token: answered
                for bad in ((), [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
                            [("authorization", f"Bearer {TOKEN}x")], [("authorization", "")]):
                    with pytest.raises(grpc.RpcError) as info:
                        call(bad)
                    assert info.value.code() == CODE.UNAUTHENTICATED, (name, bad, info.value)
            # health (and the protocol's own liveness/readiness probes) stay open
            h = health_pb2_grpc.HealthStub(channel)
            assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert k.ServerLive(kpb.ServerLiveRequest(), timeout=10).live
            assert k.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # plaintext to the TLS port
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ClassifierStub(channel).Classify(tensor_request(x, model="resnext_mini"), metadata=good,
                                                         timeout=5)
            assert info.value.code() == CODE.UNAVAILABLE
    report(f"security: token required on {len(calls)} RPCs ({', '.join(calls)}), health open; "
           "TLS with a self-signed certificate; plaintext refused")


def test_torch_load_always_weights_only():
    calls, texts = [], 0
    for top in ("zoo", "export", "serve", "bench"):
        for dirpath, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                source = open(path, encoding="utf-8").read()
                code_only = "\n".join(line.split("#")[0] for line in source.splitlines())
                tree = ast.parse(source, path)
                found = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                         and n.func.attr == "load" and isinstance(n.func.value, ast.Name)
                         and n.func.value.id == "torch"]
                # textual calls outside docstrings/comments must all be the AST's (no aliasing tricks)
                strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                in_code = len(re.findall(r"torch\.load\(", code_only)) - sum(s.count("torch.load(") for s in strings)
                assert in_code <= len(found), f"{path}: torch.load( in code the check cannot see"
                assert not re.search(r"from torch import[^\n]*\bload\b|=\s*torch\.load\s*(?!\s|\()", code_only), path
                for n in found:
                    kw = {k.arg: k.value for k in n.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    calls.append((f"{os.path.relpath(path, REPO_ROOT)}:{n.lineno}", ok))
                texts += len(found)
    bad = [where for where, ok in calls if not ok]
    assert calls and not bad, f"torch.load without weights_only=True: {bad}"
    report(f"security: {len(calls)} torch.load calls, all weights_only=True ({', '.join(w for w, _ in calls)})")


HOSTILE_NAMES = ["../../etc/passwd", "/etc/passwd", "../", "..", ".", "resnext_mini/../densenet_mini",
                 "resnext_mini/1/model.onnx", "resnext_mini\x00", "\x00/etc/passwd", "~root", "%2e%2e%2fetc",
                 "..\\..\\windows", "/proc/self/environ", "é" * 300]


def test_no_request_reaches_the_filesystem(repo, monkeypatch):
    opened = []
    real = {"builtins.open": builtins.open, "io.open": io.open, "os.open": os.open, "os.stat": os.stat,
            "os.listdir": os.listdir, "os.scandir": os.scandir}

    def spy(label):
        def wrapper(*args, **kwargs):
            opened.append((label, args[:1]))
            return real[label](*args, **kwargs)
        return wrapper

    x = np.zeros(INPUT_SIZE, np.float32)
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s, k = pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
        assert s.Classify(tensor_request(x, model="resnext_mini"), timeout=10).classes  # warm: lazy imports done
        for target, label in ((builtins, "builtins.open"), (io, "io.open"), (os, "os.open"), (os, "os.stat"),
                              (os, "os.listdir"), (os, "os.scandir")):
            monkeypatch.setattr(target, label.split(".")[1], spy(label))
        seen = set()
        try:
            for name in HOSTILE_NAMES:
                for version in (0, 1):
                    infer = kpb.ModelInferRequest(model_name=name, model_version=str(version or ""),
                                                  raw_input_contents=[x[None].tobytes()])
                    infer.inputs.add(name="input", datatype="FP32", shape=[1, *INPUT_SIZE])
                    for call in (lambda: s.Classify(tensor_request(x, model=name, version=version), timeout=10),
                                 lambda: k.ModelInfer(infer, timeout=10),
                                 lambda: k.ModelMetadata(
                                     kpb.ModelMetadataRequest(name=name, version=str(version or "")), timeout=10),
                                 lambda: s.GetLatencyReport(pb.LatencyReportRequest(model=name), timeout=10)):
                        with pytest.raises(grpc.RpcError) as info:
                            call()
                        seen.add(info.value.code())
                        assert info.value.code() == CODE.NOT_FOUND, (name, info.value)
                    assert not k.ModelReady(kpb.ModelReadyRequest(name=name), timeout=10).ready
                    item = list(s.ClassifyStream(iter([tensor_request(x, model=name)]), timeout=10))[0]
                    assert item.error.code == CODE.NOT_FOUND.value[0]
        finally:
            monkeypatch.undo()
    assert not opened, f"requests touched the filesystem: {opened[:5]}"
    report(f"security: {len(HOSTILE_NAMES)} hostile model names x 6 RPCs: all NOT_FOUND / not ready, "
           "no file opened, stat'ed or listed")
