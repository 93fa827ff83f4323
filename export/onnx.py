"""Export a zoo model to ONNX: fold BatchNorm, export, check, verify parity, write metadata.

    python -m export.onnx resnext50 --checkpoint runs/train/best.pt --out models --triton
    python -m export.onnx resnext50 --torchvision-weights resnext50_32x4d-1a0047aa.pth
    python -m export.onnx resnext_mini --checkpoint best.pt --precision int8

Writes a Triton-style model repository::

    OUT/NAME/VERSION/model.onnx     input "input" [N, C, H, W] float32 -> "logits" [N, classes] float32
    OUT/NAME/labels.txt             one class label per line, index order
    OUT/NAME/config.pbtxt           with --triton (platform onnxruntime_onnx, dynamic batching)

The model file is written to a temporary name in the version directory and renamed only after
onnxruntime reproduces PyTorch (the *unfolded* eager model) within tolerance, so a file called
``model.onnx`` has always passed verification. A new version joins an existing OUT/NAME only with
the same labels and input size (labels.txt and config.pbtxt are shared by every version): otherwise
the export is refused before anything is written. The metadata keys are documented in
:mod:`contract.metadata`. Exit status: 0 exported, 1 verification failed, 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from contract.cli import HelpFormatter
from contract import repository as layout
from contract.metadata import INPUT_NAME, OUTPUT_NAME, PRECISIONS, encode_metadata

# Every default in one place.
DEFAULT_OUT = "models"  # ignored by git
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}  # dynamo's translation table starts at opset 18
MAX_OPSET = {"torchscript": 20, "dynamo": 23}
MIN_OPSET = 13  # Conv/Gemm/InstanceNormalization/QDQ per-channel all need >= 13
EXPORTERS = ("torchscript", "dynamo")
# fp32 must reproduce eager PyTorch to this max |diff| / max |logit| (BENCHMARKING.md "Traps":
# an absolute tolerance passes trivially on random-init logits of ~1e-9).
FP32_RTOL = 1e-4
# fp16 on random inputs (no val set to judge top-1 by): a loose relative bound that still
# catches a broken conversion.
FP16_RTOL = 2e-2
# fp16 and int8 must pick the same top-1 class as fp32 eager on at least this share of val images.
LOWP_MIN_AGREEMENT = 0.99
# ... except for random-init weights, whose near-tied logits make top-1 a coin toss: their
# fp16/int8 val logits must stay within this share of the logit scale instead.
LOWP_RANDOM_INIT_RTOL = 0.25
RANDOM_SAMPLES = 4  # random N(0, 1) inputs checked in every export
VAL_SAMPLES = 500  # val images checked at most (deterministic subset)
CALIB_SAMPLES = 128  # train images int8 calibration sees
CALIB_BATCH = 16
EVAL_BATCH = 32
LATENCY_RUNS = 20  # onnxruntime batch-1 runs for the median (after 3 warm-up runs)
TRITON_MAX_BATCH = 32
TRITON_QUEUE_DELAY_US = 500
CALIB_METHODS = ("minmax", "percentile", "entropy")


class UserError(Exception):
    """Bad input: reported as one line, exit 2, nothing written."""


class VerificationError(Exception):
    """onnxruntime does not reproduce PyTorch: exit 1, no model.onnx left behind."""


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.onnx", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter)
    p.add_argument("model", nargs="?", help="registry name or alias (resnext50, densenet121, resnext_mini, ...); "
                   "optional with --checkpoint")
    w = p.add_argument_group("weights (default: random initialisation, for benchmarks)")
    src = w.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="a zoo.train checkpoint: model, norm, classes, "
                     "input size, mean/std and dataset come from it")
    src.add_argument("--torchvision-weights", metavar="PATH",
                     help="a torchvision state_dict file for the same architecture (strict load)")
    w.add_argument("--norm", choices=("bn", "gn", "ln", "in"), default=None,
                   help="norm of a random-init model (default bn; a checkpoint brings its own)")
    w.add_argument("--num-classes", type=int, default=None,
                   help="classifier size without a checkpoint (default 1000, or the torchvision file's)")
    w.add_argument("--labels", metavar="FILE", help="class labels, one per line (default class_0, class_1, ...)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=DEFAULT_OUT, help="model repository root")
    o.add_argument("--name", default=None, help="model directory name (default: the registry name)")
    o.add_argument("--version", type=int, default=None, help="version directory (default: next free, from 1)")
    o.add_argument("--triton", action="store_true", help="also write config.pbtxt for Triton Inference Server")
    o.add_argument("--max-batch-size", type=int, default=TRITON_MAX_BATCH, help="Triton max_batch_size")
    e = p.add_argument_group("export")
    e.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']} for torchscript, "
                        f"{DEFAULT_OPSET['dynamo']} for dynamo)")
    e.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx.export(dynamo=False) (fast, what the tests use) or dynamo=True")
    e.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="export resolution (default: the checkpoint's or the model's)")
    e.add_argument("--no-fold", action="store_true", help="keep BatchNorm (exported as the exporter sees fit)")
    e.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16: fp16 weights and compute, fp32 I/O; int8: static QDQ, per-channel weights")
    v = p.add_argument_group("verification and calibration")
    v.add_argument("--calib-data", metavar="SPEC", default=None,
                   help="digits | synthetic | folder:PATH: int8 calibration and val images "
                        "(default: the checkpoint's dataset)")
    v.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES, help="train images used to calibrate int8")
    v.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax", help="int8 activation ranges")
    v.add_argument("--val-samples", type=int, default=VAL_SAMPLES, help="val images verified (0: none)")
    v.add_argument("--latency-runs", type=int, default=LATENCY_RUNS, help="batch-1 runs timed (0: skip)")
    v.add_argument("--threads", type=int, default=0,
                   help="threads for PyTorch and onnxruntime (0: their defaults, all cores)")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class Steps:
    """Numbered progress lines on stderr: ``[3/8] export (torchscript, opset 17) ... 1.2s``."""

    total: int
    quiet: bool = False
    done: int = 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[dict[str, str]]:
        self.done += 1
        note: dict[str, str] = {}
        t0 = time.perf_counter()
        print(f"[{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield note
        extra = f": {note['msg']}" if note.get("msg") else ""
        print(f"[{self.done}/{self.total}] {what} done in {time.perf_counter() - t0:.1f}s{extra}",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


@dataclass
class Plan:
    """Everything resolved from the arguments before any work or any write."""

    name: str  # registry name
    dir_name: str
    model: Any  # torch.nn.Module, eval mode, unfolded
    norm: str
    labels: list[str]
    input_size: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    source: str
    crop_pct: float  # the val transform's resize/crop ratio (zoo.data.val_transform)
    data_spec: str | None
    data_is_training_set: bool  # labels of the data are the model's classes
    data_seed: int = 0
    val_fraction: float = 0.2
    extra_meta: dict[str, str] = field(default_factory=dict)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _head_shape(state: dict) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) read off a torchvision-layout state_dict, None where absent."""
    classes = next((state[k].shape[0] for k in ("fc.weight", "classifier.weight") if k in state), None)
    chans = next((state[k].shape[1] for k in ("conv1.weight", "features.conv0.weight") if k in state), None)
    return classes, chans


