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

The int8/fp32 table says whether each model met its target (``INT8_TARGETS``). Where int8 missed
it (at every batch with ``--profile``), the int8 and fp32 sessions are profiled at that batch with
onnxruntime's profiler (:mod:`bench.ort_profile`) and their kernel time split into kinds: integer
convs by the form MLAS runs them in (group=1, depthwise, grouped), convs the int8 export kept
fp32, Quantize/Dequantize, the rest; each kind's ms per run in int8 and fp32, its share of the
int8 total, and one sentence naming the largest kind, what bounds the int8 time. An fp32 node is
matched to its int8 counterpart through the module path the exporter put in both graphs' node
names. Numbers, not assertions: this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

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


# int8/fp32 median latency a model's int8 export should reach (batch 1 and 8); a model not named has no target.
INT8_TARGETS = {"resnet50": 0.5, "resnext50_32x4d": 0.5, "densenet121": 0.75}

# What the per-op profile splits the time into: integer convs by the form MLAS runs them in (fast
# kernels for group=1 and depthwise; a grouped conv with few channels per group runs as one small
# GEMM per group), float convs the int8 export kept fp32, the Quantize/Dequantize edges, the rest.
KIND_GROUP1, KIND_DEPTHWISE, KIND_GROUPED = "group=1 int8 convs", "depthwise int8 convs", "grouped int8 convs"
KIND_KEPT, KIND_QDQ, KIND_REST = "convs kept fp32", "Quantize/Dequantize", "other ops"
# an fp32 conv whose counterpart in the int8 graph was not found (shown apart, not guessed)
KIND_UNTRACED = "fp32 convs not traced to int8"
KINDS = (KIND_GROUP1, KIND_DEPTHWISE, KIND_GROUPED, KIND_KEPT, KIND_QDQ, KIND_UNTRACED, KIND_REST)
# the input holding an integer conv's weight, by op type
WEIGHT_INPUT = {"QLinearConv": 3, "NhwcQLinearConv": 3, "ConvInteger": 1}


def source_module(node_name: str, producers: dict[str, Any]) -> str | None:
    """The module path (``/layer1/layer1.0/conv2``) of the source node an optimised node runs.

    The exporter names a node ``/<module path>/<Op>``. onnxruntime keeps that name on a node it
    fuses or quantizes (adding ``_token_N`` when it makes a new one), but names an NCHWc node after
    the output tensor of what it replaced (``/layer1/layer1.0/act1/Relu_output_0_nchwc``: a conv
    fused with its ReLU), which ``producers`` (tensor -> node of the source graph) traces back
    through single-input nodes to the conv or BatchNormalization it started from.
    """
    name = re.sub(r"(_token_\d+)+$", "", node_name)
    if name.endswith("_nchwc"):
        tensor = name[:-len("_nchwc")]
        if tensor not in producers and tensor.endswith("_bn"):  # a BatchNormalization run as a depthwise conv
            tensor = tensor[:-len("_bn")]
        node = producers.get(tensor)
        while node is not None and node.op_type not in ("Conv", "BatchNormalization"):
            inputs = [i for i in node.input if i in producers]
            node = producers[inputs[0]] if len(inputs) == 1 else None
        if node is None:
            return None
        name = node.name
    return name.rsplit("/", 1)[0] if name.count("/") > 1 else None


