"""A pruned model's architecture as plain data, and the rebuild from it (no pruner needed).

Structured pruning changes channel counts only, never the module tree, so a pruned model is the
registry's model with some layers narrower. :func:`record` writes down every conv, linear and
norm layer's sizes (a dict ``module name -> {kind, sizes}`` of ints and strings, which
``torch.load(weights_only=True)`` reads); :func:`apply` swaps those layers in a freshly built
model for ones of the recorded sizes, after which the pruned state_dict loads strictly.
Checkpoints carry it under ``pruned``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def _describe(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        d: dict[str, Any] = {"kind": "conv2d", "bias": module.bias is not None}
        for k in _CONV_KEYS:
            v = getattr(module, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        return d
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, nn.BatchNorm2d):
        return {"kind": "batchnorm2d", "num_features": module.num_features, "eps": module.eps,
                "momentum": module.momentum, "affine": module.affine,
                "track_running_stats": module.track_running_stats}
    if isinstance(module, nn.GroupNorm):
        return {"kind": "groupnorm", "num_groups": module.num_groups, "num_channels": module.num_channels,
                "eps": module.eps, "affine": module.affine}
    return None


def _build(d: Mapping[str, Any]) -> nn.Module:
    kind = d["kind"]
    if kind == "conv2d":
        return nn.Conv2d(d["in_channels"], d["out_channels"], tuple(d["kernel_size"]), stride=tuple(d["stride"]),
                         padding=tuple(d["padding"]), dilation=tuple(d["dilation"]), groups=d["groups"],
                         bias=d["bias"])
    if kind == "linear":
        return nn.Linear(d["in_features"], d["out_features"], bias=d["bias"])
    if kind == "batchnorm2d":
        return nn.BatchNorm2d(d["num_features"], eps=d["eps"], momentum=d["momentum"], affine=d["affine"],
                              track_running_stats=d["track_running_stats"])
    if kind == "groupnorm":
        return nn.GroupNorm(d["num_groups"], d["num_channels"], eps=d["eps"], affine=d["affine"])
    raise ValueError(f"unknown layer kind {kind!r} in the pruned architecture")


def record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``module name -> sizes`` of every conv, linear and norm layer of ``model``."""
    out = {}
    for name, module in model.named_modules():
        d = _describe(module)
        if d is not None:
            out[name] = d
    return out


def apply(model: nn.Module, arch: Mapping[str, Mapping[str, Any]] | None) -> nn.Module:
    """Resize ``model``'s layers in place to ``arch`` (from :func:`record`); None leaves it as built.

    Raises ValueError when ``arch`` names a layer the model lacks or of another kind: the record
    belongs to another architecture.
    """
    if not arch:
        return model
    modules = dict(model.named_modules())
    like = next(model.parameters(), None)
    for name, d in arch.items():
        old = modules.get(name)
        if old is None or _describe(old) is None or _describe(old)["kind"] != d["kind"]:
            raise ValueError(f"the pruned architecture names layer {name!r}, which this model "
                             f"({type(model).__name__}) does not have as a {d['kind']}")
        if _describe(old) == dict(d):
            continue
        new = _build(d)
        if like is not None:
            new = new.to(device=like.device, dtype=like.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    head = getattr(model, "get_classifier", None)
    if callable(head) and isinstance(head(), nn.Linear):
        # The head API builds a new head on the pruned width (reset_classifier).
        model.num_features = head().in_features
    return model
