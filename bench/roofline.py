"""Roofline arithmetic: machine ceilings, per-operator FLOPs and bytes of an ONNX graph,
convolution classes, onnxruntime profile attribution, and the roofline plot.

Conventions (the same everywhere in ``bench``):

* A multiply-add is 2 FLOPs (as :func:`zoo.flops.count_flops`); a conv's bias add is not counted.
* Minimum bytes of an operator: every input (weights included) read once plus every output
  written once, fp32. Minimum bytes of a model: every weight read once, the input read once,
  the output written once and every intermediate tensor written once and read once.
* Arithmetic intensity = FLOPs / minimum bytes. The roof at intensity I is
  ``min(peak GFLOP/s, bandwidth GB/s x I)`` (Williams, Waterman, Patterson, "Roofline", CACM 2009).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bench._common import median

# Convolution classes, then the rest; the order is the order of every table.
CONV_CLASSES = ("depthwise", "grouped", "pointwise", "dense")
OP_CLASSES = CONV_CLASSES + ("gemm", "other")
BYTES_PER_ELEMENT = 4  # fp32

# Elementwise ops costed at one FLOP per output element (Sum: one per extra input).
_ELEMENTWISE = {"Relu", "Add", "Sub", "Mul", "Div", "Max", "Min", "Clip", "Sigmoid", "Tanh",
                "LeakyRelu", "HardSigmoid", "HardSwish", "Neg", "Sqrt", "Exp", "Erf", "Sum"}
# Ops that ORT fuses into the conv before them: a profiled fused node named after one of these
# is still that conv's time.
_FUSABLE = {"Relu", "Add", "Sum", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"}


def classify_conv(group: int, weight_shape: Sequence[int]) -> str:
    """Class of a Conv node from its ``group`` attribute and weight shape ``[Cout, Cin/group, kH, kW]``.

    ``depthwise``: one input channel per group (group == input channels > 1); ``grouped``:
    1 < group < input channels; ``pointwise``: group 1 and a 1x1 kernel; ``dense``: the rest.
    """
    cin = int(weight_shape[1]) * int(group)
    if group > 1 and group == cin:
        return "depthwise"
    if group > 1:
        return "grouped"
    if all(int(k) == 1 for k in weight_shape[2:]):
        return "pointwise"
    return "dense"


def conv_flops(out_shape: Sequence[int], weight_shape: Sequence[int]) -> int:
    """2 x N x Cout x (output pixels) x (Cin/group) x kH x kW."""
    n, cout = int(out_shape[0]), int(out_shape[1])
    pixels = math.prod(int(d) for d in out_shape[2:])
    per_output = math.prod(int(d) for d in weight_shape[1:])  # Cin/group x kH x kW
    assert int(weight_shape[0]) == cout, (out_shape, weight_shape)
    return 2 * n * cout * pixels * per_output


def gemm_flops(out_shape: Sequence[int], k: int) -> int:
    """2 x (output elements) x K, for Gemm and (batched) MatMul alike."""
    return 2 * math.prod(int(d) for d in out_shape) * int(k)


@dataclass
class OpCost:
    """One node of the exported graph at a given batch."""

    name: str
    op_type: str
    op_class: str
    flops: int
    bytes: int
    group: int = 1
    detail: str = ""  # shapes, for the reader

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.nan


@dataclass
class GraphCost:
    """Per-node costs of an ONNX graph at one batch, and the model's minimum traffic."""

    batch: int
    ops: list[OpCost]
    weight_bytes: int
    activation_bytes: int  # input read once, output written once, intermediates written + read once
    producer: dict[str, str]  # tensor -> node name
    node_inputs: dict[str, list[str]]  # node name -> its non-constant input tensors

    @property
    def by_name(self) -> dict[str, OpCost]:
        return {o.name: o for o in self.ops}

    @property
    def min_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def conv_gemm_flops(self) -> int:
        """FLOPs of convs and GEMMs only: what :func:`zoo.flops.count_flops` counts."""
        return sum(o.flops for o in self.ops if o.op_class != "other")

    def class_totals(self) -> dict[str, dict[str, int]]:
        out = {c: {"nodes": 0, "flops": 0, "bytes": 0} for c in OP_CLASSES}
        for o in self.ops:
            t = out[o.op_class]
            t["nodes"] += 1
            t["flops"] += o.flops
            t["bytes"] += o.bytes
        return out


