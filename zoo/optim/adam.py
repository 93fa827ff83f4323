"""Adam as the textbook writes it, with bias correction."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from zoo.optim._base import TextbookOptimizer, check_hyperparameters


class Adam(TextbookOptimizer):
    r"""Adam (Kingma & Ba 2015, https://arxiv.org/abs/1412.6980):

    ``m = beta1 * m + (1 - beta1) * g``,  ``v = beta2 * v + (1 - beta2) * g**2``,
    ``m_hat = m / (1 - beta1**t)``,  ``v_hat = v / (1 - beta2**t)``,
    ``theta = theta - lr * m_hat / (sqrt(v_hat) + eps)``,

    with ``g = grad + weight_decay * theta`` (L2 added to the gradient, as ``torch.optim.Adam``
    does; for decoupled decay use AdamW). Same rule, defaults and eps placement as
    ``torch.optim.Adam``; no amsgrad. ``state[p]["step"]`` is a Python int.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate ``eta``; 1e-3.
        betas: ``(beta1, beta2)``; (0.9, 0.999) as in the textbook.
        eps: added to ``sqrt(v_hat)``; 1e-8 as in the textbook.
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
        check_hyperparameters(lr, weight_decay, eps)
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, group, params, grads, states):
        steps = []
        for p in params:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        update = _multi_tensor_adam if group["foreach"] else _single_tensor_adam
        update(params, grads, *states, steps, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
               weight_decay=group["weight_decay"])


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
