"""ResNet / ResNeXt, with torchvision's module names so its checkpoints load.

A ResNeXt block is the ResNet bottleneck whose 3x3 conv is grouped: cardinality C groups of
width d each (``groups=C, width_per_group=d``); the textbook shows that C summed branches,
C concatenated branches + one 1x1 conv and one grouped conv are the same function.
``depthwise=True`` makes the 3x3 conv depthwise (groups = its channels).

``act_layer`` builds each activation (ReLU by default, torchvision's); ``attn_layer`` adds a
channel/spatial attention block on the bottleneck's output, after ``bn3`` and before the
residual add, where SENet (Hu et al.) and timm put it, as the module ``se`` (timm's name, so
timm's SE-ResNeXt checkpoints load). The activations are ``act1``..``act3``, one module per
place, as in timm: a PReLU's slope is a parameter of its place.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from zoo.models.head import ClassifierHead
from zoo.nn.act import ActLayer, init_conv_weight, init_scheme
from zoo.nn.attention import AttnLayer
from zoo.nn.norm import NormLayer

_RELU: ActLayer = partial(nn.ReLU, inplace=True)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 grouped (stride here, as torchvision's "ResNet v1.5") -> 1x1 expand."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        depthwise: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = _RELU,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.conv2 = conv3x3(width, width, stride, groups=width if depthwise else groups)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.se = attn_layer(planes * self.expansion) if attn_layer is not None else nn.Identity()
        self.act3 = act_layer()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.act3(out + identity)


class ResNet(ClassifierHead, nn.Module):
    """ResNet/ResNeXt with bottleneck blocks.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for the 50-layer net.
        planes: bottleneck planes per stage (output channels are 4x this).
        groups: cardinality C of the 3x3 conv.
        width_per_group: d, the width of one group at the first stage's 64 planes.
        depthwise: make every 3x3 conv depthwise instead of grouped.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"`` (3x3/1 conv, no pool)
            for 32x32 inputs.
        stem_width: output channels of the stem conv.
        act_layer: ``act_layer()`` builds each activation (see :mod:`zoo.nn.act`); the conv
            weights are initialised for it.
        attn_layer: ``attn_layer(channels)`` builds each block's attention (see
            :mod:`zoo.nn.attention`); None: none.
    """

    head_attr = "fc"  # torchvision's name: checkpoints depend on it

    def __init__(
        self,
        layers: Sequence[int],
        planes: Sequence[int] = (64, 128, 256, 512),
        groups: int = 1,
        width_per_group: int = 64,
        depthwise: bool = False,
        stem: str = "imagenet",
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = _RELU,
        attn_layer: AttnLayer | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(planes):
            raise ValueError(f"layers {tuple(layers)} and planes {tuple(planes)} differ in length")
        self.groups, self.width_per_group, self.depthwise = groups, width_per_group, depthwise
        self._norm_layer, self._act_layer, self._attn_layer = norm_layer, act_layer, attn_layer
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"Unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
        self.bn1 = norm_layer(stem_width)
        self.act1 = act_layer()
        self.inplanes = stem_width
        # Stages are named layer1..layerN (torchvision's names are a checkpoint contract).
        for i, (n, p) in enumerate(zip(layers, planes)):
            self.add_module(f"layer{i + 1}", self._make_layer(p, n, stride=1 if i == 0 else 2))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = planes[-1] * Bottleneck.expansion
        self.num_classes = num_classes
        self.fc = self._head(num_classes)

        scheme = init_scheme(act_layer)
        # Attention blocks have ReLU inside whatever the model's act, so their convs get He's.
        in_attn = {id(p) for b in self.modules() if isinstance(b, Bottleneck) for p in b.se.parameters()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_weight(m.weight, ("he", 0.0) if id(m.weight) in in_attn else scheme, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity
            # (Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
            for m in self.modules():
                if isinstance(m, Bottleneck) and getattr(m.bn3, "weight", None) is not None:
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        out_ch = planes * Bottleneck.expansion
        if stride != 1 or self.inplanes != out_ch:
            # Projection shortcut when the shape changes (1x1 conv with the block's stride).
            downsample = nn.Sequential(conv1x1(self.inplanes, out_ch, stride), norm_layer(out_ch))
        kw = dict(groups=self.groups, width_per_group=self.width_per_group,
                  depthwise=self.depthwise, norm_layer=norm_layer, act_layer=self._act_layer,
                  attn_layer=self._attn_layer)
        blocks_ = [Bottleneck(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = out_ch
        blocks_ += [Bottleneck(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_)

    def _head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling, ``(N, num_features, H', W')``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify a feature map; ``pre_logits=True`` stops before the classifier."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
