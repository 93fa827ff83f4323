"""Adam as the seed writes it (§1.3.6), with bias correction."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT


class Adam(Optimizer):
    r"""Adam (seed §1.3.6; Kingma & Ba 2015, https://arxiv.org/abs/1412.6980):

    ``m = beta1 * m + (1 - beta1) * g``,  ``v = beta2 * v + (1 - beta2) * g**2``,
    ``m_hat = m / (1 - beta1**t)``,  ``v_hat = v / (1 - beta2**t)``,
    ``theta = theta - lr * m_hat / (sqrt(v_hat) + eps)``,

    with ``g = grad + weight_decay * theta`` (L2 added to the gradient, as ``torch.optim.Adam``
    does; for decoupled decay use AdamW). Same rule, defaults and eps placement as
    ``torch.optim.Adam``; no amsgrad. ``state[p]["step"]`` is a Python int.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate ``eta``; 1e-3.
        betas: ``(beta1, beta2)``; (0.9, 0.999) as in the seed.
        eps: added to ``sqrt(v_hat)``; 1e-8 as in the seed.
        weight_decay: L2 coefficient added to the gradient.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool = True,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _init_group(self, group: dict):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._init_group(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            update = _multi_tensor_adam if group["foreach"] else _single_tensor_adam
            update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                   beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


def _single_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[int], *, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float) -> None:
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)  # beta1 * m + (1 - beta1) * g in one pass
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def _multi_tensor_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], steps: list[int], *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs], with_indices=True)
    for (dparams, dgrads, dm, dv), indices in grouped.values():
        if weight_decay != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=weight_decay)
        torch._foreach_lerp_(dm, dgrads, 1 - beta1)
        torch._foreach_mul_(dv, beta2)
        torch._foreach_addcmul_(dv, dgrads, dgrads, value=1 - beta2)
        # lr * m_hat / (sqrt(v_hat) + eps) == (lr * c2 / c1) * m / (sqrt(v) + eps * c2) with
        # c1 = 1 - beta1**t, c2 = sqrt(1 - beta2**t): exact, and saves the pass that divides
        # sqrt(v) by c2 (Kingma & Ba, end of §2, with eps rescaled to keep the rule unchanged).
        c2 = [math.sqrt(1 - beta2 ** steps[i]) for i in indices]
        step_sizes = [-lr * c / (1 - beta1 ** steps[i]) for c, i in zip(c2, indices)]
        denom = torch._foreach_sqrt(dv)
        torch._foreach_add_(denom, [eps * c for c in c2])
        torch._foreach_addcdiv_(dparams, dm, denom, step_sizes)
