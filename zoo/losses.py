"""Classification losses resolved from a string, in one place: cross-entropy and focal loss.

- ``ce``: softmax cross-entropy with optional label smoothing (Szegedy et al. 2016,
  https://arxiv.org/abs/1512.00567): the target is ``(1 - eps) * onehot + eps / C``, so
  ``loss = (1 - eps) * (-log p_y) + eps * mean_c(-log p_c)``. This is torch's
  ``F.cross_entropy(label_smoothing=eps)``.
- ``focal``: multi-class focal loss (Lin et al. 2017, https://arxiv.org/abs/1708.02002),
  ``FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)`` with ``p_t`` the softmax probability of the
  true class, averaged over the batch. ``gamma = 0, alpha = 1`` is plain cross-entropy.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REDUCTIONS = ("mean", "sum", "none")


class FocalLoss(nn.Module):
    """Softmax focal loss for ``C`` classes.

    Departures from the paper's detection setting: the paper applies a sigmoid per class and
    uses ``alpha = 0.25`` for the foreground class; here the probabilities come from a softmax
    over the classes, so the neutral ``alpha = 1`` is the default. A per-class ``alpha`` weights
    each sample by ``alpha[target]`` and the mean is over samples (it is *not* renormalised by
    the sum of the weights, unlike ``F.cross_entropy(weight=...)``).

    Args:
        gamma: focusing parameter, ``>= 0``.
        alpha: a positive scalar, or one non-negative weight per class.
        reduction: ``mean`` (default), ``sum`` or ``none``.
    """

    alpha: Tensor

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | Tensor = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if not gamma >= 0.0:
            raise ValueError(f"Invalid focal gamma: {gamma} (must be >= 0)")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Invalid reduction {reduction!r}; choose one of: {', '.join(_REDUCTIONS)}")
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t.dim() > 1 or alpha_t.numel() == 0:
            raise ValueError(f"Invalid focal alpha: {alpha!r} (a scalar or one weight per class)")
        if alpha_t.dim() == 0 and not alpha_t > 0:
            raise ValueError(f"Invalid focal alpha: {float(alpha_t)} (must be > 0)")
        if alpha_t.dim() == 1 and not bool((alpha_t >= 0).all()):
            raise ValueError(f"Invalid focal alpha: {alpha_t.tolist()} (weights must be >= 0)")
        self.gamma = float(gamma)
        self.reduction = reduction
        # A buffer, so .to(device) moves it and it is saved with the module.
        self.register_buffer("alpha", alpha_t)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits``: (N, C, ...) unnormalised scores; ``target``: (N, ...) class indices."""
        if self.alpha.dim() == 1 and self.alpha.numel() != logits.shape[1]:
            raise ValueError(f"focal alpha has {self.alpha.numel()} weights but the logits have "
                             f"{logits.shape[1]} classes")
        logp = F.log_softmax(logits, dim=1)
        logpt = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        # 1 - p_t as -expm1(log p_t): exact near p_t = 1 where 1 - exp() cancels. The clamp keeps
        # (1 - p_t) ** gamma differentiable for gamma < 1 when p_t rounds to exactly 1 (the
        # derivative of x ** gamma is infinite at 0; there the loss term is 0 * log 1 anyway).
        one_minus_pt = (-torch.expm1(logpt)).clamp_min(torch.finfo(logp.dtype).tiny)
        loss = -one_minus_pt.pow(self.gamma) * logpt
        alpha = self.alpha.to(logp.dtype)
        loss = loss * (alpha[target] if alpha.dim() == 1 else alpha)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        alpha = self.alpha.tolist()
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}"


def _cross_entropy(label_smoothing: float, **_: Any) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _focal(label_smoothing: float, gamma: float, alpha: float | Sequence[float] | Tensor,
           num_classes: int | None) -> nn.Module:
    if label_smoothing > 0.0:
        raise ValueError(f"label_smoothing={label_smoothing} is only supported by 'ce', not 'focal'")
    loss = FocalLoss(gamma=gamma, alpha=alpha)
    if num_classes is not None and loss.alpha.dim() == 1 and loss.alpha.numel() != num_classes:
        raise ValueError(f"focal alpha has {loss.alpha.numel()} weights; expected one per class "
                         f"({num_classes})")
    return loss


# Name -> builder, the one place a loss's name is tied to its implementation. Each builder takes
# the keyword arguments of create_loss (label_smoothing, gamma, alpha, num_classes), checked there.
_LOSS_MAP: dict[str, Callable[..., nn.Module]] = {"ce": _cross_entropy, "focal": _focal}
LOSSES = tuple(_LOSS_MAP)


def create_loss(
    name: str,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Tensor = 1.0,
) -> nn.Module:
    """Build the loss ``name`` (one of :data:`LOSSES`), called as ``loss(logits, target)``.

    Args:
        name: ``ce`` or ``focal``.
        num_classes: when given, a per-class ``alpha`` must have this many entries.
        label_smoothing: ``eps`` in ``[0, 1)``; ``ce`` only (``focal`` with ``eps > 0`` is an
            error rather than a silently ignored setting).
        gamma: focal focusing parameter (ignored by ``ce``).
        alpha: focal class weight, a scalar or one per class (ignored by ``ce``).
    """
    if name not in _LOSS_MAP:
        raise ValueError(f"Unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"Invalid label_smoothing: {label_smoothing} (must be in [0, 1))")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"Invalid num_classes: {num_classes!r}")
    return _LOSS_MAP[name](label_smoothing=label_smoothing, gamma=gamma, alpha=alpha, num_classes=num_classes)


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al. 2015, https://arxiv.org/abs/1503.02531):
    ``alpha * T**2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * base(s, target)``.

    The KL term is averaged over the batch (``batchmean``, the mathematical KL per sample); the
    ``T**2`` keeps its gradients on the scale of the hard-label term's as ``T`` grows. ``base`` is
    the run's own loss (label smoothing, or mixup's soft targets, stay on the hard-label part).
    Called as ``loss(student_logits, target, teacher_logits)``.
    """

    def __init__(self, base: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"Invalid distillation temperature: {temperature} (must be > 0)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid distillation alpha: {alpha} (must be in [0, 1])")
        self.base, self.temperature, self.alpha = base, float(temperature), float(alpha)

    def forward(self, logits: Tensor, target: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * self.base(logits, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
