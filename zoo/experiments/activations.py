"""``activations``: the vanishing gradient, measured, what fixes it, and a training race.

1. A deep plain conv stack (``depth`` 3x3 convs, no norm, no residuals) at initialisation, each
   activation with its matching init (:func:`zoo.nn.act.init_conv_weight`): the gradient norm of
   every conv's weight for one batch, averaged over a few seeds; the ratio first/last layer says
   how much of the gradient reaches the bottom.
2. The same stack with BatchNorm after each conv, and with residual connections
   (``x + f(x) / sqrt(depth)``: the branch scaled as Fixup/SkipInit-style inits do, so the sum
   stays bounded with no norm and the identity path carries the gradient unchanged).
3. A race on digits: the same model, data, seed and budget for each activation, through
   :func:`zoo.engine.train_one_epoch` as ``python -m zoo.train`` trains.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config import TRAIN_LR
from zoo.experiments.report import differs, fmt, json_default, md_table, pyplot, save_figure, settings_block
from zoo.experiments.training import load_data, train_cell
from zoo.fileio import atomic_write
from zoo.nn.act import get_act_layer, init_conv_weight, init_scheme

VARIANTS = ("plain", "bn", "residual")
# A gradient that loses more than this factor between the last layer and the first has vanished.
VANISHED = 0.1


class Stack(nn.Module):
    """``depth`` 3x3 convs of ``width`` channels, then global average pooling and a linear head."""

    def __init__(self, act: str, depth: int, width: int, variant: str, classes: int = 10) -> None:
        super().__init__()
        act_layer = get_act_layer(act)
        self.variant, self.depth = variant, depth
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, bias=False)
                                   for i in range(depth))
        self.norms = nn.ModuleList((nn.BatchNorm2d(width) if variant == "bn" else nn.Identity())
                                   for _ in range(depth))
        self.acts = nn.ModuleList(act_layer() for _ in range(depth))
        self.head = nn.Linear(width, classes)
        scheme = init_scheme(act_layer)
        for conv in self.convs:
            init_conv_weight(conv.weight, scheme)

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.acts)):
            y = act(norm(conv(x)))
            x = x + y / math.sqrt(self.depth) if self.variant == "residual" and i > 0 else y
        return self.head(x.mean((2, 3)))


def layer_grad_norms(act: str, variant: str, depth: int, width: int, side: int, batch: int, seed: int) -> np.ndarray:
    """The gradient norm of each conv's weight, first layer first, for one batch at initialisation."""
    torch.manual_seed(seed)
    net = Stack(act, depth, width, variant).train()
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    F.cross_entropy(net(x), y).backward()
    return np.array([c.weight.grad.norm().item() for c in net.convs])


def run_activations(cfg: dict[str, Any], out_dir: str, command: str) -> dict[str, Any]:
    grads: dict[tuple[str, str], np.ndarray] = {}
    for variant in VARIANTS:
        for act in cfg["grad_acts"]:
            runs = [layer_grad_norms(act, variant, cfg["depth"], cfg["width"], cfg["grad_side"], cfg["grad_batch"],
                                     cfg["seed"] + s) for s in range(cfg["grad_seeds"])]
            g = np.exp(np.mean(np.log(np.maximum(runs, 1e-300)), axis=0))  # geometric mean over seeds
            grads[(variant, act)] = g
            print(f"{variant:<8} {act:<8} first/last {g[0] / g[-1]:.3g}", flush=True)
    data, per_epoch = load_data(cfg, cfg["batch_size"])
    race: dict[str, dict[str, Any]] = {}
    for act in cfg["race_acts"]:
        r = train_cell(data, model=cfg["model"], norm=cfg["norm"], optimizer=cfg["optimizer"],
                       lr=TRAIN_LR[cfg["optimizer"]], batch_size=cfg["batch_size"], epochs=cfg["epochs"],
                       images_per_epoch=per_epoch, seed=cfg["seed"], weight_decay=cfg["weight_decay"],
                       schedule=cfg["schedule"], act=act)
        race[act] = r
        print(f"race {act:<12} val error {fmt(100 * (1 - r['val_acc']), '.2f')}%  "
              f"train loss {fmt(r['train_loss'], '.4f')}  {r['seconds']:.0f}s", flush=True)
    plot_activations(grads, race, cfg, os.path.join(out_dir, "activations.png"))
    report = activations_report(grads, race, cfg, len(data.val), data.name, per_epoch, command)
    raw = dict(settings=cfg, grad_norms={f"{v}/{a}": g.tolist() for (v, a), g in grads.items()},
               race={a: {k: v for k, v in r.items() if k != "losses"} for a, r in race.items()})
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(raw, default=json_default))
    return dict(grads=grads, race=race, report=report)


