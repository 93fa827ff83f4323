"""2-D loss surfaces and the path each optimizer takes on them (Rosenbrock's valley, a saddle)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from zoo.optim import create_optimizer


@dataclass(frozen=True)
class Surface:
    """A 2-D loss surface, where each rule starts and for how long, at which learning rate."""

    name: str
    formula: str
    fn: Callable[[Any, Any], Any]  # works on tensors and numpy arrays alike
    start: tuple[float, float]
    steps: int
    lr: dict[str, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_levels: bool  # contour levels spaced in log(f) (Rosenbrock's valley) or linearly


def rosenbrock(x: Any, y: Any) -> Any:
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def saddle(x: Any, y: Any) -> Any:
    return x ** 2 - y ** 2


SURFACES: dict[str, Surface] = {
    # The learning rates of tests/zoo/test_optim.py's Rosenbrock table: each rule's own scale.
    "rosenbrock": Surface("rosenbrock", "(1-x)^2 + 100 (y-x^2)^2", rosenbrock, (-1.5, 2.0), 1000,
                          dict(sgd=2e-3, momentum=1e-3, nesterov=1e-3, adagrad=2.0, adadelta=1.0,
                               rmsprop=1e-2, adam=0.1),
                          (-2.0, 2.6), (-1.0, 4.2), True),
    # One lr (0.01) wherever the rules are comparable, so momentum's and the per-coordinate
    # scaling's effects show on their own. Adagrad gets 0.05 because its step decays as
    # 1/sqrt(t) (at 0.01 it barely moves in 300 steps); Adadelta's rule has no learning rate.
    "saddle": Surface("saddle", "x^2 - y^2", saddle, (1.0, 1e-3), 300,
                      dict(sgd=0.01, momentum=0.01, nesterov=0.01, adagrad=0.05, adadelta=1.0,
                           rmsprop=0.01, adam=0.01),
                      (-1.5, 1.5), (-1.5, 1.5), False),
}
# On the saddle, a rule has escaped once f < -ESCAPE_LEVEL (it started at f = +1).
ESCAPE_LEVEL = 1.0


def trajectory(optimizer: str, surface: str | Surface, steps: int | None = None,
               lr: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``optimizer`` on a 2-D surface from its start point, in float64.

    Args:
        optimizer: a name in :data:`zoo.optim.OPTIMIZERS`.
        surface: a name in :data:`SURFACES` or a :class:`Surface`.
        steps: optimizer steps (default: the surface's).
        lr: learning rate (default: the surface's for this rule).

    Returns:
        ``(path, losses)``: the points ``(n + 1, 2)``, start included, and ``f`` at each.
        The run stops early once the point is farther from the origin than 100 times the
        plotted box (on the saddle, momentum heads off to infinity).
    """
    s = SURFACES[surface] if isinstance(surface, str) else surface
    steps = s.steps if steps is None else steps
    lr = s.lr[optimizer] if lr is None else lr
    far = 100 * max(abs(v) for v in (*s.xlim, *s.ylim))
    xy = torch.tensor(s.start, dtype=torch.float64, requires_grad=True)
    opt = create_optimizer(optimizer, [xy], lr=lr)
    points = [xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        s.fn(xy[0], xy[1]).backward()
        opt.step()
        points.append(xy.detach().clone())
        if not torch.isfinite(xy).all() or xy.abs().max() > far:
            break
    path = torch.stack(points).numpy()
    return path, s.fn(path[:, 0], path[:, 1])


def escape_step(losses: np.ndarray, level: float = ESCAPE_LEVEL) -> int | None:
    """The first step at which the loss is below ``-level``, or None if it never is."""
    below = np.flatnonzero(losses < -level)
    return int(below[0]) if below.size else None
