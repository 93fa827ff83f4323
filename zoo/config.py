"""A training run's settings: one frozen :class:`TrainConfig`, every default in one place.

``python -m zoo.train`` builds it from its command line; a checkpoint keeps it as a plain dict
(:meth:`TrainConfig.to_dict`, read back by :meth:`TrainConfig.from_dict`); :func:`resumed` gives
the settings a resumed run trains with; :func:`validated` checks them before any work starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from zoo.augment import Augment, AugmentError, resolve_augment
from zoo.losses import LOSSES
from zoo.nn.act import ACTS
from zoo.nn.attention import ATTNS
from zoo.nn.norm import NORMS
from zoo.optim import OPTIMIZERS, SCHEDULERS
from zoo.registry import get_model_spec

# Learning rates for training these nets with batch 32-64 when --lr is not given (the
# optimizers' own defaults suit their update rule, not this task).
TRAIN_LR = dict(sgd=0.1, momentum=0.05, nesterov=0.05, adagrad=0.01, adadelta=1.0, rmsprop=1e-3, adam=3e-3)

# --schedule step multiplies the lr by this every --step-epochs epochs (torchvision's reference).
STEP_GAMMA = 0.1


class ConfigError(ValueError):
    """A setting that cannot run; the message is one line meant for the user."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The defaults train resnext_mini on digits to >= 95% val
    top-1 in well under two minutes on a 2-core CPU."""

    # model
    model: str = "resnext_mini"  # a registry name or alias (validated() makes it the name)
    norm: str = "bn"  # one of zoo.nn.norm.NORMS
    gn_groups: int = 32  # GroupNorm groups (the largest divisor of the channels <= this)
    act: str = "relu"  # one of zoo.nn.act.ACTS
    attn: str | None = None  # none or one of zoo.nn.attention.ATTNS; None: the model's own
    attn_reduction: int = 16  # channel reduction of se and cbam
    input_size: tuple[int, int] | None = None  # (H, W) to train at; None: the model's own
    init_weights: str | None = None  # fine-tune from this file, all but the classifier head
    # optimization
    optimizer: str = "adam"  # one of zoo.optim.OPTIMIZERS
    lr: float | None = None  # None: TRAIN_LR[optimizer]
    momentum: float | None = None  # momentum/nesterov only; None: the optimizer's own (0.9)
    weight_decay: float = 5e-4  # L2 penalty added to the gradient by the optimizer
    epochs: int = 8  # total, counted from the start of the run (the schedule is laid out over it)
    batch_size: int = 32  # images per step, per process
    schedule: str = "cosine"  # one of zoo.optim.SCHEDULERS, updated every step
    warmup_epochs: int = 0  # linear warmup before the schedule
    step_epochs: int | None = None  # schedule "step": decay every N epochs; None: step_every()
    loss: str = "ce"  # one of zoo.losses.LOSSES
    label_smoothing: float = 0.0  # loss "ce" only
    focal_gamma: float = 2.0  # loss "focal" only
    # augmentation of the train split (zoo.augment, timm's names); None: the data's default
    no_aug: bool = False  # train on the val transform
    hflip: float | None = None  # None: 0.5 for folders, 0 for digits/synthetic
    vflip: float = 0.0
    scale: tuple[float, float] | None = None  # random resized crop; None: 0.08-1 for folders, no crop otherwise
    ratio: tuple[float, float] | None = None  # None: 3/4-4/3
    color_jitter: float = 0.0
    aa: str | None = None  # e.g. rand-m9-mstd0.5
    reprob: float = 0.0  # random erasing
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0: off
    mixup_prob: float = 1.0  # share of batches mixed
    mixup_switch_prob: float = 0.5  # cutmix instead of mixup, when both are on
    # weight averaging
    model_ema: bool = False  # keep an exponential moving average of the weights (zoo.ema)
    model_ema_decay: float = 0.9998
    # knowledge distillation (zoo.losses.DistillationLoss)
    teacher: str | None = None  # a zoo checkpoint to distil from; None: no distillation
    teacher_sha256: str | None = None  # the teacher file's checksum, set by zoo.train (not a flag)
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9  # weight of the distillation term; 1 - alpha weights the loss on the labels
    # data and output
    data: str = "digits"  # a zoo.data spec: digits, synthetic, folder:PATH
    val_fraction: float = 0.2  # share of each class held out for validation
    out: str = "runs/train"  # output folder
    resume: str | None = None  # continue from this checkpoint
    seed: int = 0  # the weights, the data split and the batch order
    # runtime
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    workers: int = 0  # DataLoader worker processes
    amp: bool = False  # autocast: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = False  # channels-last memory format for the model and inputs
    # Not saved in checkpoints: how this process shows its work, whether it may overwrite a run
    # already in ``out``, and which settings its command line gave (resumed() keeps the
    # checkpoint's value of the others).
    progress: bool | None = None  # progress bars; None: only when stderr is a terminal
    force: bool = False  # write into an ``out`` that holds another run (see zoo.train)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``config``: a plain dict of the saved settings (lists, not tuples)."""
        d = {name: getattr(self, name) for name in SAVED_KEYS}
        for key in ("input_size", "scale", "ratio"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainConfig:
        """The settings of a checkpoint's ``config``, also as written by earlier versions."""
        d = {k: v for k, v in saved.items() if k in SAVED_KEYS}
        # Before --step-epochs, the step schedule decayed every 30 epochs; before --init-weights,
        # every run started from random weights.
        d.setdefault("step_epochs", 30 if d.get("schedule") == "step" else None)
        d.setdefault("init_weights", None)
        if d.get("input_size") is not None:
            d["input_size"] = tuple(int(v) for v in d["input_size"])
        for key in ("scale", "ratio"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


SAVED_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in ("progress", "force", "given"))

# Every default, by name (the CLI's help texts quote them).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig) if f.name in SAVED_KEYS}

# The augmentation, mixup and weight-averaging settings (resumed from the checkpoint too).
AUGMENT_KEYS = ("no_aug", "hflip", "vflip", "scale", "ratio", "color_jitter", "aa", "reprob", "mixup", "cutmix",
                "mixup_prob", "mixup_switch_prob", "model_ema", "model_ema_decay")

# The distillation settings (resumed from the checkpoint; the teacher file must still match its checksum).
KD_KEYS = ("teacher", "teacher_sha256", "kd_temperature", "kd_alpha")

# The settings a resumed run takes from its checkpoint (the model, data and optimization); the
# command line still says how far to go (epochs), where to write (out) and how to run.
RESUME_KEYS = ("model", "norm", "gn_groups", "act", "attn", "attn_reduction", "input_size", "init_weights", "data",
               "val_fraction", "seed",
               "optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule",
               "warmup_epochs", "step_epochs", "loss", "label_smoothing", "focal_gamma") + AUGMENT_KEYS + KD_KEYS

# Runtime settings a resumed run takes from the checkpoint unless the command line gives them:
# they change the numbers (the DataLoader's worker count changes which RNG the augmentation draws
# from; autocast and the memory format change the arithmetic), so only the same values resume exactly.
RUNTIME_KEYS = ("workers", "amp", "channels_last")


def step_every(step_epochs: int | None, epochs: int) -> int:
    """Epochs between the step schedule's decays: --step-epochs, else a third of --epochs."""
    return step_epochs if step_epochs is not None else max(1, epochs // 3)


def schedule_reshaped(config: TrainConfig, epochs: int) -> bool:
    """Whether the lr schedule of a run with these settings changes when its epochs become ``epochs``."""
    if config.schedule == "cosine":
        return epochs != config.epochs
    if config.schedule == "step":
        return step_every(config.step_epochs, epochs) != step_every(config.step_epochs, config.epochs)
    return False


def resumed(config: TrainConfig, saved: Mapping[str, Any] | TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The settings a run resuming from ``config.resume`` trains with, and warning lines.

    The :data:`RESUME_KEYS` come from the checkpoint's settings ``saved``; one the command line
    gave with another value is ignored, and a warning names it. Settings the command line did
    not give (not in ``config.given``): ``out`` becomes the checkpoint's folder (refused with
    :class:`ConfigError` when that folder's ``last.pt`` is another file, which resuming there
    would overwrite) and ``epochs`` the checkpoint's run's. A different ``epochs`` that reshapes
    the lr schedule is warned about.
    """
    if not config.resume:
        raise ValueError("resumed() needs a config with resume set")
    old = saved if isinstance(saved, TrainConfig) else TrainConfig.from_dict(saved)
    ignored = []
    for key in RESUME_KEYS:
        given, kept = getattr(config, key), getattr(old, key)
        if key in config.given and _canonical(key, given) != _canonical(key, kept):
            ignored.append(f"{_flag(key)} {_show_setting(key, given, config)} "
                           f"(checkpoint: {_show_setting(key, kept, old)})")
    changes: dict[str, Any] = {key: getattr(old, key) for key in RESUME_KEYS}
    inexact = []
    for key in RUNTIME_KEYS:
        if key not in config.given:
            changes[key] = getattr(old, key)
        elif getattr(config, key) != getattr(old, key):
            inexact.append(f"{_flag(key)} {_show(getattr(config, key))} (checkpoint: {_show(getattr(old, key))})")
    if "out" not in config.given:
        folder = os.path.dirname(config.resume) or "."
        last = os.path.join(folder, "last.pt")
        if os.path.isfile(last) and not os.path.samefile(last, config.resume):
            raise ConfigError(f"{folder} holds the run's last.pt, which resuming {config.resume} there would "
                              "overwrite (with its later epochs of metrics.jsonl): pass --out for the resumed run")
        changes["out"] = folder
    warnings = []
    if ignored:
        warnings.append("resuming keeps the checkpoint's settings; ignoring " + ", ".join(ignored))
    if inexact:
        warnings.append("resuming with " + ", ".join(inexact) + ": the result will differ from an uninterrupted run")
    if "epochs" not in config.given:
        changes["epochs"] = old.epochs
    elif schedule_reshaped(old, config.epochs):
        warnings.append(f"the checkpoint's run was --epochs {old.epochs}: resuming with --epochs "
                        f"{config.epochs} reshapes its {old.schedule} lr schedule over {config.epochs} epochs, "
                        "so the result differs from an uninterrupted run of either length")
    return replace(config, **changes), warnings


def validated(config: TrainConfig) -> TrainConfig:
    """``config`` with the model's canonical name; :class:`ConfigError` for the first bad setting."""
    try:
        config = replace(config, model=get_model_spec(config.model).name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for value, choices, what in ((config.norm, NORMS, "norm"), (config.act, ACTS, "act"),
                                 (config.attn or "none", ("none", *ATTNS), "attn"),
                                 (config.optimizer, OPTIMIZERS, "optimizer"),
                                 (config.schedule, SCHEDULERS, "schedule"), (config.loss, LOSSES, "loss")):
        if value not in choices:
            raise ConfigError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    fixed = get_model_spec(config.model).attn
    if fixed is not None and config.attn not in (None, fixed):
        raise ConfigError(f"{config.model} fixes --attn {fixed}; got --attn {config.attn}")
    if config.attn_reduction < 1:
        raise ConfigError(f"--attn-reduction must be >= 1, got {config.attn_reduction}")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(config, name)}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {config.workers}")
    if config.lr is not None and not config.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {config.lr}")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise ConfigError(f"--warmup-epochs must be >= 0 and less than --epochs ({config.epochs}), "
                          f"got {config.warmup_epochs}")
    if config.step_epochs is not None and config.step_epochs < 1:
        raise ConfigError(f"--step-epochs must be >= 1, got {config.step_epochs}")
    try:
        augmentation(config)
    except AugmentError as e:
        raise ConfigError(str(e)) from None
    for name in ("mixup", "cutmix"):
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(config, name):g}")
    for name in ("mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(config, name) <= 1:
            raise ConfigError(f"{_flag(name)} must be in [0, 1], got {getattr(config, name):g}")
    if (config.mixup or config.cutmix) and config.loss != "ce":
        raise ConfigError(f"--mixup/--cutmix need soft targets, which --loss ce takes; not --loss {config.loss}")
    if not 0 < config.model_ema_decay < 1:
        raise ConfigError(f"--model-ema-decay must be in (0, 1), got {config.model_ema_decay:g}")
    if not config.kd_temperature > 0:
        raise ConfigError(f"--kd-temperature must be > 0, got {config.kd_temperature:g}")
    if not 0 <= config.kd_alpha <= 1:
        raise ConfigError(f"--kd-alpha must be in [0, 1], got {config.kd_alpha:g}")
    return config


def augmentation(config: TrainConfig) -> Augment:
    """The train split's augmentation as this run resolves it (:func:`zoo.augment.resolve_augment`)."""
    return resolve_augment(data=config.data, no_aug=config.no_aug, hflip=config.hflip, vflip=config.vflip,
                           scale=config.scale, ratio=config.ratio, color_jitter=config.color_jitter,
                           aa=config.aa, reprob=config.reprob)


def optimizer_hparams(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of ``zoo.optim.create_optimizer(config.optimizer, ...)``."""
    hp: dict[str, Any] = {"weight_decay": config.weight_decay,
                          "lr": config.lr if config.lr is not None else TRAIN_LR[config.optimizer]}
    if config.momentum is not None:
        if config.optimizer not in ("momentum", "nesterov"):
            raise ConfigError(f"--momentum applies to momentum/nesterov, not {config.optimizer}")
        hp["momentum"] = config.momentum
    return hp


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show_setting(key: str, value: Any, config: TrainConfig) -> str:
    """A setting as the run uses it: ``--lr`` left unset is its optimizer's default lr."""
    if key == "lr" and value is None:
        return _show(TRAIN_LR.get(config.optimizer))
    return _show(value)


def _show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _canonical(key: str, value: Any) -> Any:
    if key == "model":
        try:
            return get_model_spec(value).name
        except ValueError:
            return value
    if key in ("input_size", "scale", "ratio") and value is not None:
        return [float(v) for v in value]
    return value