def _read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise UserError(f"--labels {path}: {e.strerror or e}") from None
    while labels and not labels[-1].strip():
        labels.pop()
    if not labels or any(not v.strip() for v in labels):
        raise UserError(f"--labels {path}: needs one non-empty label per line")
    return labels


def resolve_plan(args: argparse.Namespace) -> Plan:
    """Check every argument and load the weights; UserError names the first problem."""
    from contract.preprocess import CROP_PCT
    from zoo.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from zoo.registry import create_model, get_model_spec, resolve_name
    from zoo.weights import WeightsError, describe_mismatch, read_state_dict

    if args.model is None and not args.checkpoint:
        raise UserError("name a model (e.g. resnext50) or pass --checkpoint")
    name = None
    if args.model is not None:
        try:
            name = resolve_name(args.model)
        except ValueError as e:
            raise UserError(str(e)) from None

    data_seed, val_fraction = 0, 0.2
    extra: dict[str, str] = {}
    if args.checkpoint:
        if args.labels is not None:
            raise UserError("--labels cannot be combined with --checkpoint: the checkpoint holds its classes")
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            hint = " (a torchvision state_dict? use --torchvision-weights)" if "not a zoo training" in str(e) else ""
            raise UserError(f"{e}{hint}") from None
        try:
            ckpt_name = resolve_name(str(ckpt["model_name"]))
        except ValueError:
            raise UserError(f"{args.checkpoint}: holds unknown model {ckpt['model_name']!r}") from None
        if name is not None and ckpt_name != name:
            raise UserError(f"{args.checkpoint} holds a {ckpt_name} checkpoint, not {name}")
        name = ckpt_name
        try:
            model = model_from_checkpoint(ckpt, args.checkpoint)
        except (CheckpointError, ValueError, TypeError) as e:
            raise UserError(str(e).splitlines()[0]) from None
        model_args = dict(ckpt["model_args"])
        norm = str(model_args.get("norm", "bn"))
        labels = [str(c) for c in ckpt["classes"]]
        for flag, given, fixed in (("--norm", args.norm, norm), ("--num-classes", args.num_classes, len(labels))):
            if given is not None and given != fixed:
                raise UserError(f"{args.checkpoint} fixes {flag} {fixed}; got {flag} {given}")
        input_size = tuple(int(v) for v in ckpt["input_size"])
        mean, std = [float(v) for v in ckpt["mean"]], [float(v) for v in ckpt["std"]]
        crop_pct = float(ckpt.get("crop_pct", CROP_PCT))
        data_spec = ckpt.get("data") or None
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        if isinstance(config.get("seed"), int):
            data_seed = config["seed"]
        if isinstance(config.get("val_fraction"), float) and 0 < config["val_fraction"] < 1:
            val_fraction = config["val_fraction"]
        source = f"checkpoint:{os.path.abspath(args.checkpoint)} sha256:{_sha256(args.checkpoint)}"
        if data_spec:
            extra["data"] = str(data_spec)
        n_out = getattr(_classifier(model), "out_features", len(labels))
        if len(labels) != n_out or len(input_size) != 3 or len(mean) != input_size[0] or len(std) != input_size[0]:
            raise UserError(f"{args.checkpoint}: inconsistent checkpoint ({len(labels)} classes for {n_out} "
                            f"logits, input_size {list(input_size)}, {len(mean)} mean values)")
    else:
        spec = get_model_spec(name)
        norm = args.norm or "bn"
        state = None
        num_classes, in_chans = args.num_classes, spec.input_size[0]
        if args.torchvision_weights:
            if norm != "bn":
                raise UserError(f"--torchvision-weights are BatchNorm weights; --norm {norm} does not fit them")
            try:
                state = dict(read_state_dict(args.torchvision_weights))
            except WeightsError as e:
                raise UserError(str(e)) from None
            file_classes, file_chans = _head_shape(state)
            if num_classes is None and file_classes is not None:
                num_classes = int(file_classes)
            in_chans = int(file_chans) if file_chans in (1, 3) else in_chans
        labels = _read_labels(args.labels) if args.labels else None
        if num_classes is None:
            num_classes = len(labels) if labels else 1000
        if num_classes < 1:
            raise UserError(f"Invalid --num-classes: {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise UserError(f"--labels {args.labels} has {len(labels)} labels for {num_classes} classes")
        labels = labels or [f"class_{i}" for i in range(num_classes)]
        model = create_model(name, num_classes=num_classes, norm=norm, in_chans=in_chans)
        if state is not None:
            problem = describe_mismatch(model, state)
            if problem:
                raise UserError(f"{args.torchvision_weights} does not fit {name}: {problem}")
            model.load_state_dict(state, strict=True)
            path = args.torchvision_weights
            source = f"torchvision:{os.path.abspath(path)} sha256:{_sha256(path)}"
        else:
            source = "random-init"
        input_size = (in_chans,) + tuple(spec.input_size[1:])
        mean, std = list(spec.mean), list(spec.std)
        if in_chans != len(mean):  # a 1-channel model: one mean/std, the average of the RGB ones
            mean, std = [float(np.mean(mean))] * in_chans, [float(np.mean(std))] * in_chans
        crop_pct = CROP_PCT
        data_spec = None

    if args.input_size is not None:
        h, w = args.input_size
        if h < 1 or w < 1:
            raise UserError(f"Invalid --input-size: {h} {w} (positive H W)")
        input_size = (input_size[0], h, w)
    if args.calib_data is not None:
        data_spec = args.calib_data
    if any("\n" in v or "\r" in v for v in labels):
        raise UserError("class labels may not contain line breaks (labels.txt holds one per line)")
    dir_name = args.name or name
    if not layout.is_model_name(dir_name):
        raise UserError(f"Invalid --name {dir_name!r}: letters, digits, '_', '.', '-' only")
    return Plan(name=name, dir_name=dir_name, model=model.eval(), norm=norm, labels=labels,
                input_size=tuple(input_size), mean=mean, std=std, source=source, crop_pct=crop_pct,
                data_spec=data_spec,
                data_is_training_set=bool(args.checkpoint) and args.calib_data in (None, extra.get("data")),
                data_seed=data_seed, val_fraction=val_fraction, extra_meta=extra)


def _classifier(model: Any) -> Any:
    return model.get_classifier()


def check_args(args: argparse.Namespace) -> None:
    exporter = args.exporter
    if args.opset is not None and not MIN_OPSET <= args.opset <= MAX_OPSET[exporter]:
        raise UserError(f"Invalid --opset {args.opset}: the {exporter} exporter supports "
                        f"{MIN_OPSET}..{MAX_OPSET[exporter]}")
    if exporter == "dynamo" and args.opset is not None and args.opset < DEFAULT_OPSET["dynamo"]:
        raise UserError(f"Invalid --opset {args.opset}: the dynamo exporter needs >= {DEFAULT_OPSET['dynamo']}")
    if args.version is not None and args.version < 1:
        raise UserError(f"Invalid --version: {args.version} (a positive integer)")
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--calib-samples", args.calib_samples, 1),
                             ("--val-samples", args.val_samples, 0), ("--latency-runs", args.latency_runs, 0),
                             ("--threads", args.threads, 0)):
        if value < low:
            raise UserError(f"Invalid {flag}: {value} (at least {low})")