def _node_names(graph: Any) -> None:
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def analyze_onnx(model: Any, batch: int) -> GraphCost:
    """FLOPs, bytes and class of every node of ``model`` (an onnx.ModelProto) at ``batch``.

    The batch dimension of the inputs is fixed to ``batch`` and shapes come from onnx shape
    inference. Nodes that compute only from initializers (weight ``Identity`` copies the exporter
    adds) are constants: onnxruntime folds them, so they cost nothing and their outputs count
    as weights.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    init_names = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in init_names:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    del m.graph.value_info[:]
    for vi in m.graph.output:  # let inference recompute them at this batch
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].Clear()
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    _node_names(m.graph)

    shapes: dict[str, list[int]] = {}
    for t in m.graph.initializer:
        shapes[t.name] = [int(d) for d in t.dims]
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [int(d.dim_value) for d in dims]

    const = set(init_names)
    for node in m.graph.node:
        if node.op_type == "Constant" or (node.input and all(i in const or not i for i in node.input)):
            const.update(node.output)

    def numel(name: str) -> int:
        if name not in shapes:
            raise ValueError(f"shape inference left {name!r} without a static shape at batch {batch}")
        return math.prod(shapes[name])

    ops: list[OpCost] = []
    producer: dict[str, str] = {}
    node_inputs: dict[str, list[str]] = {}
    act_written: set[str] = set()
    for node in m.graph.node:
        for o in node.output:
            producer[o] = node.name
        if node.op_type == "Constant" or all(o in const for o in node.output):
            continue
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        node_inputs[node.name] = [i for i in ins if i not in const]
        act_written.update(outs)
        nbytes = BYTES_PER_ELEMENT * (sum(numel(i) for i in ins) + sum(numel(o) for o in outs))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        group, detail = 1, ""
        if node.op_type == "Conv":
            w = shapes[ins[1]]
            group = int(attrs.get("group", 1))
            op_class = classify_conv(group, w)
            flops = conv_flops(shapes[outs[0]], w)
            detail = f"x{shapes[ins[0]]} w{w} g{group} -> {shapes[outs[0]]}"
        elif node.op_type in ("Gemm", "MatMul"):
            a, y = shapes[ins[0]], shapes[outs[0]]
            k = a[0] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
            op_class, flops = "gemm", gemm_flops(y, k)
            detail = f"{a} x {shapes[ins[1]]} -> {y}"
        else:
            op_class = "other"
            out_n = sum(numel(o) for o in outs)
            if node.op_type in _ELEMENTWISE:
                flops = out_n * (max(1, len(ins) - 1) if node.op_type == "Sum" else 1)
            elif node.op_type == "BatchNormalization":
                flops = 2 * out_n
            elif node.op_type in ("MaxPool", "AveragePool"):
                flops = out_n * math.prod(int(k) for k in attrs.get("kernel_shape", [1]))
            elif node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum"):
                flops = numel(ins[0])
            else:  # Concat, Flatten, Reshape, Transpose, ...: data movement only
                flops = 0
        ops.append(OpCost(node.name, node.op_type, op_class, int(flops), int(nbytes), group, detail))

    weight_bytes = BYTES_PER_ELEMENT * sum(math.prod(int(d) for d in t.dims) for t in m.graph.initializer)
    graph_in = [vi.name for vi in m.graph.input if vi.name not in init_names]
    graph_out = [vi.name for vi in m.graph.output]
    inter = act_written - set(graph_out)
    act = sum(numel(n) for n in graph_in) + sum(numel(n) for n in graph_out) + 2 * sum(numel(n) for n in inter)
    return GraphCost(batch, ops, weight_bytes, BYTES_PER_ELEMENT * act, producer, node_inputs)


# --------------------------------------------------------------------------- profiling


def profile_runs(trace_path: str, skip_runs: int = 0) -> list[list[dict[str, Any]]]:
    """Kernel-time events of an onnxruntime profile (``SessionOptions.enable_profiling``), one
    list per ``model_run``, without the first ``skip_runs`` runs (the warm-up)."""
    with open(trace_path, encoding="utf-8") as f:
        events = json.load(f)
    if isinstance(events, dict):  # the chrome-trace object form
        events = events.get("traceEvents", [])
    runs = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    out: list[list[dict[str, Any]]] = [[] for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = float(e.get("ts", 0))
        for i, (start, end) in enumerate(runs):
            if start <= ts <= end:
                out[i].append(e)
                break
    return out[skip_runs:]


def map_profiled_node(name: str, op_name: str, graph: GraphCost, tensors: Sequence[str]) -> str | None:
    """The exported graph's node that a profiled (optimised) node stands for, or None.

    onnxruntime keeps a node's name through most rewrites; the NCHWc layout transformer and the
    activation fusions name the new node after the output tensor it produces
    (``/layer1/.../relu/Relu_output_0_nchwc``). So: an exact node name first, else the longest
    tensor name the node name starts with, whose producer is the node; and a fused conv named
    after its ReLU or residual Add is walked back to the conv it started from.
    """
    by_name = graph.by_name
    if name in by_name:
        anchor = name
    else:
        best = ""
        for t in tensors:
            if len(t) > len(best) and name.startswith(t) and (len(name) == len(t) or name[len(t)] == "_"):
                best = t
        anchor = graph.producer.get(best) if best else None
        if anchor is None or anchor not in by_name:
            return None
    if "Conv" in op_name and by_name[anchor].op_type in _FUSABLE:
        frontier, seen = [anchor], set()
        for _ in range(4):  # Conv -> (Add) -> Relu: a few steps at most
            nxt = []
            for n in frontier:
                for t in graph.node_inputs.get(n, []):
                    p = graph.producer.get(t)
                    if p is None or p in seen or p not in by_name:
                        continue
                    if by_name[p].op_type == "Conv":
                        return p
                    seen.add(p)
                    if by_name[p].op_type in _FUSABLE:
                        nxt.append(p)
            frontier = nxt
    return anchor


@dataclass
class ClassProfile:
    """Measured kernel time per run of each op class, with FLOPs and bytes as onnxruntime ran them.

    ``flops``/``bytes``: an exported node that has no kernel of its own (onnxruntime fused it
    into the kernel before it, e.g. a ReLU or a residual Add into a conv) adds its FLOPs to
    that kernel's class and its intermediate tensor's traffic disappears.
    """

    time_us: dict[str, float]
    flops: dict[str, int]
    bytes: dict[str, int]
    nodes: dict[str, int]  # exported nodes of each class
    total_us: float
    unmapped_us: float
    runs: int
    per_node_us: dict[str, float] = field(default_factory=dict)
    reorder_us: float = 0.0  # NCHW <-> NCHWc layout conversions onnxruntime inserted
    layouts: dict[str, str] = field(default_factory=dict)  # conv node -> "nchwc" (blocked) or "nchw"

    def nchwc_convs(self, graph: GraphCost, op_class: str) -> tuple[int, int]:
        """(convs of ``op_class`` run in the blocked NCHWc layout, convs of it that ran at all)."""
        cls = {o.name for o in graph.ops if o.op_class == op_class and o.op_type == "Conv"}
        ran = [n for n in self.layouts if n in cls]
        return sum(self.layouts[n] == "nchwc" for n in ran), len(ran)


def attribute_profile(runs: Sequence[Sequence[dict[str, Any]]], graph: GraphCost) -> ClassProfile:
    """Per-class kernel time per run (median over runs, node by node), mapping profiled nodes back
    to the exported graph. Nodes that cannot be mapped (layout reorders onnxruntime inserts)
    count as ``other``."""
    tensors = list(graph.producer)
    by_name = graph.by_name
    per_key: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(runs))
    for i, events in enumerate(runs):
        for e in events:
            key = (str(e["name"])[: -len("_kernel_time")], str(e.get("args", {}).get("op_name", "")))
            per_key[key][i] += float(e.get("dur", 0))
    time_us: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    layouts: dict[str, str] = {}
    unmapped = reorder = 0.0
    for (name, op_name), durs in per_key.items():
        us = median(durs)
        if op_name.startswith("Reorder"):
            reorder += us
        node = map_profiled_node(name, op_name, graph, tensors)
        if node is None:
            unmapped += us
            time_us["other"] += us
        else:
            time_us[by_name[node].op_class] += us
            per_node[node] += us
            if by_name[node].op_type == "Conv":
                layouts[node] = "nchwc" if name.endswith("_nchwc") else "nchw"

    flops: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    nodes: dict[str, int] = defaultdict(int)
    for op in graph.ops:
        nodes[op.op_class] += 1
        host = op.name if (op.name in per_node or not per_node) else _host(op.name, graph, per_node)
        if host is None or host == op.name:
            flops[op.op_class] += op.flops
            nbytes[op.op_class] += op.bytes
        else:
            flops[by_name[host].op_class] += op.flops
    total = sum(time_us.values())
    return ClassProfile({c: time_us.get(c, 0.0) for c in OP_CLASSES}, {c: flops.get(c, 0) for c in OP_CLASSES},
                        {c: nbytes.get(c, 0) for c in OP_CLASSES}, {c: nodes.get(c, 0) for c in OP_CLASSES},
                        total, unmapped, len(runs), dict(per_node), reorder, layouts)


def _host(name: str, graph: GraphCost, ran: dict[str, float]) -> str | None:
    """The nearest upstream node with a kernel of its own: the one a fused node was fused into."""
    frontier, seen = [name], {name}
    for _ in range(4):
        nxt = []
        for n in frontier:
            for t in graph.node_inputs.get(n, []):
                p = graph.producer.get(t)
                if p is None or p in seen:
                    continue
                if p in ran:
                    return p
                seen.add(p)
                nxt.append(p)
        frontier = nxt
    return None


# --------------------------------------------------------------------------- ceilings


@dataclass
class Ceilings:
    peak_gflops: float  # best fp32 matmul, torch or onnxruntime
    bandwidth_gbps: float  # best large (DRAM) copy, read + write counted
    detail: dict[str, float]  # every measurement behind them, by name
    cache_gbps: float | None = None  # copy of a buffer that stays in L3: the roof for data that fits
    cpu_cores: float | None = None  # cores' worth of CPU time the matmul actually got

    @property
    def ridge(self) -> float:
        """Intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.peak_gflops / self.bandwidth_gbps

    def roof(self, intensity: float) -> float:
        return min(self.peak_gflops, self.bandwidth_gbps * intensity)

    @staticmethod
    def best(*cs: "Ceilings") -> "Ceilings":
        """The better of several measurements of the same ceilings, every measurement kept in ``detail``."""
        caches = [c.cache_gbps for c in cs if c.cache_gbps]
        cores = [c.cpu_cores for c in cs if c.cpu_cores]
        detail = {}
        for c in cs:
            detail.update(c.detail)
        return Ceilings(max(c.peak_gflops for c in cs), max(c.bandwidth_gbps for c in cs), detail,
                        max(caches) if caches else None, min(cores) if cores else None)


