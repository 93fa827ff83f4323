"""An exponential moving average of a model's weights (timm's ``--model-ema``).

After every optimizer step, each floating-point entry of the state dict (parameters and
BatchNorm running statistics) moves toward the model's:

    ema = d * ema + (1 - d) * weight,        d = min(decay, (1 + k) / (10 + k))

for the ``k``-th update (k = 1, 2, ...). The cap is TensorFlow's ``ExponentialMovingAverage``
with ``num_updates``: timm's default decay 0.9998 averages over about 5,000 steps, longer than a
short run, whose average would stay near the random initial weights; the cap makes early updates
count more (d = 0.9 at k = 80, 0.99 at k = 890) until the run is long enough for ``decay``.
Integer entries (BatchNorm's ``num_batches_tracked``) are copied.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEma:
    """The averaged copy ``module`` (eval mode, no gradients) of a model, updated by :meth:`update`.

    Args:
        model: the model being trained (unwrapped from DistributedDataParallel if wrapped).
        decay: the decay once the warmup cap has passed it, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"Invalid EMA decay: {decay} (must be in (0, 1))")
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    def decay_at(self, k: int) -> float:
        """The decay of the ``k``-th update."""
        return min(self.decay, (1.0 + k) / (10.0 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        current = unwrap(model).state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(new.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
