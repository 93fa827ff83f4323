"""Activation layers resolved from a string, in one place (timm's ``get_act_layer``).

Every block calls the returned factory as ``act_layer()`` and gets a fresh module, one per place
it is used: a PReLU's slope is a parameter, so two places never share one module.

- ``relu`` (the default) is ``nn.ReLU(inplace=True)``, torchvision's module, so the models stay
  torchvision-exact. The others are torch's modules with their own defaults: ``leaky_relu`` has
  slope 0.01, ``prelu`` one learned slope per layer starting at 0.25 (torch's and timm's
  ``nn.PReLU()``; He et al. also tried one per channel), ``swish`` is another name of ``silu``.

Weight init follows the activation (:func:`init_conv_weight`): He et al.'s variance for the ReLU
family (they derive it for ReLU and PReLU; the smooth ReLU-likes GELU, SiLU, Mish, ELU and the
hard ones are ReLU-shaped for large inputs and are initialised the same), LeCun's ``1 / fan_in``
for SELU (its self-normalising fixed point assumes it), Glorot/Xavier for sigmoid, tanh and
hardsigmoid (Glorot and Bengio derive it for activations linear near 0).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import Tensor, nn

ActLayer = Callable[[], nn.Module]

# Name -> module factory, the one place an activation's name is tied to its implementation.
_ACT_MAP: dict[str, ActLayer] = {
    "relu": partial(nn.ReLU, inplace=True),
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
ACTS = tuple(_ACT_MAP)

# Initialisation family of each module type; anything not listed (a layer of your own) gets He.
_XAVIER = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)


def get_act_layer(name: str | ActLayer) -> ActLayer:
    """Return ``act_layer() -> nn.Module`` for ``name`` in :data:`ACTS`; a callable passes through
    unchanged (a layer of your own)."""
    if callable(name):
        return name
    if name not in _ACT_MAP:
        raise ValueError(f"Unknown act {name!r}; choose one of: {', '.join(ACTS)}")
    return _ACT_MAP[name]


def act_name(act: str | ActLayer) -> str:
    """The canonical table name of ``act`` (``swish`` is ``silu``), for reports and configs."""
    return "silu" if act == "swish" else str(act)


def init_scheme(act_layer: ActLayer) -> tuple[str, float]:
    """``(scheme, negative_slope)`` for the module ``act_layer()`` builds: ``"he"``, ``"lecun"``
    or ``"xavier"``; the slope is the leaky/PReLU one He et al.'s gain uses (0 otherwise)."""
    probe = act_layer()
    if isinstance(probe, _XAVIER):
        return "xavier", 0.0
    if isinstance(probe, nn.SELU):
        return "lecun", 0.0
    if isinstance(probe, nn.LeakyReLU):
        return "he", float(probe.negative_slope)
    if isinstance(probe, nn.PReLU):
        return "he", float(probe.weight.detach().reshape(-1)[0]) if probe.weight.device.type != "meta" else 0.25
    return "he", 0.0


def init_conv_weight(weight: Tensor, scheme: tuple[str, float], mode: str = "fan_in") -> None:
    """Initialise a conv/linear ``weight`` for the activation that follows it.

    ``mode`` is the He fan (``fan_out`` in torchvision's ResNet, ``fan_in`` in its DenseNet). The
    ReLU case makes exactly torchvision's call, so the default models draw the same numbers.
    """
    kind, slope = scheme
    if kind == "xavier":
        nn.init.xavier_normal_(weight)
    elif kind == "lecun":
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear")
    elif slope:
        nn.init.kaiming_normal_(weight, a=slope, mode=mode, nonlinearity="leaky_relu")
    else:
        nn.init.kaiming_normal_(weight, mode=mode, nonlinearity="relu")
