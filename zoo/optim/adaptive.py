"""Per-coordinate step sizes as the textbook writes them: Adagrad, Adadelta, RMSprop.

All three keep ``eps`` inside the square root, exactly as the textbook's formulas do. In every rule
``g = grad + weight_decay * theta`` (L2 added to the gradient, as torch.optim does), and sparse
gradients are refused.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from zoo.optim._base import TextbookOptimizer, check_hyperparameters


class Adagrad(TextbookOptimizer):
    r"""Adagrad: ``G = G + g**2;  theta = theta - lr * g / sqrt(G + eps)``.

    Departure from ``torch.optim.Adagrad``: torch divides by ``sqrt(G) + eps`` (eps outside the
    root); here eps sits inside it as in the textbook, so the effective floor on the denominator is
    ``sqrt(eps)`` (1e-4 for the default 1e-8). No ``lr_decay`` or ``initial_accumulator_value``.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate ``eta``; 0.01 by default (the textbook gives none; torch's default).
        eps: added to ``G`` under the square root; 1e-8 as in the textbook.
        weight_decay: L2 coefficient added to the gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default).
    """

    def __init__(self, params: ParamsT, lr: float = 0.01, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, foreach: bool = True) -> None:
        check_hyperparameters(lr, weight_decay, eps)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        return ("sum",)

    def _update(self, group, params, grads, states):
        update = _multi_tensor_adagrad if group["foreach"] else _single_tensor_adagrad
        update(params, grads, *states, lr=group["lr"], eps=group["eps"],
               weight_decay=group["weight_decay"])


class Adadelta(TextbookOptimizer):
    r"""Adadelta, which needs no learning rate:

    ``E[g2] = rho * E[g2] + (1 - rho) * g**2``,
    ``delta = sqrt(E[dx2] + eps) / sqrt(E[g2] + eps) * g``,
    ``E[dx2] = rho * E[dx2] + (1 - rho) * delta**2``,
    ``theta = theta - lr * delta``.

    ``lr`` is only a multiplier on the textbook's step and defaults to 1.0, which is the textbook's rule
    exactly. With ``lr=1`` this matches ``torch.optim.Adadelta(lr=1.0, rho=rho, eps=eps)``, which
    also keeps eps inside both roots.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: multiplier on the step; 1.0 (the textbook's rule) by default.
        rho: decay of both running averages (the textbook's ``gamma``); 0.9 as in the textbook.
        eps: added under both square roots; 1e-6 (the textbook gives no value; Zeiler 2012 and
            torch use 1e-6). It also sets the size of the first steps, ``~sqrt(eps)``.
        weight_decay: L2 coefficient added to the gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default).
    """

    def __init__(self, params: ParamsT, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, foreach: bool = True) -> None:
        check_hyperparameters(lr, weight_decay, eps)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _update(self, group, params, grads, states):
        update = _multi_tensor_adadelta if group["foreach"] else _single_tensor_adadelta
        update(params, grads, *states, lr=group["lr"], rho=group["rho"], eps=group["eps"],
               weight_decay=group["weight_decay"])


class RMSprop(TextbookOptimizer):
    r"""RMSprop:
    ``E[g2] = alpha * E[g2] + (1 - alpha) * g**2;  theta = theta - lr * g / sqrt(E[g2] + eps)``.

    Departures from ``torch.optim.RMSprop``: torch divides by ``sqrt(E[g2]) + eps`` (eps
    outside the root; here inside, as in the textbook, so the floor is ``sqrt(eps)``), and its
    defaults are ``alpha=0.99, lr=0.01``; the textbook uses 0.9 and 1e-3. No momentum or centering.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate ``eta``; 1e-3 as in the textbook.
        alpha: decay of the running average of ``g**2``; 0.9 as in the textbook.
        eps: added under the square root; 1e-8.
        weight_decay: L2 coefficient added to the gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default).
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, alpha: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, foreach: bool = True) -> None:
        check_hyperparameters(lr, weight_decay, eps)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        return ("square_avg",)

    def _update(self, group, params, grads, states):
        update = _multi_tensor_rmsprop if group["foreach"] else _single_tensor_rmsprop
        update(params, grads, *states, lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
               weight_decay=group["weight_decay"])


def _single_tensor_adagrad(params, grads, sums, *, lr, eps, weight_decay):
    for p, g, s in zip(params, grads, sums):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        s.addcmul_(g, g)
        p.addcdiv_(g, s.add(eps).sqrt_(), value=-lr)


def _multi_tensor_adagrad(params, grads, sums, *, lr, eps, weight_decay):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, sums])
    for (dparams, dgrads, dsums), _ in grouped.values():
        if weight_decay != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=weight_decay)
        torch._foreach_addcmul_(dsums, dgrads, dgrads)
        denom = torch._foreach_add(dsums, eps)
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(dparams, dgrads, denom, value=-lr)


def _single_tensor_adadelta(params, grads, square_avgs, acc_deltas, *, lr, rho, eps, weight_decay):
    for p, g, sq, acc in zip(params, grads, square_avgs, acc_deltas):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        sq.mul_(rho).addcmul_(g, g, value=1 - rho)
        delta = acc.add(eps).sqrt_().div_(sq.add(eps).sqrt_()).mul_(g)
        acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        p.add_(delta, alpha=-lr)


def _multi_tensor_adadelta(params, grads, square_avgs, acc_deltas, *, lr, rho, eps, weight_decay):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, square_avgs, acc_deltas])
    for (dparams, dgrads, dsq, dacc), _ in grouped.values():
        if weight_decay != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=weight_decay)
        torch._foreach_mul_(dsq, rho)
        torch._foreach_addcmul_(dsq, dgrads, dgrads, value=1 - rho)
        rms_g = torch._foreach_add(dsq, eps)
        torch._foreach_sqrt_(rms_g)
        deltas = torch._foreach_add(dacc, eps)  # RMS[dx] of the previous step
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, rms_g)
        torch._foreach_mul_(deltas, dgrads)
        torch._foreach_mul_(dacc, rho)
        torch._foreach_addcmul_(dacc, deltas, deltas, value=1 - rho)
        torch._foreach_add_(dparams, deltas, alpha=-lr)


def _single_tensor_rmsprop(params, grads, square_avgs, *, lr, alpha, eps, weight_decay):
    for p, g, sq in zip(params, grads, square_avgs):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        p.addcdiv_(g, sq.add(eps).sqrt_(), value=-lr)


def _multi_tensor_rmsprop(params, grads, square_avgs, *, lr, alpha, eps, weight_decay):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, square_avgs])
    for (dparams, dgrads, dsq), _ in grouped.values():
        if weight_decay != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=weight_decay)
        torch._foreach_mul_(dsq, alpha)
        torch._foreach_addcmul_(dsq, dgrads, dgrads, value=1 - alpha)
        denom = torch._foreach_add(dsq, eps)
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(dparams, dgrads, denom, value=-lr)
