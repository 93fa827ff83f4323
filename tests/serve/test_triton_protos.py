"""The Triton messages and RPCs in protos/inference/grpc_predict_v2.proto are Triton's, on the wire.

Stock clients (tritonclient, perf_analyzer, Triton's examples) were built from Triton's own
grpc_service.proto; a field renumbered, retyped or renamed in the copy would still compile and
round-trip through the project's own client, and break only theirs. So Triton's file, vendored
unchanged in tests/triton_examples/protos, is compiled here and every message and RPC the
project's service declares is compared with Triton's, field by field.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from serve._proto.inference import grpc_predict_v2_pb2

TRITON_PROTOS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "triton_examples", "protos")
SERVICE = "GRPCInferenceService"


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Triton's grpc_service.proto and model_config.proto, compiled by protoc, by file name."""
    out = tmp_path_factory.mktemp("triton") / "triton.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{TRITON_PROTOS}", "--include_imports",
                    f"--descriptor_set_out={out}", "grpc_service.proto"], check=True, capture_output=True)
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}


def _ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = {}
    for fd in (grpc_predict_v2_pb2.DESCRIPTOR, *grpc_predict_v2_pb2.DESCRIPTOR.dependencies):
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        out[fd.name] = proto
    return out


def _messages(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message, nested ones too, by its full name (``inference.ModelInferRequest.InferInputTensor``)."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, messages) -> None:
        for m in messages:
            found[f"{prefix}.{m.name}"] = m
            walk(f"{prefix}.{m.name}", m.nested_type)

    for f in files.values():
        walk(f.package, f.message_type)
    return found


def _fields(m: descriptor_pb2.DescriptorProto) -> dict[int, tuple]:
    """What the wire and the generated code of a client depend on, per field number. Type names are
    compared without the package prefix protoc adds (``.inference.``)."""
    return {f.number: (f.name, f.type, f.label, f.type_name.rsplit(".inference.", 1)[-1],
                       f.HasField("oneof_index") and m.oneof_decl[f.oneof_index].name)
            for f in m.field}


def test_every_message_of_the_service_is_tritons_field_for_field(triton):
    theirs = _messages(triton)
    ours = _messages(_ours())
    shared = sorted(set(ours) & set(theirs))
    # The service's own messages, and ModelConfig's: all of them are Triton's.
    assert "inference.ModelInferRequest.InferInputTensor" in shared and "inference.ModelConfig" in shared
    missing = sorted(n for n in ours if n not in theirs)
    assert not missing, f"messages in the package inference that Triton does not define: {missing}"
    for name in shared:
        assert _fields(ours[name]) == _fields(theirs[name]), name
        enums = {e.name: [(v.name, v.number) for v in e.value] for e in theirs[name].enum_type}
        assert {e.name: [(v.name, v.number) for v in e.value] for e in ours[name].enum_type} == enums, name


def test_every_rpc_is_tritons_with_the_same_types_and_streaming(triton):
    theirs = {m.name: m for f in triton.values() for s in f.service if s.name == SERVICE for m in s.method}
    ours = {m.name: m for f in _ours().values() for s in f.service if s.name == SERVICE for m in s.method}
    assert ours, "the project's service is not named inference.GRPCInferenceService"
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, m in ours.items():
        t = theirs[name]
        assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == \
            (t.input_type, t.output_type, t.client_streaming, t.server_streaming), name
