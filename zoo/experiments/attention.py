"""``attention``: what SE, ECA and CBAM cost and buy on one model.

Per attention (none, se, eca, cbam) on the same model: parameters, FLOPs, onnxruntime latency at
batch 1 and 8 (BatchNorm folded, as ``export.onnx`` ships it; every variant and batch timed in one
interleaved run), the time onnxruntime's profiler puts in the attention nodes, per operator, and
the val accuracy after the same training budget on digits.

The claim measured: attention adds almost no FLOPs but costs time, because its global pooling is
one more full pass over the activations and its gate (a broadcast multiply) cannot fuse into the
convolution before it, as a BatchNorm or an activation can.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from zoo.config import TRAIN_LR
from zoo.experiments.report import fmt, json_default, md_table, pyplot, save_figure, settings_block
from zoo.experiments.training import load_data, train_cell
from zoo.fileio import atomic_write
from zoo.flops import count_flops
from zoo.nn.fold import fold_batchnorm
from zoo.registry import count_params, create_model, get_model_spec

VARIANTS = ("none", "se", "eca", "cbam")
BATCHES = (1, 8)
# onnxruntime node names keep the module path: these parts mark an attention block's nodes
# (ResNeXt's ``layerN.M.se``, DenseNet's ``features.attnN``).
ATTN_MARKS = ("/se/", "/attn")


def is_attention_node(name: str) -> bool:
    return any(m in name for m in ATTN_MARKS)


def export_onnx(model: torch.nn.Module, input_size: tuple[int, ...], path: str) -> None:
    """BatchNorm folded, a dynamic batch axis, opset 17 (the exporter's own defaults)."""
    import warnings

    folded = fold_batchnorm(model.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (torch.randn(2, *input_size),), path, dynamo=False, input_names=["input"],
                          output_names=["logits"], opset_version=17, do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, str], input_size: tuple[int, ...], threads: int,
                        rounds: int) -> dict[tuple[str, int], float]:
    """Median ms of one ``session.run`` per (variant, batch), timed in rounds that visit every
    variant and batch in turn, so other load on the machine hits them alike."""
    sessions = {v: _session(p, threads) for v, p in paths.items()}
    rng = np.random.default_rng(0)
    feeds = {b: {"input": rng.standard_normal((b, *input_size), dtype=np.float32)} for b in BATCHES}
    for s in sessions.values():
        for b in BATCHES:
            for _ in range(2):
                s.run(None, feeds[b])
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for _ in range(rounds):
        for v, s in sessions.items():
            for b in BATCHES:
                t0 = time.perf_counter()
                s.run(None, feeds[b])
                times[(v, b)].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def profile_ops(path: str, input_size: tuple[int, ...], threads: int, runs: int, batch: int,
                workdir: str) -> dict[str, Any]:
    """onnxruntime's per-node kernel times over ``runs`` runs at ``batch`` (after one warm-up run):
    total ms per run, and the attention nodes' ms per run by operator type."""
    from bench.ort_profile import profile

    x = {"input": np.random.default_rng(1).standard_normal((batch, *input_size), dtype=np.float32)}
    prof = profile(path, x, threads, runs, workdir)
    attn: dict[str, float] = defaultdict(float)
    for node in prof.nodes:
        if is_attention_node(node.name):
            attn[node.op] += node.ms
    return dict(total_ms=prof.total_ms, attn_ms=sum(attn.values()), attn_by_op=dict(attn), by_op=prof.by_op)


def attention_flops(model_name: str, attn: str, input_size: tuple[int, ...]) -> tuple[int, int]:
    with torch.device("meta"):
        model = create_model(model_name, attn=attn)
    return count_params(model), count_flops(model, input_size)


