"""Conversion: PyTorch -> ONNX graph, its checks (onnx.checker, strict shape inference, what
BatchNorm folding left), and the fp16 and int8 versions of a graph."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.metadata import INPUT_NAME, OUTPUT_NAME


def export_model(model: Any, input_size: Sequence[int], opset: int, exporter: str) -> Any:
    """``model`` (eval) -> onnx.ModelProto with a dynamic batch axis named ``batch``."""
    import onnx
    import torch

    dummy = torch.randn(2, *input_size)  # batch 2: an exporter must not specialise the batch to 1
    with warnings.catch_warnings(), quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"):
        warnings.simplefilter("ignore")  # TorchScript deprecation notices and tracer warnings
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(model, (dummy,), buf, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            return onnx.load_from_string(buf.getvalue())
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(model, (dummy,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        return program.model_proto


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def count_ops(model: Any, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def count_batchnorm_with_statistics(model: Any) -> int:
    """BatchNormalization nodes that still normalize: all but the folded scale/shift ones
    (:class:`zoo.nn.ScaleShift`: mean 0, variance 1, epsilon 0), which are a plain affine map."""
    from onnx import numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})

    def is_all(name: str, value: float) -> bool:
        return name in consts and bool((numpy_helper.to_array(consts[name]) == value).all())

    count = 0
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        if not (eps == 0 and is_all(n.input[3], 0.0) and is_all(n.input[4], 1.0)):
            count += 1
    return count


def check_graph(model: Any, input_size: Sequence[int], num_classes: int) -> Any:
    """onnx.checker (full) and strict shape inference; returns the model with inferred shapes."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)

    def dims(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = inferred.graph.input, inferred.graph.output
    expect_in, expect_out = list(input_size), [num_classes]
    if (inp.name != INPUT_NAME or not isinstance(dims(inp)[0], str) or dims(inp)[1:] != expect_in
            or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT):
        raise AssertionError(f"unexpected graph input {inp.name} {dims(inp)}")
    if out.name != OUTPUT_NAME or not isinstance(dims(out)[0], str) or dims(out)[1:] != expect_out:
        raise AssertionError(f"unexpected graph output {out.name} {dims(out)}")
    return inferred


def to_fp16(model: Any) -> Any:
    """fp16 weights and compute, fp32 ``input``/``logits`` (Cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings(), quiet_loggers("onnxruntime"):
        warnings.simplefilter("ignore")  # "the value is out of fp16 range, clamped" for tiny weights
        converted = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the input Casts after the nodes that read them; onnx.checker wants
    # nodes in topological order.
    topological_sort(converted.graph)
    return converted


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise AssertionError(f"graph has a cycle or a dangling input near node {pending[0].name}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    copies = [type(n)() for n in ordered]
    for dst, src in zip(copies, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)


# fp16 on the CPU provider: said once in the export output.
FP16_CPU_NOTE = ("note: onnxruntime's CPU provider has no fast fp16 kernels (it runs most nodes in fp32 with casts "
                 "around them): fp16 buys file size here, not speed; it is the fast path on CUDA (onnxruntime-gpu, "
                 "CUDAExecutionProvider). bf16 is not offered: the CPU provider has no bf16 conv kernels either")

# What x86 runs fastest (onnxruntime's "quantization on x86" notes and its QDQ transformer):
# - uint8 activations with int8 weights (U8S8). The CPU provider turns DequantizeLinear -> Conv ->
#   QuantizeLinear into a real QLinearConv only for uint8 activations; int8 activations are
#   rewritten to uint8 only where a quantized tensor has a single consumer, so every ResNeXt block
#   input and every DenseNet feature map stayed float with a Q/DQ pair around it (slower than fp32).
# - per-channel, symmetric weights (zero point 0: MLAS skips the zero-point correction of the
#   weights), asymmetric activations (uint8 ranges that start at ReLU's 0 lose no level).
# - QDQ rather than QOperator: onnxruntime fuses QDQ into the same QLinearConv/QLinearAdd/QGemm
#   graph the operator format spells out, and a QDQ file also runs on providers (TensorRT, CUDA)
#   that read QDQ but not the com.microsoft QLinear* operators.
INT8_SETTINGS = dict(activations="uint8", weights="int8", per_channel=True, format="QDQ", weight_symmetric=True,
                     activation_symmetric=False)


# auto keeps a class of grouped convs fp32 only when the model ran clearly faster so: a near tie
# stays int8 (a quarter of the weight bytes), and timing noise alone must not flip the choice.
AUTO_FP32_IF_BELOW = 0.95


@dataclass(frozen=True)
class Int8Choice:
    """How an int8 export was quantized, and why (recorded as ``zoo.int8`` and in ``--json``)."""

    exclude: str  # what --int8-exclude asked: "auto", "none" or op types
    excluded: tuple[str, ...]  # nodes kept fp32
    # auto: per grouped-conv class, fastest batch-1 time with those convs fp32 / everything int8,
    # in the same interleaved run ({} where there was nothing to measure)
    measured: dict[str, float] = field(default_factory=dict)
    calib_method: str = "minmax"
    calib_images: int = 0
    scale_shift_convs: int = 0  # folded scale/shift nodes run as int8 depthwise convs

    def as_dict(self) -> dict[str, Any]:
        return dict(INT8_SETTINGS, exclude=self.exclude, excluded=list(self.excluded), measured=dict(self.measured),
                    calib_method=self.calib_method, calib_images=self.calib_images,
                    scale_shift_convs=self.scale_shift_convs)

    def describe(self) -> str:
        kept = f"{len(self.excluded)} node(s) kept fp32" if self.excluded else "no node kept fp32"
        text = f"uint8 activations, int8 per-channel weights, QDQ; --int8-exclude {self.exclude}: {kept}"
        if self.scale_shift_convs:
            text += f"; {self.scale_shift_convs} scale/shift nodes as depthwise convs"
        if self.measured:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in self.measured.items())
            text += f" (measured, model time with them fp32 / all int8: {ratios})"
        return text


def parse_int8_exclude(text: str) -> tuple[str, ...] | str:
    """``"auto"`` / ``"none"`` as they are, otherwise a tuple of ONNX op types; ValueError if malformed."""
    if text in ("auto", "none"):
        return text
    ops = tuple(t.strip() for t in text.split(",") if t.strip())
    if not ops or not all(t.isidentifier() for t in ops):
        raise ValueError(f"Invalid --int8-exclude {text!r}: auto, none or comma-separated ONNX op types "
                         "(e.g. Conv,Gemm)")
    return ops


def grouped_conv_classes(model: Any) -> dict[str, list[str]]:
    """Grouped, non-depthwise convs by input channels per group: ``{"4 ch/group": [node names]}``.

    These are the candidates ``auto`` measures: MLAS runs an int8 conv with group > 1 as a loop of
    one im2col and one small GEMM per group, which for few channels per group can lose to the fp32
    kernels. Depthwise convs (1 channel per group) have their own int8 kernel and are not candidates.
    """
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    classes: dict[int, list[str]] = {}
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        shape = weights.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if group > 1 and shape is not None and shape[1] > 1:
            classes.setdefault(shape[1], []).append(n.name)
    return {f"{k} ch/group": v for k, v in sorted(classes.items())}


def scale_shift_to_depthwise_conv(model: Any) -> int:
    """Rewrite, in place, each folded scale/shift node (BatchNormalization with mean 0, variance 1,
    epsilon 0: :class:`zoo.nn.ScaleShift`) as the same per-channel affine map spelled as a 1x1
    depthwise Conv; returns how many.

    Why, for int8 only: onnxruntime quantizes no BatchNormalization, so each of DenseNet's
    pre-activation scale/shifts (one per layer, reading the concatenated features) would stay a
    float node with a Dequantize/Quantize pair and NHWC<->NCHW transposes around it, between two
    integer convs. As a depthwise conv it runs MLAS's int8 depthwise kernel with its ReLU fused,
    and one int8 weight per channel (per-channel scales) stores each scale exactly.
    """
    import onnx
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:  # the TorchScript exporter spells some of them as Constant and Identity nodes
        if n.op_type == "Constant":
            consts.update({n.output[0]: a.t for a in n.attribute if a.name == "value"})
        elif n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
    rewritten = 0
    nodes = []
    for n in model.graph.node:
        attrs = {a.name: a for a in n.attribute}
        eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        params = [consts.get(i) for i in n.input[1:5]] if n.op_type == "BatchNormalization" else [None]
        if None in params or eps != 0 or len(n.output) != 1:
            nodes.append(n)
            continue
        scale, shift, mean, var = (numpy_helper.to_array(t) for t in params)
        if scale.ndim != 1 or not ((mean == 0).all() and (var == 1).all()):
            nodes.append(n)
            continue
        weight = numpy_helper.from_array(scale.reshape(-1, 1, 1, 1).astype(np.float32), f"{n.name}_dw_weight")
        bias = numpy_helper.from_array(shift.astype(np.float32), f"{n.name}_dw_bias")
        model.graph.initializer.extend([weight, bias])
        nodes.append(helper.make_node("Conv", [n.input[0], weight.name, bias.name], list(n.output),
                                      name=f"{n.name}_dw", group=len(scale), kernel_shape=[1, 1]))
        rewritten += 1
    if rewritten:
        # The BatchNormalization inputs are now unread: drop them (onnxruntime warns about each).
        needed = {o.name for o in model.graph.output}
        live = []
        for n in reversed(nodes):
            if any(o in needed for o in n.output):
                live.append(n)
                needed.update(n.input)
        del model.graph.node[:]
        model.graph.node.extend(reversed(live))
        kept = [t for t in model.graph.initializer if t.name in needed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        onnx.checker.check_model(model)
    return rewritten


# The op types whose float weights onnxruntime's graph optimiser quantizes by itself (see
# :func:`keep_excluded_float`).
REQUANTIZED_BY_ONNXRUNTIME = ("Conv", "ConvTranspose", "Gemm")


def keep_excluded_float(model: Any, excluded: Sequence[str]) -> list[str]:
    """Give each node of ``excluded`` whose op onnxruntime could re-quantize and which reads a
    per-tensor DequantizeLinear its own DequantizeLinear of the same quantized tensor, with the
    same scale and zero point repeated per channel (axis 1); in place, returns those nodes' names.

    Why: onnxruntime's optimiser (its weight/bias quantization pass for QDQ graphs) takes a
    Conv/ConvTranspose/Gemm with float weights whose input comes from a per-tensor
    DequantizeLinear and whose output leads to a QuantizeLinear, quantizes its weights per tensor
    and fuses it into an integer op. The quantizer left such a node float on purpose, but wherever
    quantized tensors surround it (ResNeXt's shortcut conv reads a quantized block output and
    feeds a quantized Add; a grouped conv between two quantized convs) it ran as an integer conv
    anyway, with coarser weights than the export's own. That pass only reads a per-tensor input,
    so a per-channel DequantizeLinear keeps the node float; the values it dequantizes are the same.
    """
    from onnx import helper, numpy_helper

    wanted = set(excluded)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rewritten, nodes = [], []
    for n in model.graph.node:
        dq = producers.get(n.input[0]) if n.name in wanted and n.op_type in REQUANTIZED_BY_ONNXRUNTIME else None
        weight = inits.get(n.input[1]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if weight is None or len(dq.input) < 3 or dq.input[1] not in inits or dq.input[2] not in inits:
            nodes.append(n)
            continue
        scale, zero_point = numpy_helper.to_array(inits[dq.input[1]]), numpy_helper.to_array(inits[dq.input[2]])
        attrs = {a.name: a.i for a in n.attribute if a.type == a.INT}
        if n.op_type == "Conv":
            channels = weight.dims[1] * attrs.get("group", 1)
        elif n.op_type == "ConvTranspose":
            channels = weight.dims[0]
        else:
            channels = weight.dims[1] if attrs.get("transB", 0) else weight.dims[0]
        # A one-channel tensor's scale stays a scalar whatever its shape: left as it is (the
        # export's own check then names the node if onnxruntime still fuses it).
        if scale.size != 1 or channels < 2:
            nodes.append(n)
            continue
        s = numpy_helper.from_array(np.full(channels, scale.item(), scale.dtype), f"{n.name}_input_scale")
        z = numpy_helper.from_array(np.full(channels, zero_point.item(), zero_point.dtype),
                                    f"{n.name}_input_zero_point")
        model.graph.initializer.extend([s, z])
        own = helper.make_node("DequantizeLinear", [dq.input[0], s.name, z.name], [f"{n.name}_input_dequantized"],
                               name=f"{n.name}_input_DequantizeLinear", axis=1)
        n.input[0] = own.output[0]
        nodes.extend([own, n])
        rewritten.append(n.name)
    if rewritten:
        # A shared DequantizeLinear that only excluded nodes read is dead now.
        read = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
        live = [n for n in nodes if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
        del model.graph.node[:]
        model.graph.node.extend(live)
        read = {i for n in live for i in n.input}
        kept = [t for t in model.graph.initializer if t.name in read]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return rewritten


def to_int8(model: Any, calib: Iterator[np.ndarray], method: str, workdir: str, exclude: str = "auto",
            threads: int = 0, timing_rounds: int = 9) -> tuple[Any, Int8Choice]:
    """Static quantization as :data:`INT8_SETTINGS` says, calibrated on ``calib`` batches.

    ``exclude`` (``--int8-exclude``): ``"none"`` quantizes every node onnxruntime can;
    comma-separated op types keep those nodes fp32; ``"auto"`` times, in one interleaved run at
    batch 1 with ``threads``, the all-int8 model against one variant per class of grouped convs
    (:func:`grouped_conv_classes`) kept fp32, and keeps fp32 the classes whose variant ran faster
    by more than :data:`AUTO_FP32_IF_BELOW` says. The nodes it keeps fp32 are checked to run float
    in onnxruntime's optimised graph (:func:`keep_excluded_float` says why they might not);
    VerificationError, naming them, otherwise.

    The node that writes ``logits`` keeps int8 weights but a float output: quantizing its output
    would round the logits themselves to 256 levels of their calibrated range (on a
    digits-trained resnext_mini that alone took the error from ~2% to ~12% of the logit scale).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from export.config import UserError, VerificationError
    from export.verify import kept_float_disagreement, optimized_graph_audit

    try:
        asked = parse_int8_exclude(exclude)
    except ValueError as e:
        raise UserError(str(e)) from None
    batches = list(calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    src, pre, cache = (os.path.join(workdir, f) for f in ("fp32.onnx", "pre.onnx", "calibration.json"))
    model = copy.deepcopy(model)
    scale_shifts = scale_shift_to_depthwise_conv(model)
    onnx.save(model, src)
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]

    def quantize(excluded: Sequence[str], name: str) -> str:
        dst = os.path.join(workdir, name)
        # Calibrated once: the cache holds the tensor ranges, so a variant costs only the rewrite.
        quantize_static(
            pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(excluded),
            extra_options={"OpTypesToExcludeOutputQuantization": head_ops, "WeightSymmetric": True,
                           "ActivationSymmetric": False},
            calibrate_method=calibrate_method, calibration_cache_path=cache)
        if excluded:
            quantized = onnx.load(dst)
            if keep_excluded_float(quantized, excluded):
                onnx.save(quantized, dst)
        return dst

    with quiet_loggers("root", "onnxruntime"):
        # Shape inference plus onnxruntime's graph fusions, so QDQ pairs land on the fused graph.
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        prepared = onnx.load(pre, load_external_data=False)
        graph = prepared.graph
        head_ops = sorted({n.op_type for n in graph.node if OUTPUT_NAME in n.output})
        measured: dict[str, float] = {}
        made: dict[tuple[str, ...], str] = {}  # auto's variants by their excluded nodes, reused when chosen
        if asked == "none":
            excluded: list[str] = []
        elif asked != "auto":
            present = {n.op_type for n in graph.node}
            if set(asked) - present:
                raise UserError(f"--int8-exclude {','.join(sorted(set(asked) - present))}: no such node in the graph "
                                f"(its op types: {', '.join(sorted(present))})")
            excluded = [n.name for n in graph.node if n.op_type in asked]
        else:
            classes = grouped_conv_classes(prepared)
            excluded = []
            if classes:
                variants = {"int8": quantize([], "all.onnx")}
                variants.update({k: quantize(names, f"keep{i}.onnx") for i, (k, names) in enumerate(classes.items())})
                made = {(): variants["int8"], **{tuple(names): variants[k] for k, names in classes.items()}}
                times = _interleaved_fastest_ms(variants, batches[0][:1], threads, timing_rounds)
                measured = {k: round(times[k] / times["int8"], 3) for k in classes}
                chosen = [k for k in classes if measured[k] < AUTO_FP32_IF_BELOW]
                if len(chosen) > 1:
                    # Each class was timed alone; together they put Quantize/Dequantize pairs around
                    # more float convs, so the combination is timed too, against the best single
                    # class and all-int8.
                    best, both = min(chosen, key=lambda k: measured[k]), "+".join(chosen)
                    names = [n for k in chosen for n in classes[k]]
                    made[tuple(names)] = variants[both] = quantize(names, "keep-chosen.onnx")
                    again = _interleaved_fastest_ms({k: variants[k] for k in ("int8", best, both)},
                                                    batches[0][:1], threads, timing_rounds)
                    measured[both] = round(again[both] / again["int8"], 3)
                    chosen = pick_auto(chosen, best, {k: again[k] / again["int8"] for k in (best, both)})
                excluded = [n for k in chosen for n in classes[k]]
        dst = made.get(tuple(excluded)) or quantize(excluded, "int8.onnx")
    quantized = onnx.load(dst)
    onnx.checker.check_model(quantized, full_check=True)
    # What is recorded as kept fp32 must be what onnxruntime runs in float: checked on the graph
    # its optimiser makes, since that (not the quantizer) decides which nodes become integer ops.
    disagreement = kept_float_disagreement(optimized_graph_audit(dst, threads), quantized, excluded)
    if disagreement:
        raise VerificationError(f"--int8-exclude {exclude}: {disagreement}")
    return quantized, Int8Choice(exclude=exclude, excluded=tuple(excluded), measured=measured, calib_method=method,
                                 calib_images=sum(len(b) for b in batches), scale_shift_convs=scale_shifts)


def pick_auto(chosen: list[str], best: str, ratios: dict[str, float]) -> list[str]:
    """What auto keeps fp32 once the classes measured faster fp32 one by one (``chosen``, several)
    were timed together (``ratios``: the best single class's and the combination's time over
    all-int8's, in one run): the faster of the two, none unless it is clearly faster than all-int8."""
    both = "+".join(chosen)
    pick = both if ratios[both] <= ratios[best] else best
    if ratios[pick] >= AUTO_FP32_IF_BELOW:
        return []
    return chosen if pick == both else [best]


def _interleaved_fastest_ms(paths: dict[str, str], x: np.ndarray, threads: int, rounds: int) -> dict[str, float]:
    """Fastest ms of ``session.run`` per model, timed in rounds (A B C A B C ...) so that other load
    on the machine hits every variant alike. The fastest run, not the median: this picks the
    faster kernel, and on a loaded machine the median mostly measures the other load."""
    import time

    from export.verify import ort_session

    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    feeds = {INPUT_NAME: np.ascontiguousarray(x)}
    for s in sessions.values():
        for _ in range(2):
            s.run([OUTPUT_NAME], feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run([OUTPUT_NAME], feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000.0 * min(v) for k, v in times.items()}
