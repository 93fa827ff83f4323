"""The checked-in stubs in serve/_proto and contract/_proto are what `make protos` makes from protos/ today."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from google.protobuf import descriptor_pb2

from tests.serve.conftest import REPO_ROOT


@dataclass(frozen=True)
class Proto:
    path: str  # under the repository root
    package: str  # the protobuf package
    module: str  # the generated modules' Python package
    root: str  # where protoc's -I maps protos/ to: the generated files' folder and descriptor names
    variable: str  # the Makefile variable that lists it
    services: bool = True  # gRPC services, so a _pb2_grpc stub too

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def generated(self) -> str:
        return self.module.replace(".", "/")

    @property
    def stubs(self) -> tuple[str, ...]:
        grpc = (f"{self.stem}_pb2_grpc.py",) if self.services else ()
        return (f"{self.stem}_pb2.py", f"{self.stem}_pb2.pyi") + grpc

    def pb2(self):
        return importlib.import_module(f"{self.module}.{self.stem}_pb2")

    def pb2_grpc(self):
        return importlib.import_module(f"{self.module}.{self.stem}_pb2_grpc")


PROTOS = [
    Proto("protos/zoo/serving/v1/classifier.proto", "zoo.serving.v1", "serve._proto.zoo.serving.v1", "serve/_proto",
          "PROTOS"),
    Proto("protos/inference/grpc_predict_v2.proto", "inference", "serve._proto.inference", "serve/_proto", "PROTOS"),
    # Triton's ModelConfig (config.pbtxt), messages only, for the torch-free contract package.
    Proto("protos/inference/model_config.proto", "inference", "contract._proto.inference", "contract/_proto",
          "CONTRACT_PROTOS", services=False),
]
IDS = [p.stem for p in PROTOS]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """Every stub regenerated with the Makefile's own command, into a temp dir."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    tools = importlib.metadata.version("grpcio-tools")
    generated = PROTOS[0].pb2_grpc().GRPC_GENERATED_VERSION
    if tools != generated:
        pytest.skip(f"grpcio-tools {tools} is installed; the stubs were made with {generated} "
                    "(the descriptor test still runs)")
    out = tmp_path_factory.mktemp("protos")
    result = subprocess.run(["make", "-s", "protos", f"PY={sys.executable}", f"PROTO_OUT={out}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_makefile_generates_every_proto():
    with open(os.path.join(REPO_ROOT, "Makefile")) as f:
        lines = f.read().splitlines()
    for variable in sorted({p.variable for p in PROTOS}):
        line = next(line for line in lines if line.startswith(f"{variable} :="))
        assert sorted(line.split(":=", 1)[1].split()) == sorted(p.path for p in PROTOS if p.variable == variable)
    on_disk = sorted(os.path.relpath(os.path.join(d, f), REPO_ROOT)
                     for d, _, files in os.walk(os.path.join(REPO_ROOT, "protos"))
                     for f in files if f.endswith(".proto"))
    assert on_disk == sorted(p.path for p in PROTOS)


@pytest.mark.parametrize("proto", PROTOS, ids=IDS)
def test_stubs_in_step_with_proto(proto, regenerated):
    """Byte for byte what `make protos` writes today."""
    for name in proto.stubs:
        fresh = (regenerated / proto.generated / name).read_text()
        with open(os.path.join(REPO_ROOT, proto.generated, name)) as f:
            checked_in = f.read()
        assert fresh == checked_in, f"{proto.generated}/{name} is stale: run `make protos` and commit the result"


@pytest.mark.parametrize("proto", PROTOS, ids=IDS)
def test_descriptor_in_step_with_proto(proto, tmp_path):
    """Any grpcio-tools version: the compiled .proto equals the descriptor the stubs carry."""
    from grpc_tools import protoc

    out = tmp_path / f"{proto.stem}.pb"
    protos = os.path.join(REPO_ROOT, "protos")
    # The contract mapping second: the service protos import the one ModelConfig from there.
    code = protoc.main(["protoc", f"-I{proto.root}={protos}", f"-Icontract/_proto={protos}",
                        f"--descriptor_set_out={out}", os.path.join(REPO_ROOT, proto.path)])
    assert code == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # protoc's descriptor sets carry them; generated code does not
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(proto.pb2().DESCRIPTOR.serialized_pb)
    assert fresh.name == f"{proto.root}/" + proto.path.removeprefix("protos/") and fresh.package == proto.package
    assert fresh == checked_in, f"{proto.root} is stale: run `make protos` and commit the result"


def _drop_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _drop_json_names(m.nested_type)


@pytest.mark.parametrize("proto", [p for p in PROTOS if p.services], ids=[p.stem for p in PROTOS if p.services])
def test_generated_imports_are_package_qualified(proto):
    with open(os.path.join(REPO_ROOT, proto.generated, f"{proto.stem}_pb2_grpc.py")) as f:
        assert f"from {proto.module} import {proto.stem}_pb2" in f.read()


# The wire contract of the Open Inference Protocol: what Triton and KServe clients send. A field
# renumbered or retyped here would still compile and round-trip with our own stubs, so it is
# pinned against the public specification (kserve docs/predict-api/v2/grpc_predict_v2.proto).
KSERVE_FIELDS = {
    "ModelInferRequest": {"model_name": (1, "string"), "model_version": (2, "string"), "id": (3, "string"),
                          "parameters": (4, "map"), "inputs": (5, "message"), "outputs": (6, "message"),
                          "raw_input_contents": (7, "bytes")},
    "ModelInferRequest.InferInputTensor": {"name": (1, "string"), "datatype": (2, "string"), "shape": (3, "int64"),
                                           "parameters": (4, "map"), "contents": (5, "message")},
    "ModelInferRequest.InferRequestedOutputTensor": {"name": (1, "string"), "parameters": (2, "map")},
    "ModelInferResponse": {"model_name": (1, "string"), "model_version": (2, "string"), "id": (3, "string"),
                           "parameters": (4, "map"), "outputs": (5, "message"), "raw_output_contents": (6, "bytes")},
    "ModelInferResponse.InferOutputTensor": {"name": (1, "string"), "datatype": (2, "string"), "shape": (3, "int64"),
                                             "parameters": (4, "map"), "contents": (5, "message")},
    "InferParameter": {"bool_param": (1, "bool"), "int64_param": (2, "int64"), "string_param": (3, "string"),
                       "double_param": (4, "double"), "uint64_param": (5, "uint64")},
    "InferTensorContents": {"bool_contents": (1, "bool"), "int_contents": (2, "int32"), "int64_contents": (3, "int64"),
                            "uint_contents": (4, "uint32"), "uint64_contents": (5, "uint64"),
                            "fp32_contents": (6, "float"), "fp64_contents": (7, "double"),
                            "bytes_contents": (8, "bytes")},
    "ModelMetadataResponse": {"name": (1, "string"), "versions": (2, "string"), "platform": (3, "string"),
                              "inputs": (4, "message"), "outputs": (5, "message")},
    "ModelMetadataResponse.TensorMetadata": {"name": (1, "string"), "datatype": (2, "string"), "shape": (3, "int64")},
    "ServerMetadataResponse": {"name": (1, "string"), "version": (2, "string"), "extensions": (3, "string")},
    "ModelReadyRequest": {"name": (1, "string"), "version": (2, "string")},
    "ModelMetadataRequest": {"name": (1, "string"), "version": (2, "string")},
}
_FD = descriptor_pb2.FieldDescriptorProto
_TYPES = {_FD.TYPE_STRING: "string", _FD.TYPE_BYTES: "bytes", _FD.TYPE_BOOL: "bool", _FD.TYPE_INT32: "int32",
          _FD.TYPE_INT64: "int64", _FD.TYPE_UINT32: "uint32", _FD.TYPE_UINT64: "uint64", _FD.TYPE_FLOAT: "float",
          _FD.TYPE_DOUBLE: "double", _FD.TYPE_MESSAGE: "message"}


def test_open_inference_protocol_wire_contract():
    pb2 = PROTOS[1].pb2()
    service = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer", "ModelStreamInfer", "ModelConfig",
                                                 "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                                                 "RepositoryModelUnload", "SystemSharedMemoryStatus",
                                                 "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                                                 "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
                                                 "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings"]
    streaming = [m.name for m in service.methods if m.client_streaming or m.server_streaming]
    assert streaming == ["ModelStreamInfer"]
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    for path, fields in KSERVE_FIELDS.items():
        message = pb2.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
        for nested in path.split(".")[1:]:
            message = message.nested_types_by_name[nested]
        got = {}
        for f in message.fields:
            kind = _TYPES[f.type]
            if kind == "message" and f.message_type.GetOptions().map_entry:
                kind = "map"
            got[f.name] = (f.number, kind)
        assert got == fields, path
