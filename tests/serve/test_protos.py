"""The checked-in stubs in serve/_proto are what `make protos` makes from protos/ today."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from serve._proto.zoo.serving.v1 import classifier_pb2, classifier_pb2_grpc
from tests.serve.conftest import REPO_ROOT

PROTO = "protos/zoo/serving/v1/classifier.proto"
GENERATED = "serve/_proto/zoo/serving/v1"
STUBS = ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py")


def test_stubs_in_step_with_proto(tmp_path):
    """Regenerate with the Makefile's own command into a temp dir and diff, byte for byte."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    tools = importlib.metadata.version("grpcio-tools")
    if tools != classifier_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"grpcio-tools {tools} is installed; the stubs were made with "
                    f"{classifier_pb2_grpc.GRPC_GENERATED_VERSION} (the descriptor test still runs)")
    result = subprocess.run(["make", "-s", "protos", f"PY={sys.executable}", f"PROTO_OUT={tmp_path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in STUBS:
        fresh = (tmp_path / GENERATED / name).read_text()
        with open(os.path.join(REPO_ROOT, GENERATED, name)) as f:
            checked_in = f.read()
        assert fresh == checked_in, f"{GENERATED}/{name} is stale: run `make protos` and commit the result"


def test_descriptor_in_step_with_proto(tmp_path):
    """Any grpcio-tools version: the compiled .proto equals the descriptor the stubs carry."""
    from grpc_tools import protoc

    out = tmp_path / "classifier.pb"
    code = protoc.main(["protoc", "-Iserve/_proto=" + os.path.join(REPO_ROOT, "protos"),
                        f"--descriptor_set_out={out}", os.path.join(REPO_ROOT, PROTO)])
    assert code == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # protoc's descriptor sets carry them; generated code does not
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(classifier_pb2.DESCRIPTOR.serialized_pb)
    assert fresh.name == "serve/_proto/zoo/serving/v1/classifier.proto" and fresh.package == "zoo.serving.v1"
    assert fresh == checked_in, "serve/_proto is stale: run `make protos` and commit the result"


def _drop_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _drop_json_names(m.nested_type)


def test_generated_imports_are_package_qualified():
    with open(os.path.join(REPO_ROOT, GENERATED, "classifier_pb2_grpc.py")) as f:
        assert "from serve._proto.zoo.serving.v1 import classifier_pb2" in f.read()