def ratios(grads: dict[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], float]:
    """First layer's gradient norm over the last's, per (variant, act)."""
    return {k: float(g[0] / g[-1]) for k, g in grads.items()}


def activations_verdict(ratio: dict[tuple[str, str], float], race_err: dict[str, float], n_val: int,
                        race_loss: dict[str, float] | None = None) -> str:
    """The report's verdicts, from the first/last ratios and the race's val errors."""
    acts = sorted({a for _, a in ratio}, key=lambda a: [k[1] for k in ratio].index(a))
    saturating = [a for a in ("sigmoid", "tanh") if a in acts]
    relu_like = [a for a in acts if a not in ("sigmoid", "tanh", "hardsigmoid")]
    vanished = [a for a in acts if ratio[("plain", a)] < VANISHED]
    lines = []
    if saturating and relu_like:
        held = all(a in vanished for a in saturating) and not any(a in vanished for a in relu_like)
        partly = any(a in vanished for a in saturating) and not any(a in vanished for a in relu_like)
        verdict = "bears out" if held else ("only partly bears out" if partly else "does not bear out")
        lines.append(
            "Plain stack, first/last gradient norm: " + ", ".join(f"{a} {ratio[('plain', a)]:.3g}" for a in acts)
            + f". A gradient counts as vanished when less than {VANISHED:g} of it reaches the first layer: "
            + (", ".join(vanished) if vanished else "none") + " vanished. "
            f"This {verdict} the textbook's claim that saturating activations (sigmoid, tanh) make the gradient "
            "vanish through depth while the ReLU family passes it on.")
        for variant, what in (("bn", "BatchNorm"), ("residual", "residual connections")):
            fixed = [a for a in vanished if ratio[(variant, a)] >= VANISHED]
            lines.append(
                f"With {what}: " + ", ".join(f"{a} {ratio[(variant, a)]:.3g}" for a in acts) + ". "
                + (f"It fixes the vanishing gradient of {', '.join(fixed)}" if fixed else
                   "It fixes none of the vanished gradients" if vanished else "Nothing had vanished to fix")
                + (f" but not of {', '.join(a for a in vanished if a not in fixed)}."
                   if vanished and len(fixed) < len(vanished) else "."))
    race_sat = [a for a in saturating if a in race_err]
    race_relu = [a for a in relu_like if a in race_err]
    if race_sat and race_relu:
        best = min(race_relu, key=lambda a: race_err[a])
        beaten = [a for a in race_sat if race_err[best] < race_err[a] and differs(race_err[best], race_err[a], n_val)]
        verdict = ("bears out" if len(beaten) == len(race_sat) else "only partly bears out" if beaten
                   else "does not bear out")
        lines.append(
            "Race, val error: " + ", ".join(f"{a} {100 * race_err[a]:.2f}%" for a in race_err) + f". The best of the "
            f"ReLU family ({best}) is ahead of " + (", ".join(beaten) if beaten else "neither saturating one")
            + f" beyond twice the binomial standard error on {n_val} val images. This {verdict} the textbook's claim "
            "that the ReLU family trains faster than sigmoid and tanh on the same budget (the race's model has "
            "BatchNorm, which, per the rows above, takes away much of the saturating ones' handicap).")
        if race_loss:
            slower = [a for a in race_sat if race_loss[a] > race_loss[best]]
            lines[-1] += (" Final train loss, the speed of training itself: "
                          + ", ".join(f"{a} {race_loss[a]:.4f}" for a in race_sat + [best]) + "; "
                          + (f"{', '.join(slower)} trained slower than {best}." if slower
                             else f"neither saturating one trained slower than {best}."))
    return "\n\n".join(lines) or "This run lacks the activations the claims compare."


