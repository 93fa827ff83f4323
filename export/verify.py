"""Verification: onnxruntime against eager PyTorch (parity on random and val images), the gates
a conversion must pass, and batch-1 latency."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.metadata import INPUT_NAME, OUTPUT_NAME
from export.config import FP32_RTOL, RANDOM_SAMPLES, ExportConfig


@dataclass
class Parity:
    what: str  # "random" or "val"
    count: int
    rel_diff: float  # max |onnx - eager| / max |eager|
    agreement: float  # share of samples whose top-1 matches (ties within the tolerance count as equal)
    acc_eager: float | None = None
    acc_onnx: float | None = None

    def describe(self, precision: str) -> str:
        text = f"max|diff|/scale {self.rel_diff:.2e}, top-1 agreement {100 * self.agreement:.2f}%"
        if self.acc_eager is not None:
            text += (f", accuracy fp32 eager {100 * self.acc_eager:.2f}% / {precision} onnx "
                     f"{100 * self.acc_onnx:.2f}%")
        if precision == "int8" and self.what == "random":
            text += " (N(0,1) inputs lie outside the calibrated ranges: not gated)"
        return text


def ort_session(path: str, threads: int = 0) -> Any:
    """A CPU onnxruntime session, the default ``ExportConfig.session_factory``; ``threads`` 0: all cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_logits(ref: np.ndarray, out: np.ndarray, tie_rtol: float = FP32_RTOL) -> tuple[float, np.ndarray]:
    """(max |out - ref| relative to the logit scale max |ref|, per-sample top-1 agreement).

    Two classes whose eager logits differ by less than ``tie_rtol`` of the scale are a tie: either
    pick agrees (random-init nets have near-equal logits, and float rounding order decides those).
    """
    ref = ref.astype(np.float64)
    scale = float(np.abs(ref).max())
    if not np.isfinite(out).all():
        return math.inf, np.zeros(len(ref), dtype=bool)
    diff = float(np.abs(out.astype(np.float64) - ref).max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    picked = ref[np.arange(len(ref)), out.argmax(1)]
    return rel, picked >= ref.max(1) - tie_rtol * scale


def run_pair(model: Any, session: Any, batches: Iterator[tuple[np.ndarray, np.ndarray | None]],
             what: str, total: int, progress: bool, tie_rtol: float = FP32_RTOL) -> Parity:
    """Run eager ``model`` and ``session`` on the same batches and compare."""
    import torch
    from tqdm import tqdm

    refs, outs, labels = [], [], []
    with torch.no_grad(), tqdm(total=total, desc=f"verify {what}", unit="img", file=sys.stderr,
                               disable=not progress, leave=False) as bar:
        for x, y in batches:
            refs.append(model(torch.from_numpy(x)).numpy())
            outs.append(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
            if y is not None:
                labels.append(y)
            bar.update(len(x))
    ref, out = np.concatenate(refs), np.concatenate(outs)
    rel, agree = compare_logits(ref, out, tie_rtol)
    parity = Parity(what, len(ref), rel, float(agree.mean()))
    if labels:
        y = np.concatenate(labels)
        parity.acc_eager = float((ref.argmax(1) == y).mean())
        parity.acc_onnx = float((out.argmax(1) == y).mean())
    return parity


def random_batches(input_size: Sequence[int]) -> Iterator[tuple[np.ndarray, None]]:
    rng = np.random.default_rng(0)
    yield rng.standard_normal((RANDOM_SAMPLES, *input_size), dtype=np.float32), None


def renormalizer(bundle: Any, mean: Sequence[float], std: Sequence[float]):
    """Map the bundle's normalisation to the model's: x' = (x * std_b + mean_b - mean) / std."""
    mb, sb = np.asarray(bundle.mean, np.float32), np.asarray(bundle.std, np.float32)
    mm, sm = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mb.shape == mm.shape and np.allclose(mb, mm) and np.allclose(sb, sm):
        return lambda x: x
    shape = (1, -1, 1, 1)
    return lambda x: ((x * sb.reshape(shape) + mb.reshape(shape) - mm.reshape(shape)) / sm.reshape(shape)).astype(
        np.float32)


def subset(n: int, k: int, seed: int = 0) -> np.ndarray:
    """A deterministic, class-order-independent subset of ``k`` of ``n`` indices, sorted."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def dataset_batches(dataset: Any, indices: np.ndarray, batch: int, renorm: Any,
                    with_labels: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    for start in range(0, len(indices), batch):
        items = [dataset[int(i)] for i in indices[start:start + batch]]
        x = renorm(np.stack([np.asarray(t[0], dtype=np.float32) for t in items]))
        y = np.asarray([int(t[1]) for t in items]) if with_labels else None
        yield np.ascontiguousarray(x), y


def gate(parities: Sequence[Parity], config: ExportConfig, random_init: bool = False) -> list[str]:
    """The verification failures against ``config``'s tolerances, as sentences (empty: passed)."""
    precision = config.precision
    fp32_rtol, fp16_rtol = config.fp32_rtol, config.fp16_rtol
    min_agreement, random_init_rtol = config.lowp_min_agreement, config.lowp_random_init_rtol
    failures = []
    for p in parities:
        if not math.isfinite(p.rel_diff):
            failures.append(f"{p.what}: onnxruntime returned non-finite logits")
        elif precision == "fp32":
            if p.rel_diff > fp32_rtol:
                failures.append(f"{p.what}: max|diff|/scale {p.rel_diff:.2e} > {fp32_rtol:.0e}")
            if p.agreement < 1.0:
                failures.append(f"{p.what}: top-1 agreement {100 * p.agreement:.2f}% < 100%")
        elif p.what == "val" and random_init:
            if p.rel_diff > random_init_rtol:
                failures.append(f"val: {precision} max|diff|/scale {p.rel_diff:.2e} > {random_init_rtol} "
                                "(random-init weights: top-1 is not checked)")
        elif p.what == "val":
            if p.agreement < min_agreement:
                failures.append(f"val: {precision} top-1 agreement {100 * p.agreement:.2f}% "
                                f"< {100 * min_agreement:.0f}%")
        elif precision == "fp16" and p.rel_diff > fp16_rtol:
            failures.append(f"{p.what}: fp16 max|diff|/scale {p.rel_diff:.2e} > {fp16_rtol:.0e}")
    return failures


def median_latency_ms(session: Any, input_size: Sequence[int], runs: int) -> float | None:
    if runs <= 0:
        return None
    x = np.random.default_rng(1).standard_normal((1, *input_size), dtype=np.float32)
    for _ in range(3):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))



