"""``python -m zoo.experiments NAME``: small, reproducible checks of the textbook's claims.

    python -m zoo.experiments optimizers     # the seven rules on one CNN + 2-D trajectories
    python -m zoo.experiments norm-batch     # BN / GN / LN / IN at batch 32, 16, 8, 4, 2
    python -m zoo.experiments norm-batch --quick --out /tmp/exp    # seconds, synthetic data

Each writes ``OUT/NAME/report.md`` (command, settings, tables and a verdict computed from the
numbers), ``OUT/NAME/NAME.png`` and ``OUT/NAME/results.json`` (the raw numbers).

- ``optimizers``: every rule of :data:`zoo.optim.OPTIMIZERS` trains the same model
  from the same initial weights on the same batches, each at its :data:`zoo.train.TRAIN_LR`;
  the table gives the final train loss, val top-1 and the time per step. The same rules also
  run on two 2-D surfaces (:data:`SURFACES`): Rosenbrock from (-1.5, 2) and the saddle
  ``x^2 - y^2`` from (1, 1e-3), next to which plain gradient descent should linger.
- ``norm-batch``: the four norms of :data:`zoo.nn.norm.NORMS` at each batch size,
  momentum SGD with the learning rate scaled linearly with the batch (as in the GN paper). The
  budget is a fixed number of training images: every cell sees the same images in the same
  order, only grouped into batches differently, so a batch of 2 takes 16x the steps of 32.

The full budgets fit in under 10 minutes each on a 2-core CPU: the digits are trained at their
native 8 x 8 (resnext_mini's CIFAR stem keeps the resolution, so its stages run at 8, 4 and 2
pixels), several times faster than at the model's default 32 x 32 and with nothing lost to
upsampling; on these budgets GN, LN and IN also reached lower errors at 8 x 8 than at 16 x 16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from zoo.data import DataBundle, DataError, build_datasets
from zoo.nn.norm import NORMS
from zoo.optim import OPTIMIZERS, create_optimizer, create_scheduler
from zoo.registry import create_model, get_model_spec
from zoo.train import DEFAULTS as TRAIN_DEFAULTS
from zoo.train import TRAIN_LR, evaluate, seed_everything

EXPERIMENTS = ("optimizers", "norm-batch")

# Every default in one place. ``input_size`` is the side of the square input; ``epochs`` counts
# passes over ``images_per_epoch`` training images (the training set rounded down to a multiple
# of the largest batch, so every batch size sees exactly the same images).
SETTINGS: dict[str, dict[str, Any]] = {
    "optimizers": dict(model="resnext_mini", data="digits", input_size=8, epochs=8, batch_size=32,
                       schedule="cosine", weight_decay=TRAIN_DEFAULTS["weight_decay"], norm="bn", seed=0,
                       train_images=None),
    "norm-batch": dict(model="resnext_mini", data="digits", input_size=8, epochs=4,
                       batch_sizes=(32, 16, 8, 4, 2), norms=NORMS, optimizer="momentum",
                       base_lr=TRAIN_LR["momentum"], base_batch=32, schedule="cosine",
                       weight_decay=TRAIN_DEFAULTS["weight_decay"], gn_groups=32, seed=0, train_images=None),
}
# --quick: the same code paths on a budget of seconds (for the tests and a smoke run).
QUICK: dict[str, dict[str, Any]] = {
    "optimizers": dict(data="synthetic", input_size=8, epochs=1, train_images=64),
    "norm-batch": dict(data="synthetic", input_size=8, epochs=1, train_images=32),
}


# ------------------------------------------------------------------------------ 2-D surfaces


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


# ------------------------------------------------------------------------------ training


def ordered_indices(n: int, count: int, seed: int, epoch: int) -> list[int]:
    """The first ``count`` of a permutation of ``range(n)`` fixed by (seed, epoch).

    Seeded like zoo.train's per-epoch sampler; every cell of an experiment draws the same list,
    so batch sizes differ only in how these images are grouped.
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g)[:count].tolist()


