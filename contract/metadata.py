"""The metadata an exported ONNX model carries: what ``serve`` learns about a model from ``export``.

Torch-free on purpose (the server never imports torch), and onnx-free at import time: a server
holding only an onnxruntime session reads the same keys with
``decode_metadata(session.get_modelmeta().custom_metadata_map)``.

Keys in the model's ``metadata_props`` (all values are strings; JSON where marked):

    zoo.model       registry name, e.g. "resnext50_32x4d"
    zoo.version     model version, the Triton version directory ("1", "2", ...)
    zoo.labels      JSON list of class labels, index order (len == number of logits)
    zoo.input_size  JSON [C, H, W] the model takes (the batch axis is dynamic)
    zoo.mean        JSON list, per-channel mean the input was normalised with
    zoo.std         JSON list, per-channel std: x = (pixel / 255 - mean) / std
    zoo.norm        "bn", "gn", "ln" or "in"
    zoo.folded      "true" when BatchNorm was folded away, else "false"
    zoo.precision   "fp32", "fp16" or "int8" (inputs and outputs are float32 in all three)
    zoo.source      "random-init", or "checkpoint:PATH sha256:HEX" / "torchvision:PATH sha256:HEX"
    zoo.crop_pct    float: image -> resize shorter side to round(H / crop_pct) (bilinear) ->
                    center crop H x W, as contract.preprocess.val_transform (1.0 for
                    digits/synthetic)
    zoo.created     ISO 8601 UTC time of the export

Optional, checked when present (exports older than these keys lack them):

    zoo.flops       int: FLOPs of one forward pass at batch 1 and zoo.input_size (conv and matmul
                    layers, a multiply-add counts as 2), as zoo.flops.count_flops and
                    ``python -m zoo list`` count them
    zoo.dense_twin  for a depthwise variant: the registry name of the dense model it is measured
                    against (e.g. "resnext_mini" for "resnext_mini_dw")
    zoo.int8        int8 exports: JSON object, how it was quantized (activation and weight types,
                    format, per-channel, --int8-exclude and the nodes kept fp32, calibration)

Optional (informational): zoo.data (the dataset spec it was trained on), zoo.weights ("model" or
"ema": which of a checkpoint's weights), zoo.act and zoo.attn (the activation and attention a
checkpoint's model was built with, when given), zoo.opset, zoo.exporter. The input is named
``input`` [N, C, H, W] float32 and the output ``logits``
[N, len(labels)] float32.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from contract.names import is_model_name

PREFIX = "zoo."
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PRECISIONS = ("fp32", "fp16", "int8")

# short name -> kind of value; the full key is PREFIX + short name.
FIELDS: dict[str, str] = {
    "model": "str",
    "version": "int",
    "labels": "json",
    "input_size": "json",
    "mean": "json",
    "std": "json",
    "norm": "str",
    "folded": "bool",
    "precision": "str",
    "source": "str",
    "crop_pct": "float",
    "created": "str",
}
REQUIRED = tuple(FIELDS)
# Keys an export may leave out; same kinds as FIELDS.
OPTIONAL: dict[str, str] = {
    "flops": "int",
    "dense_twin": "str",
    "int8": "json",
}


class MetadataError(ValueError):
    """Metadata that is missing or malformed; the message names the key."""


def encode_metadata(**fields: Any) -> dict[str, str]:
    """``{"zoo.KEY": "string value"}`` for the given short names (the FIELDS plus any extras).

    Lists and tuples are JSON-encoded, booleans become "true"/"false", everything else ``str``.
    """
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise MetadataError(f"metadata is missing {', '.join(missing)}")
    out: dict[str, str] = {}
    for key, value in fields.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        else:
            text = str(value)
        out[PREFIX + key] = text
    return out


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """Parse ``zoo.*`` string properties into short names with Python values.

    ``labels`` becomes a list of str, ``input_size`` a list of 3 ints, ``mean``/``std`` lists
    of floats (one per channel), ``version`` an int and ``folded`` a bool; extras stay strings.

    Raises:
        MetadataError: a required key is missing or a value does not parse.
    """
    missing = [PREFIX + k for k in REQUIRED if PREFIX + k not in props]
    if missing:
        raise MetadataError(f"not a zoo export: missing metadata {', '.join(missing)}")
    out: dict[str, Any] = {}
    for full, text in props.items():
        if not full.startswith(PREFIX):
            continue
        key = full[len(PREFIX):]
        kind = FIELDS.get(key) or OPTIONAL.get(key, "str")
        try:
            if kind == "json":
                value: Any = json.loads(text)
            elif kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            elif kind == "bool":
                if text not in ("true", "false"):
                    raise ValueError(f"expected true or false, got {text!r}")
                value = text == "true"
            else:
                value = text
        except ValueError as e:
            raise MetadataError(f"bad metadata {full}: {e}") from None
        out[key] = value
    _validate(out)
    return out


def _validate(meta: dict[str, Any]) -> None:
    labels, size = meta["labels"], meta["input_size"]
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise MetadataError("bad metadata zoo.labels: expected a non-empty JSON list of strings")
    if (not isinstance(size, list) or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise MetadataError(f"bad metadata zoo.input_size: expected [C, H, W], got {size!r}")
    for key in ("mean", "std"):
        v = meta[key]
        if (not isinstance(v, list) or len(v) != size[0]
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise MetadataError(f"bad metadata zoo.{key}: expected {size[0]} numbers, got {v!r}")
        meta[key] = [float(x) for x in v]
    if any(s <= 0 for s in meta["std"]):
        raise MetadataError(f"bad metadata zoo.std: must be positive, got {meta['std']!r}")
    if not 0.0 < meta["crop_pct"] <= 1.0:
        raise MetadataError(f"bad metadata zoo.crop_pct: must be in (0, 1], got {meta['crop_pct']!r}")
    if meta["precision"] not in PRECISIONS:
        raise MetadataError(f"bad metadata zoo.precision: {meta['precision']!r}")
    if "flops" in meta and meta["flops"] <= 0:
        raise MetadataError(f"bad metadata zoo.flops: must be positive, got {meta['flops']!r}")
    if "dense_twin" in meta and not is_model_name(meta["dense_twin"]):
        raise MetadataError(f"bad metadata zoo.dense_twin: not a model name: {meta['dense_twin']!r}")
    if "int8" in meta and not isinstance(meta["int8"], dict):
        raise MetadataError(f"bad metadata zoo.int8: expected a JSON object, got {meta['int8']!r}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`decode_metadata` of the ONNX file at ``path`` (reads the graph, not external data)."""
    import onnx  # here, so that importing this module costs nothing for an onnxruntime-only reader

    model = onnx.load(os.fspath(path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in model.metadata_props})
