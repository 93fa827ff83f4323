"""Gradient descent, Momentum and Nesterov momentum as the textbook writes them."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from zoo.optim._base import TextbookOptimizer, check_hyperparameters


class SGD(TextbookOptimizer):
    r"""Gradient descent with optional (Nesterov) momentum, velocity in the textbook's form.

    With ``g = grad + weight_decay * theta`` (L2 added to the gradient, as torch.optim does):

    - ``momentum == 0``: ``theta = theta - lr * g``.
    - ``momentum == gamma > 0``: ``v = gamma * v + lr * g;  theta = theta - v``.
    - ``nesterov=True``: ``v = gamma * v + lr * grad J(theta - gamma * v);
      theta = theta - v``. The parameters hold the look-ahead point ``phi = theta - gamma * v``
      (the reparameterisation torch.optim uses), so the gradient the caller computes at the
      parameters is the one the rule asks for; the update becomes
      ``v = gamma * v + lr * g;  phi = phi - lr * g - gamma * v``, and
      ``theta = phi + gamma * v`` can be read back from ``state[p]["momentum_buffer"]``.

    Departure from ``torch.optim.SGD``: torch keeps the velocity without the learning rate
    (``b = mu * b + g;  theta -= lr * b``), so ``v = lr * b`` and the two trajectories agree
    while lr is constant. When a scheduler changes lr, torch rescales the whole accumulated
    velocity at once; here only new gradients get the new lr and the old velocity decays at the
    lr it was built with. The buffer starts at zero (torch starts it at the first gradient, the
    same first step). No dampening.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate ``eta``; 0.01 by default (the textbook gives none).
        momentum: ``gamma``; 0 gives plain gradient descent. The registry's ``momentum`` and
            ``nesterov`` default it to 0.9.
        nesterov: use Nesterov accelerated gradient (needs ``momentum > 0``).
        weight_decay: L2 coefficient added to the gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default) instead of a loop
            over parameters.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        foreach: bool = True,
    ) -> None:
        check_hyperparameters(lr, weight_decay)
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError(f"Nesterov momentum requires momentum > 0, got momentum={momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, group, params, grads, states):
        update = _multi_tensor_sgd if group["foreach"] else _single_tensor_sgd
        update(params, grads, states[0] if states else [], lr=group["lr"], momentum=group["momentum"],
               nesterov=group["nesterov"], weight_decay=group["weight_decay"])


def _single_tensor_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *,
                       lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum == 0:
            p.add_(g, alpha=-lr)
            continue
        v = bufs[i]
        v.mul_(momentum).add_(g, alpha=lr)
        if nesterov:
            p.add_(g, alpha=-lr).add_(v, alpha=-momentum)
        else:
            p.sub_(v)


def _multi_tensor_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *,
                      lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    lists = [params, grads, bufs] if momentum != 0 else [params, grads]
    # Fused foreach kernels need one device and dtype per list.
    for (dparams, dgrads, *dbufs), _ in Optimizer._group_tensors_by_device_and_dtype(lists).values():
        if weight_decay != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=weight_decay)
        if momentum == 0:
            torch._foreach_add_(dparams, dgrads, alpha=-lr)
            continue
        (dbufs,) = dbufs
        torch._foreach_mul_(dbufs, momentum)
        torch._foreach_add_(dbufs, dgrads, alpha=lr)
        if nesterov:
            torch._foreach_add_(dparams, dgrads, alpha=-lr)
            torch._foreach_add_(dparams, dbufs, alpha=-momentum)
        else:
            torch._foreach_sub_(dparams, dbufs)
