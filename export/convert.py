"""Conversion: PyTorch -> ONNX graph, its checks (onnx.checker, strict shape inference, what
BatchNorm folding left), and the fp16 and int8 versions of a graph."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
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


def to_int8(model: Any, calib: Iterator[np.ndarray], method: str, workdir: str) -> Any:
    """Static QDQ quantization with per-channel int8 weights, calibrated on ``calib`` batches.

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

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    src, pre, dst = (os.path.join(workdir, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(model, src)
    with quiet_loggers("root", "onnxruntime"):
        # Shape inference plus onnxruntime's graph fusions, so QDQ pairs land on the fused graph.
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        head_ops = sorted({n.op_type for n in onnx.load(pre, load_external_data=False).graph.node
                           if OUTPUT_NAME in n.output})
        quantize_static(
            pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            extra_options={"OpTypesToExcludeOutputQuantization": head_ops},
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method])
    quantized = onnx.load(dst)
    onnx.checker.check_model(quantized, full_check=True)
    return quantized
