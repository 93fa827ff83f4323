"""Training checkpoints: written atomically, checksummed, rebuilt without the training code.

A checkpoint is a dict saved with ``torch.save`` holding only tensors and plain Python values
(so ``torch.load(weights_only=True)`` reads it):

    model          the model's state_dict (unwrapped from DistributedDataParallel)
    model_name     registry name, e.g. "resnext_mini"
    model_args     {"num_classes", "norm", "gn_groups", "in_chans"}: what create_model needs
    classes        class labels, index order
    input_size     [C, H, W] the val transform produces
    mean, std      per-channel normalization the val transform applies
    crop_pct       the val transform's resize/crop ratio (zoo.data.val_transform)
    data           the --data spec it was trained on
    epoch, best_metric, optimizer, scheduler, rng
    config         the run's settings, :meth:`zoo.config.TrainConfig.to_dict` (a plain dict)
    checksum       sha256 of the model tensors (names, dtypes, shapes and bytes)
    augment        the train augmentation as resolved (zoo.augment.Augment.to_dict)
    selected       "model" or "ema": the weights that scored this epoch's val accuracy
    pruned         (a pruned model only) its layer sizes, :func:`zoo.pruned.record`
With ``--model-ema``, also:
    model_ema      the averaged weights (zoo.ema), same keys as ``model``
    ema_updates    updates the average has had (its decay's warmup)
    ema_checksum   sha256 of ``model_ema``
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping

import torch
from torch import nn

from zoo import pruned
from zoo.fileio import atomic_write
from zoo.registry import create_model
from zoo.weights import WeightsError, describe_mismatch, load_failure, state_checksum, torch_load

REQUIRED_KEYS = ("model", "model_name", "model_args", "classes", "input_size", "mean", "std", "checksum")


class CheckpointError(WeightsError):
    """A checkpoint that is missing, unreadable, corrupt or incomplete; the message names the file."""


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Add the checksum and write ``checkpoint`` atomically (temp file, fsync, rename)."""
    checkpoint = dict(checkpoint, checksum=state_checksum(checkpoint["model"]))
    if checkpoint.get("model_ema") is not None:
        checkpoint["ema_checksum"] = state_checksum(checkpoint["model_ema"])
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a zoo checkpoint; :class:`CheckpointError` with the file's name otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch_load(path)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({load_failure(e)})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path}: not a zoo training checkpoint (missing {', '.join(missing)})")
    if state_checksum(ckpt["model"]) != ckpt["checksum"]:
        raise CheckpointError(f"{path}: checksum mismatch, the weights are corrupt")
    if ckpt.get("model_ema") is not None and state_checksum(ckpt["model_ema"]) != ckpt.get("ema_checksum"):
        raise CheckpointError(f"{path}: checksum mismatch, the EMA weights are corrupt")
    return ckpt


def checkpoint_weights(ckpt: Mapping[str, Any], ema: bool | None = None,
                       path: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """``(state_dict, which)``: the raw weights (``which == "model"``) or the EMA's (``"ema"``).

    ``ema=None`` takes the checkpoint's ``selected`` weights (the ones that scored its val
    accuracy; raw weights for a run without ``--model-ema``); True requires the EMA weights.
    """
    has_ema = ckpt.get("model_ema") is not None
    if ema and not has_ema:
        raise CheckpointError(f"{path}: holds no EMA weights (trained without --model-ema)")
    use_ema = has_ema and (ema if ema is not None else ckpt.get("selected") == "ema")
    return (dict(ckpt["model_ema"]), "ema") if use_ema else (dict(ckpt["model"]), "model")


def model_from_checkpoint(ckpt: Mapping[str, Any], path: str = "checkpoint", ema: bool | None = False) -> nn.Module:
    """Rebuild the trained model from the checkpoint's own model arguments and load its weights:
    the raw ones by default, else as :func:`checkpoint_weights` picks for ``ema``."""
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    try:
        pruned.apply(model, ckpt.get("pruned"))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state, _ = checkpoint_weights(ckpt, ema, path)
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['model_name']}: {problem}")
    model.load_state_dict(state)
    return model
