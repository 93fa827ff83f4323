"""What every rule of the textbook shares: argument checks, lazily created zero state, the closure step.

A rule names its per-parameter state tensors (``state_keys``) and implements ``_update``, which
gets, for one param group, the parameters that have a gradient, those gradients and the state
tensors in ``state_keys`` order.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer


def check_hyperparameters(lr: float, weight_decay: float, eps: float | None = None) -> None:
    """Raise ValueError (torch.optim's wording) for a negative ``lr``, ``eps`` or ``weight_decay``."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class TextbookOptimizer(Optimizer):
    """A torch Optimizer whose ``step`` gathers a group's gradients and state and calls ``_update``."""

    def state_keys(self, group: dict) -> tuple[str, ...]:
        """Names of the zero-initialised state tensors a parameter of ``group`` keeps."""
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]]) -> None:
        raise NotImplementedError

    def _init_group(self, group: dict) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:
        keys = self.state_keys(group)
        params, grads, states = [], [], [[] for _ in keys]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            if not keys:  # stateless (plain SGD): no empty entry in state_dict, as torch.optim
                continue
            state = self.state[p]
            for key, out in zip(keys, states):
                if key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                out.append(state[key])
        return params, grads, states

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if params:
                self._update(group, params, grads, states)
        return loss