def run_attention(cfg: dict[str, Any], out_dir: str, command: str) -> dict[str, Any]:
    spec = get_model_spec(cfg["model"])
    input_size = spec.input_size
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for v in VARIANTS:
            params, flops = attention_flops(cfg["model"], v, input_size)
            torch.manual_seed(cfg["seed"])
            path = os.path.join(tmp, f"{v}.onnx")
            export_onnx(create_model(cfg["model"], num_classes=10, attn=v), input_size, path)
            paths[v] = path
            rows[v] = dict(params=params, flops=flops)
        latency = interleaved_latency(paths, input_size, cfg["ort_threads"], cfg["rounds"])
        for v in VARIANTS:
            rows[v].update({f"ms_b{b}": latency[(v, b)] for b in BATCHES})
            rows[v]["profile"] = profile_ops(paths[v], input_size, cfg["ort_threads"], cfg["profile_runs"],
                                             max(BATCHES), tmp)
            print(f"{v:<5} {rows[v]['params']:,} params  {rows[v]['flops'] / 1e6:.2f} MFLOPs  "
                  + "  ".join(f"b{b} {latency[(v, b)]:.2f} ms" for b in BATCHES), flush=True)
    data, per_epoch = load_data(cfg, cfg["batch_size"])
    for v in VARIANTS:
        r = train_cell(data, model=cfg["model"], norm="bn", optimizer=cfg["optimizer"], lr=TRAIN_LR[cfg["optimizer"]],
                       batch_size=cfg["batch_size"], epochs=cfg["epochs"], images_per_epoch=per_epoch,
                       seed=cfg["seed"], weight_decay=cfg["weight_decay"], schedule=cfg["schedule"], attn=v)
        rows[v].update(val_acc=r["val_acc"], train_loss=r["train_loss"], train_seconds=r["seconds"])
        print(f"{v:<5} val top-1 {fmt(100 * r['val_acc'], '.2f')}%  {r['seconds']:.0f}s", flush=True)
    plot_attention(rows, cfg, os.path.join(out_dir, "attention.png"))
    report = attention_report(rows, cfg, input_size, data.name, len(data.val), per_epoch, command)
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(dict(settings=cfg, rows=rows), default=json_default))
    return dict(rows=rows, report=report)


def attention_verdict(rows: dict[str, dict[str, Any]]) -> str:
    """Per attention: FLOPs added vs time added at each batch, and the profiled share of time in
    its nodes; the claim holds for a variant whose time overhead exceeds twice its FLOP overhead."""
    base = rows["none"]
    lines, held = [], []
    for v in VARIANTS[1:]:
        r = rows[v]
        d_flops = r["flops"] / base["flops"] - 1
        d_time = {b: r[f"ms_b{b}"] / base[f"ms_b{b}"] - 1 for b in BATCHES}
        share = r["profile"]["attn_ms"] / r["profile"]["total_ms"] if r["profile"]["total_ms"] else float("nan")
        costs = all(t > 2 * d_flops and t > 0.02 for t in d_time.values())
        held.append(costs)
        lines.append(f"- **{v}**: +{100 * d_flops:.2f}% FLOPs; time "
                     + ", ".join(f"{100 * t:+.1f}% at batch {b}" for b, t in d_time.items())
                     + f"; {100 * share:.1f}% of the profiled kernel time is in its nodes "
                     f"(vs {100 * d_flops / (1 + d_flops):.2f}% of the FLOPs): "
                     + ("costs time out of proportion to its FLOPs." if costs else "no disproportionate cost."))
    verdict = ("bears out" if all(held) else "only partly bears out" if any(held) else "does not bear out")
    return ("\n".join(lines) + f"\n\nThis {verdict} the claim that attention adds almost no FLOPs but costs time "
            "(here: time overhead above 2% and above twice the FLOP overhead at both batch sizes, one interleaved "
            "run; the medians carry the machine's noise, a few percent on a shared CPU).")


