"""int8 exports: what onnxruntime runs as integer ops after its graph optimisations (the audit),
the per-node fp32 fallback, and the choices recorded in the metadata and the result.

No timing is asserted: ``--int8-exclude auto`` measures, so its choice may differ from run to run;
what must hold whatever it chose is that exactly the nodes it kept fp32 run as float.
"""
from __future__ import annotations

import json
import math

import onnx
import pytest
import torch

import export.convert as convert
import export.onnx as exp
from contract.metadata import read_metadata
from export import ExportConfig, UserError, export
from export.config import SilentReporter
from export.convert import AUTO_FP32_IF_BELOW, export_model, grouped_conv_classes, pick_auto
from export.verify import GraphAudit, kept_float_disagreement
from tests.export.digits import fit_resnext_mini, make_checkpoint, stacked
from zoo.data import build_datasets
from zoo.nn import fold_batchnorm
from zoo.registry import create_model


def int8_export(tmp_path, name: str, exclude: str, checkpoint: str | None = None):
    config = ExportConfig(model=None if checkpoint else name, checkpoint=checkpoint, out=str(tmp_path / "m"),
                          precision="int8", int8_exclude=exclude, calib_data="digits", calib_samples=32,
                          val_samples=64, latency_runs=0, threads=1, progress_bars=False, reporter=SilentReporter())
    return export(config)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> str:
    """resnext_mini fitted a few seconds on digits at 16x16. Trained weights matter here: with
    random-init ones (folded biases all zero, one shared initializer) onnxruntime happened to leave
    the grouped convs alone, so only a trained model shows what it does to them."""
    size = (3, 16, 16)
    bundle = build_datasets("digits", size)
    x, y = stacked(bundle.train)
    model = fit_resnext_mini(x, y, steps=60)
    path = tmp_path_factory.mktemp("int8") / "digits.pt"
    return make_checkpoint(path, model, "resnext_mini", data="digits", input_size=size, classes=bundle.classes,
                           mean=bundle.mean, std=bundle.std)


def convs_in_model(name: str) -> tuple[int, int]:
    """(convs, folded scale/shift modules) of the model as it is exported: each scale/shift runs as
    a depthwise conv in an int8 export."""
    folded = fold_batchnorm(create_model(name).eval())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in folded.modules())
    scale_shifts = sum(type(m).__name__ == "ScaleShift" for m in folded.modules())
    return convs, scale_shifts


