"""The textbook's optimizers, resolved from a name in one place.

>>> opt = create_optimizer("nesterov", model.parameters(), lr=0.1, weight_decay=1e-4)
>>> sched = create_scheduler("cosine", opt, epochs=90, steps_per_epoch=len(loader), warmup_epochs=5)
"""
from __future__ import annotations

from typing import Any, NamedTuple

from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from zoo.optim.adam import Adam
from zoo.optim.adaptive import Adadelta, Adagrad, RMSprop
from zoo.optim.schedule import SCHEDULERS, create_scheduler
from zoo.optim.sgd import SGD

__all__ = ["OPTIMIZERS", "SCHEDULERS", "SGD", "Adagrad", "Adadelta", "RMSprop", "Adam",
           "create_optimizer", "create_scheduler"]


class _Spec(NamedTuple):
    cls: type[Optimizer]
    defaults: dict[str, Any]  # the caller may override these
    fixed: dict[str, Any]  # these define the name; contradicting them is an error


_REGISTRY: dict[str, _Spec] = {
    "sgd": _Spec(SGD, {}, {"momentum": 0.0, "nesterov": False}),
    "momentum": _Spec(SGD, {"momentum": 0.9}, {"nesterov": False}),
    "nesterov": _Spec(SGD, {"momentum": 0.9}, {"nesterov": True}),
    "adagrad": _Spec(Adagrad, {}, {}),
    "adadelta": _Spec(Adadelta, {}, {}),
    "rmsprop": _Spec(RMSprop, {}, {}),
    "adam": _Spec(Adam, {}, {}),
}
OPTIMIZERS = tuple(_REGISTRY)


def create_optimizer(name: str, params: ParamsT, **hyperparameters: Any) -> Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: iterable of parameters or of param-group dicts, as for any torch optimizer.
        **hyperparameters: keyword arguments of the class (``lr``, ``momentum``,
            ``weight_decay``, ``betas``, ``eps``, ``rho``, ``alpha``, ``foreach``); unset ones
            take the class defaults, except ``momentum=0.9`` for ``momentum`` and ``nesterov``.
            ``sgd`` fixes ``momentum=0`` and ``momentum``/``nesterov`` fix ``nesterov``: passing
            a different value is an error, not silently overwritten.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    for key, value in spec.fixed.items():
        if key in hyperparameters and hyperparameters[key] != value:
            raise ValueError(f"{name} fixes {key}={value!r}; got {key}={hyperparameters[key]!r}")
    return spec.cls(params, **{**spec.defaults, **hyperparameters, **spec.fixed})
