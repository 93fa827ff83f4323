"""``compression``: int8, structured pruning and distillation on one accuracy-vs-latency chart.

One teacher (the experiment's model) is trained once on digits; from it come the rows

- ``fp32`` and ``int8``: the teacher exported as it is and quantized (``export.export``);
- ``pruned 30% / 50% / 70%``: :func:`zoo.prune.prune_model` removes that share of the FLOPs (whole
  channels, widths rounded for onnxruntime's conv kernels), then a short fine-tune through
  :func:`zoo.engine.train_one_epoch`; ``pruned 50% + int8`` quantizes the 50% one;
- ``student alone`` and ``student distilled``: a narrow student trained from the same initial
  weights on the same images, once on the labels only and once with :class:`zoo.losses.DistillationLoss`
  from the teacher. The student is the experiment's model with ``student_prune`` of every layer
  group's channels pruned at random initialisation, i.e. the same architecture at a fraction of its
  width: the registry's smaller models (the ``_dw`` twins) keep ~0.9x the parameters and as many
  FLOPs, too close to the teacher for distillation to have anything to bridge.

Every row is exported through the export library (BatchNorm folded) to a temporary folder under
the output folder; its accuracy is the onnxruntime model's on the whole val set, and the latency
of every row at batch 1 and 8 comes from one interleaved onnxruntime run. The report names the
rows on the Pareto front (no other row both at least as accurate and at least as fast, one of
them strictly), computed from the measured numbers at each batch size.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from zoo.experiments.attention import BATCHES, interleaved_latency
from zoo.experiments.report import differs, fmt, json_default, md_table, pyplot, save_figure, settings_block
from zoo.experiments.training import load_data
from zoo.fileio import atomic_write
from zoo.flops import count_flops
from zoo.registry import count_params, create_model

RATIOS = (0.3, 0.5, 0.7)
INT8_PRUNED = 0.5  # the pruned model that is also quantized


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose ``(latency, accuracy)`` no other point dominates: none is at least as fast
    and at least as accurate while strictly better in one. NaN accuracy (a failed row) never
    makes the front. Names come back in the order given."""
    ok = {k: v for k, v in points.items() if not (np.isnan(v[0]) or np.isnan(v[1]))}

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1]) for b in ok.values())

    return [k for k, v in ok.items() if not dominated(v)]


# ------------------------------------------------------------------------------ training