def attention_report(rows: dict[str, dict[str, Any]], cfg: dict[str, Any], input_size: tuple[int, ...],
                     data_name: str, n_val: int, per_epoch: int, command: str) -> str:
    base = rows["none"]
    table = md_table(
        ["attn", "params", "MFLOPs", "FLOPs vs none"] + [f"ms batch {b}" for b in BATCHES]
        + [f"time vs none, batch {b}" for b in BATCHES] + ["val top-1 (%)"],
        [[v, f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}", f"{r['flops'] / base['flops']:.4f}x"]
         + [f"{r[f'ms_b{b}']:.3f}" for b in BATCHES]
         + [f"{r[f'ms_b{b}'] / base[f'ms_b{b}']:.3f}x" for b in BATCHES]
         + [fmt(100 * r["val_acc"], ".2f")] for v, r in rows.items()])
    ops = sorted({op for r in rows.values() for op in r["profile"]["attn_by_op"]})
    prof = md_table(
        ["attn", "kernel ms / run", "in attention", "share"] + ops,
        [[v, f"{r['profile']['total_ms']:.3f}", f"{r['profile']['attn_ms']:.3f}",
          f"{100 * r['profile']['attn_ms'] / r['profile']['total_ms']:.1f}%" if r["profile"]["total_ms"] else "n/a"]
         + [f"{r['profile']['attn_by_op'].get(op, 0.0):.3f}" for op in ops] for v, r in rows.items()])
    all_ops = sorted({op for r in rows.values() for op in r["profile"]["by_op"]},
                     key=lambda op: -max(r["profile"]["by_op"].get(op, 0.0) for r in rows.values()))
    whole = md_table(["attn"] + all_ops,
                     [[v] + [f"{r['profile']['by_op'].get(op, 0.0):.3f}" for op in all_ops] for v, r in rows.items()])
    c, h, w = input_size
    return f"""# Experiment: attention

Command: `{command}`

## Settings
{settings_block(cfg)}
- model: {cfg['model']} with each attention (`create_model(..., attn=...)`, reduction 16), 10 classes
- FLOPs and latency at {c} x {h} x {w} (the model's input size), BatchNorm folded, onnxruntime CPU with \
{cfg['ort_threads']} intra-op thread(s), median of {cfg['rounds']} interleaved rounds over every variant and batch
- profile: onnxruntime's per-node kernel times at batch {max(BATCHES)}, mean of {cfg['profile_runs']} runs \
after a warm-up run; a node is the attention's when its name holds the block's module path
- accuracy: {data_name} at {cfg['input_size']} x {cfg['input_size']}, {cfg['epochs']} epoch(s) x {per_epoch} \
images, {cfg['optimizer']}, the same seed and image order for every variant; {n_val} val images (one seed: \
differences of a few points are noise)

## Cost and accuracy
{table}

## Where the time goes (ms per run in the attention's nodes, by operator, batch {max(BATCHES)})
{prof}

## The whole graph, by operator (ms per run, batch {max(BATCHES)})
onnxruntime fuses a Conv with the Add and activation after it (FusedConv) when nothing sits between them; a gate \
on the block's output (SE/ECA/CBAM's Mul before the residual Add) leaves Adds and activations to run as nodes \
of their own, and the pooling and gate nodes do not run in the blocked layout (NCHWc) its convolutions use, so \
the activations are converted out of it and back (ReorderOutput, ReorderInput). That time shows here, not in \
the attention's nodes.

{whole}

![attention cost](attention.png)

## Does it bear out the claim?
{attention_verdict(rows)}
"""


def plot_attention(rows: dict[str, dict[str, Any]], cfg: dict[str, Any], path: str) -> None:
    plt = pyplot()
    base = rows["none"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(VARIANTS))
    width = 0.25
    ax.bar(x - width, [100 * (rows[v]["flops"] / base["flops"] - 1) for v in VARIANTS], width, label="FLOPs")
    for i, b in enumerate(BATCHES):
        ax.bar(x + i * width, [100 * (rows[v][f"ms_b{b}"] / base[f"ms_b{b}"] - 1) for v in VARIANTS], width,
               label=f"onnxruntime time, batch {b}")
    ax.set_xticks(x, VARIANTS)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="added vs none (%)", title=f"{cfg['model']}: what attention adds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