def _best_seconds(fn, reps: int, min_seconds: float) -> float:
    """Best time of at least ``reps`` calls, going on until ``min_seconds`` have passed: on a
    shared machine a longer window is likelier to contain a quiet moment."""
    fn()  # warm-up: first touch of pages, thread pool start
    best = math.inf
    start = time.perf_counter()
    done = 0
    while done < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return best


def measure_ceilings(threads: int, matmul_n: int = 2048, copy_mib: int = 512, cache_mib: int = 8, reps: int = 5,
                     min_seconds: float = 1.0, tag: str = "") -> Ceilings:
    """Peak fp32 GFLOP/s (an n^3 matmul, in torch and in onnxruntime) and copy bandwidth (GB/s).

    A ceiling is what the machine *can* do, so each is the best of ``reps`` runs or more (as many
    as fit in ``min_seconds``), not the median:
    on a shared machine the median of a ceiling measures the neighbours. Buffers are allocated
    and touched before timing (first touch of fresh pages runs at ~3 GB/s here). The copy of
    ``copy_mib`` MiB is the DRAM roof; ``cache_mib`` MiB stays in L3 and shows how much higher
    the roof is for data that fits there. ``cpu_cores`` is how many cores' worth of CPU time the
    torch matmul got: below ``threads``, other processes were using the cores.
    """
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    sfx = f" ({tag})" if tag else ""
    n = matmul_n
    flops = 2.0 * n ** 3
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    cpu0, wall0 = os.times(), time.perf_counter()
    secs = _best_seconds(lambda: torch.mm(a, b, out=c), reps, min_seconds)
    cpu1, wall1 = os.times(), time.perf_counter()
    cores = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (wall1 - wall0)
    detail = {f"matmul torch {n}^3 GFLOP/s{sfx}": flops / secs / 1e9}

    g = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mp.ir_version = min(mp.ir_version, 9)
    sess = ort.InferenceSession(mp.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    feeds = {"A": a.numpy(), "B": b.numpy()}
    ort_secs = _best_seconds(lambda: sess.run(None, feeds), reps, min_seconds)
    detail[f"matmul onnxruntime {n}^3 GFLOP/s{sfx}"] = flops / ort_secs / 1e9
    sess = None
    peak = max(detail.values())

    bws = []
    for mib in (copy_mib, cache_mib):
        elems = mib * 2**20 // 4
        src = torch.ones(elems)
        dst = torch.zeros(elems)
        gbps = 2 * elems * 4 / _best_seconds(lambda: dst.copy_(src), reps, min_seconds / 2) / 1e9
        where = "in cache" if mib == cache_mib else "DRAM"
        detail[f"copy {mib} MiB ({where}) GB/s, read + write{sfx}"] = gbps
        bws.append(gbps)
        src = dst = None
    detail[f"CPU obtained during the matmul, cores{sfx}"] = cores
    return Ceilings(peak, bws[0], detail, bws[1], cores)


def session_options(threads: int, profile_prefix: str | None = None) -> Any:
    """onnxruntime options used for every timed session: ``threads`` intra-op threads, one
    inter-op thread (sequential execution), all graph optimisations, warnings off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


# --------------------------------------------------------------------------- plot


@dataclass
class Point:
    """One thing placed on the roofline."""

    label: str
    intensity: float
    gflops: float
    kind: str  # "model", "op" or "sweep"
    depthwise_side: bool  # a depthwise model / depthwise op (marked apart from the dense ones)
    op_class: str = ""


_CLASS_MARKERS = {"depthwise": "v", "grouped": "s", "pointwise": "D", "dense": "o", "gemm": "P", "other": "x"}


def plot_roofline(path: str, ceilings: Ceilings, points: Sequence[Point], title: str) -> None:
    """Write a log-log roofline PNG: the roofs, then every model, op class and sweep conv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p.intensity > 0 and p.gflops > 0 and math.isfinite(p.intensity)
           and math.isfinite(p.gflops)]
    xs = [p.intensity for p in pts] or [1.0]
    ys = [p.gflops for p in pts] or [1.0]
    lo_x = min(min(xs) / 2, ceilings.ridge / 20)
    hi_x = max(max(xs) * 2, ceilings.ridge * 20)
    grid = np.logspace(math.log10(lo_x), math.log10(hi_x), 200)
    fig, ax = plt.subplots(figsize=(10, 7), dpi=110)
    ax.loglog(grid, [ceilings.roof(x) for x in grid], color="black", lw=2,
              label=f"roof: {ceilings.peak_gflops:.0f} GFLOP/s, DRAM {ceilings.bandwidth_gbps:.1f} GB/s")
    if ceilings.cache_gbps:
        ax.loglog(grid, [min(ceilings.peak_gflops, ceilings.cache_gbps * x) for x in grid], color="grey", lw=1,
                  ls="--", label=f"roof for data in L3 ({ceilings.cache_gbps:.0f} GB/s)")
    ax.axvline(ceilings.ridge, color="grey", ls=":", lw=1)
    ax.text(ceilings.ridge, ceilings.peak_gflops * 1.08, f" ridge {ceilings.ridge:.1f} FLOP/B", fontsize=8)
    ax.text(grid[0], ceilings.peak_gflops * 1.08, f"peak {ceilings.peak_gflops:.0f} GFLOP/s", fontsize=8)
    ax.text(grid[0] * 1.1, ceilings.roof(grid[0] * 1.1) * 1.15,
            f"{ceilings.bandwidth_gbps:.1f} GB/s", fontsize=8, rotation=30)
    colors = {False: "tab:blue", True: "tab:red"}
    seen: set[str] = set()

    def once(lbl: str) -> str | None:
        if lbl in seen:
            return None
        seen.add(lbl)
        return lbl

    for p in pts:
        c = colors[p.depthwise_side]
        side = "depthwise" if p.depthwise_side else "dense"
        if p.kind == "model":
            ax.scatter(p.intensity, p.gflops, s=140, marker="*", color=c, edgecolor="black", zorder=5,
                       label=once("model: depthwise variant" if p.depthwise_side else "model: its dense/grouped twin"))
            ax.annotate(p.label, (p.intensity, p.gflops), fontsize=7, xytext=(4, 4), textcoords="offset points")
        elif p.kind == "op":
            ax.scatter(p.intensity, p.gflops, s=28, marker=_CLASS_MARKERS.get(p.op_class, "."), alpha=0.6,
                       color=c, label=once(f"{p.op_class} ops ({side} model)"))
        else:
            ax.scatter(p.intensity, p.gflops, s=70, marker="h", facecolor="none", edgecolor=c, lw=1.5,
                       label=once(f"sweep conv ({'depthwise' if p.depthwise_side else 'dense/grouped'})"))
            ax.annotate(p.label, (p.intensity, p.gflops), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(min(min(ys) / 3, ceilings.peak_gflops / 1000), ceilings.peak_gflops * 2)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, minimum traffic)")
    ax.set_ylabel("achieved GFLOP/s (multiply-add = 2 FLOPs)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
