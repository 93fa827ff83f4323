"""``python -m bench.export``: what folding and compression buy at inference time.

For each model: export (random init) folded fp32, unfolded fp32, fp16 and int8 with
``export.onnx``, then time, interleaved in rounds (A B C ... A B C ...), at each batch size:

- onnxruntime on the folded and the unfolded export, each with graph optimisations off and on
  (onnxruntime fuses Conv+BN itself at its basic level, and the TorchScript exporter already
  folds Conv->BN in eval mode, so only the BN nodes that follow no conv (DenseNet's
  pre-activation norms) separate the two exports: for ResNeXt they are the same graph, and
  their difference is this machine's noise);
- onnxruntime fp16 and int8;
- PyTorch eager, unfolded and folded.

Timed with :func:`bench._common.interleaved`. Prints medians (ms) and ratios against the folded
fp32 export measured in the same run (int8/fp32 and fp16/fp32 per batch size), export times, file
sizes, and for each export the graph audit: how many convs and matmuls onnxruntime runs as
integer ops after its optimisations, and the Quantize/Dequantize nodes left. ``--runners``
times a subset (e.g. ``--runners "ort int8"``); only the exports those need are made.
Numbers, not assertions: this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from bench import _common as common
from contract.cli import HelpFormatter

VARIANTS = ("folded", "unfolded", "fp16", "int8")
RUNNERS_BASE = "ort folded"  # the baseline every ratio is taken against


def export_variant(name: str, variant: str, out: str, threads: int) -> tuple[Any, float]:
    """Export ``name`` as ``variant`` into ``out``; return (the ExportResult, seconds)."""
    from export import ExportConfig, UserError, VerificationError, export
    from export.config import SilentReporter

    config = ExportConfig(
        model=name, out=out, name=f"{name}-{variant}", version=1, threads=threads, latency_runs=0,
        fold=variant != "unfolded", precision=variant if variant in ("fp16", "int8") else "fp32",
        calib_data="synthetic" if variant == "int8" else None, calib_samples=32, progress_bars=False,
        reporter=SilentReporter())
    t0 = time.perf_counter()
    try:
        result = export(config)
    except (UserError, VerificationError) as e:
        raise RuntimeError(f"export of {name} ({variant}) failed: {e}") from None
    return result, time.perf_counter() - t0


def ort_runner(path: str, threads: int, optimize: bool) -> Callable[[np.ndarray], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})


def eager_runner(model: Any) -> Callable[[np.ndarray], Any]:
    import torch

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))
    return run


# runner -> (the export it runs, or None for eager PyTorch)
RUNNER_VARIANT = {RUNNERS_BASE: "folded", "ort unfolded": "unfolded", "ort folded, opt off": "folded",
                  "ort unfolded, opt off": "unfolded", "ort fp16": "fp16", "ort int8": "int8",
                  "eager unfolded": None, "eager folded": None}


def bench_model(name: str, batches: list[int], runs: int, threads: int, workdir: str,
                runner_names: tuple[str, ...] = tuple(RUNNER_VARIANT)) -> list[dict]:
    import onnx
    import torch

    from export.convert import count_batchnorm_with_statistics
    from zoo.nn import fold_batchnorm
    from zoo.registry import create_model, get_model_spec

    torch.set_num_threads(threads)
    paths, export_s, sizes, bn_nodes, results = {}, {}, {}, {}, {}
    variants = [v for v in VARIANTS if v in {RUNNER_VARIANT[r] for r in (RUNNERS_BASE, *runner_names)}]
    for variant in variants:
        print(f"  exporting {name} {variant} ...", flush=True)
        results[variant], export_s[variant] = export_variant(name, variant, workdir, threads)
        paths[variant] = results[variant].path
        sizes[variant] = os.path.getsize(paths[variant])
        bn_nodes[variant] = count_batchnorm_with_statistics(onnx.load(paths[variant]))

    torch.manual_seed(0)
    model = create_model(name).eval()
    makers = {
        RUNNERS_BASE: lambda: ort_runner(paths["folded"], threads, True),
        "ort unfolded": lambda: ort_runner(paths["unfolded"], threads, True),
        "ort folded, opt off": lambda: ort_runner(paths["folded"], threads, False),
        "ort unfolded, opt off": lambda: ort_runner(paths["unfolded"], threads, False),
        "ort fp16": lambda: ort_runner(paths["fp16"], threads, True),
        "ort int8": lambda: ort_runner(paths["int8"], threads, True),
        "eager unfolded": lambda: eager_runner(model),
        "eager folded": lambda: eager_runner(fold_batchnorm(model)),
    }
    runners = {k: make() for k, make in makers.items() if k == RUNNERS_BASE or k in runner_names}
    rows = []
    input_size = get_model_spec(name).input_size
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
        print(f"  timing {name} batch {batch} ({runs} interleaved rounds) ...", flush=True)
        stats = common.interleaved({k: (lambda run=run: run(x)) for k, run in runners.items()}, runs, rounds=runs)
        base = stats[RUNNERS_BASE].median_ms
        for key, s in stats.items():
            rows.append(dict(model=name, batch=batch, runner=key, median_ms=s.median_ms, p90_ms=s.p90_ms,
                             faults_per_call=s.faults_per_call, ratio_vs_folded=s.median_ms / base))
    for variant in variants:
        audit, int8 = results[variant].audit, results[variant].int8
        rows.append(dict(model=name, variant=variant, export_s=export_s[variant], file_bytes=sizes[variant],
                         bn_nodes=bn_nodes[variant], audit=audit.as_dict(), audit_text=audit.describe(),
                         int8=int8.as_dict() if int8 is not None else None))
    return rows


def print_report(rows: list[dict], threads: int) -> None:
    timing = [r for r in rows if "runner" in r]
    files = [r for r in rows if "variant" in r]
    print(f"\nlatency, median of interleaved rounds, {threads} thread(s); ratio = / 'ort folded' in the same run")
    print(f"{'model':<18} {'batch':>5} {'runner':<22} {'median ms':>10} {'p90 ms':>9} {'ratio':>7} {'faults/call':>12}")
    for r in timing:
        print(f"{r['model']:<18} {r['batch']:>5} {r['runner']:<22} {r['median_ms']:>10.2f} {r['p90_ms']:>9.2f} "
              f"{r['ratio_vs_folded']:>7.2f} {r['faults_per_call']:>12.0f}")
    print(f"\n{'model':<18} {'variant':<9} {'export s':>9} {'file MiB':>9} {'BN nodes':>9}")
    for r in files:
        print(f"{r['model']:<18} {r['variant']:<9} {r['export_s']:>9.1f} {r['file_bytes'] / 2**20:>9.2f} "
              f"{r['bn_nodes']:>9}")
    print("BN nodes: BatchNormalization nodes that normalize with statistics (folded scale/shift nodes not counted)")
    lowp = [r for r in timing if r["runner"] in ("ort int8", "ort fp16")]
    if lowp:
        print(f"\n{'model':<18} {'batch':>5} {'int8/fp32':>10} {'fp16/fp32':>10}")
        for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in lowp):
            ratio = {r["runner"]: r["ratio_vs_folded"] for r in lowp if (r["model"], r["batch"]) == (model, batch)}
            cells = [f"{ratio[k]:>10.2f}" if k in ratio else f"{'-':>10}" for k in ("ort int8", "ort fp16")]
            print(f"{model:<18} {batch:>5} {' '.join(cells)}")
    print("\nonnxruntime graph after its optimisations (CPU provider):")
    for r in files:
        print(f"  {r['model']} {r['variant']}: {r['audit_text']}")
        if r["int8"] is not None:
            kept = r["int8"]["excluded"]
            print(f"    int8: {r['int8']['activations']} activations, {r['int8']['weights']} weights "
                  f"({r['int8']['format']}), {len(kept)} node(s) kept fp32, measured {r['int8']['measured']}")


DEFAULTS = dict(models="resnext50_32x4d,densenet121", batch="1,8", runs=20)
# A smoke run (tests, a first look): the mini models, few rounds; explicit options still win.
QUICK = dict(models="resnext_mini,densenet_mini", batch="1,8", runs=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--models", help=f"comma-separated model names (default {DEFAULTS['models']}; "
                                    f"--quick: {QUICK['models']})")
    p.add_argument("--batch", help=f"comma-separated batch sizes (default {DEFAULTS['batch']})")
    p.add_argument("--runs", type=int, help=f"interleaved rounds, median of this many (default {DEFAULTS['runs']}; "
                                            f"--quick: {QUICK['runs']})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime and torch threads")
    p.add_argument("--runners", nargs="+", metavar="RUNNER", default=list(RUNNER_VARIANT),
                   help=f"runners to time, each one argument ('{RUNNERS_BASE}' always): "
                        + ", ".join(f"'{r}'" for r in RUNNER_VARIANT))
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    chosen = QUICK if args.quick else DEFAULTS
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        from zoo.registry import get_model_spec
        names = [get_model_spec(n).name for n in args.models.split(",") if n]
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    runner_names = tuple(args.runners)
    unknown = [r for r in runner_names if r not in RUNNER_VARIANT]
    if unknown:
        p.exit(2, f"error: unknown runner {unknown[0]!r}: choose from {', '.join(RUNNER_VARIANT)}\n")
    if args.runs < 1 or not batches or min(batches) < 1:
        p.exit(2, "error: --runs and --batch must be positive\n")
    # PyTorch eager at larger batches otherwise pays for page faults on every call (mmap'ed
    # activation buffers are unmapped and faulted in again); faults per call are reported too.
    print(f"malloc: {common.pin_malloc()}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        for name in names:
            rows += bench_model(name, batches, args.runs, args.threads, work, runner_names)
    print_report(rows, args.threads)
    if os.path.exists("/proc/loadavg"):  # other work on the machine skews every ratio: say how much there was
        with open("/proc/loadavg") as f:
            print(f"load average (1, 5, 15 min) at the end: {' '.join(f.read().split()[:3])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