def _graph_tables(source: Any, optimized: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    """(tensor -> producing node of ``source``, node name -> node of ``optimized``, initializer shapes)."""
    producers = {out: n for n in source.graph.node for out in n.output}
    nodes = {n.name: n for n in optimized.graph.node}
    shapes = {i.name: list(i.dims) for i in optimized.graph.initializer}
    return producers, nodes, shapes


def integer_conv_form(node: Any, shapes: dict[str, list[int]]) -> tuple[str, int | None]:
    """(kind, channels per group) of an integer conv node, from its group and its weight's shape."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    weight = shapes.get(node.input[WEIGHT_INPUT[node.op_type]]) if len(node.input) > WEIGHT_INPUT[node.op_type] \
        else None
    per_group = weight[1] if weight else None
    if group == 1:
        return KIND_GROUP1, per_group
    return (KIND_DEPTHWISE if per_group == 1 else KIND_GROUPED), per_group


def int8_kinds(prof: Any, source: Any) -> tuple[dict[str, str], dict[str, str], set[int]]:
    """Kinds of the int8 profile: (node name -> kind, source module -> kind of its conv, the
    channels per group of its grouped integer convs)."""
    from export.verify import DEQUANTIZE_OPS, FLOAT_OPS, INTEGER_OPS, QUANTIZE_OPS

    producers, nodes, shapes = _graph_tables(source, prof.graph)
    by_node, by_module, per_group = {}, {}, set()
    for t in prof.nodes:
        node = nodes.get(t.name)
        op = node.op_type if node is not None else t.op
        if INTEGER_OPS.get(op) == "conv" and node is not None and op in WEIGHT_INPUT:
            kind, channels = integer_conv_form(node, shapes)
            if kind == KIND_GROUPED and channels is not None:
                per_group.add(channels)
        elif INTEGER_OPS.get(op) == "conv":
            kind = KIND_GROUPED if node is None else integer_conv_form(node, shapes)[0]
        elif FLOAT_OPS.get(op) == "conv":
            kind = KIND_KEPT
        elif op in QUANTIZE_OPS or op in DEQUANTIZE_OPS:
            kind = KIND_QDQ
        else:
            kind = KIND_REST
        by_node[t.name] = kind
        if kind in (KIND_GROUP1, KIND_DEPTHWISE, KIND_GROUPED, KIND_KEPT):
            module = source_module(t.name, producers)
            if module is not None:
                by_module[module] = kind
    return by_node, by_module, per_group


def fp32_kinds(prof: Any, source: Any, by_module: dict[str, str]) -> dict[str, str]:
    """Kinds of the fp32 profile's nodes: a conv (or a BatchNormalization the int8 export runs as
    a depthwise conv) takes the kind of the int8 node made from the same module."""
    from export.verify import FLOAT_OPS

    producers, nodes, _ = _graph_tables(source, prof.graph)
    kinds = {}
    for t in prof.nodes:
        node = nodes.get(t.name)
        op = node.op_type if node is not None else t.op
        conv = FLOAT_OPS.get(op) == "conv"
        kind = by_module.get(source_module(t.name, producers)) if conv or op == "BatchNormalization" else None
        kinds[t.name] = kind or (KIND_UNTRACED if conv else KIND_REST)
    return kinds


def bound_of(kinds: list[dict], target: float | None, per_group: Sequence[int] = ()) -> str:
    """The sentence naming what bounds the int8 time. With a target ratio: the kind furthest over
    it (its int8 ms minus target x its fp32 ms: a kind already under the target is not what keeps
    the model over it, however large). Without one: the largest kind."""
    if target is None:
        top = max(kinds, key=lambda k: k["int8_ms"])
    else:
        top = max(kinds, key=lambda k: k["int8_ms"] - target * k["fp32_ms"])
    detail = (f" ({', '.join(map(str, sorted(per_group)))} channels per group)"
              if top["kind"] == KIND_GROUPED and per_group else "")
    versus = (f"{top['int8_ms'] / top['fp32_ms']:.1f}x their fp32 time" if top["fp32_ms"] > 0
              else "no fp32 counterpart")
    over = ("" if target is None else
            f"; {top['int8_ms'] - target * top['fp32_ms']:.1f} ms over what {target:g}x their fp32 time allows")
    return f"bound: {top['kind']}{detail}, {100 * top['share']:.0f}% of the int8 time, {versus}{over}"


def profile_int8(int8_path: str, fp32_path: str, x: np.ndarray, threads: int, runs: int, workdir: str,
                 target: float | None = None) -> dict:
    """Where the int8 session's time goes against the fp32 (folded) one's at the batch of ``x``:
    onnxruntime's kernel ms per run by kind in each, the share of the int8 total, and a sentence
    naming the kind that bounds the int8 time (:func:`bound_of`)."""
    import onnx

    from bench.ort_profile import profile

    feed = {"input": x}
    profs = {v: profile(p, feed, threads, runs, workdir, graph=True, tag=f"{v}-b{len(x)}")
             for v, p in (("int8", int8_path), ("fp32", fp32_path))}
    by_node, by_module, per_group = int8_kinds(profs["int8"], onnx.load(int8_path, load_external_data=False))
    fp32_by_node = fp32_kinds(profs["fp32"], onnx.load(fp32_path, load_external_data=False), by_module)
    total = {v: p.total_ms for v, p in profs.items()}
    kinds = []
    for kind in KINDS:
        int8 = [t.ms for t in profs["int8"].nodes if by_node[t.name] == kind]
        fp32 = [t.ms for t in profs["fp32"].nodes if fp32_by_node[t.name] == kind]
        if int8 or fp32:
            kinds.append(dict(kind=kind, int8_ms=sum(int8), fp32_ms=sum(fp32), int8_nodes=len(int8),
                              fp32_nodes=len(fp32), share=sum(int8) / total["int8"] if total["int8"] else 0.0))
    bound = bound_of(kinds, target, sorted(per_group))
    return dict(batch=len(x), runs=profs["int8"].runs, int8_total_ms=total["int8"], fp32_total_ms=total["fp32"],
                kinds=kinds, grouped_channels_per_group=sorted(per_group), bound=bound)


def bench_model(name: str, batches: list[int], runs: int, threads: int, workdir: str,
                runner_names: tuple[str, ...] = tuple(RUNNER_VARIANT), profile: bool = False) -> list[dict]:
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
            if key == "ort int8":
                target = INT8_TARGETS.get(name)
                met = None if target is None else s.median_ms / base <= target
                rows[-1].update(target=target, target_met=met, profile=None)
                if profile or met is False:
                    print(f"  profiling {name} int8 and fp32 at batch {batch} ...", flush=True)
                    where = os.path.join(workdir, f"profile-{name}")
                    os.makedirs(where, exist_ok=True)
                    rows[-1]["profile"] = profile_int8(paths["int8"], paths["folded"], x, threads, runs, where,
                                                       target)
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
        print(f"\n{'model':<18} {'batch':>5} {'int8/fp32':>10} {'int8 target':>18} {'fp16/fp32':>10}")
        for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in lowp):
            ratio = {r["runner"]: r for r in lowp if (r["model"], r["batch"]) == (model, batch)}
            cells = [f"{ratio[k]['ratio_vs_folded']:>10.2f}" if k in ratio else f"{'-':>10}"
                     for k in ("ort int8", "ort fp16")]
            int8 = ratio.get("ort int8", {})
            target = (f"<= {int8['target']:.2f} {'met' if int8['target_met'] else 'missed':<6}"
                      if int8.get("target") is not None else "-")
            print(f"{model:<18} {batch:>5} {cells[0]} {target:>18} {cells[1]}")
    for r in timing:
        if r.get("profile"):
            print_profile(r["model"], r["profile"], r["target_met"])
    print("\nonnxruntime graph after its optimisations (CPU provider):")
    for r in files:
        print(f"  {r['model']} {r['variant']}: {r['audit_text']}")
        if r["int8"] is not None:
            kept = r["int8"]["excluded"]
            print(f"    int8: {r['int8']['activations']} activations, {r['int8']['weights']} weights "
                  f"({r['int8']['format']}), {len(kept)} node(s) kept fp32, measured {r['int8']['measured']}")


def print_profile(model: str, prof: dict, target_met: bool | None) -> None:
    why = {False: "int8 missed its target", True: "int8 met its target", None: "no int8 target"}[target_met]
    print(f"\nwhere the int8 time goes, {model} batch {prof['batch']} ({why}): onnxruntime's kernel ms per run, "
          f"mean of {prof['runs']} profiled run(s)")
    print(f"  {'kind':<30} {'int8 ms':>9} {'fp32 ms':>9} {'int8/fp32':>10} {'share of int8':>14} {'int8 nodes':>10}")
    for k in prof["kinds"]:
        vs = f"{k['int8_ms'] / k['fp32_ms']:>9.2f}x" if k["fp32_ms"] > 0 else f"{'-':>10}"
        print(f"  {k['kind']:<30} {k['int8_ms']:>9.3f} {k['fp32_ms']:>9.3f} {vs} {100 * k['share']:>13.1f}% "
              f"{k['int8_nodes']:>10}")
    total = prof["int8_total_ms"] / prof["fp32_total_ms"] if prof["fp32_total_ms"] else float("nan")
    print(f"  {'total':<30} {prof['int8_total_ms']:>9.3f} {prof['fp32_total_ms']:>9.3f} {total:>9.2f}x "
          f"{100.0:>13.1f}% {sum(k['int8_nodes'] for k in prof['kinds']):>10}")
    print(f"  {prof['bound']}")


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
    p.add_argument("--profile", action="store_true",
                   help="profile int8 against fp32 at every batch (without it: only where int8 misses its target, "
                        + ", ".join(f"{m} {t}x" for m, t in INT8_TARGETS.items()) + ")")
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
    if args.profile and "ort int8" not in runner_names:
        p.exit(2, "error: --profile profiles the 'ort int8' runner: add it to --runners\n")
    if args.runs < 1 or not batches or min(batches) < 1:
        p.exit(2, "error: --runs and --batch must be positive\n")
    # PyTorch eager at larger batches otherwise pays for page faults on every call (mmap'ed
    # activation buffers are unmapped and faulted in again); faults per call are reported too.
    print(f"malloc: {common.pin_malloc()}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        for name in names:
            rows += bench_model(name, batches, args.runs, args.threads, work, runner_names, args.profile)
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