def train_cell(data: DataBundle, *, model: str, norm: str, optimizer: str, lr: float, batch_size: int,
               epochs: int, images_per_epoch: int, seed: int, weight_decay: float, schedule: str,
               gn_groups: int = 32) -> dict[str, Any]:
    """Train one configuration from the initial weights fixed by ``seed``; return its numbers.

    The result holds ``train_loss`` (mean over the last epoch), ``val_acc``, ``val_loss``,
    ``step_ms`` (median wall time of a whole training step: forward, backward, update),
    ``update_ms`` (median time of ``optimizer.step()`` alone), ``losses`` (every step's),
    ``val_history`` (val top-1 after each epoch), ``steps``, ``seconds`` and ``diverged``
    (the step at which the loss stopped being finite, or None).
    """
    seed_everything(seed)
    in_chans = data.input_size[0]
    net = create_model(model, num_classes=data.num_classes, norm=norm, gn_groups=gn_groups, in_chans=in_chans)
    opt = create_optimizer(optimizer, net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = images_per_epoch // batch_size
    sched = create_scheduler(schedule, opt, epochs=epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    val_loader = DataLoader(data.val, batch_size=256, shuffle=False)
    losses: list[float] = []
    step_s: list[float] = []
    update_s: list[float] = []
    val_history: list[float] = []
    val_loss = val_acc = math.nan
    diverged = None
    t_start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = ordered_indices(len(data.train), images_per_epoch, seed, epoch)
        loader = DataLoader(data.train, batch_size=batch_size, sampler=order, drop_last=True)
        for x, y in loader:
            t0 = time.perf_counter()
            loss = loss_fn(net(x), y)
            if not torch.isfinite(loss):
                diverged = len(losses) + 1
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            sched.step()
            update_s.append(t2 - t1)
            step_s.append(t2 - t0)
            losses.append(loss.item())
        if diverged is not None:
            break
        val_loss, val_acc = evaluate(net, val_loader, loss_fn, torch.device("cpu"), None, False)
        val_history.append(val_acc)
    seconds = time.perf_counter() - t_start
    if diverged is not None:
        val_loss, val_acc, train_loss = math.nan, math.nan, math.nan
    else:
        train_loss = statistics.fmean(losses[-steps_per_epoch:])
    return dict(train_loss=train_loss, val_acc=val_acc, val_loss=val_loss,
                step_ms=1e3 * statistics.median(step_s) if step_s else math.nan,
                update_ms=1e3 * statistics.median(update_s) if update_s else math.nan,
                losses=losses, val_history=val_history, steps=len(losses), seconds=seconds,
                diverged=diverged)


def load_data(cfg: dict[str, Any], max_batch: int) -> tuple[DataBundle, int]:
    """The experiment's data at ``input_size`` and the images per epoch (a multiple of max_batch).

    With ``train_images`` set, the train split is cut to that many images, drawn at random
    (seeded) so every class keeps its share on average.
    """
    spec = get_model_spec(cfg["model"])
    size = (spec.input_size[0], cfg["input_size"], cfg["input_size"])
    data = build_datasets(cfg["data"], size, seed=cfg["seed"])
    if cfg["train_images"] is not None and cfg["train_images"] < len(data.train):
        g = torch.Generator().manual_seed(cfg["seed"])
        keep = torch.randperm(len(data.train), generator=g)[:cfg["train_images"]].sort().values.tolist()
        data = dataclasses.replace(data, train=Subset(data.train, keep))
    n = len(data.train)
    per_epoch = n // max_batch * max_batch
    if per_epoch < max_batch:
        raise DataError(f"{n} training images are fewer than one batch of {max_batch}")
    return data, per_epoch


# ------------------------------------------------------------------------------ reporting


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def differs(a: float, b: float, n: int) -> bool:
    """Whether error rates a and b on n images differ by more than twice their standard error."""
    return abs(a - b) > 2 * math.sqrt(binomial_se(a, n) ** 2 + binomial_se(b, n) ** 2)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def settings_block(cfg: dict[str, Any]) -> str:
    return "\n".join(f"- `{k}`: {v if not isinstance(v, (tuple, list)) else ', '.join(map(str, v))}"
                     for k, v in cfg.items())


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_figure(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve starts at the first step."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# ------------------------------------------------------------------------------ optimizers


def run_optimizers(cfg: dict[str, Any], out_dir: str, command: str) -> dict[str, Any]:
    data, per_epoch = load_data(cfg, cfg["batch_size"])
    results: dict[str, dict[str, Any]] = {}
    for name in OPTIMIZERS:
        r = train_cell(data, model=cfg["model"], norm=cfg["norm"], optimizer=name, lr=TRAIN_LR[name],
                       batch_size=cfg["batch_size"], epochs=cfg["epochs"], images_per_epoch=per_epoch,
                       seed=cfg["seed"], weight_decay=cfg["weight_decay"], schedule=cfg["schedule"])
        r["lr"] = TRAIN_LR[name]
        results[name] = r
        print(f"{name:<9} lr {r['lr']:<6g} train loss {fmt(r['train_loss'], '.4f')}  val top-1 "
              f"{fmt(100 * r['val_acc'], '.2f')}%  {r['step_ms']:.1f} ms/step  ({r['seconds']:.0f}s)", flush=True)

    paths = {sname: {name: trajectory(name, sname) for name in OPTIMIZERS} for sname in SURFACES}

    plot_optimizers(results, paths, os.path.join(out_dir, "optimizers.png"),
                    steps_per_epoch=per_epoch // cfg["batch_size"])
    report = optimizers_report(results, paths, cfg, data, per_epoch, command)
    raw = dict(settings=cfg, images_per_epoch=per_epoch, cnn=results,
               surfaces={s: {n: dict(path=p.tolist(), losses=f.tolist()) for n, (p, f) in d.items()}
                         for s, d in paths.items()})
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(raw, default=_json_default))
    return dict(results=results, paths=paths, report=report)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def optimizers_report(results: dict[str, dict[str, Any]], paths: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                      cfg: dict[str, Any], data: DataBundle, per_epoch: int, command: str) -> str:
    n_val = len(data.val)
    rows = [[name, f"{r['lr']:g}", fmt(r["train_loss"], ".4f"), fmt(100 * r["val_acc"], ".2f"),
             fmt(r["step_ms"], ".1f"), fmt(r["update_ms"], ".2f"),
             "" if r["diverged"] is None else f"diverged at step {r['diverged']}"] for name, r in results.items()]
    cnn = md_table(["optimizer", "lr", "final train loss", "val top-1 (%)", "ms / step", "ms / update", "note"], rows)

    srows = []
    for name in OPTIMIZERS:
        rp, rl = paths["rosenbrock"][name]
        sp, sl = paths["saddle"][name]
        esc = escape_step(sl)
        srows.append([name, f"{SURFACES['rosenbrock'].lr[name]:g}", f"{rl[-1]:.3g}",
                      f"({rp[-1, 0]:.3f}, {rp[-1, 1]:.3f})", f"{SURFACES['saddle'].lr[name]:g}",
                      "not within budget" if esc is None else str(esc), f"{sl[-1]:.3g}"])
    surf = md_table(["optimizer", "Rosenbrock lr", "Rosenbrock f at end", "end point (min at (1, 1))",
                     "saddle lr", f"saddle: steps to f < -{ESCAPE_LEVEL:g}", "saddle f at end"], srows)

    verdicts = optimizers_verdict(results, paths, n_val)
    ros, sad = SURFACES["rosenbrock"], SURFACES["saddle"]
    steps_per_epoch = per_epoch // cfg["batch_size"]
    return f"""# Experiment: optimizers

Command: `{command}`

## Settings
{settings_block(cfg)}
- data: {data.name} at {data.input_size[1]} x {data.input_size[2]}, {len(data.train)} train images \
({per_epoch} used per epoch, {steps_per_epoch} steps of {cfg['batch_size']}), {n_val} val images, \
{data.num_classes} classes
- every rule starts from the same weights and sees the same batches in the same order; lr per rule from \
`zoo.train.TRAIN_LR`, {cfg['schedule']} schedule per step, weight decay {cfg['weight_decay']:g}
- final train loss: mean over the last epoch's steps; val top-1 after the last epoch; ms / step: median \
wall time of forward + backward + update; ms / update: median time of `optimizer.step()` alone (the \
rule's own cost; forward and backward are the same for all seven, and on a shared machine they carry most \
of the noise)
- 2-D surfaces: Rosenbrock {ros.formula} from {ros.start}, {ros.steps} steps; saddle {sad.formula} from \
{sad.start}, {sad.steps} steps (runs stop early once far outside the plot); float64

## CNN training ({cfg['model']}, {cfg['epochs']} epochs)
{cnn}

## 2-D trajectories
{surf}

![training curves and trajectories](optimizers.png)

## Does it bear out the textbook?
{verdicts}
"""


def optimizers_verdict(results: dict[str, dict[str, Any]], paths: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                       n_val: int) -> str:
    lines = []
    # The textbook: plain gradient descent easily gets stuck near saddle points.
    budget = SURFACES["saddle"].steps
    esc = {name: escape_step(paths["saddle"][name][1]) for name in OPTIMIZERS}
    key = {n: (budget + 1 if s is None else s) for n, s in esc.items()}
    slowest = max(key.values())
    slow_names = [n for n in OPTIMIZERS if key[n] == slowest]
    others = [key[n] for n in OPTIMIZERS if n != "sgd"]
    sgd_txt = "did not get below f = -1 within {} steps".format(budget) if esc["sgd"] is None \
        else f"took {esc['sgd']} steps to get below f = -1"
    if key["sgd"] > max(others):
        lines.append(f"- Saddle: plain sgd {sgd_txt}, the slowest of the seven (the others: "
                     + ", ".join(f"{n} {'never' if esc[n] is None else esc[n]}" for n in OPTIMIZERS if n != "sgd")
                     + "). This bears out the textbook's remark that plain gradient descent lingers near saddle "
                     "points: the gradient along the escape direction is proportional to the tiny offset "
                     "from the saddle, and only momentum or per-coordinate scaling makes it grow fast.")
    else:
        lines.append(f"- Saddle: plain sgd {sgd_txt}; the slowest was "
                     f"{', '.join(slow_names)}. This does not bear out the remark that plain gradient descent "
                     "is the one that lingers near saddle points, at these learning rates.")
    # The textbook: among the adaptive rules, Adam works best.
    adaptive = [n for n in ("adagrad", "adadelta", "rmsprop", "adam") if n in results]
    ok = {n: results[n] for n in adaptive if results[n]["diverged"] is None}
    if "adam" in ok and len(ok) > 1:
        best_other = max((n for n in ok if n != "adam"), key=lambda n: ok[n]["val_acc"])
        a_err, o_err = 1 - ok["adam"]["val_acc"], 1 - ok[best_other]["val_acc"]
        if not differs(a_err, o_err, n_val):
            rel = "about as well as"
            bears = "neither bears out nor contradicts"
        elif a_err < o_err:
            rel, bears = "better than", "bears out"
        else:
            rel, bears = "worse than", "does not bear out"
        lines.append(f"- Adaptive rules: adam reached {100 * ok['adam']['val_acc']:.2f}% val top-1 "
                     f"(train loss {ok['adam']['train_loss']:.4f}), {rel} the best other adaptive rule, "
                     f"{best_other}, at {100 * ok[best_other]['val_acc']:.2f}% (train loss "
                     f"{ok[best_other]['train_loss']:.4f}); a difference counts when it exceeds twice its "
                     f"binomial standard error on {n_val} val images. This {bears} the textbook's statement that "
                     "Adam works better than the other adaptive methods, on this small budget and one seed.")
    best = max((n for n in results if results[n]["diverged"] is None), key=lambda n: results[n]["val_acc"],
               default=None)
    if best is not None:
        lines.append(f"- Best val top-1 overall: {best} ({100 * results[best]['val_acc']:.2f}%).")
    return "\n".join(lines)


def plot_optimizers(results: dict[str, dict[str, Any]], paths: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
                    path: str, steps_per_epoch: int) -> None:
    plt = _pyplot()
    colors = dict(zip(OPTIMIZERS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 2, figsize=(13, 11))
    ax = axes[0, 0]
    window = max(1, steps_per_epoch // 4)
    for name, r in results.items():
        if r["losses"]:
            ax.plot(np.arange(1, len(r["losses"]) + 1), smooth(r["losses"], window), color=colors[name], label=name)
    ax.set(xlabel="step", ylabel=f"train loss (moving mean of {window} steps)", yscale="log",
           title="training loss (same init, same batches)")
    ax.legend()
    ax = axes[0, 1]
    for name, r in results.items():
        if r["val_history"]:
            ax.plot(np.arange(1, len(r["val_history"]) + 1), 100 * np.asarray(r["val_history"]), "o-",
                    color=colors[name], label=f"{name} ({fmt(100 * r['val_acc'], '.1f')}%)")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="val accuracy after each epoch")
    ax.legend()
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    for ax, sname in zip(axes[1], SURFACES):
        s = SURFACES[sname]
        gx, gy = np.meshgrid(np.linspace(*s.xlim, 300), np.linspace(*s.ylim, 300))
        gz = s.fn(gx, gy)
        if s.log_levels:
            ax.contour(gx, gy, gz, levels=np.logspace(-1, 3.5, 16), colors="0.6", linewidths=0.6)
            ax.plot(1, 1, "k*", markersize=14, zorder=10, label="minimum (1, 1)")
        else:
            ax.contour(gx, gy, gz, levels=np.linspace(-2, 2, 17), colors="0.6", linewidths=0.6)
            ax.plot(0, 0, "kx", markersize=10, zorder=10, label="saddle (0, 0)")
        for name in OPTIMIZERS:
            p, _ = paths[sname][name]
            ax.plot(p[:, 0], p[:, 1], "-", color=colors[name], linewidth=1.5, label=name)
            ax.plot(p[-1, 0], p[-1, 1], "o", color=colors[name], markersize=6, markeredgecolor="k", zorder=5)
        ax.plot(*s.start, "ks", markersize=6, label=f"start {s.start}")
        ax.set(xlim=s.xlim, ylim=s.ylim, xlabel="x", ylabel="y", aspect="equal",
               title=f"{s.formula}, {s.steps} steps")
        ax.legend(fontsize=8, loc="lower left" if s.log_levels else "lower right")
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------ norm-batch


def run_norm_batch(cfg: dict[str, Any], out_dir: str, command: str) -> dict[str, Any]:
    batch_sizes = tuple(cfg["batch_sizes"])
    data, per_epoch = load_data(cfg, max(batch_sizes))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for norm in cfg["norms"]:
        for b in batch_sizes:
            lr = cfg["base_lr"] * b / cfg["base_batch"]
            r = train_cell(data, model=cfg["model"], norm=norm, optimizer=cfg["optimizer"], lr=lr, batch_size=b,
                           epochs=cfg["epochs"], images_per_epoch=per_epoch, seed=cfg["seed"],
                           weight_decay=cfg["weight_decay"], schedule=cfg["schedule"], gn_groups=cfg["gn_groups"])
            r["lr"] = lr
            results[(norm, b)] = r
            print(f"{norm} batch {b:>2}  lr {lr:<8.4g} val error {fmt(100 * (1 - r['val_acc']), '.2f')}%  "
                  f"train loss {fmt(r['train_loss'], '.4f')}  {r['steps']} steps  {r['seconds']:.0f}s", flush=True)
    plot_norm_batch(results, dict(cfg, n_val=len(data.val)), os.path.join(out_dir, "norm-batch.png"))
    report = norm_batch_report(results, cfg, data, per_epoch, command)
    raw = dict(settings=cfg, images_per_epoch=per_epoch,
               cells=[dict(norm=n, batch_size=b, **{k: v for k, v in r.items() if k != "losses"})
                      for (n, b), r in results.items()])
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(raw, default=_json_default))
    return dict(results=results, report=report)


def norm_batch_report(results: dict[tuple[str, int], dict[str, Any]], cfg: dict[str, Any], data: DataBundle,
                      per_epoch: int, command: str) -> str:
    norms, batch_sizes = tuple(cfg["norms"]), tuple(cfg["batch_sizes"])
    err = {k: 1 - r["val_acc"] for k, r in results.items()}
    grid = md_table(["val error (%)"] + [f"batch {b}" for b in batch_sizes],
                    [[norm.upper()] + [fmt(100 * err[(norm, b)], ".2f") for b in batch_sizes] for norm in norms])
    cells = md_table(["norm", "batch", "lr", "steps", "val error (%)", "val top-1 (%)", "final train loss", "seconds"],
                     [[norm.upper(), str(b), f"{r['lr']:.4g}", str(r["steps"]), fmt(100 * err[(norm, b)], ".2f"),
                       fmt(100 * r["val_acc"], ".2f"), fmt(r["train_loss"], ".4f"), f"{r['seconds']:.1f}"]
                      for (norm, b), r in results.items()])
    images = cfg["epochs"] * per_epoch
    return f"""# Experiment: norm-batch

Command: `{command}`

## Settings
{settings_block(cfg)}
- data: {data.name} at {data.input_size[1]} x {data.input_size[2]}, {len(data.train)} train images, \
{len(data.val)} val images, {data.num_classes} classes
- budget: **a fixed number of training images seen**, {images} per cell ({cfg['epochs']} epoch(s) x \
{per_epoch} images); every cell sees the same images in the same order (only the grouping into batches \
differs), so batch b takes {images} / b steps
- learning rate scaled linearly with the batch: {cfg['base_lr']:g} x b / {cfg['base_batch']} \
({cfg['optimizer']}, {cfg['schedule']} schedule per step, weight decay {cfg['weight_decay']:g}); \
GN with {cfg['gn_groups']} groups (the largest divisor of the channels <= {cfg['gn_groups']}); \
LN and IN are GN with 1 and C groups
- val error after the last epoch, BN with its running statistics (eval mode); one seed ({cfg['seed']})

## Val error by norm and batch size
{grid}

## Every cell
{cells}

![val error vs batch size](norm-batch.png)

## Does it bear out the textbook?
{norm_batch_verdict(err, norms, batch_sizes, len(data.val), {k: r["train_loss"] for k, r in results.items()})}
"""


def norm_batch_verdict(err: dict[tuple[str, int], float], norms: Sequence[str], batch_sizes: Sequence[int],
                       n_val: int, train_loss: dict[tuple[str, int], float] | None = None) -> str:
    """The report's verdict on the norm-vs-batch claim, from val errors (and train losses) keyed by (norm, batch)."""
    big, small = max(batch_sizes), min(batch_sizes)
    se_note = (f"A change counts when it exceeds twice its binomial standard error on {n_val} val images "
               f"(one seed per cell).")
    if "bn" not in norms or "gn" not in norms or big == small:
        return "The claim compares BN and GN across batch sizes; this run lacks one of them. " + se_note

    def move(norm: str) -> tuple[float, bool]:
        a, b = err[(norm, big)], err[(norm, small)]
        return b - a, differs(a, b, n_val)

    bn_d, bn_sig = move("bn")
    gn_d, gn_sig = move("gn")
    bn_degrades = bn_sig and bn_d > 0
    gn_degrades = gn_sig and gn_d > 0
    reason = ""
    if bn_degrades and not gn_degrades:
        verdict = "bears out"
    elif bn_degrades:
        verdict = "only partly bears out"
        reason = ": BN degrades, but so does GN"
    elif gn_degrades:
        verdict, reason = "does not bear out", ": GN degrades and BN does not"
    else:
        verdict, reason = "does not bear out", ": BN's val error does not rise beyond the noise"
    gap = err[("bn", small)] - err[("gn", small)]
    gap_sig = differs(err[("bn", small)], err[("gn", small)], n_val)

    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    def change(d: float, sig: bool) -> str:
        return f"{100 * d:+.2f} points, {'significant' if sig else 'within noise'}"

    lines = [
        f"From batch {big} to batch {small}, BN's val error went from {pct(err[('bn', big)])} to "
        f"{pct(err[('bn', small)])} ({change(bn_d, bn_sig)}) and GN's from {pct(err[('gn', big)])} to "
        f"{pct(err[('gn', small)])} ({change(gn_d, gn_sig)}); at batch {small} GN's error is "
        + (f"{100 * abs(gap):.2f} points {'below' if gap > 0 else 'above'} BN's" if gap else "equal to BN's")
        + f"{'' if gap_sig or not gap else ' (within noise)'}. "
        f"This {verdict} the textbook's claim that GN holds as the batch shrinks while BN degrades{reason}.",
    ]
    if train_loss is not None:
        lines.append(
            f"Final train loss (train mode, so BN normalises with the batch's own statistics) from batch {big} "
            f"to {small}: " + ", ".join(f"{n.upper()} {train_loss[(n, big)]:.3f} -> {train_loss[(n, small)]:.3f}"
                                        for n in norms)
            + ". " + ("BN's rises the most: the noisier batch statistics that the textbook's claim rests on show in "
                      "training" + (" and carry over to the val error." if bn_degrades else ", but they do not "
                                    "carry over to the val error, for which BN uses its running statistics.")
                      if max(norms, key=lambda n: train_loss[(n, small)] - train_loss[(n, big)]) == "bn"
                      else "BN's does not rise the most."))
    order = sorted(norms, key=lambda n: err[(n, big)])
    lines.append(f"At batch {big} the order is " + " < ".join(f"{n.upper()} ({pct(err[(n, big)])})" for n in order)
                 + "; the textbook has BN best and GN second there, which "
                 + ("this matches." if order[:2] == ["bn", "gn"] else "this does not match (by ranking; "
                    "see the noise note).")
                 + " " + se_note)
    return "\n\n".join(lines)


def plot_norm_batch(results: dict[tuple[str, int], dict[str, Any]], cfg: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    norms, batch_sizes = tuple(cfg["norms"]), tuple(cfg["batch_sizes"])
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    n_val = cfg["n_val"]
    for norm in norms:
        err = np.array([1 - results[(norm, b)]["val_acc"] for b in batch_sizes])
        se = np.sqrt(np.clip(err * (1 - err), 0, None) / n_val)
        ax_err.errorbar(batch_sizes, 100 * err, yerr=100 * se, fmt="o-", capsize=3, label=norm.upper())
        ax_loss.plot(batch_sizes, [results[(norm, b)]["train_loss"] for b in batch_sizes], "o-", label=norm.upper())
    for ax, ylabel in ((ax_err, "val error (%)"), (ax_loss, "final train loss")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.invert_xaxis()  # the batch shrinks to the right, as in the textbook's figure
        ax.set(xlabel="batch size", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_err.set_title(f"{cfg['model']} on {cfg['data']}: val error (bars: 1 binomial s.e.), "
                     f"{cfg['epochs']} epoch(s) each")
    ax_loss.set_title("train loss over the last epoch")
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------ CLI

RUNNERS: dict[str, Callable[[dict[str, Any], str, str], dict[str, Any]]] = {
    "optimizers": run_optimizers, "norm-batch": run_norm_batch,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoo.experiments", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default="runs/experiments", help="results go to OUT/NAME/")
    p.add_argument("--quick", action="store_true", help="a budget of seconds on synthetic data (tests, smoke runs)")
    g = p.add_argument_group("overrides (default: the experiment's settings)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--input-size", type=int, help="side of the square input")
    g.add_argument("--train-images", type=int, help="use only this many training images")
    g.add_argument("--data", choices=("digits", "synthetic"))
    g.add_argument("--model", help="e.g. resnext_mini, densenet_mini")
    g.add_argument("--seed", type=int)
    # Tiny tensors gain little from intra-op threads, and on a shared 2-core machine the second
    # thread's spin-waits made steps 10-100x slower whenever another process held a core.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(SETTINGS[args.name])
    if args.quick:
        cfg.update(QUICK[args.name])
    for key in ("epochs", "input_size", "train_images", "data", "model", "seed"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name not in RUNNERS:
        print(f"error: unknown experiment {args.name!r}; choose one of: {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    for key in ("epochs", "input_size", "train_images", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    cfg = resolve_settings(args)
    try:
        get_model_spec(cfg["model"])
    except ValueError as e:
        parser.error(str(e))
    out_dir = os.path.join(args.out, args.name)
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "zoo.experiments", *argv])
    t0 = time.perf_counter()
    try:
        report = RUNNERS[args.name](cfg, out_dir, command)["report"]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    write_atomic(os.path.join(out_dir, "report.md"),
                 report + f"\nWall time: {elapsed:.0f} s with {args.threads} torch thread(s).\n")
    print(f"done in {elapsed:.0f}s: {out_dir}/report.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
