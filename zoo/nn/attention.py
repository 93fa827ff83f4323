"""Channel and spatial attention blocks resolved from a string, in one place (timm's ``create_attn``).

Every block calls the returned factory as ``attn_layer(num_channels)``; the module maps a
feature map to one of the same shape, ``x * gate``.

- ``se``: squeeze-and-excitation (Hu et al. 2018, https://arxiv.org/abs/1709.01507): global
  average pool, 1x1 conv down to ``C / reduction`` channels, ReLU, 1x1 conv back up, sigmoid
  gate per channel. timm's ``SEModule`` exactly (module names ``fc1``/``fc2``, biases, the reduced
  width rounded to a multiple of 8, at least 8), so timm's SE-ResNeXt weights load.
- ``eca``: efficient channel attention (Wang et al. 2020, https://arxiv.org/abs/1910.03151):
  global average pool, one 1-D conv across neighbouring channels (no reduction), sigmoid gate.
  The kernel grows with ``log2(C)``: ``k = |(log2 C + 1) / 2|`` made odd, at least 3 (timm's
  ``EcaModule``). ``reduction`` does not apply.
- ``cbam``: convolutional block attention (Woo et al. 2018, https://arxiv.org/abs/1807.06521):
  a channel gate from average- and max-pooled descriptors through one shared MLP, then a
  spatial gate from a 7x7 conv over the channel-wise mean and max maps. The spatial conv has a
  bias and no norm, as in the paper (timm adds a BatchNorm there); the MLP has no biases, as in
  timm's ``CbamModule``, with the reduced width rounded to an integer, at least 1.

The internal activation is ReLU whatever the model's ``act``: that is the papers' and timm's
choice, and it keeps timm's SE-ResNeXt weights exact.

Every gate is a Sigmoid module and every pool a plain reduction, so the blocks trace with
``torch.fx`` (BatchNorm folding) and export to ONNX as ReduceMean/ReduceMax, Conv and Sigmoid.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

AttnLayer = Callable[[int], nn.Module]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``v`` rounded to the nearest multiple of ``divisor``, at least ``min_value`` (default
    ``divisor``): timm's ``make_divisible(..., round_limit=0)``, which SE uses."""
    min_value = min_value or divisor
    return max(min_value, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, divisor: int = 8) -> None:
        super().__init__()
        rd = make_divisible(channels / reduction, divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttn(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C): the channels are the conv's sequence
        s = self.conv(s).transpose(1, 2).unsqueeze(-1)  # (N, C, 1, 1)
        return x * self.gate(s)


class ChannelAttn(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        rd = max(1, round(channels / reduction))
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(avg + mx)


class SpatialAttn(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * self.gate(self.conv(s))


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channel = ChannelAttn(channels, reduction)
        self.spatial = SpatialAttn()

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


# Name -> block, the one place an attention's name is tied to its implementation. Each is called
# as factory(num_channels, reduction=...), except ECA, which has no reduction.
_ATTN_MAP: dict[str, Callable[..., nn.Module]] = {
    "se": SqueezeExcite,
    "eca": EfficientChannelAttn,
    "cbam": CBAM,
}
ATTNS = tuple(_ATTN_MAP)


def get_attn_layer(name: str | AttnLayer | None, reduction: int = 16) -> AttnLayer | None:
    """Return ``attn_layer(num_channels) -> nn.Module`` for ``name`` in :data:`ATTNS`, ``None``
    for no attention (``None`` or ``"none"``); a callable passes through unchanged."""
    if name is None or name == "none":
        return None
    if callable(name):
        return name
    if name not in _ATTN_MAP:
        raise ValueError(f"Unknown attn {name!r}; choose one of: none, {', '.join(ATTNS)}")
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError(f"Invalid attn_reduction: {reduction!r} (a positive integer)")
    if name == "eca":
        return _ATTN_MAP[name]
    return partial(_ATTN_MAP[name], reduction=reduction)