def activations_report(grads: dict[tuple[str, str], np.ndarray], race: dict[str, dict[str, Any]], cfg: dict[str, Any],
                       n_val: int, data_name: str, per_epoch: int, command: str) -> str:
    ratio = ratios(grads)
    acts = list(cfg["grad_acts"])
    grad_table = md_table(["act", "init"] + [f"{v} first/last" for v in VARIANTS]
                          + [f"{v} first layer" for v in VARIANTS],
                          [[a, init_scheme(get_act_layer(a))[0]] + [f"{ratio[(v, a)]:.3g}" for v in VARIANTS]
                           + [f"{grads[(v, a)][0]:.3g}" for v in VARIANTS] for a in acts])
    race_table = md_table(["act", "val error (%)", "val top-1 (%)", "final train loss", "steps", "seconds"],
                          [[a, fmt(100 * (1 - r["val_acc"]), ".2f"), fmt(100 * r["val_acc"], ".2f"),
                            fmt(r["train_loss"], ".4f"), str(r["steps"]), f"{r['seconds']:.1f}"]
                           for a, r in race.items()])
    race_err = {a: 1 - r["val_acc"] for a, r in race.items() if not math.isnan(r["val_acc"])}
    return f"""# Experiment: activations

Command: `{command}`

## Settings
{settings_block(cfg)}
- gradients: a stack of {cfg['depth']} 3x3 convs x {cfg['width']} channels at {cfg['grad_side']} x \
{cfg['grad_side']}, batch {cfg['grad_batch']} of N(0, 1) images with random labels, cross-entropy through a \
global-pool linear head; gradient norm of each conv's weight at initialisation, geometric mean over \
{cfg['grad_seeds']} seed(s); `bn`: BatchNorm (batch statistics) after each conv; `residual`: \
x + f(x) / sqrt({cfg['depth']}) from the second layer on
- race: {cfg['model']} ({cfg['norm']}) on {data_name} at {cfg['input_size']} x {cfg['input_size']}, \
{cfg['epochs']} epoch(s) x {per_epoch} images, {cfg['optimizer']} at lr {TRAIN_LR[cfg['optimizer']]:g}, \
{cfg['schedule']} schedule, the same initial seed and image order for every activation

## Gradient reaching each layer (first/last: 1 is no loss; below {VANISHED:g}, vanished)
{grad_table}

![gradient norm per layer](activations.png)

## Race
{race_table}

## Does it bear out the textbook?
{activations_verdict(ratio, race_err, n_val, {a: r["train_loss"] for a, r in race.items()})}
"""


def plot_activations(grads: dict[tuple[str, str], np.ndarray], race: dict[str, dict[str, Any]], cfg: dict[str, Any],
                     path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(VARIANTS) + 1, figsize=(5 * (len(VARIANTS) + 1), 4.5))
    for ax, variant in zip(axes, VARIANTS):
        for act in cfg["grad_acts"]:
            g = grads[(variant, act)]
            ax.plot(np.arange(1, len(g) + 1), g, "o-", ms=3, label=act)
        ax.set_yscale("log")
        ax.set(xlabel="layer (1 = first)", ylabel="gradient norm of the conv weight",
               title=f"{variant}: {cfg['depth']} convs at init")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for act, r in race.items():
        ax.plot(np.arange(1, len(r["val_history"]) + 1), [100 * (1 - a) for a in r["val_history"]], "o-", label=act)
    ax.set(xlabel="epoch", ylabel="val error (%)", title=f"race: {cfg['model']} on {cfg['data']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
