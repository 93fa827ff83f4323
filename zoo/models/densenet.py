"""DenseNet-BC, with torchvision's module names so its checkpoints load.

A dense layer is the pre-activation bottleneck BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k);
its input is the concatenation of every earlier output of the block. Transitions are
BN-ReLU-Conv1x1 (compression 0.5) then 2x2 average pooling. ``depthwise=True`` replaces each
3x3 conv by a depthwise 3x3 + pointwise 1x1.

``act_layer`` builds each activation (ReLU by default, torchvision's). ``attn_layer`` puts one
attention block at the end of each dense block (``features.attnN``, on the block's whole
concatenated output, before the transition or ``norm5``). Not in each dense layer: a layer's
own output is only ``growth_rate`` channels (16-48), too few to squeeze (SE at reduction 16
would keep one or two), and later layers re-weight it anyway through their 1x1 convs; the block
output is what the block hands on, every feature of the block in one view, and it costs one
block per dense block instead of one per layer (58 in densenet121). This follows the SE paper's
rule of recalibrating a unit's output before it is combined further downstream.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from zoo.models.head import ClassifierHead
from zoo.nn.act import ActLayer, init_conv_weight, init_scheme
from zoo.nn.attention import AttnLayer
from zoo.nn.norm import NormLayer

_RELU: ActLayer = partial(nn.ReLU, inplace=True)


class _DenseLayer(nn.Module):
    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        norm_layer: NormLayer,
        memory_efficient: bool = False,
        depthwise: bool = False,
        act_layer: ActLayer = _RELU,
    ) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = norm_layer(num_input_features)
        self.relu1 = act_layer()  # torchvision's names, whatever the activation
        self.conv1 = nn.Conv2d(num_input_features, mid, 1, bias=False)
        self.norm2 = norm_layer(mid)
        self.relu2 = act_layer()
        if depthwise:
            self.conv2: nn.Module = nn.Sequential(
                nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False),
                nn.Conv2d(mid, growth_rate, 1, bias=False),
            )
        else:
            self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, inputs: list[Tensor]) -> Tensor:
        # The concatenation and the first BN-ReLU-conv are what checkpointing recomputes:
        # their outputs grow with the block and dominate DenseNet's training memory
        # (Pleiss et al. 2017, https://arxiv.org/abs/1707.06990).
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs: list[Tensor]) -> Tensor:
        if self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            # Unpacked: the block appends to its list later, and recomputation must see it as now.
            out = cp.checkpoint(lambda *xs: self.bottleneck(list(xs)), *inputs, use_reentrant=False)
        else:
            out = self.bottleneck(inputs)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, **layer_kw) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, **layer_kw)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int, norm_layer: NormLayer,
                 act_layer: ActLayer = _RELU) -> None:
        super().__init__()
        self.norm = norm_layer(num_input_features)
        self.relu = act_layer()
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(ClassifierHead, nn.Module):
    """DenseNet-BC.

    Args:
        growth_rate: k, channels each dense layer adds.
        block_config: dense layers per block.
        num_init_features: channels out of the stem.
        bn_size: the bottleneck is ``bn_size * k`` wide (4 in the paper).
        compression: transition output = ``floor(compression * input)`` channels.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"`` (3x3/1 conv).
        memory_efficient: checkpoint each bottleneck (less memory, ~15-20% slower training).
        depthwise: depthwise 3x3 + pointwise 1x1 instead of each dense 3x3 conv.
        act_layer: ``act_layer()`` builds each activation (see :mod:`zoo.nn.act`); the conv
            weights are initialised for it.
        attn_layer: ``attn_layer(channels)`` builds the attention after each dense block (see
            the module docstring and :mod:`zoo.nn.attention`); None: none.
    """

    head_attr = "classifier"  # torchvision's name: checkpoints depend on it

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        stem: str = "imagenet",
        memory_efficient: bool = False,
        depthwise: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = _RELU,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__()
        if stem == "imagenet":
            stem_layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", norm_layer(num_init_features)),
                ("relu0", act_layer()),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        elif stem == "cifar":
            stem_layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, 3, padding=1, bias=False)),
                ("norm0", norm_layer(num_init_features)),
                ("relu0", act_layer()),
            ]
        else:
            raise ValueError(f"Unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
        self.features = nn.Sequential(OrderedDict(stem_layers))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers, num_features, growth_rate, bn_size=bn_size, drop_rate=drop_rate,
                norm_layer=norm_layer, memory_efficient=memory_efficient, depthwise=depthwise, act_layer=act_layer,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if attn_layer is not None:
                self.features.add_module(f"attn{i + 1}", attn_layer(num_features))
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                self.features.add_module(f"transition{i + 1}",
                                         _Transition(num_features, out_features, norm_layer, act_layer))
                num_features = out_features
        self.features.add_module("norm5", norm_layer(num_features))
        # torchvision calls F.relu here; a module of its own lets the activation be chosen.
        self.act = act_layer()
        self.num_features = num_features
        self.num_classes = num_classes
        self.classifier = self._head(num_classes)

        scheme = init_scheme(act_layer)
        # Attention blocks have ReLU inside whatever the model's act, so their convs get He's.
        in_attn = {id(p) for name, m in self.features.named_children() if name.startswith("attn")
                   for p in m.parameters()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_weight(m.weight, ("he", 0.0) if id(m.weight) in in_attn else scheme)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(head.bias)
        return head

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling, ``(N, num_features, H', W')``: ``norm5`` and its ReLU
        included (DenseNet-BC's pre-activation blocks leave the last activation to the end)."""
        return self.act(self.features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify a feature map; ``pre_logits=True`` stops before the classifier."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
