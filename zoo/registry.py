"""Model names -> builders, in one place.

Each variant is one :class:`ModelSpec`: the builder, a small dict of model arguments, and the
metadata that travels with it (default input size, mean/std, its dense twin). The same record
feeds ``num_classes`` and, later, the ONNX metadata.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from zoo.models.densenet import DenseNet
from zoo.models.resnext import ResNet
from zoo.nn.act import ActLayer, get_act_layer
from zoo.nn.attention import AttnLayer, get_attn_layer
from zoo.nn.norm import NormLayer, get_norm_layer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "resnext" or "densenet"
    model_args: dict[str, Any]
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dense_twin: str | None = None  # for a depthwise variant: the model it is measured against
    description: str = ""
    attn: str | None = None  # the attention the variant fixes (timm's SE-ResNeXts: "se")

    @property
    def builder(self) -> Callable[..., nn.Module]:
        return FAMILIES[self.family]


# Family name -> model class: each takes its variant's model_args plus num_classes, in_chans,
# norm_layer, act_layer and attn_layer, and has the head API (forward_features, forward_head,
# get_classifier, reset_classifier).
FAMILIES: dict[str, Callable[..., nn.Module]] = {"resnext": ResNet, "densenet": DenseNet}
_REGISTRY: dict[str, ModelSpec] = {}
ALIASES = {"resnext50": "resnext50_32x4d", "resnext101": "resnext101_32x8d"}


def _register(spec: ModelSpec) -> None:
    assert spec.name not in _REGISTRY, spec.name
    _REGISTRY[spec.name] = spec


_R50 = dict(layers=(3, 4, 6, 3))
_R101 = dict(layers=(3, 4, 23, 3))
# CIFAR-style small nets for 32x32 inputs: 3x3 stem, no max pool, three stages (32 -> 16 -> 8),
# sized to train an epoch of digits in seconds on 2 CPU cores. resnext_mini is 4x32d: 8 channels
# per group in the first stage. With 4 per group, oneDNN's grouped-conv weight gradient
# (torch 2.13, CPU) ran 10-15x slower than with 8 per group at the same FLOPs.
_RMINI = dict(layers=(1, 1, 1), planes=(16, 32, 64), groups=4, width_per_group=32,
              stem="cifar", stem_width=32)
_DMINI = dict(growth_rate=16, block_config=(4, 6, 8), num_init_features=32, stem="cifar")
_MINI_IN = (3, 32, 32)

for spec in [
    ModelSpec("resnet50", "resnext", dict(_R50), description="ResNet-50, cardinality 1 (the baseline)"),
    ModelSpec("resnext50_32x4d", "resnext", dict(_R50, groups=32, width_per_group=4), description="ResNeXt-50 32x4d"),
    ModelSpec("resnext101_32x8d", "resnext", dict(_R101, groups=32, width_per_group=8),
              description="ResNeXt-101 32x8d"),
    ModelSpec("resnext101_64x4d", "resnext", dict(_R101, groups=64, width_per_group=4),
              description="ResNeXt-101 64x4d"),
    ModelSpec("resnext50_dw", "resnext", dict(_R50, groups=32, width_per_group=4, depthwise=True),
              dense_twin="resnext50_32x4d", description="ResNeXt-50 with depthwise 3x3 convs"),
    ModelSpec("resnext_mini", "resnext", dict(_RMINI), input_size=_MINI_IN, description="small ResNeXt for 32x32"),
    ModelSpec("resnext_mini_dw", "resnext", dict(_RMINI, depthwise=True), input_size=_MINI_IN,
              dense_twin="resnext_mini", description="resnext_mini with depthwise 3x3 convs"),
    # timm's SE-ResNeXts: torchvision's ResNeXt with timm's SEModule in every bottleneck (same
    # state_dict keys, shapes and outputs as timm.create_model of the same name).
    ModelSpec("seresnext50_32x4d", "resnext", dict(_R50, groups=32, width_per_group=4), attn="se",
              description="SE-ResNeXt-50 32x4d (timm's)"),
    ModelSpec("seresnext101_32x8d", "resnext", dict(_R101, groups=32, width_per_group=8), attn="se",
              description="SE-ResNeXt-101 32x8d (timm's)"),
    ModelSpec("seresnext_mini", "resnext", dict(_RMINI), input_size=_MINI_IN, attn="se",
              description="resnext_mini with SE blocks"),
    ModelSpec("densenet121", "densenet", dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
              description="DenseNet-121"),
    ModelSpec("densenet161", "densenet", dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
              description="DenseNet-161"),
    ModelSpec("densenet169", "densenet", dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
              description="DenseNet-169"),
    ModelSpec("densenet201", "densenet", dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
              description="DenseNet-201"),
    ModelSpec("densenet121_dw", "densenet",
              dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, depthwise=True),
              dense_twin="densenet121", description="DenseNet-121, depthwise 3x3 + pointwise 1x1"),
    ModelSpec("densenet_mini", "densenet", dict(_DMINI), input_size=_MINI_IN,
              description="small DenseNet-BC for 32x32"),
    ModelSpec("densenet_mini_dw", "densenet", dict(_DMINI, depthwise=True), input_size=_MINI_IN,
              dense_twin="densenet_mini", description="densenet_mini, depthwise 3x3 + pointwise 1x1"),
]:
    _register(spec)


def list_models() -> list[str]:
    """Every registered model name (aliases not included), sorted."""
    return sorted(_REGISTRY)


def resolve_name(name: str) -> str:
    """The canonical name for ``name`` or an alias; ValueError with close matches otherwise."""
    if name in _REGISTRY:
        return name
    if name in ALIASES:
        return ALIASES[name]
    choices = list(_REGISTRY) + list(ALIASES)
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"choose one of: {', '.join(list_models())}"
    raise ValueError(f"Unknown model {name!r}; {hint}")


def get_model_spec(name: str) -> ModelSpec:
    return _REGISTRY[resolve_name(name)]


# Arguments create_model sets from its own parameters; a caller may not pass them again.
_RESERVED = {"num_classes", "in_chans", "norm_layer", "act_layer", "attn_layer"}


def create_model(
    name: str,
    num_classes: int = 1000,
    norm: str | NormLayer = "bn",
    gn_groups: int = 32,
    in_chans: int = 3,
    act: str | ActLayer = "relu",
    attn: str | AttnLayer | None = None,
    attn_reduction: int = 16,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` or an alias (``resnext50``, ``resnext101``).
        num_classes: size of the classifier.
        norm: one of ``bn``, ``gn``, ``ln``, ``in`` (see :mod:`zoo.nn.norm`), or a
            ``norm_layer(num_channels)`` callable of your own.
        gn_groups: groups for ``gn`` (largest divisor of the channel count <= this).
        in_chans: input channels (3 for RGB, 1 for grayscale).
        act: an activation of :data:`zoo.nn.act.ACTS` (``relu``, the default, is torchvision's),
            or an ``act_layer()`` callable of your own; the conv weights are initialised for it.
        attn: ``se``, ``eca``, ``cbam`` (see :mod:`zoo.nn.attention`), ``none``, an
            ``attn_layer(channels)`` callable, or None: the variant's own (``se`` for the
            ``seresnext*`` models, which fix it; none for the others).
        attn_reduction: the channel reduction of ``se`` and ``cbam`` (16 in both papers).
        **kwargs: overrides of the variant's model arguments, e.g. ``memory_efficient=True``
            for DenseNet or ``zero_init_residual=True`` for ResNeXt. Overriding an argument the
            variant fixes (``groups``, ``depthwise``, ...) to a different value is an error.
    """
    spec = get_model_spec(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Invalid num_classes: {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"Invalid in_chans: {in_chans!r}")
    norm_layer = get_norm_layer(norm, gn_groups)
    act_layer = get_act_layer(act)
    if spec.attn is not None and attn is not None and attn != spec.attn:
        raise ValueError(f"{spec.name} fixes attn={spec.attn!r}; got attn={attn!r}")
    attn_layer = get_attn_layer(spec.attn if attn is None else attn, attn_reduction)
    bad = _RESERVED & kwargs.keys()
    if bad:
        raise ValueError(f"{', '.join(sorted(bad))} is set by create_model itself: use its num_classes, "
                         "in_chans, norm, act and attn arguments")
    for key, value in kwargs.items():
        if key in spec.model_args and spec.model_args[key] != value:
            raise ValueError(f"{spec.name} fixes {key}={spec.model_args[key]!r}; got {key}={value!r}")
    args = dict(spec.model_args, **kwargs)
    return spec.builder(num_classes=num_classes, in_chans=in_chans, norm_layer=norm_layer, act_layer=act_layer,
                        attn_layer=attn_layer, **args)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
