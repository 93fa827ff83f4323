"""onnxruntime's per-node profile: kernel time per node of the graph a CPU session really runs.

:func:`profile` runs a model in a session with onnxruntime's profiler on
(``SessionOptions.enable_profiling``) and reads the trace ``end_profiling()`` writes; the same
session writes its optimised graph (``optimized_model_filepath``), so every timed node can be
looked up by name in the graph it belongs to (onnxruntime names an event ``<node>_kernel_time``,
with the operator in ``args.op_name``). :func:`read_trace` is the parser alone.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeTime:
    """One node of the optimised graph: its name, operator and kernel ms per run."""

    name: str
    op: str
    ms: float


@dataclass
class Profile:
    """Kernel time per node, averaged over ``runs`` runs; ``graph`` is the optimised onnx.ModelProto
    (None when not asked for)."""

    nodes: list[NodeTime]
    runs: int
    graph: Any = None
    by_op: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        by_op: dict[str, float] = defaultdict(float)
        for n in self.nodes:
            by_op[n.op] += n.ms
        self.by_op = dict(by_op)

    @property
    def total_ms(self) -> float:
        return sum(n.ms for n in self.nodes)


KERNEL_SUFFIX = "_kernel_time"


def read_trace(path: str, skip_runs: int = 0) -> tuple[list[NodeTime], int]:
    """(node kernel times in ms per run, runs counted) from a trace written by ``end_profiling()``
    (events split per run by :func:`bench.roofline.profile_runs`).

    The first ``skip_runs`` runs are left out: a session's first run also plans and grows its
    memory arena, which the kernel times of that run carry.
    """
    from bench.roofline import profile_runs

    runs = profile_runs(path, skip_runs)
    if not runs:
        raise ValueError(f"{path}: no run left in the trace after skipping {skip_runs}")
    total: dict[tuple[str, str], float] = defaultdict(float)
    for run in runs:
        for e in run:
            total[e["name"][:-len(KERNEL_SUFFIX)], e.get("args", {}).get("op_name", "?")] += float(e["dur"]) / 1e3
    return [NodeTime(name, op, ms / len(runs)) for (name, op), ms in total.items()], len(runs)


def profile(path: str, feed: dict[str, Any], threads: int, runs: int, workdir: str, warmup: int = 1,
            graph: bool = False, tag: str = "profile") -> Profile:
    """Profile ``runs`` runs of the model at ``path`` on ``feed`` (after ``warmup`` runs left out)
    in a CPU session with every graph optimisation, ``threads`` intra-op threads; with ``graph``,
    the optimised graph that session ran comes back too. Files go to ``workdir``, named by ``tag``."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(workdir, tag)
    if graph:
        options.optimized_model_filepath = os.path.join(workdir, f"{tag}-optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        session.run(None, feed)
    nodes, counted = read_trace(session.end_profiling(), skip_runs=warmup)
    return Profile(nodes, counted, onnx.load(options.optimized_model_filepath) if graph else None)
