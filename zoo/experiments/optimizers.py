"""``optimizers``: the seven rules on one CNN from the same weights and batches, and on two 2-D surfaces."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from zoo.config import TRAIN_LR
from zoo.data import DataBundle
from zoo.experiments.report import differs, fmt, json_default, md_table, pyplot, save_figure, settings_block, smooth
from zoo.experiments.surfaces import ESCAPE_LEVEL, SURFACES, escape_step, trajectory
from zoo.experiments.training import load_data, train_cell
from zoo.fileio import atomic_write
from zoo.optim import OPTIMIZERS


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
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(raw, default=json_default))
    return dict(results=results, paths=paths, report=report)


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
    plt = pyplot()
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
