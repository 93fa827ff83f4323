"""Normalization layers resolved from a string, in one place.

Every block calls the returned factory only as ``norm_layer(num_channels)``.

- ``bn``: BatchNorm2d. The textbook's running average ``r = 0.9 r + 0.1 x`` is torch's
  ``momentum=0.1`` (torch weights the *new* value); the running variance is the unbiased
  estimate ``m / (m - 1) * var`` as in the textbook
- ``gn``: GroupNorm over groups of channels of one sample. When ``gn_groups`` does not divide
  the channel count, the largest divisor of the channel count that is <= ``gn_groups`` is used
  (so 24 channels with 32 groups -> 24 groups; 48 with 32 -> 24).
- ``ln``: GroupNorm with one group: per sample over (C, H, W), as the textbook's figure draws it.
- ``in``: GroupNorm with C groups: per sample and channel over (H, W), affine per channel.

GN/LN/IN use the statistics of the sample at hand, in training and at test time alike, so a
sample's output never depends on the rest of its batch (and they cannot be folded away).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]


def gn_num_groups(num_channels: int, gn_groups: int) -> int:
    """The group count GroupNorm uses: the largest divisor of ``num_channels`` <= ``gn_groups``."""
    if num_channels < 1 or gn_groups < 1:
        raise ValueError(f"Invalid GroupNorm sizes: channels={num_channels}, groups={gn_groups}")
    for g in range(min(gn_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1  # unreachable: 1 divides everything


def group_norm(num_channels: int, gn_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(gn_num_groups(num_channels, gn_groups), num_channels, eps=eps)


def layer_norm(num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(1, num_channels, eps=eps)


def instance_norm(num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(num_channels, num_channels, eps=eps)


# Name -> layer factory, the one place a norm's name is tied to its implementation (timm's
# layers/create_norm.py _NORM_MAP). Each is called as factory(num_channels), gn's with gn_groups.
_NORM_MAP: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "gn": group_norm,
    "ln": layer_norm,
    "in": instance_norm,
}
NORMS = tuple(_NORM_MAP)


def get_norm_layer(name: str | NormLayer, gn_groups: int = 32) -> NormLayer:
    """Return ``norm_layer(num_channels) -> nn.Module`` for ``name`` in :data:`NORMS`; a callable
    passes through unchanged (a layer of your own)."""
    if callable(name):
        return name
    if name not in _NORM_MAP:
        raise ValueError(f"Unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    if name == "gn":
        if not isinstance(gn_groups, int) or gn_groups < 1:
            raise ValueError(f"Invalid gn_groups: {gn_groups!r} (a positive integer)")
        return partial(_NORM_MAP[name], gn_groups=gn_groups)
    return _NORM_MAP[name]
