"""Learning-rate schedules by name: ``none``, ``step``, ``cosine``, each with optional linear warmup.

The scheduler is a per-step :class:`torch.optim.lr_scheduler.LambdaLR`: call
``scheduler.step()`` after every ``optimizer.step()``. To step it once per epoch instead, pass
``steps_per_epoch=1``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class _Plan(NamedTuple):
    """A schedule's layout in steps, as create_scheduler resolved it."""

    warmup: int
    total: int
    decay_every: int
    decay_rate: float
    min_lr_factor: float


def _constant(s: int, plan: _Plan) -> float:
    return 1.0


def _step(s: int, plan: _Plan) -> float:
    return plan.decay_rate ** (s // plan.decay_every)


def _cosine(s: int, plan: _Plan) -> float:
    progress = min(s - plan.warmup, plan.total - plan.warmup) / (plan.total - plan.warmup)
    return plan.min_lr_factor + (1 - plan.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


# Name -> the lr factor at step s after warmup, the one place a schedule's name is tied to its
# formula (create_scheduler's docstring gives them).
_SCHEDULE_MAP: dict[str, Callable[[int, _Plan], float]] = {"none": _constant, "step": _step, "cosine": _cosine}
SCHEDULERS = tuple(_SCHEDULE_MAP)


def create_scheduler(
    name: str,
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    *,
    warmup_start_factor: float = 0.1,
    decay_epochs: int | None = None,
    decay_rate: float = 0.1,
    min_lr_factor: float = 0.0,
) -> LambdaLR:
    """Scale each group's initial lr by a factor of the step ``s`` (0-based, counted in steps).

    With ``W = warmup_epochs * steps_per_epoch`` and ``T = epochs * steps_per_epoch``:

    - warmup, ``s < W``: ``warmup_start_factor + (1 - warmup_start_factor) * s / W``, linear
      up to 1 (as ``torch.optim.lr_scheduler.LinearLR``);
    - ``none``: 1;
    - ``step``: ``decay_rate ** (s // (decay_epochs * steps_per_epoch))``, i.e. milestones at
      epochs ``decay_epochs, 2 * decay_epochs, ...`` counted from the start of training
      (warmup included); by default ``decay_epochs = max(1, epochs // 3)``, so the schedule is
      laid out over the whole run and decays twice, like torchvision's reference recipe
      (every 30 of 90 epochs);
    - ``cosine``: ``min_lr_factor + (1 - min_lr_factor) * (1 + cos(pi * (s - W) / (T - W))) / 2``,
      from 1 right after warmup down to ``min_lr_factor`` at the end of training.

    Args:
        name: one of :data:`SCHEDULERS`.
        optimizer: the optimizer whose groups' ``lr`` is scheduled.
        epochs: length of training.
        steps_per_epoch: optimizer steps per epoch (1 for a per-epoch schedule).
        warmup_epochs: epochs of linear warmup before the schedule (``< epochs``).
        warmup_start_factor: factor of the first warmup step, in (0, 1].
        decay_epochs: ``step`` only: epochs between decays (default: a third of ``epochs``,
            at least 1).
        decay_rate: ``step`` only: factor applied at each decay.
        min_lr_factor: ``cosine`` only: final factor.
    """
    if name not in _SCHEDULE_MAP:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"Invalid epochs: {epochs!r}")
    if not (isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
        raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r}")
    if not (isinstance(warmup_epochs, int) and 0 <= warmup_epochs < epochs):
        raise ValueError(f"Invalid warmup_epochs: {warmup_epochs!r} (an int in [0, epochs))")
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ValueError(f"Invalid warmup_start_factor: {warmup_start_factor}")
    if decay_epochs is None:
        decay_epochs = max(1, epochs // 3)
    if not (isinstance(decay_epochs, int) and decay_epochs >= 1):
        raise ValueError(f"Invalid decay_epochs: {decay_epochs!r}")
    if not 0.0 < decay_rate <= 1.0:
        raise ValueError(f"Invalid decay_rate: {decay_rate}")
    if not 0.0 <= min_lr_factor <= 1.0:
        raise ValueError(f"Invalid min_lr_factor: {min_lr_factor}")

    plan = _Plan(warmup=warmup_epochs * steps_per_epoch, total=epochs * steps_per_epoch,
                 decay_every=decay_epochs * steps_per_epoch, decay_rate=decay_rate, min_lr_factor=min_lr_factor)
    after_warmup = _SCHEDULE_MAP[name]

    # A plain function, not a callable object: LambdaLR.state_dict() then saves no state of it,
    # and the schedule is rebuilt from the run's settings on resume.
    def factor(s: int) -> float:
        if s < plan.warmup:
            return warmup_start_factor + (1 - warmup_start_factor) * s / plan.warmup
        return after_warmup(s, plan)

    return LambdaLR(optimizer, factor)
