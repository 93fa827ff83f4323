"""The model repository layout: what ``export`` writes and ``serve`` (and Triton) reads.

    ROOT/NAME/VERSION/model.onnx    VERSION is a positive integer directory
    ROOT/NAME/labels.txt            one class label per line, index order, shared by every version
    ROOT/NAME/config.pbtxt          optional: Triton's ``ModelConfig`` in protobuf text format

``config.pbtxt`` is written by :func:`config_text` and read by :func:`parse_config`, both through
Triton's own ``inference.ModelConfig`` message (``protos/inference/model_config.proto``), so what
is written reads back as the same message, and a file Triton would refuse is refused here too.
"""
from __future__ import annotations

import os
from typing import Sequence

from google.protobuf import text_format

from contract._proto.inference import model_config_pb2
from contract.metadata import INPUT_NAME, OUTPUT_NAME
from contract.names import NAME_RE, is_model_name, parse_version  # noqa: F401 (NAME_RE: part of the layout's API)

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
# A model's directory name (Triton's model name): no path separators, no leading dot or dash.
# Triton's backend for an ONNX model file run by onnxruntime.
PLATFORM = "onnxruntime_onnx"

ModelConfig = model_config_pb2.ModelConfig


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read; the message is one line naming the file."""


def versions(model_dir: str | os.PathLike) -> list[int]:
    """The version directories of ``model_dir`` (positive integer names), ascending; [] without it."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir)
                  if parse_version(d) is not None and os.path.isdir(os.path.join(model_dir, d)))


def model_names(root: str | os.PathLike) -> list[str]:
    """The model directories of ``root`` that hold at least one version directory, sorted."""
    return sorted(d for d in os.listdir(root)
                  if is_model_name(d) and os.path.isdir(os.path.join(root, d)) and versions(os.path.join(root, d)))


def model_file(model_dir: str | os.PathLike, version: int) -> str:
    """The path of version ``version``'s model file in ``model_dir``."""
    return os.path.join(model_dir, str(version), MODEL_FILE)


# --------------------------------------------------------------------------- labels.txt


def labels_text(labels: Sequence[str]) -> str:
    """labels.txt's content: one label per line, each line ended by ``\\n``."""
    broken = next((v for v in labels if "\n" in v or "\r" in v), None)
    if broken is not None:
        raise ValueError(f"label {broken!r} holds a line break: labels.txt holds one label per line")
    return "\n".join(labels) + "\n"


def parse_labels(text: str) -> list[str]:
    """The labels of a labels.txt's text (``\\n`` or ``\\r\\n`` line ends; trailing blank lines dropped)."""
    labels = [line.rstrip("\r") for line in text.split("\n")]
    while labels and not labels[-1].strip():
        labels.pop()
    return labels


def read_labels(path: str | os.PathLike) -> list[str] | None:
    """The labels of the labels.txt at ``path``; None when it is missing or not UTF-8 text."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return parse_labels(f.read())
    except (OSError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------- config.pbtxt


def triton_config(name: str, input_size: Sequence[int], num_classes: int, max_batch_size: int,
                  max_queue_delay_us: int, label_file: str = LABELS_FILE) -> ModelConfig:
    """The ``ModelConfig`` of an exported classifier: float32 ``input`` NCHW -> ``logits``, dynamic batching.

    Args:
        name: the model directory's name (Triton requires them equal).
        input_size: ``(C, H, W)``; Triton's dims leave out the batch axis.
        num_classes: the length of ``logits``.
        max_batch_size: the largest batch one request may carry.
        max_queue_delay_us: how long Triton's dynamic batcher waits to fill a batch.
        label_file: the labels file beside the versions, for Triton's classification extension.
    """
    config = ModelConfig(name=name, platform=PLATFORM, max_batch_size=int(max_batch_size))
    config.input.add(name=INPUT_NAME, data_type=model_config_pb2.TYPE_FP32,
                     format=model_config_pb2.ModelInput.FORMAT_NCHW, dims=[int(d) for d in input_size])
    config.output.add(name=OUTPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[int(num_classes)],
                      label_filename=label_file)
    config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    return config


def config_text(config: ModelConfig) -> str:
    """config.pbtxt's content for ``config`` (protobuf text format, dims on one line)."""
    return text_format.MessageToString(config, use_short_repeated_primitives=True)


def parse_config(text: str) -> ModelConfig:
    """The ``ModelConfig`` of a config.pbtxt's text; ConfigError for anything Triton would refuse to parse."""
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"not a Triton model config: {e}") from None


def read_config(path: str | os.PathLike) -> ModelConfig | None:
    """:func:`parse_config` of the file at ``path``; None when there is no such file.

    Raises:
        ConfigError: the file cannot be read or parsed; the message names it.
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {os.fspath(path)}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return parse_config(text)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None