@pytest.mark.parametrize("name", ["resnext_mini", "densenet_mini"])
def test_every_conv_runs_as_an_integer_op(tmp_path, name):
    result = int8_export(tmp_path, name, "none")
    convs, scale_shifts = convs_in_model(name)
    audit = result.audit
    assert result.int8.excluded == () and result.int8.scale_shift_convs == scale_shifts
    assert (name == "densenet_mini") == (scale_shifts > 0)
    # uint8 activations: every conv (DenseNet's scale/shifts included) and the classifier are
    # integer kernels, chained without a float tensor between them: the input's QuantizeLinear is
    # the only conversion left, and the classifier writes float logits itself.
    assert (audit.integer_convs, audit.float_convs) == (convs + scale_shifts, 0), audit
    assert (audit.integer_matmuls, audit.float_matmuls) == (1, 0), audit
    assert (audit.quantize, audit.dequantize) == (1, 0), audit
    assert audit.ops["QLinearConv"] == convs + scale_shifts
    assert "BatchNormalization" not in audit.ops
    assert f"convs {convs + scale_shifts} integer / 0 float" in result.summary

    recorded = read_metadata(result.path)["int8"]
    assert recorded == result.int8.as_dict() == json.loads(json.dumps(result.to_json()))["int8"]
    assert (recorded["activations"], recorded["weights"], recorded["per_channel"], recorded["format"]) == \
        ("uint8", "int8", True, "QDQ")
    # and the file says so itself: uint8 activation zero points, int8 weights
    graph = onnx.load(result.path).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    q_zero_points = {inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert q_zero_points == {onnx.TensorProto.UINT8}


def test_excluded_op_types_stay_float(tmp_path):
    result = int8_export(tmp_path, "resnext_mini", "Gemm")
    convs, _ = convs_in_model("resnext_mini")
    audit = result.audit
    assert len(result.int8.excluded) == 1 and read_metadata(result.path)["int8"]["exclude"] == "Gemm"
    assert (audit.integer_matmuls, audit.float_matmuls) == (0, 1), audit
    assert (audit.integer_convs, audit.float_convs) == (convs, 0), audit
    assert audit.dequantize >= 1  # the classifier reads a dequantized (float) tensor


def test_excluded_convs_run_float_even_between_quantized_tensors(tmp_path):
    """Every conv kept fp32, the shortcut convs of the second and third stage included: each
    reads a quantized block output and feeds a quantized Add, which is where onnxruntime's own
    optimiser used to quantize their weights and run them as integer convs."""
    result = int8_export(tmp_path, "resnext_mini", "Conv")
    convs, _ = convs_in_model("resnext_mini")
    audit = result.audit
    assert len(result.int8.excluded) == convs
    assert "/layer2/layer2.0/downsample/downsample.0/Conv" in result.int8.excluded
    assert (audit.integer_convs, audit.float_convs) == (0, convs), audit
    assert (audit.integer_matmuls, audit.float_matmuls) == (1, 0), audit
    assert f"convs 0 integer / {convs} float" in result.summary


def test_auto_choices_run_float_in_a_trained_model(tmp_path, digits_checkpoint, monkeypatch):
    """auto's per-node choice, made deterministic: a threshold every measured ratio lies under keeps
    every grouped conv fp32, and exactly those run float; each sits between two quantized convs."""
    monkeypatch.setattr(convert, "AUTO_FP32_IF_BELOW", math.inf)
    # and of the classes timed together or the best alone, the combination
    monkeypatch.setattr(convert, "pick_auto", lambda chosen, best, ratios: chosen)
    result = int8_export(tmp_path, "resnext_mini", "auto", checkpoint=digits_checkpoint)
    convs, _ = convs_in_model("resnext_mini")
    grouped = [m for m in create_model("resnext_mini").modules()
               if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels]
    excluded, audit = result.int8.excluded, result.audit
    assert len(excluded) == len(grouped) > 0 and all(n.endswith("/conv2/Conv") for n in excluded)
    assert (audit.integer_convs, audit.float_convs) == (convs - len(excluded), len(excluded)), audit
    assert not [n for n in audit.integer_nodes if any(n.startswith(e) for e in excluded)], audit.integer_nodes


def test_export_refuses_a_kept_node_that_runs_as_an_integer_op(tmp_path, capsys, monkeypatch):
    """Without the rewrite that keeps excluded nodes float, onnxruntime (the version this project
    pins) runs the two inner shortcut convs as integer convs: the export must say so in one line,
    naming them, and write nothing, rather than record them as fp32."""
    monkeypatch.setattr(convert, "keep_excluded_float", lambda model, excluded: [])
    code = exp.main(["resnext_mini", "--precision", "int8", "--calib-data", "digits", "--calib-samples", "16",
                     "--val-samples", "32", "--int8-exclude", "Conv", "--out", str(tmp_path / "m"), "--threads", "1",
                     "--latency-runs", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not (tmp_path / "m").exists()
    assert err[-1] == ("python -m export.onnx: verification failed: --int8-exclude Conv: onnxruntime runs 2 node(s) "
                       "recorded as kept fp32 as integer ops after its graph optimisations: "
                       "/layer2/layer2.0/downsample/downsample.0/Conv, /layer3/layer3.0/downsample/downsample.0/Conv")
    assert "Traceback" not in "\n".join(err)


def test_kept_float_disagreement_traces_integer_ops_to_their_nodes():
    """onnxruntime names a fused op after the node it replaced plus a suffix: ``Conv_12_token_4``
    comes from ``Conv_12``, not from ``Conv_1``; an op whose name traces to no node still counts."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    model = export_model(net.eval(), (3, 16, 16), 17, "torchscript")
    for node, name in zip([n for n in model.graph.node if n.op_type == "Conv"], ["Conv_1", "Conv_12"]):
        node.name = name

    def audit(*integer_nodes: str) -> GraphAudit:
        return GraphAudit(integer_convs=len(integer_nodes), float_convs=2 - len(integer_nodes), integer_matmuls=0,
                          float_matmuls=0, quantize=1, dequantize=1, ops={}, integer_nodes=integer_nodes)

    assert kept_float_disagreement(audit("Conv_12_token_4"), model, ["Conv_1"]) is None
    assert kept_float_disagreement(audit("Conv_1_token_5"), model, ["Conv_1"]) == (
        "onnxruntime runs 1 node(s) recorded as kept fp32 as integer ops after its graph optimisations: Conv_1")
    assert kept_float_disagreement(audit("Conv_12_token_4", "QLinearConv_token_9"), model, ["Conv_1"]) == (
        "onnxruntime runs 2 convs/matmuls as integer ops after its graph optimisations, but only 1 are not "
        "recorded as kept fp32")


def test_auto_keeps_fp32_exactly_the_grouped_convs_it_measured_slower(tmp_path):
    result = int8_export(tmp_path, "resnext_mini", "auto")
    convs, _ = convs_in_model("resnext_mini")
    choice, audit = result.int8, result.audit
    model = create_model("resnext_mini").eval()
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels]
    # one class per channels-per-group count, every grouped conv in one, each measured once; when
    # several were faster fp32, their combination was measured too
    per_class = {f"{m.in_channels // m.groups} ch/group" for m in grouped}
    faster_fp32 = [k for k in sorted(per_class, key=lambda k: int(k.split()[0]))
                   if choice.measured[k] < AUTO_FP32_IF_BELOW]
    together = {"+".join(faster_fp32)} if len(faster_fp32) > 1 else set()
    assert set(choice.measured) == per_class | together and all(r > 0 for r in choice.measured.values())
    # what it kept fp32: every conv of those classes, or of the best one alone, or none
    size = {k: sum(f"{m.in_channels // m.groups} ch/group" == k for m in grouped) for k in per_class}
    allowed = {sum(size[k] for k in faster_fp32)} | ({size[k] for k in faster_fp32} | {0} if together else set())
    assert len(choice.excluded) in allowed, (choice.measured, choice.excluded)
    assert (audit.integer_convs, audit.float_convs) == (convs - len(choice.excluded), len(choice.excluded)), audit
    assert (audit.integer_matmuls, audit.float_matmuls) == (1, 0)


def test_auto_keeps_the_combination_only_when_it_beats_the_best_class_alone():
    chosen = ["8 ch/group", "16 ch/group"]
    both = "8 ch/group+16 ch/group"
    assert pick_auto(chosen, "8 ch/group", {"8 ch/group": 0.90, both: 0.85}) == chosen
    assert pick_auto(chosen, "8 ch/group", {"8 ch/group": 0.90, both: 1.02}) == ["8 ch/group"]
    # timed again beside all-int8, neither is clearly faster any more: all int8
    assert pick_auto(chosen, "8 ch/group", {"8 ch/group": 0.97, both: 0.99}) == []


def test_grouped_conv_classes_leave_out_dense_and_depthwise_convs():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(32, 32, 3, groups=8),
                              torch.nn.Conv2d(32, 32, 3, groups=32), torch.nn.Conv2d(32, 32, 1, groups=8))
    classes = grouped_conv_classes(export_model(net.eval(), (3, 16, 16), 17, "torchscript"))
    assert list(classes) == ["4 ch/group"] and len(classes["4 ch/group"]) == 2


def test_unknown_exclusion_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="--int8-exclude LSTM: no such node in the graph"):
        int8_export(tmp_path, "resnext_mini", "LSTM")
    assert not (tmp_path / "m").exists()


def test_cli_json_carries_the_audit(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = exp.main(["resnext_mini", "--precision", "int8", "--calib-data", "digits", "--calib-samples", "16",
                     "--val-samples", "32", "--int8-exclude", "none", "--out", str(tmp_path / "m"), "--json",
                     str(out), "--threads", "1", "--latency-runs", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(out.read_text())
    assert data["precision"] == "int8" and data["audit"]["float_convs"] == 0 and data["int8"]["exclude"] == "none"
    assert data["path"] == str(tmp_path / "m" / "resnext_mini" / "1" / "model.onnx")
    rows = dict(line.split("  ", 1) for line in captured.out.splitlines() if "  " in line)
    assert rows["onnxruntime graph"].strip().startswith(f"convs {data['audit']['integer_convs']} integer / 0 float")
    assert "uint8 activations, int8 per-channel weights, QDQ" in rows["int8"]


def test_attention_convs_run_as_integer_ops_and_the_gates_stay_float(tmp_path):
    """seresnext_mini: the SE block's 1x1 convs quantize like every other conv; its Sigmoid and Mul
    gate run in float between a Dequantize and a Quantize (onnxruntime's CPU provider has no
    integer Mul; the README says so)."""
    result = int8_export(tmp_path, "seresnext_mini", "none")
    convs, scale_shifts = convs_in_model("seresnext_mini")
    ses = sum(type(m).__name__ == "SqueezeExcite" for m in create_model("seresnext_mini").modules())
    audit = result.audit
    assert ses > 0 and (audit.integer_convs, audit.float_convs) == (convs + scale_shifts, 0), audit
    assert audit.ops.get("Sigmoid", 0) + audit.ops.get("QLinearSigmoid", 0) == ses, audit.ops
    assert audit.dequantize >= ses and audit.quantize > 1, audit
