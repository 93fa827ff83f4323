"""Everything an export settles before it converts anything: the model and its weights (a zoo
checkpoint, a torchvision state_dict or random initialisation), labels, input size, calibration
data, and where the files go (the repository's model directory and the version it claims).

Every problem found here is a :class:`~export.config.UserError` and nothing is written yet.
"""
from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract import repository as layout
from export.config import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportConfig, UserError
from zoo.fileio import TMP_PREFIX, file_sha256


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


def resolve_plan(config: ExportConfig) -> Plan:
    """Check every argument and load the weights; UserError names the first problem."""
    from contract.preprocess import CROP_PCT
    from zoo.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint, model_from_checkpoint
    from zoo.registry import create_model, get_model_spec, resolve_name
    from zoo.weights import WeightsError, describe_mismatch, read_weights

    if config.model is None and not config.checkpoint:
        raise UserError("name a model (e.g. resnext50) or pass --checkpoint")
    name = None
    if config.model is not None:
        try:
            name = resolve_name(config.model)
        except ValueError as e:
            raise UserError(str(e)) from None

    data_seed, val_fraction = 0, 0.2
    extra: dict[str, str] = {}
    if config.checkpoint:
        if config.labels is not None:
            raise UserError("--labels cannot be combined with --checkpoint: the checkpoint holds its classes")
        try:
            ckpt = load_checkpoint(config.checkpoint)
        except CheckpointError as e:
            hint = " (a torchvision state_dict? use --torchvision-weights)" if "not a zoo training" in str(e) else ""
            raise UserError(f"{e}{hint}") from None
        try:
            ckpt_name = resolve_name(str(ckpt["model_name"]))
        except ValueError:
            raise UserError(f"{config.checkpoint}: holds unknown model {ckpt['model_name']!r}") from None
        if name is not None and ckpt_name != name:
            raise UserError(f"{config.checkpoint} holds a {ckpt_name} checkpoint, not {name}")
        name = ckpt_name
        try:
            # By default the weights that scored the checkpoint's val accuracy (the EMA's when they did better).
            extra["weights"] = checkpoint_weights(ckpt, config.ema, config.checkpoint)[1]
            model = model_from_checkpoint(ckpt, config.checkpoint, ema=config.ema)
        except (CheckpointError, ValueError, TypeError) as e:
            raise UserError(str(e).splitlines()[0]) from None
        model_args = dict(ckpt["model_args"])
        norm = str(model_args.get("norm", "bn"))
        extra.update({key: str(model_args[key]) for key in ("act", "attn") if model_args.get(key)})
        labels = [str(c) for c in ckpt["classes"]]
        for flag, given, fixed in (("--norm", config.norm, norm), ("--num-classes", config.num_classes, len(labels))):
            if given is not None and given != fixed:
                raise UserError(f"{config.checkpoint} fixes {flag} {fixed}; got {flag} {given}")
        input_size = tuple(int(v) for v in ckpt["input_size"])
        mean, std = [float(v) for v in ckpt["mean"]], [float(v) for v in ckpt["std"]]
        crop_pct = float(ckpt.get("crop_pct", CROP_PCT))
        data_spec = ckpt.get("data") or None
        trained_with = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        if isinstance(trained_with.get("seed"), int):
            data_seed = trained_with["seed"]
        if isinstance(trained_with.get("val_fraction"), float) and 0 < trained_with["val_fraction"] < 1:
            val_fraction = trained_with["val_fraction"]
        source = f"checkpoint:{os.path.abspath(config.checkpoint)} sha256:{file_sha256(config.checkpoint)}"
        if data_spec:
            extra["data"] = str(data_spec)
        n_out = getattr(_classifier(model), "out_features", len(labels))
        if len(labels) != n_out or len(input_size) != 3 or len(mean) != input_size[0] or len(std) != input_size[0]:
            raise UserError(f"{config.checkpoint}: inconsistent checkpoint ({len(labels)} classes for {n_out} "
                            f"logits, input_size {list(input_size)}, {len(mean)} mean values)")
    else:
        spec = get_model_spec(name)
        norm = config.norm or "bn"
        state = None
        num_classes, in_chans = config.num_classes, spec.input_size[0]
        if config.torchvision_weights:
            if norm != "bn":
                raise UserError(f"--torchvision-weights are BatchNorm weights; --norm {norm} does not fit them")
            try:
                weights, about = read_weights(config.torchvision_weights)
            except WeightsError as e:
                raise UserError(str(e)) from None
            if "model_name" in about:  # its classes, norm and input size would be dropped for ImageNet's
                raise UserError(f"{config.torchvision_weights} is a zoo training checkpoint, not a torchvision "
                                "state_dict: pass it as --checkpoint")
            state = dict(weights)
            file_classes, file_chans = _head_shape(state)
            if num_classes is None and file_classes is not None:
                num_classes = int(file_classes)
            in_chans = int(file_chans) if file_chans in (1, 3) else in_chans
        labels = _read_labels(config.labels) if config.labels else None
        if num_classes is None:
            num_classes = len(labels) if labels else 1000
        if num_classes < 1:
            raise UserError(f"Invalid --num-classes: {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise UserError(f"--labels {config.labels} has {len(labels)} labels for {num_classes} classes")
        labels = labels or [f"class_{i}" for i in range(num_classes)]
        model = create_model(name, num_classes=num_classes, norm=norm, in_chans=in_chans)
        if state is not None:
            problem = describe_mismatch(model, state)
            if problem:
                raise UserError(f"{config.torchvision_weights} does not fit {name}: {problem}")
            model.load_state_dict(state, strict=True)
            path = config.torchvision_weights
            source = f"torchvision:{os.path.abspath(path)} sha256:{file_sha256(path)}"
        else:
            source = "random-init"
        input_size = (in_chans,) + tuple(spec.input_size[1:])
        mean, std = list(spec.mean), list(spec.std)
        if in_chans != len(mean):  # a 1-channel model: one mean/std, the average of the RGB ones
            mean, std = [float(np.mean(mean))] * in_chans, [float(np.mean(std))] * in_chans
        crop_pct = CROP_PCT
        data_spec = None

    if config.input_size is not None:
        h, w = config.input_size
        if h < 1 or w < 1:
            raise UserError(f"Invalid --input-size: {h} {w} (positive H W)")
        input_size = (input_size[0], h, w)
    if config.calib_data is not None:
        data_spec = config.calib_data
    if any("\n" in v or "\r" in v for v in labels):
        raise UserError("class labels may not contain line breaks (labels.txt holds one per line)")
    dir_name = config.name or name
    if not layout.is_model_name(dir_name):
        raise UserError(f"Invalid --name {dir_name!r}: letters, digits, '_', '.', '-' only")
    return Plan(name=name, dir_name=dir_name, model=model.eval(), norm=norm, labels=labels,
                input_size=tuple(input_size), mean=mean, std=std, source=source, crop_pct=crop_pct,
                data_spec=data_spec,
                data_is_training_set=bool(config.checkpoint) and config.calib_data in (None, extra.get("data")),
                data_seed=data_seed, val_fraction=val_fraction, extra_meta=extra)


def _classifier(model: Any) -> Any:
    return model.get_classifier()


def check_config(config: ExportConfig) -> None:
    exporter = config.exporter
    from contract.metadata import PRECISIONS
    from export.config import CALIB_METHODS, EXPORTERS
    for what, value, choices in (("exporter", exporter, EXPORTERS), ("precision", config.precision, PRECISIONS),
                                 ("calibration method", config.calib_method, CALIB_METHODS)):
        if value not in choices:
            raise UserError(f"Invalid {what} {value!r}: one of {', '.join(choices)}")
    if config.opset is not None and not MIN_OPSET <= config.opset <= MAX_OPSET[exporter]:
        raise UserError(f"Invalid --opset {config.opset}: the {exporter} exporter supports "
                        f"{MIN_OPSET}..{MAX_OPSET[exporter]}")
    if exporter == "dynamo" and config.opset is not None and config.opset < DEFAULT_OPSET["dynamo"]:
        raise UserError(f"Invalid --opset {config.opset}: the dynamo exporter needs >= {DEFAULT_OPSET['dynamo']}")
    if config.version is not None and config.version < 1:
        raise UserError(f"Invalid --version: {config.version} (a positive integer)")
    for flag, value, low in (("--max-batch-size", config.max_batch_size, 1),
                             ("--calib-samples", config.calib_samples, 1), ("--val-samples", config.val_samples, 0),
                             ("--latency-runs", config.latency_runs, 0), ("--threads", config.threads, 0)):
        if value < low:
            raise UserError(f"Invalid {flag}: {value} (at least {low})")


def load_data(plan: Plan, config: ExportConfig) -> Any | None:
    """The DataBundle for verification and calibration, or None (UserError if asked for and broken)."""
    from zoo.data import DataError, build_datasets

    needed = config.precision == "int8"
    if plan.data_spec is None:
        if needed:
            raise UserError("--precision int8 needs calibration images: pass --calib-data digits|synthetic|"
                            "folder:PATH (or a checkpoint trained on a dataset)")
        return None
    if config.val_samples == 0 and not needed:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable images are listed in bundle.skipped
            return build_datasets(plan.data_spec, plan.input_size, seed=plan.data_seed,
                                  val_fraction=plan.val_fraction)
    except DataError as e:
        if config.calib_data is None and not needed:  # the checkpoint's dataset is gone: verify without it
            config.reporter.warning(f"warning: skipping val verification: {e}")
            return None
        raise UserError(f"data {plan.data_spec!r}: {e}") from None


def check_writable(out: str) -> None:
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
        except Exception:  # noqa: BLE001, S112 - a corrupt or foreign file says nothing about the classes
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
    """The version directory an export claims, and its model file until it is committed.

    :meth:`claim` creates ``OUT/NAME/VERSION`` (the next free version if a concurrent export took
    the planned one), so the version is final before anything is stamped with it. The model goes
    to a temporary name there and becomes ``model.onnx`` only on :meth:`commit`, with
    :func:`zoo.fileio.atomic_write`'s guarantees (fsynced file and folder, permissions from the
    umask so a server running as another user reads it). :meth:`rollback` removes what was created.
    """

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

    def claim(self) -> int:
        """Create the version directory -> the version it holds."""
        while True:
            try:
                self._mkdir(self.version_dir, exist_ok=self.explicit)
                return self.version
            except FileExistsError:  # a concurrent export claimed this version
                self.version += 1

    def write(self, data: bytes) -> str:
        """``data`` to a temporary file in the version directory (fsynced) -> its path."""
        name = f"{TMP_PREFIX}{secrets.token_hex(6)}-{layout.MODEL_FILE}"
        path = os.path.join(self.version_dir, name)
        # 0o666 less the umask, as atomic_write and open() give: not mkstemp's owner-only 0o600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.tmp = path
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path

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
            try:
                os.rmdir(path)  # only if empty: never removes anything we did not write
            except OSError:
                pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
