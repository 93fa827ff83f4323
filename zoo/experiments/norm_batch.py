"""``norm-batch``: BN, GN, LN and IN as the batch shrinks, on a fixed budget of images."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from zoo.data import DataBundle
from zoo.experiments.report import differs, fmt, json_default, md_table, pyplot, save_figure, settings_block
from zoo.experiments.training import load_data, train_cell
from zoo.fileio import atomic_write


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
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(raw, default=json_default))
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
    plt = pyplot()
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
