"""contract.repository: the model repository layout, labels.txt, and config.pbtxt written and read as a pair."""
from __future__ import annotations

import os

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

from contract import repository as layout
from contract._proto.inference import model_config_pb2 as mc

# What `python -m export.onnx --triton` wrote before config.pbtxt went through the ModelConfig
# message: repositories on disk hold this layout, and it must keep reading as the same config.
LEGACY_CONFIG = """\
name: "resnext_mini"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 16, 16 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 500
}
"""


# --------------------------------------------------------------------------- config.pbtxt


def test_config_round_trip():
    config = layout.triton_config("resnext_mini", (3, 16, 16), 10, max_batch_size=32, max_queue_delay_us=500)
    text = layout.config_text(config)
    assert layout.parse_config(text) == config
    assert text.startswith('name: "resnext_mini"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 32\n')
    assert "dims: [3, 16, 16]" in text and 'label_filename: "labels.txt"' in text


def test_config_is_what_triton_loads():
    config = layout.parse_config(layout.config_text(layout.triton_config("m", [1, 28, 28], 4, 8, 250, "classes.txt")))
    assert (config.name, config.platform, config.max_batch_size) == ("m", "onnxruntime_onnx", 8)
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, inp.format, list(inp.dims)) == ("input", mc.TYPE_FP32,
                                                                    mc.ModelInput.FORMAT_NCHW, [1, 28, 28])
    assert (out.name, out.data_type, list(out.dims), out.label_filename) == ("logits", mc.TYPE_FP32, [4], "classes.txt")
    assert config.dynamic_batching.max_queue_delay_microseconds == 250


def test_legacy_config_reads_as_the_same_message():
    assert layout.parse_config(LEGACY_CONFIG) == layout.triton_config("resnext_mini", (3, 16, 16), 10, 32, 500)


def test_a_config_written_for_triton_by_hand_reads():
    text = LEGACY_CONFIG + ('instance_group [{ count: 2, kind: KIND_GPU }]\n'
                            'parameters { key: "k" value: { string_value: "v" } }\n')
    config = layout.parse_config(text)
    assert config.instance_group[0].count == 2 and config.parameters["k"].string_value == "v"


@pytest.mark.parametrize("text", [
    'name: "x"\nmax_batch: 3\n',  # a typo in a field name
    "max_batch_size: abc\n",
    "max_batch_size: 3000000000\n",  # int32 in Triton's message
    'input [{ name: "input" data_type: TYPE_FLOAT32 }]\n',  # not a DataType
    'name: "x"\ninput [\n',  # cut off
])
def test_parse_config_refuses_what_triton_refuses(text):
    with pytest.raises(layout.ConfigError, match="not a Triton model config: "):
        layout.parse_config(text)


def test_read_config(tmp_path):
    path = tmp_path / "config.pbtxt"
    assert layout.read_config(path) is None  # no file: no config
    path.write_text(LEGACY_CONFIG)
    assert layout.read_config(path).max_batch_size == 32
    path.write_text("max_batch_size: -4\nplatform: 7\n")
    with pytest.raises(layout.ConfigError, match=f"^{path}: not a Triton model config: 2:"):
        layout.read_config(path)
    path.write_bytes(b"name: \"\xff\"\n")
    with pytest.raises(layout.ConfigError, match=f"^cannot read {path}: "):
        layout.read_config(path)


# The fields the exporter writes, with the numbers and types of Triton's model_config.proto
# (triton-inference-server/common): a renumbered field would still round-trip here but not in Triton.
TRITON_FIELDS = {
    "ModelConfig": {"name": 1, "platform": 2, "max_batch_size": 4, "input": 5, "output": 6, "dynamic_batching": 11,
                    "instance_group": 7, "parameters": 14},
    "ModelInput": {"name": 1, "data_type": 2, "format": 3, "dims": 4},
    "ModelOutput": {"name": 1, "data_type": 2, "dims": 3, "label_filename": 4},
    "ModelDynamicBatching": {"preferred_batch_size": 1, "max_queue_delay_microseconds": 2},
}


def test_model_config_is_tritons():
    for message, fields in TRITON_FIELDS.items():
        descriptor = mc.DESCRIPTOR.message_types_by_name[message]
        assert {f: descriptor.fields_by_name[f].number for f in fields} == fields, message
    assert mc.DataType.Value("TYPE_FP32") == 11 and mc.ModelInput.Format.Value("FORMAT_NCHW") == 2
    assert mc.ModelConfig.DESCRIPTOR.fields_by_name["max_batch_size"].type == FieldDescriptor.TYPE_INT32


def test_model_config_is_generated_once():
    """protobuf refuses inference.ModelConfig registered from a second file: one stub in the tree."""
    found = descriptor_pool.Default().FindMessageTypeByName("inference.ModelConfig")
    assert found.file.name == "contract/_proto/inference/model_config.proto"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    packages = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py"))]
    assert {"contract", "serve", "export", "zoo"} <= set(packages)
    stubs = [os.path.relpath(os.path.join(d, f), root) for package in packages
             for d, _, files in os.walk(os.path.join(root, package)) for f in files if f == "model_config_pb2.py"]
    assert stubs == [os.path.join("contract", "_proto", "inference", "model_config_pb2.py")]


# --------------------------------------------------------------------------- layout


def test_versions(tmp_path):
    model_dir = tmp_path / "m"
    assert layout.versions(model_dir) == []  # no directory yet
    for d in ("1", "3", "10", "0", "x", "2.5", "tmp-in-progress", "\u0663"):  # the last: an Arabic-Indic 3
        (model_dir / d).mkdir(parents=True)
    (model_dir / "4").write_text("a file, not a version")
    assert layout.versions(model_dir) == [1, 3, 10]
    assert layout.model_file(model_dir, 3) == os.path.join(model_dir, "3", "model.onnx")


def test_model_names(tmp_path):
    for d in ("b/1", "a/2", "empty", "no-versions/x", ".hidden/1", "-dash/1", "with.dot_and-dash/7"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "file").write_text("")
    assert layout.model_names(tmp_path) == ["a", "b", "with.dot_and-dash"]


@pytest.mark.parametrize("name,ok", [("resnext_mini", True), ("m1.v2-x", True), ("_x", True), ("", False),
                                     (".hidden", False), ("-x", False), ("a/b", False), ("a b", False),
                                     ("..", False), ("a\n", False)])
def test_is_model_name(name, ok):
    assert layout.is_model_name(name) is ok


# --------------------------------------------------------------------------- labels.txt


def test_labels_round_trip(tmp_path):
    labels = ["cat", "hot dog", "  padded  ", "ünïcode", "", "last"]
    text = layout.labels_text(labels)
    assert text == "cat\nhot dog\n  padded  \nünïcode\n\nlast\n"
    assert layout.parse_labels(text) == labels
    path = tmp_path / "labels.txt"
    path.write_bytes(text.encode())
    assert layout.read_labels(path) == labels


def test_labels_text_refuses_line_breaks():
    for bad in ("a\nb", "a\r"):
        with pytest.raises(ValueError, match="holds a line break"):
            layout.labels_text(["ok", bad])


def test_parse_labels_tolerates_crlf_and_trailing_blank_lines(tmp_path):
    assert layout.parse_labels("a\r\nb\r\n\r\n  \n") == ["a", "b"]
    assert layout.parse_labels("") == []
    assert layout.read_labels(tmp_path / "missing.txt") is None
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert layout.read_labels(tmp_path / "latin1.txt") is None
