"""contract.metadata: the zoo.* keys an export writes and a server reads, encoded and checked."""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from contract.metadata import (FIELDS, INPUT_NAME, OUTPUT_NAME, PREFIX, MetadataError, decode_metadata,
                               encode_metadata, read_metadata)

GOOD = dict(model="resnext_mini", version=3, labels=["cat", "dog"], input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3),
            std=[0.2, 0.25, 0.3], norm="bn", folded=True, precision="int8", source="random-init", crop_pct=0.875,
            created="2024-01-02T03:04:05+00:00")


def test_round_trip():
    props = encode_metadata(**GOOD, data="digits")
    assert set(props) == {PREFIX + k for k in FIELDS} | {"zoo.data"}
    assert props["zoo.labels"] == '["cat", "dog"]' and props["zoo.folded"] == "true"
    assert all(isinstance(v, str) for v in props.values())
    meta = decode_metadata({**props, "other.key": "ignored"})
    assert meta == dict(GOOD, input_size=[3, 32, 32], mean=[0.5, 0.4, 0.3], data="digits")
    assert type(meta["version"]) is int and type(meta["crop_pct"]) is float and meta["folded"] is True


def test_missing_keys_are_named():
    with pytest.raises(MetadataError, match="metadata is missing crop_pct"):
        encode_metadata(**{k: v for k, v in GOOD.items() if k != "crop_pct"})
    props = encode_metadata(**GOOD)
    del props["zoo.labels"], props["zoo.std"]
    with pytest.raises(MetadataError, match="not a zoo export: missing metadata zoo.labels, zoo.std"):
        decode_metadata(props)


@pytest.mark.parametrize("key,text,match", [
    ("version", "two", "bad metadata zoo.version"),
    ("labels", "[cat]", "bad metadata zoo.labels"),
    ("labels", "[]", "non-empty JSON list of strings"),
    ("labels", "[1, 2]", "non-empty JSON list of strings"),
    ("input_size", "[3, 32]", r"expected \[C, H, W\], got \[3, 32\]"),
    ("input_size", "[3, 0, 32]", r"expected \[C, H, W\]"),
    ("input_size", "[true, 32, 32]", r"expected \[C, H, W\]"),
    ("mean", "[0.5, 0.5]", "zoo.mean: expected 3 numbers"),
    ("std", '["a", "b", "c"]', "zoo.std: expected 3 numbers"),
    ("std", "[0.2, 0.0, 0.3]", "zoo.std: must be positive"),
    ("folded", "yes", "expected true or false"),
    ("crop_pct", "0", r"zoo.crop_pct: must be in \(0, 1\]"),
    ("crop_pct", "1.5", r"zoo.crop_pct: must be in \(0, 1\]"),
    ("precision", "fp64", "bad metadata zoo.precision: 'fp64'"),
])
def test_bad_values_are_refused(key, text, match):
    props = encode_metadata(**GOOD)
    props[PREFIX + key] = text
    with pytest.raises(MetadataError, match=match):
        decode_metadata(props)


def test_read_metadata_from_an_onnx_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "g",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph)
    for key, value in encode_metadata(**GOOD).items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    meta = read_metadata(path)
    assert meta["labels"] == ["cat", "dog"] and meta["precision"] == "int8"
    assert json.loads(encode_metadata(**meta)["zoo.input_size"]) == [3, 32, 32]


def test_optional_flops_and_dense_twin_round_trip():
    props = encode_metadata(**GOOD, flops=12_345_678, dense_twin="resnext_mini")
    assert props["zoo.flops"] == "12345678" and props["zoo.dense_twin"] == "resnext_mini"
    meta = decode_metadata(props)
    assert meta["flops"] == 12_345_678 and type(meta["flops"]) is int and meta["dense_twin"] == "resnext_mini"
    older = decode_metadata(encode_metadata(**GOOD))  # an export made before these keys existed
    assert "flops" not in older and "dense_twin" not in older


@pytest.mark.parametrize("key,text,match", [
    ("flops", "1.5e9", "bad metadata zoo.flops"),
    ("flops", "0", "zoo.flops: must be positive, got 0"),
    ("flops", "-3", "zoo.flops: must be positive"),
    ("dense_twin", "", "zoo.dense_twin: not a model name: ''"),
    ("dense_twin", "../resnext_mini", "zoo.dense_twin: not a model name"),
])
def test_bad_optional_values_are_refused(key, text, match):
    props = encode_metadata(**GOOD)
    props[PREFIX + key] = text
    with pytest.raises(MetadataError, match=match):
        decode_metadata(props)