def _train(net: nn.Module, data: Any, cfg: dict[str, Any], epochs: int, lr: float, per_epoch: int,
           teacher: nn.Module | None = None) -> float:
    """``epochs`` passes over the experiment's image order, as ``zoo.train`` steps; val top-1 after."""
    from zoo.engine import epoch_order, evaluate, train_one_epoch
    from zoo.losses import DistillationLoss, create_loss
    from zoo.optim import create_optimizer, create_scheduler

    ce = create_loss("ce")
    loss_fn = DistillationLoss(ce, cfg["kd_temperature"], cfg["kd_alpha"]) if teacher is not None else ce
    opt = create_optimizer(cfg["optimizer"], net.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    sched = create_scheduler(cfg["schedule"], opt, epochs=epochs, steps_per_epoch=per_epoch // cfg["batch_size"])
    cpu = torch.device("cpu")
    for epoch in range(epochs):
        order = epoch_order(len(data.train), cfg["seed"], epoch)[:per_epoch]
        loader = DataLoader(data.train, batch_size=cfg["batch_size"], sampler=order, drop_last=True)
        train_one_epoch(net, loss_fn, opt, loader, cpu, scheduler=sched, teacher=teacher)
    return evaluate(net, ce, DataLoader(data.val, batch_size=256), cpu)[1]


def _save(net: nn.Module, path: str, cfg: dict[str, Any], data: Any, model_args: dict[str, Any]) -> None:
    """A checkpoint ``export.export(checkpoint=...)`` reads, the pruned layer sizes included."""
    from zoo import pruned
    from zoo.checkpoint import save_checkpoint

    save_checkpoint(path, dict(
        model={k: v.detach().clone() for k, v in net.state_dict().items()}, model_name=cfg["model"],
        model_args=model_args, classes=list(data.classes), input_size=list(data.input_size), mean=list(data.mean),
        std=list(data.std), crop_pct=data.crop_pct, data=data.name, selected="model",
        config=dict(seed=cfg["seed"]), pruned=pruned.record(net)))


def _export(ckpt: str, precision: str, name: str, out: str, threads: int) -> Any:
    from export import ExportConfig, export
    from export.config import SilentReporter

    # The table reports each row's own val accuracy, so the export's agreement gate (which would
    # refuse an int8 model that disagrees with fp32 on 1% of the images) must not drop the row.
    return export(ExportConfig(checkpoint=ckpt, out=out, name=name, precision=precision, val_samples=0,
                               latency_runs=0, threads=threads, progress_bars=False, reporter=SilentReporter(),
                               lowp_min_agreement=0.0, lowp_random_init_rtol=float("inf")))


def ort_accuracy(path: str, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """Top-1 of the ONNX model at ``path`` on images ``x`` with labels ``y``."""
    from zoo.experiments.attention import _session

    session = _session(path, threads)
    pred = np.concatenate([session.run(None, {"input": x[i:i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


# ------------------------------------------------------------------------------ the experiment

def run_compression(cfg: dict[str, Any], out_dir: str, command: str) -> dict[str, Any]:
    from zoo.prune import check_structure, prune_model

    data, per_epoch = load_data(cfg, cfg["batch_size"])
    input_size = tuple(data.input_size)
    model_args = dict(num_classes=data.num_classes, in_chans=input_size[0])
    ckpts: dict[str, tuple[str, str]] = {}  # row -> (checkpoint, precision)
    rows: dict[str, dict[str, Any]] = {}
    work = tempfile.mkdtemp(prefix="compression-", dir=out_dir)
    try:
        def keep(name: str, net: nn.Module, torch_acc: float, precisions: Sequence[str], **extra: Any) -> None:
            path = os.path.join(work, f"{len(ckpts)}.pt")
            _save(net, path, cfg, data, model_args)
            for p in precisions:
                row = name if p == "fp32" or len(precisions) == 1 else f"{name} + int8"
                ckpts[row] = (path, p)
                rows[row] = dict(params=count_params(net), flops=count_flops(net, input_size), precision=p,
                                 torch_acc=torch_acc, **extra)
            print(f"{name:<18} {count_params(net):>9,} params  torch val top-1 {fmt(100 * torch_acc, '.2f')}%",
                  flush=True)

        torch.manual_seed(cfg["seed"])
        teacher = create_model(cfg["model"], **model_args)
        acc = _train(teacher, data, cfg, cfg["epochs"], cfg["lr"], per_epoch)
        teacher.eval()
        keep("fp32", teacher, acc, ("fp32",))
        rows["int8"] = dict(rows["fp32"], precision="int8")
        ckpts["int8"] = (ckpts["fp32"][0], "int8")

        for ratio in cfg["prune_ratios"]:
            net = create_model(cfg["model"], **model_args)
            net.load_state_dict(teacher.state_dict())
            prune_model(net, input_size, ratio, cfg["criterion"])
            check_structure(net)
            acc = _train(net, data, cfg, cfg["finetune_epochs"], cfg["finetune_lr"], per_epoch)
            name = f"pruned {100 * ratio:.0f}%"
            keep(name, net.eval(), acc, ("fp32", "int8") if ratio == INT8_PRUNED else ("fp32",))

        torch.manual_seed(cfg["seed"] + 1)
        student0 = prune_model(create_model(cfg["model"], **model_args), input_size, cfg["student_prune"], "l1",
                               target="channels")
        init = {k: v.clone() for k, v in student0.state_dict().items()}
        for name, t in (("student alone", None), ("student distilled", teacher)):
            student0.load_state_dict(init)
            acc = _train(student0, data, cfg, cfg["student_epochs"], cfg["lr"], per_epoch, teacher=t)
            keep(name, student0.eval(), acc, ("fp32",))

        x = np.stack([np.asarray(data.val[i][0], dtype=np.float32) for i in range(len(data.val))])
        y = np.asarray([int(data.val[i][1]) for i in range(len(data.val))])
        paths = {}
        for i, (row, (ckpt, precision)) in enumerate(ckpts.items()):
            result = _export(ckpt, precision, f"row{i}", work, cfg["ort_threads"])
            paths[row] = result.path
            rows[row].update(bytes=result.file_bytes, onnx_acc=ort_accuracy(result.path, x, y, cfg["ort_threads"]))
        latency = interleaved_latency(paths, input_size, cfg["ort_threads"], cfg["rounds"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row, r in rows.items():
        r.update({f"ms_b{b}": latency[(row, b)] for b in BATCHES})
        print(f"{row:<18} onnxruntime top-1 {fmt(100 * r['onnx_acc'], '.2f')}%  "
              + "  ".join(f"b{b} {r[f'ms_b{b}']:.3f} ms" for b in BATCHES), flush=True)
    fronts = {b: pareto_front({k: (r[f"ms_b{b}"], r["onnx_acc"]) for k, r in rows.items()}) for b in BATCHES}
    plot_compression(rows, fronts, cfg, os.path.join(out_dir, "compression.png"))
    report = compression_report(rows, fronts, cfg, input_size, data.name, len(data.val), per_epoch, command)
    atomic_write(os.path.join(out_dir, "results.json"),
                 json.dumps(dict(settings=cfg, rows=rows, pareto={str(b): f for b, f in fronts.items()}),
                            default=json_default))
    return dict(rows=rows, fronts=fronts, report=report)


def compression_verdict(rows: dict[str, dict[str, Any]], fronts: dict[int, list[str]], n_val: int) -> str:
    lines = []
    for b, front in fronts.items():
        base = rows["fp32"][f"ms_b{b}"]
        lines.append(f"- batch {b}: " + ", ".join(
            f"**{k}** ({fmt(100 * rows[k]['onnx_acc'], '.2f')}%, {rows[k][f'ms_b{b}'] / base:.2f}x fp32's time)"
            for k in sorted(front, key=lambda k: rows[k][f"ms_b{b}"])))
    both = [k for k in rows if all(k in f for f in fronts.values())]
    never = [k for k in rows if not any(k in f for f in fronts.values())]
    lines.append(f"\nOn the front at every batch size: {', '.join(both) or 'none'}. "
                 "Dominated at every batch size (another row at least as fast and as accurate): "
                 f"{', '.join(never) or 'none'}.")
    # A row beaten only by an accuracy margin within the noise of n_val images is not clearly off the front.
    close = [k for k in never if any(not any(
        rows[f][f"ms_b{b}"] <= rows[k][f"ms_b{b}"] and rows[f]["onnx_acc"] > rows[k]["onnx_acc"]
        and differs(1 - rows[f]["onnx_acc"], 1 - rows[k]["onnx_acc"], n_val) for f in front)
        for b, front in fronts.items())]
    lines.append("Dominated only by accuracy margins within twice the standard error on "
                 f"{n_val} val images at some batch size (noise, not a verdict): {', '.join(close) or 'none'}.")
    s, d = rows["student alone"]["onnx_acc"], rows["student distilled"]["onnx_acc"]
    lines.append(f"Distillation moved the student's val top-1 from {fmt(100 * s, '.2f')}% to {fmt(100 * d, '.2f')}% "
                 f"({fmt(100 * (d - s), '+.2f')} points) on the same budget and initial weights.")
    return "\n".join(lines)


def compression_report(rows: dict[str, dict[str, Any]], fronts: dict[int, list[str]], cfg: dict[str, Any],
                       input_size: tuple[int, ...], data_name: str, n_val: int, per_epoch: int, command: str) -> str:
    from zoo.prune import DEFAULT_ROUND_TO

    base = rows["fp32"]
    table = md_table(
        ["row", "params", "MFLOPs", "size (KB)", "val top-1 (%)"] + [f"ms batch {b}" for b in BATCHES]
        + ["params vs fp32", "FLOPs vs fp32", "size vs fp32"] + [f"time vs fp32, batch {b}" for b in BATCHES]
        + [f"Pareto, batch {b}" for b in BATCHES],
        [[k, f"{r['params']:,}", f"{r['flops'] / 1e6:.3f}", f"{r['bytes'] / 1e3:.1f}", fmt(100 * r["onnx_acc"], ".2f")]
         + [f"{r[f'ms_b{b}']:.3f}" for b in BATCHES]
         + [f"{r['params'] / base['params']:.3f}x", f"{r['flops'] / base['flops']:.3f}x",
            f"{r['bytes'] / base['bytes']:.3f}x"]
         + [f"{r[f'ms_b{b}'] / base[f'ms_b{b}']:.3f}x" for b in BATCHES]
         + ["yes" if k in fronts[b] else "no" for b in BATCHES] for k, r in rows.items()])
    c, h, w = input_size
    return f"""# Experiment: compression

Command: `{command}`

## Settings
{settings_block(cfg)}
- teacher: {cfg['model']} trained {cfg['epochs']} epoch(s) x {per_epoch} {data_name} images at {h} x {w}, \
{cfg['optimizer']} at lr {cfg['lr']}, {cfg['schedule']} schedule
- pruned: `zoo.prune.prune_model` ({cfg['criterion']} criterion, whole channels) of the teacher: \
"pruned N%" removes N% of its FLOPs (the FLOPs column gives the share reached), widths rounded to multiples of \
{DEFAULT_ROUND_TO} channels; then {cfg['finetune_epochs']} fine-tune epoch(s) at lr {cfg['finetune_lr']}
- int8: `export.export(precision="int8")` with its defaults (calibration on training images)
- student: {cfg['model']} with {100 * cfg['student_prune']:.0f}% of its channels removed at random \
initialisation, {cfg['student_epochs']} epoch(s) from the same initial weights, alone (cross-entropy) and \
distilled (T = {cfg['kd_temperature']}, alpha = {cfg['kd_alpha']})
- accuracy: the exported ONNX model in onnxruntime on all {n_val} val images (one seed: differences of a \
point or two are noise); size: the ONNX file
- latency: onnxruntime CPU, {cfg['ort_threads']} intra-op thread(s), BatchNorm folded, median of \
{cfg['rounds']} rounds that visit every row at batch 1 and 8 in turn

## Rows
{table}

![accuracy vs latency](compression.png)

## Pareto front (no other row at least as fast and at least as accurate)
{compression_verdict(rows, fronts, n_val)}
"""


def plot_compression(rows: dict[str, dict[str, Any]], fronts: dict[int, list[str]], cfg: dict[str, Any],
                     path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 5))
    for ax, b in zip(axes, BATCHES):
        for k, r in rows.items():
            on = k in fronts[b]
            ax.scatter(r[f"ms_b{b}"], 100 * r["onnx_acc"], s=50, marker="o" if on else "x",
                       color="tab:red" if on else "tab:gray")
            ax.annotate(k, (r[f"ms_b{b}"], 100 * r["onnx_acc"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        front = sorted(fronts[b], key=lambda k: rows[k][f"ms_b{b}"])
        ax.plot([rows[k][f"ms_b{b}"] for k in front], [100 * rows[k]["onnx_acc"] for k in front], color="tab:red",
                lw=1, label="Pareto front")
        ax.set(xlabel=f"onnxruntime ms, batch {b}", ylabel="val top-1 (%)", title=f"batch {b}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{cfg['model']} compressed: accuracy vs latency")
    fig.tight_layout()
    save_figure(fig, path)