# What the audit counts, by op type in the graph onnxruntime runs (domains ai.onnx,
# com.microsoft and com.microsoft.nchwc). A conv or matmul is "integer" when its kernel reads
# 8-bit tensors; "float" when it reads float (fp32 or fp16) ones.
INTEGER_OPS = {
    "QLinearConv": "conv", "ConvInteger": "conv", "NhwcQLinearConv": "conv",
    "QLinearMatMul": "matmul", "MatMulInteger": "matmul", "QGemm": "matmul", "MatMulIntegerToFloat": "matmul",
    "DynamicQuantizeMatMul": "matmul", "QAttention": "matmul",
}
FLOAT_OPS = {
    "Conv": "conv", "FusedConv": "conv", "NhwcFusedConv": "conv", "ConvTranspose": "conv",
    "MatMul": "matmul", "Gemm": "matmul", "FusedMatMul": "matmul", "FusedGemm": "matmul",
}
QUANTIZE_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")
DEQUANTIZE_OPS = ("DequantizeLinear",)


@dataclass(frozen=True)
class GraphAudit:
    """Which convs and matmuls onnxruntime runs as integer ops after its graph optimisations."""

    integer_convs: int
    float_convs: int
    integer_matmuls: int  # MatMul and Gemm (the classifier) together
    float_matmuls: int
    quantize: int  # QuantizeLinear nodes left (a float -> uint8 edge at run time)
    dequantize: int
    ops: dict[str, int]  # every op type in the optimised graph, with its count
    # the integer convs and matmuls, as onnxruntime names them: after the node each replaced
    # (``<name>`` or ``<name>_token_<n>``), which :func:`kept_float_disagreement` traces back
    integer_nodes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def describe(self) -> str:
        return (f"convs {self.integer_convs} integer / {self.float_convs} float, matmul/gemm "
                f"{self.integer_matmuls} integer / {self.float_matmuls} float; QuantizeLinear {self.quantize}, "
                f"DequantizeLinear {self.dequantize}")


def audit_graph(model: Any) -> GraphAudit:
    """:class:`GraphAudit` of an (optimised) onnx.ModelProto."""
    from collections import Counter

    ops = Counter(n.op_type for n in model.graph.node)
    count = {(kind, table): 0 for kind in ("conv", "matmul") for table in ("int", "float")}
    for op, n in ops.items():
        if op in INTEGER_OPS:
            count[INTEGER_OPS[op], "int"] += n
        elif op in FLOAT_OPS:
            count[FLOAT_OPS[op], "float"] += n
    return GraphAudit(integer_convs=count["conv", "int"], float_convs=count["conv", "float"],
                      integer_matmuls=count["matmul", "int"], float_matmuls=count["matmul", "float"],
                      quantize=sum(ops[o] for o in QUANTIZE_OPS), dequantize=sum(ops[o] for o in DEQUANTIZE_OPS),
                      ops=dict(sorted(ops.items())),
                      integer_nodes=tuple(n.name for n in model.graph.node if n.op_type in INTEGER_OPS))


def kept_float_disagreement(audit: GraphAudit, model: Any, excluded: Sequence[str]) -> str | None:
    """Where ``audit`` (of the graph onnxruntime runs for the quantized ``model``) contradicts
    ``excluded``, the nodes recorded as kept fp32, as one sentence naming them; None if it agrees.

    Each integer op is traced back to the longest name of one of ``model``'s convs and matmuls its
    own name starts with. Counts back that up where a name does not trace: the optimised graph
    cannot hold more integer convs and matmuls than ``model`` has such nodes left to quantize.
    """
    candidates = [n.name for n in model.graph.node if n.op_type in FLOAT_OPS or n.op_type in INTEGER_OPS]
    traced = set()
    for name in audit.integer_nodes:
        sources = [c for c in candidates if c and name.startswith(c)]
        if sources:
            traced.add(max(sources, key=len))
    kept = set(excluded)
    named = [c for c in candidates if c in traced and c in kept]
    if named:
        return (f"onnxruntime runs {len(named)} node(s) recorded as kept fp32 as integer ops after its graph "
                f"optimisations: {', '.join(named)}")
    quantizable = sum(1 for c in candidates if c not in kept)
    integer = audit.integer_convs + audit.integer_matmuls
    if integer > quantizable:
        return (f"onnxruntime runs {integer} convs/matmuls as integer ops after its graph optimisations, but only "
                f"{quantizable} are not recorded as kept fp32")
    return None


def optimized_graph_audit(path: str, threads: int = 0) -> GraphAudit:
    """Audit the graph onnxruntime's CPU provider runs for the model at ``path``: the session
    writes its optimised graph (``optimized_model_filepath``, all optimisation levels), which is
    read back and counted."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="export-audit-") as work:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(work, "optimized.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return audit_graph(onnx.load(options.optimized_model_filepath))