def load_data(plan: Plan, args: argparse.Namespace) -> Any | None:
    """The DataBundle for verification and calibration, or None (UserError if asked for and broken)."""
    from zoo.data import DataError, build_datasets

    needed = args.precision == "int8"
    if plan.data_spec is None:
        if needed:
            raise UserError("--precision int8 needs calibration images: pass --calib-data digits|synthetic|"
                            "folder:PATH (or a checkpoint trained on a dataset)")
        return None
    if args.val_samples == 0 and not needed:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable images are listed in bundle.skipped
            return build_datasets(plan.data_spec, plan.input_size, seed=plan.data_seed,
                                  val_fraction=plan.val_fraction)
    except DataError as e:
        if args.calib_data is None and not needed:  # the checkpoint's dataset is gone: verify without it
            print(f"warning: skipping val verification: {e}", file=sys.stderr)
            return None
        raise UserError(f"data {plan.data_spec!r}: {e}") from None


# --------------------------------------------------------------------------- output paths


def _check_writable(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {probe} is not a writable directory")


def plan_version(model_dir: str, requested: int | None) -> int:
    if requested is None:
        existing = layout.versions(model_dir)
        return existing[-1] + 1 if existing else 1
    target = layout.model_file(model_dir, requested)
    if os.path.exists(target):
        raise UserError(f"{target} already exists: choose another --version or leave it out for the next free one")
    return requested


def _triton_dims(path: str) -> tuple[list[int] | None, list[int] | None]:
    """(first input's dims, first output's dims) of an existing config.pbtxt; None where it says nothing."""
    try:
        config = layout.read_config(path)
    except layout.ConfigError:
        return None, None

    def dims(tensors: Any) -> list[int] | None:
        return [int(d) for d in tensors[0].dims] if tensors and tensors[0].dims else None

    return (dims(config.input), dims(config.output)) if config is not None else (None, None)


def _describe_labels(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
    return f"{len(labels)} classes ({shown})"


def check_same_model(model_dir: str, labels: Sequence[str], input_size: Sequence[int]) -> None:
    """UserError when ``model_dir`` already holds versions of a model with other classes or another
    input size: labels.txt and config.pbtxt are shared by every version, so exporting there would
    rewrite them under the existing versions."""
    versions = [v for v in layout.versions(model_dir) if os.path.isfile(layout.model_file(model_dir, v))]
    if not versions:
        return
    from contract.metadata import read_metadata

    label_sources: list[list[str]] = []
    size_sources: list[list[int]] = []
    for v in reversed(versions):  # the newest version whose metadata reads
        try:
            meta = read_metadata(layout.model_file(model_dir, v))
        except Exception:  # noqa: BLE001 - a corrupt or foreign file says nothing about the classes
            continue
        label_sources.append(list(meta["labels"]))
        size_sources.append([int(d) for d in meta["input_size"]])
        break
    new_labels, new_size = list(labels), [int(d) for d in input_size]
    file_labels = layout.read_labels(os.path.join(model_dir, layout.LABELS_FILE))
    # compared with what this export would write there
    if file_labels and file_labels != layout.parse_labels(layout.labels_text(new_labels)):
        label_sources.append(file_labels)
    config_in, config_out = _triton_dims(os.path.join(model_dir, layout.CONFIG_FILE))
    if config_in:
        size_sources.append(config_in)
    old_labels = next((x for x in label_sources if x != new_labels), None)
    old_size = next((x for x in size_sources if x != new_size), None)
    old_count = None  # a class count only config.pbtxt tells
    if old_labels is None and config_out is not None and config_out != [len(new_labels)]:
        old_count = config_out[0] if len(config_out) == 1 else 0
    if old_labels is None and old_count is None and old_size is None:
        return
    if old_labels is not None:
        old_classes = _describe_labels(old_labels)
    elif old_count is not None:
        old_classes = f"{old_count} classes"
    else:
        old_classes = _describe_labels(new_labels)
    differ = []
    if old_labels is not None and len(old_labels) == len(new_labels):
        i = next(i for i, (a, b) in enumerate(zip(old_labels, new_labels)) if a != b)
        differ.append(f"label {i} is {old_labels[i]!r} there, {new_labels[i]!r} here")
    elif old_labels is not None or old_count is not None:
        differ.append("the classes differ")
    if old_size is not None:
        differ.append("the input size differs")
    where = "version " if len(versions) == 1 else "versions "
    raise UserError(
        f"{model_dir} already holds {where}{', '.join(map(str, versions))} with {old_classes}, "
        f"input {old_size or new_size}; this export has {_describe_labels(new_labels)}, input {new_size} "
        f"({' and '.join(differ)}). Every version shares its labels.txt and config.pbtxt: "
        "export under another --name or into a new --out")


class OutputDir:
    """Creates the version directory and removes what it created if the export fails."""

    def __init__(self, out: str, dir_name: str, version: int, explicit: bool) -> None:
        self.model_dir = os.path.join(out, dir_name)
        self.version = version
        self.explicit = explicit
        self.created: list[str] = []
        self.tmp: str | None = None

    @property
    def version_dir(self) -> str:
        return os.path.join(self.model_dir, str(self.version))

    def _mkdir(self, path: str, exist_ok: bool) -> None:
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            self._mkdir(parent, True)
        try:
            os.mkdir(path)
            self.created.append(path)
        except FileExistsError:
            if not exist_ok:
                raise

    def open(self) -> str:
        """Create the version directory (the next free one if another export took ours) -> temp path."""
        while True:
            try:
                self._mkdir(self.version_dir, exist_ok=self.explicit)
                break
            except FileExistsError:  # a concurrent export claimed this version
                self.version += 1
        fd, self.tmp = tempfile.mkstemp(prefix=".model.onnx.", suffix=".partial", dir=self.version_dir)
        os.close(fd)
        return self.tmp

    def commit(self) -> str:
        final = os.path.join(self.version_dir, layout.MODEL_FILE)
        os.replace(self.tmp, final)
        self.tmp = None
        _fsync_dir(self.version_dir)
        return final

    def rollback(self) -> None:
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = None
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty: never removes anything we did not write


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- export


def export_model(model: Any, input_size: Sequence[int], opset: int, exporter: str) -> Any:
    """``model`` (eval) -> onnx.ModelProto with a dynamic batch axis named ``batch``."""
    import onnx
    import torch

    dummy = torch.randn(2, *input_size)  # batch 2: an exporter must not specialise the batch to 1
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"):
        warnings.simplefilter("ignore")  # TorchScript deprecation notices and tracer warnings
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(model, (dummy,), buf, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            return onnx.load_from_string(buf.getvalue())
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(model, (dummy,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        return program.model_proto


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def count_ops(model: Any, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def count_batchnorm_with_statistics(model: Any) -> int:
    """BatchNormalization nodes that still normalize: all but the folded scale/shift ones
    (:class:`zoo.nn.ScaleShift`: mean 0, variance 1, epsilon 0), which are a plain affine map."""
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})

    def is_all(name: str, value: float) -> bool:
        return name in consts and bool((numpy_helper.to_array(consts[name]) == value).all())

    count = 0
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        if not (eps == 0 and is_all(n.input[3], 0.0) and is_all(n.input[4], 1.0)):
            count += 1
    return count


def check_graph(model: Any, input_size: Sequence[int], num_classes: int) -> Any:
    """onnx.checker (full) and strict shape inference; returns the model with inferred shapes."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)

    def dims(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = inferred.graph.input, inferred.graph.output
    expect_in, expect_out = list(input_size), [num_classes]
    if (inp.name != INPUT_NAME or not isinstance(dims(inp)[0], str) or dims(inp)[1:] != expect_in
            or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT):
        raise AssertionError(f"unexpected graph input {inp.name} {dims(inp)}")
    if out.name != OUTPUT_NAME or not isinstance(dims(out)[0], str) or dims(out)[1:] != expect_out:
        raise AssertionError(f"unexpected graph output {out.name} {dims(out)}")
    return inferred


def to_fp16(model: Any) -> Any:
    """fp16 weights and compute, fp32 ``input``/``logits`` (Cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings(), _quiet_loggers("onnxruntime"):
        warnings.simplefilter("ignore")  # "the value is out of fp16 range, clamped" for tiny weights
        converted = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the input Casts after the nodes that read them; onnx.checker wants
    # nodes in topological order.
    topological_sort(converted.graph)
    return converted


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise AssertionError(f"graph has a cycle or a dangling input near node {pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    copies = [type(n)() for n in ordered]
    for dst, src in zip(copies, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)


def to_int8(model: Any, calib: Iterator[np.ndarray], method: str, workdir: str) -> Any:
    """Static QDQ quantization with per-channel int8 weights, calibrated on ``calib`` batches.

    The node that writes ``logits`` keeps int8 weights but a float output: quantizing its output
    would round the logits themselves to 256 levels of their calibrated range (on a
    digits-trained resnext_mini that alone took the error from ~2% to ~12% of the logit scale).
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    src, pre, dst = (os.path.join(workdir, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(model, src)
    with _quiet_loggers("root", "onnxruntime"):
        # Shape inference plus onnxruntime's graph fusions, so QDQ pairs land on the fused graph.
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        head_ops = sorted({n.op_type for n in onnx.load(pre, load_external_data=False).graph.node
                           if OUTPUT_NAME in n.output})
        quantize_static(
            pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={"OpTypesToExcludeOutputQuantization": head_ops},
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method])
    quantized = onnx.load(dst)
    onnx.checker.check_model(quantized, full_check=True)
    return quantized


# --------------------------------------------------------------------------- verification


@dataclass
class Parity:
    what: str  # "random" or "val"
    count: int
    rel_diff: float  # max |onnx - eager| / max |eager|
    agreement: float  # share of samples whose top-1 matches (ties within the tolerance count as equal)
    acc_eager: float | None = None
    acc_onnx: float | None = None

    def describe(self, precision: str) -> str:
        text = f"max|diff|/scale {self.rel_diff:.2e}, top-1 agreement {100 * self.agreement:.2f}%"
        if self.acc_eager is not None:
            text += (f", accuracy fp32 eager {100 * self.acc_eager:.2f}% / {precision} onnx "
                     f"{100 * self.acc_onnx:.2f}%")
        if precision == "int8" and self.what == "random":
            text += " (N(0,1) inputs lie outside the calibrated ranges: not gated)"
        return text


def ort_session(path: str, threads: int = 0) -> Any:
    """A CPU onnxruntime session (module-level so tests can swap it); ``threads`` 0: all cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_logits(ref: np.ndarray, out: np.ndarray) -> tuple[float, np.ndarray]:
    """(max |out - ref| relative to the logit scale max |ref|, per-sample top-1 agreement).

    Two classes whose eager logits differ by less than FP32_RTOL of the scale are a tie: either
    pick agrees (random-init nets have near-equal logits, and float rounding order decides those).
    """
    ref = ref.astype(np.float64)
    scale = float(np.abs(ref).max())
    if not np.isfinite(out).all():
        return math.inf, np.zeros(len(ref), dtype=bool)
    diff = float(np.abs(out.astype(np.float64) - ref).max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    picked = ref[np.arange(len(ref)), out.argmax(1)]
    return rel, picked >= ref.max(1) - FP32_RTOL * scale


def run_pair(model: Any, session: Any, batches: Iterator[tuple[np.ndarray, np.ndarray | None]],
             what: str, total: int, progress: bool) -> Parity:
    """Run eager ``model`` and ``session`` on the same batches and compare."""
    import torch
    from tqdm import tqdm

    refs, outs, labels = [], [], []
    with torch.no_grad(), tqdm(total=total, desc=f"verify {what}", unit="img", file=sys.stderr,
                               disable=not progress, leave=False) as bar:
        for x, y in batches:
            refs.append(model(torch.from_numpy(x)).numpy())
            outs.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
            if y is not None:
                labels.append(y)
            bar.update(len(x))
    ref, out = np.concatenate(refs), np.concatenate(outs)
    rel, agree = compare_logits(ref, out)
    parity = Parity(what, len(ref), rel, float(agree.mean()))
    if labels:
        y = np.concatenate(labels)
        parity.acc_eager = float((ref.argmax(1) == y).mean())
        parity.acc_onnx = float((out.argmax(1) == y).mean())
    return parity


def _random_batches(input_size: Sequence[int]) -> Iterator[tuple[np.ndarray, None]]:
    rng = np.random.default_rng(0)
    yield rng.standard_normal((RANDOM_SAMPLES, *input_size), dtype=np.float32), None


def _renormalizer(bundle: Any, mean: Sequence[float], std: Sequence[float]):
    """Map the bundle's normalisation to the model's: x' = (x * std_b + mean_b - mean) / std."""
    mb, sb = np.asarray(bundle.mean, np.float32), np.asarray(bundle.std, np.float32)
    mm, sm = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mb.shape == mm.shape and np.allclose(mb, mm) and np.allclose(sb, sm):
        return lambda x: x
    shape = (1, -1, 1, 1)
    return lambda x: ((x * sb.reshape(shape) + mb.reshape(shape) - mm.reshape(shape)) / sm.reshape(shape)).astype(
        np.float32)


def _subset(n: int, k: int, seed: int = 0) -> np.ndarray:
    """A deterministic, class-order-independent subset of ``k`` of ``n`` indices, sorted."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def dataset_batches(dataset: Any, indices: np.ndarray, batch: int, renorm: Any,
                    with_labels: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    for start in range(0, len(indices), batch):
        items = [dataset[int(i)] for i in indices[start:start + batch]]
        x = renorm(np.stack([np.asarray(t[0], dtype=np.float32) for t in items]))
        y = np.asarray([int(t[1]) for t in items]) if with_labels else None
        yield np.ascontiguousarray(x), y


def gate(parities: list[Parity], precision: str, random_init: bool = False) -> list[str]:
    """The verification failures, as sentences (empty: passed)."""
    failures = []
    for p in parities:
        if not math.isfinite(p.rel_diff):
            failures.append(f"{p.what}: onnxruntime returned non-finite logits")
        elif precision == "fp32":
            if p.rel_diff > FP32_RTOL:
                failures.append(f"{p.what}: max|diff|/scale {p.rel_diff:.2e} > {FP32_RTOL:.0e}")
            if p.agreement < 1.0:
                failures.append(f"{p.what}: top-1 agreement {100 * p.agreement:.2f}% < 100%")
        elif p.what == "val" and random_init:
            if p.rel_diff > LOWP_RANDOM_INIT_RTOL:
                failures.append(f"val: {precision} max|diff|/scale {p.rel_diff:.2e} > {LOWP_RANDOM_INIT_RTOL} "
                                "(random-init weights: top-1 is not checked)")
        elif p.what == "val":
            if p.agreement < LOWP_MIN_AGREEMENT:
                failures.append(f"val: {precision} top-1 agreement {100 * p.agreement:.2f}% "
                                f"< {100 * LOWP_MIN_AGREEMENT:.0f}%")
        elif precision == "fp16" and p.rel_diff > FP16_RTOL:
            failures.append(f"{p.what}: fp16 max|diff|/scale {p.rel_diff:.2e} > {FP16_RTOL:.0e}")
    return failures


def median_latency_ms(session: Any, input_size: Sequence[int], runs: int) -> float | None:
    if runs <= 0:
        return None
    x = np.random.default_rng(1).standard_normal((1, *input_size), dtype=np.float32)
    for _ in range(3):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


# --------------------------------------------------------------------------- main


def _summary(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        return _run(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"{prog}: verification failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    import importlib.util
    if importlib.util.find_spec("onnxruntime") is None:  # verification runs it; it comes from an extra
        raise UserError("onnxruntime is not installed: pip install -e '.[cpu]' (or '.[gpu]' for onnxruntime-gpu)")
    with _torch_threads(args.threads):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    _check_writable(args.out)
    plan = resolve_plan(args)
    model_dir = os.path.join(args.out, plan.dir_name)
    check_same_model(model_dir, plan.labels, plan.input_size)
    version = plan_version(model_dir, args.version)
    bundle = load_data(plan, args)
    opset = args.opset or DEFAULT_OPSET[args.exporter]
    progress = not args.no_progress
    import torch
    from zoo.flops import count_flops
    from zoo.nn import fold_batchnorm
    from zoo.registry import count_params

    if plan.source == "random-init":
        print("WARNING: no --checkpoint or --torchvision-weights: exporting RANDOM initialisation "
              "(its predictions are meaningless; fine for benchmarks)", file=sys.stderr)
    steps = Steps(total=8 if args.precision == "fp32" else 9)
    model, c = plan.model, plan.input_size

    with steps.step(f"build {plan.name} (norm={plan.norm}, {len(plan.labels)} classes, input {list(c)})") as note:
        try:
            with torch.no_grad():
                model(torch.zeros(1, *c))
        except RuntimeError as e:
            raise UserError(f"{plan.name} cannot run at input size {list(c)}: {str(e).splitlines()[0]}") from None
        params, flops = count_params(model), count_flops(model, c)
        note["msg"] = f"{params:,} parameters, {flops / 1e9:.3f} GFLOPs"

    bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with steps.step("fold BatchNorm") as note:
        if args.no_fold:
            to_export, folded = model, False
            note["msg"] = "skipped (--no-fold)"
        elif bn_modules == 0:
            to_export, folded = model, False
            note["msg"] = (f"nothing to fold: {plan.norm} normalizes with the statistics of each input "
                           "at test time, so it stays in the graph")
        else:
            to_export, folded = fold_batchnorm(model), True
            note["msg"] = f"{bn_modules} BatchNorm2d folded into convs or scale/shift"

    with steps.step(f"export ({args.exporter}, opset {opset}, dynamic batch)"):
        onnx_model = export_model(to_export, c, opset, args.exporter)
    with steps.step("onnx.checker full check"):
        import onnx
        onnx.checker.check_model(onnx_model, full_check=True)
    with steps.step("shape inference") as note:
        onnx_model = check_graph(onnx_model, c, len(plan.labels))
        bn_nodes = count_batchnorm_with_statistics(onnx_model)
        scale_shift = count_ops(onnx_model, "BatchNormalization") - bn_nodes
        note["msg"] = f"input [batch, {', '.join(map(str, c))}] -> logits [batch, {len(plan.labels)}], " \
                      f"{len(onnx_model.graph.node)} nodes, {bn_nodes} BatchNormalization" \
                      + (f" (+ {scale_shift} folded to scale/shift)" if scale_shift else "")

    renorm = _renormalizer(bundle, plan.mean, plan.std) if bundle is not None else None
    if args.precision == "fp16":
        with steps.step("convert to fp16 (fp32 input/output)"):
            onnx_model = to_fp16(onnx_model)
            onnx.checker.check_model(onnx_model, full_check=True)
    elif args.precision == "int8":
        idx = _subset(len(bundle.train), args.calib_samples, seed=1)
        with steps.step(f"quantize int8 (QDQ, per-channel, {args.calib_method}, {len(idx)} calibration images)"):
            calib = (x for x, _ in dataset_batches(bundle.train, idx, CALIB_BATCH, renorm, False))
            with tempfile.TemporaryDirectory(prefix="export-int8-") as work:
                onnx_model = to_int8(onnx_model, calib, args.calib_method, work)

    meta = encode_metadata(
        model=plan.name, version=version, labels=plan.labels, input_size=list(c), mean=plan.mean, std=plan.std,
        norm=plan.norm, folded=folded, precision=args.precision, source=plan.source, crop_pct=plan.crop_pct,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        opset=opset, exporter=f"torch {torch.__version__.split('+')[0]} {args.exporter}", **plan.extra_meta)
    del onnx_model.metadata_props[:]
    for key, value in meta.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx_model.model_version = version
    onnx_model.doc_string = f"{plan.name} ({plan.norm}, {args.precision}) exported by zoo export.onnx"
    data = onnx_model.SerializeToString()

    out = OutputDir(args.out, plan.dir_name, version, explicit=args.version is not None)
    try:
        with steps.step("write temporary model file") as note:
            tmp = out.open()
            meta_version = out.version
            if meta_version != version:  # a concurrent export took our version: restamp
                onnx_model.model_version = meta_version
                for p in onnx_model.metadata_props:
                    if p.key == "zoo.version":
                        p.value = str(meta_version)
                data = onnx_model.SerializeToString()
            _write_file(tmp, data)
            note["msg"] = f"{_size(len(data))} in {out.version_dir}"

        parities: list[Parity] = []
        with steps.step("verify onnxruntime (CPU) against PyTorch eager (unfolded)") as note:
            session = ort_session(tmp, args.threads)
            parities.append(run_pair(model, session, _random_batches(c), "random", RANDOM_SAMPLES, progress))
            if bundle is not None and args.val_samples > 0:
                idx = _subset(len(bundle.val), args.val_samples)
                batches = dataset_batches(bundle.val, idx, EVAL_BATCH, renorm, plan.data_is_training_set)
                parities.append(run_pair(model, session, batches, "val", len(idx), progress))
            failures = gate(parities, args.precision, random_init=plan.source == "random-init")
            note["msg"] = "FAILED" if failures else "passed"
        latency = median_latency_ms(session, c, args.latency_runs) if not failures else None

        bn_note = f"{bn_nodes}"
        if folded:
            bn_note += f" (folded {bn_modules} BatchNorm2d" + (
                f"; {scale_shift} with no conv before them run as scale/shift nodes)" if scale_shift else ")")
        elif bn_modules:
            bn_note += f" (not folded: {bn_modules} BatchNorm2d in the model; the exporter fuses Conv->BN itself)"
        rows = [
            ("model", f"{plan.name} (norm={plan.norm}, {len(plan.labels)} classes, input {list(c)})"),
            ("weights", plan.source),
            ("parameters", f"{params:,}"),
            ("GFLOPs (bs1)", f"{flops / 1e9:.3f}"),
            ("precision", args.precision + ("" if args.precision == "fp32" else " (fp32 input/output)")),
            ("file size", _size(len(data))),
            ("BatchNormalization nodes", bn_note),
            ("opset / exporter", f"{opset} / {args.exporter}"),
        ]
        for p in parities:
            rows.append((f"parity {p.what} ({p.count})", p.describe(args.precision)))
        if plan.source == "random-init" and args.precision != "fp32" and len(parities) > 1:
            rows.append(("note", f"random-init weights: {args.precision} val top-1 agreement is reported, not "
                                 f"gated (near-tied logits); max|diff|/scale <= {LOWP_RANDOM_INIT_RTOL} is"))
        rows.append(("onnxruntime latency bs1", f"{latency:.2f} ms median of {args.latency_runs}"
                     if latency is not None else "not measured"))
        if failures:
            rows.append(("result", "VERIFICATION FAILED, nothing written"))
            print(_summary(rows, f"export {plan.dir_name} v{out.version} ({args.precision})"))
            raise VerificationError("; ".join(failures))

        with steps.step("commit model repository") as note:
            del session
            final = out.commit()
            from zoo.fileio import atomic_write
            labels_path = os.path.join(out.model_dir, layout.LABELS_FILE)
            labels_text = layout.labels_text(plan.labels).encode()
            if os.path.exists(labels_path) and _read_bytes(labels_path) != labels_text:
                print(f"warning: replacing {labels_path}: its labels differ from this export's "
                      "(Triton reads one labels file for every version)", file=sys.stderr)
            atomic_write(labels_path, labels_text)
            written = [final, labels_path]
            if args.triton:
                config_path = os.path.join(out.model_dir, layout.CONFIG_FILE)
                config = layout.triton_config(plan.dir_name, c, len(plan.labels), args.max_batch_size,
                                              TRITON_QUEUE_DELAY_US)
                atomic_write(config_path, layout.config_text(config))
                written.append(config_path)
            note["msg"] = ", ".join(written)
    except BaseException:
        out.rollback()
        raise

    rows.append(("written", final))
    print(_summary(rows, f"export {plan.dir_name} v{out.version} ({args.precision})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
