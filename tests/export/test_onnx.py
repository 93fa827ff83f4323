"""python -m export.onnx: fold, export, check, verify, metadata, Triton repository, bad input.

Most tests call ``main(argv)`` in-process (torch is imported once) with ``--threads 1``: on this
shared 2-core machine one thread is several times faster than two competing with other work.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
from datetime import datetime

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

import export.onnx as exp
from export import ExportConfig, VerificationError, export
from export.config import SilentReporter
from export.convert import FP16_CPU_NOTE, count_batchnorm_with_statistics
from export.verify import ort_session
from tests.export.digits import fit_resnext_mini, make_checkpoint, stacked
from contract._proto.inference.model_config_pb2 import DataType, ModelConfig
from contract.metadata import decode_metadata, read_metadata
from tests.conftest import MINI_MODELS, randomize_bn_stats
from zoo.data import build_datasets
from zoo.registry import create_model, get_model_spec

NORMS = ("bn", "gn", "ln", "in")
FAST = ["--threads", "1", "--latency-runs", "2", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- helpers


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = exp.main([*argv, *FAST])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def summary(out: str) -> dict[str, str]:
    """The CLI's summary table as {row name: value}."""
    rows = {}
    for line in out.splitlines():
        key, sep, value = line.partition("  ")
        if sep and key.strip():
            rows[key.strip()] = value.strip()
    return rows


def onnx_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def logits(session, x: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"input": x.astype(np.float32)})[0]


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------- every mini model x norm


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MINI_MODELS)
def test_mini_models_export_and_verify(tmp_path, capsys, name, norm):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, norm=norm).eval()
    randomize_bn_stats(model)
    ckpt = make_checkpoint(tmp_path / "c.pt", model, name, norm=norm)
    code, out, err = run(capsys, name, "--checkpoint", ckpt, "--out", str(tmp_path / "m"), "--val-samples", "16")
    assert code == 0, err
    path = tmp_path / "m" / name / "1" / "model.onnx"
    graph = onnx.load(str(path))
    bn_nodes = [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    meta = read_metadata(path)
    # No node normalizes with statistics; DenseNet's BNs with no conv before them are folded to
    # scale/shift nodes (BatchNormalization with mean 0, variance 1, epsilon 0: one pass in onnxruntime)
    assert count_batchnorm_with_statistics(graph) == 0
    if name.startswith("densenet") and norm == "bn":
        assert len(bn_nodes) > 0 and all(a.f == 0.0 for n in bn_nodes for a in n.attribute if a.name == "epsilon")
    else:
        assert bn_nodes == []
    assert meta["folded"] is (norm == "bn")
    if norm != "bn":  # GN/LN/IN stay as they are: they normalize with each input's own statistics
        assert any(n.op_type == "InstanceNormalization" for n in graph.graph.node)
        assert "nothing to fold" in err
    rows = summary(out)
    assert "parity val (16)" in rows and rows["BatchNormalization nodes"].startswith("0")

    # Dynamic batch: batch 5 and five batches of 1 give the same per-sample logits, and both
    # match the unfolded eager model.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *get_model_spec(name).input_size)
    with torch.no_grad():
        ref = model(x).numpy()
    five = logits(session, x.numpy())
    ones = np.concatenate([logits(session, x[i:i + 1].numpy()) for i in range(5)])
    assert np.abs(five - ones).max() <= 1e-5 * np.abs(ref).max()
    assert rel_diff(five, ref) < 1e-4


# --------------------------------------------------------------------------- a trained model: fp16, int8, Triton


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnext_mini trained ~10 s on digits at 16x16 (~90% val top-1): logits with real margins."""
    size = (3, 16, 16)
    bundle = build_datasets("digits", size)
    x, y = stacked(bundle.train)
    model = fit_resnext_mini(x, y, steps=30)
    root = tmp_path_factory.mktemp("trained")
    path = make_checkpoint(root / "digits.pt", model, "resnext_mini", data="digits", input_size=size,
                           classes=bundle.classes, mean=bundle.mean, std=bundle.std)
    return dict(path=path, model=model, bundle=bundle, root=root)


@pytest.fixture(scope="module")
def trained_fp32(trained):
    out = trained["root"] / "repo"
    assert exp.main(["--checkpoint", trained["path"], "--out", str(out), "--triton", *FAST]) == 0
    return out / "resnext_mini"


def val_agreement(trained, path) -> tuple[float, float, float]:
    """(top-1 agreement with eager fp32, eager accuracy, onnx accuracy) on the whole val split."""
    val = trained["bundle"].val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = np.array([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        ref = trained["model"](x).numpy()
    out = logits(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), x.numpy())
    return float((out.argmax(1) == ref.argmax(1)).mean()), float((ref.argmax(1) == y).mean()), \
        float((out.argmax(1) == y).mean())


def test_trained_fp32_reports_val_accuracy(trained, trained_fp32):
    agree, acc_eager, acc_onnx = val_agreement(trained, trained_fp32 / "1" / "model.onnx")
    assert agree == 1.0 and acc_eager == acc_onnx
    assert acc_eager > 0.7  # the fixture really learned something, so margins mean something


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_low_precision_agrees(trained, trained_fp32, capsys, precision):
    out_dir = trained["root"] / f"repo-{precision}"
    # int8: every node onnxruntime can quantize, the most-rounded form the default's measurement
    # (which keeps some grouped convs fp32 where they run faster) can pick
    extra = ["--int8-exclude", "none"] if precision == "int8" else []
    code, out, err = run(capsys, "--checkpoint", trained["path"], "--out", str(out_dir), "--precision", precision,
                         *extra)
    assert code == 0, err
    path = out_dir / "resnext_mini" / "1" / "model.onnx"
    agree, acc_eager, acc_onnx = val_agreement(trained, path)
    assert agree >= 0.99, (precision, agree)
    assert acc_onnx >= acc_eager - 0.005, (precision, acc_eager, acc_onnx)  # at most half a point lost
    # fp16 is no speed-up on the CPU provider: said once, with where it is one
    assert err.count(FP16_CPU_NOTE) == (precision == "fp16")
    rows = summary(out)
    assert rows["precision"].startswith(precision) and "accuracy fp32 eager" in rows["parity val (359)"]
    assert read_metadata(path)["precision"] == precision
    graph = onnx.load(str(path)).graph
    # fp32 in and out whatever the precision inside
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    init_type = {t.name: t.data_type for t in graph.initializer}
    ratio = os.path.getsize(trained_fp32 / "1" / "model.onnx") / os.path.getsize(path)
    if precision == "int8":
        assert ratio >= 3.0
        dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init_type]
        # int8 weights (per channel), int32 biases
        assert {init_type[n.input[0]] for n in dq} == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}
        assert all(init_type[n.input[1]] == onnx.TensorProto.INT8 for n in graph.node
                   if n.op_type == "Conv" and n.input[1] in init_type) is True
        assert any(n.op_type == "QuantizeLinear" for n in graph.node)
        int8 = read_metadata(path)["int8"]
        assert int8["activations"] == "uint8" and int8["weights"] == "int8"
        # onnxruntime runs every conv as an integer op
        audit = re.match(r"convs (\d+) integer / 0 float", rows["onnxruntime graph"])
        assert audit and int(audit[1]) > 0 and int8["excluded"] == [], rows["onnxruntime graph"]
    else:
        weights = {init_type[n.input[1]] for n in graph.node if n.op_type == "Conv"}
        assert weights == {onnx.TensorProto.FLOAT16} and ratio > 1.8


def test_metadata_round_trip(trained, trained_fp32):
    path = trained_fp32 / "1" / "model.onnx"
    meta = read_metadata(path)
    bundle = trained["bundle"]
    assert meta["model"] == "resnext_mini" and meta["version"] == 1
    assert meta["labels"] == list(bundle.classes)
    assert meta["input_size"] == [3, 16, 16]
    assert meta["mean"] == pytest.approx(list(bundle.mean)) and meta["std"] == pytest.approx(list(bundle.std))
    assert meta["norm"] == "bn" and meta["folded"] is True and meta["precision"] == "fp32"
    import hashlib
    digest = hashlib.sha256(open(trained["path"], "rb").read()).hexdigest()
    assert meta["source"] == f"checkpoint:{os.path.abspath(trained['path'])} sha256:{digest}"
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert meta["data"] == "digits"
    # what a torch-free server sees through onnxruntime alone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert decode_metadata(session.get_modelmeta().custom_metadata_map) == meta
    assert onnx.load(str(path)).model_version == 1
    assert (trained_fp32 / "labels.txt").read_text().splitlines() == list(bundle.classes)


def test_triton_config_parses(trained_fp32):
    """With Triton's own ModelConfig message, so text_format rejects what Triton's parser would."""
    config = text_format.Parse((trained_fp32 / "config.pbtxt").read_text(), ModelConfig())
    assert config.name == "resnext_mini" == trained_fp32.name  # Triton wants the directory's name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size >= 1 and config.HasField("dynamic_batching")
    fp32 = DataType.Value("TYPE_FP32")
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", fp32, [3, 16, 16])  # no batch dim
    assert (out.name, out.data_type, list(out.dims)) == ("logits", fp32, [10])
    assert out.label_filename == "labels.txt" and (trained_fp32 / "labels.txt").is_file()
    with pytest.raises(text_format.ParseError):  # the message really checks: a typo is caught
        text_format.Parse('name: "x"\nmax_batch: 3\n', ModelConfig())


def test_next_free_version(trained, trained_fp32, capsys):
    code, out, err = run(capsys, "--checkpoint", trained["path"], "--out", str(trained_fp32.parent),
                         "--val-samples", "0")
    assert code == 0, err
    assert read_metadata(trained_fp32 / "2" / "model.onnx")["version"] == 2
    code, _, err = run(capsys, "--checkpoint", trained["path"], "--out", str(trained_fp32.parent), "--version", "1")
    assert code == 2 and "already exists" in err


def _snapshot(root) -> dict[str, bytes]:
    return {f: open(os.path.join(root, f), "rb").read() for f in onnx_files(root)}


def test_other_classes_or_input_size_under_an_existing_name_are_refused(tmp_path, capsys):
    """labels.txt and config.pbtxt are shared by every version: an export with other classes or
    another input size must not rewrite them under the versions already there."""
    out_dir = tmp_path / "models"
    fast = ["--out", str(out_dir), "--val-samples", "0", "--latency-runs", "0"]
    for _ in range(2):
        code, _, err = run(capsys, "resnext_mini", "--num-classes", "10", "--triton", *fast)
        assert code == 0, err
    before = _snapshot(out_dir)
    assert (out_dir / "resnext_mini" / "labels.txt").read_text().count("\n") == 10
    # the walkthrough: a 3-class checkpoint (its own input size too) into the 10-class model's directory
    torch.manual_seed(0)
    ckpt = make_checkpoint(tmp_path / "folder.pt", create_model("resnext_mini", num_classes=3), "resnext_mini",
                           data=None, classes=["cat", "dog", "fox"])
    (tmp_path / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(9)) + "ten\n")
    refused = {
        "other classes": (["--checkpoint", ckpt, "--triton"], ["10 classes (class_0, class_1, class_2, ...)",
                                                                 "3 classes (cat, dog, fox)", "the classes differ"]),
        "other input size": (["resnext_mini", "--num-classes", "10", "--input-size", "48", "48"],
                             ["input [3, 32, 32]", "input [3, 48, 48]", "the input size differs"]),
        "same count, other labels": (["resnext_mini", "--labels", str(tmp_path / "labels.txt")],
                                     ["label 9 is 'class_9' there, 'ten' here"]),
    }
    for case, (argv, messages) in refused.items():
        code, out, err = run(capsys, *argv, *fast)
        assert code == 2, (case, err)
        (line,) = err.strip().splitlines()
        assert line.startswith("python -m export.onnx: error: "), line
        assert f"{out_dir / 'resnext_mini'} already holds versions 1, 2 with" in line, line
        assert "--name" in line and "--out" in line, line
        assert all(m in line for m in messages), (case, line)
        assert _snapshot(out_dir) == before, case  # nothing written, nothing rewritten
    # the same classes and input size: a new version, as before
    code, _, err = run(capsys, "resnext_mini", "--num-classes", "10", "--triton", *fast)
    assert code == 0, err
    assert read_metadata(out_dir / "resnext_mini" / "3" / "model.onnx")["version"] == 3
    # ... and the refused export goes where it was pointed to
    code, _, err = run(capsys, "--checkpoint", ckpt, "--name", "folder", "--triton", *fast)
    assert code == 0, err
    assert (out_dir / "folder" / "labels.txt").read_text() == "cat\ndog\nfox\n"
    assert (out_dir / "resnext_mini" / "labels.txt").read_bytes() == before["resnext_mini/labels.txt"]
    assert (out_dir / "resnext_mini" / "config.pbtxt").read_bytes() == before["resnext_mini/config.pbtxt"]


# --------------------------------------------------------------------------- torchvision layout, no-fold, dynamo


def test_torchvision_state_dict(tmp_path, capsys):
    model = randomize_bn_stats(create_model("densenet_mini", num_classes=7)).eval()
    # torchvision's published DenseNet files use the old "norm.1" names; both layouts must load
    state = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "tv.pth")
    code, out, err = run(capsys, "densenet_mini", "--torchvision-weights", str(tmp_path / "tv.pth"),
                         "--out", str(tmp_path / "m"))
    assert code == 0, err
    path = tmp_path / "m" / "densenet_mini" / "1" / "model.onnx"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_diff(logits(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), x.numpy()), ref) < 1e-4
    meta = read_metadata(path)
    assert meta["source"].startswith("torchvision:") and len(meta["labels"]) == 7
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_no_fold_keeps_densenet_preactivation_bn(tmp_path, capsys):
    # The exporter folds Conv->BN by itself, but DenseNet's BN->ReLU->Conv norms stay as
    # BatchNormalization nodes unless zoo folds them (BENCHMARKING.md, "Traps").
    code, out, err = run(capsys, "densenet_mini", "--no-fold", "--out", str(tmp_path / "m"), "--num-classes", "5",
                         "--input-size", "24", "40")
    assert code == 0, err
    path = tmp_path / "m" / "densenet_mini" / "1" / "model.onnx"
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) > 0
    meta = read_metadata(path)
    assert meta["folded"] is False and meta["input_size"] == [3, 24, 40]
    assert "RANDOM initialisation" in err


def test_dynamo_exporter(tmp_path, capsys):
    code, out, err = run(capsys, "resnext_mini", "--exporter", "dynamo", "--out", str(tmp_path / "m"),
                         "--num-classes", "3", "--norm", "gn")
    assert code == 0, err
    assert summary(out)["opset / exporter"] == "18 / dynamo"


@pytest.mark.slow
def test_resnext50_full_size(tmp_path, capsys):
    code, out, err = run(capsys, "resnext50", "--out", str(tmp_path / "m"))
    assert code == 0, err
    path = tmp_path / "m" / "resnext50_32x4d" / "1" / "model.onnx"
    assert path.is_file() and read_metadata(path)["labels"][999] == "class_999"
    rows = summary(out)
    assert rows["parameters"] == "25,028,904" and rows["BatchNormalization nodes"] == "0 (folded 53 BatchNorm2d)"


# --------------------------------------------------------------------------- bad input and failed verification


@pytest.fixture(scope="module")
def densenet_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    model = create_model("densenet_mini", num_classes=4)
    path = make_checkpoint(root / "dense.pt", model, "densenet_mini")
    (root / "corrupt.pt").write_bytes(open(path, "rb").read()[:5000])
    torch.save(create_model("resnext_mini", num_classes=4).state_dict(), root / "resnext_tv.pth")
    return root


BAD = {
    "unknown model": (["resnext5000"], "Unknown model 'resnext5000'"),
    "missing checkpoint": (["resnext_mini", "--checkpoint", "{root}/nope.pt"], "no such checkpoint file"),
    "corrupt checkpoint": (["resnext_mini", "--checkpoint", "{root}/corrupt.pt"], "corrupt or truncated"),
    "other architecture": (["resnext_mini", "--checkpoint", "{root}/dense.pt"],
                           "holds a densenet_mini checkpoint, not resnext_mini"),
    "torchvision mismatch": (["densenet_mini", "--torchvision-weights", "{root}/resnext_tv.pth"],
                             "does not fit densenet_mini"),
    "zoo checkpoint as torchvision weights": (["densenet_mini", "--torchvision-weights", "{root}/dense.pt"],
                                              "{root}/dense.pt is a zoo training checkpoint, not a torchvision "
                                              "state_dict: pass it as --checkpoint"),
    "int8 without data": (["resnext_mini", "--precision", "int8"], "needs calibration images"),
    "unknown data": (["resnext_mini", "--calib-data", "imagenet"], "Unknown data 'imagenet'"),
    "bad opset": (["resnext_mini", "--opset", "5"], "Invalid --opset 5"),
    "int8 exclusion without int8": (["resnext_mini", "--int8-exclude", "none"],
                                    "--int8-exclude applies to --precision int8 only"),
    "malformed int8 exclusion": (["resnext_mini", "--precision", "int8", "--calib-data", "digits",
                                  "--int8-exclude", "Conv;Gemm"], "Invalid --int8-exclude 'Conv;Gemm'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(densenet_ckpt, tmp_path, capsys, case):
    argv, message = BAD[case]
    out_dir = tmp_path / "m"
    code, out, err = run(capsys, *[a.format(root=densenet_ckpt) for a in argv], "--out", str(out_dir))
    assert code == 2
    assert message.format(root=densenet_ckpt) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists()


def test_bad_input_from_the_shell(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export.onnx", "resnext5000", "--out", str(tmp_path / "m")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("python -m export.onnx: error: Unknown model 'resnext5000'")
    assert not (tmp_path / "m").exists()


class _CorruptSession:
    """An onnxruntime session whose logits are off by 1% of their scale."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        (y,) = self.session.run(names, feeds)
        return [y + 0.01 * np.abs(y).max()]


def test_failed_verification_leaves_no_model(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "m"
    code, _, err = run(capsys, "resnext_mini", "--out", str(out_dir), "--num-classes", "4")
    assert code == 0, err
    before = onnx_files(out_dir)
    # the CLI's own config, with the one collaborator a test may swap: the session factory
    real = exp.export
    corrupt = lambda path, threads: _CorruptSession(ort_session(path, threads))  # noqa: E731
    monkeypatch.setattr(exp, "export", lambda config: real(dataclasses.replace(config, session_factory=corrupt)))
    code, out, err = run(capsys, "resnext_mini", "--out", str(out_dir), "--num-classes", "4", "--triton")
    assert code == 1
    assert "verification failed" in err and "max|diff|/scale" in err and "VERIFICATION FAILED" in out
    assert onnx_files(out_dir) == before  # no version 2, no temp file, no config.pbtxt
    assert not (out_dir / "resnext_mini" / "2").exists()


class _OffByRounding:
    """An onnxruntime session whose logits are off by a millionth of their scale: within every
    real tolerance, over a zero one."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        (y,) = self.session.run(names, feeds)
        return [y + 1e-6 * np.abs(y).max()]


def test_failed_verification_in_empty_repo_writes_nothing(tmp_path):
    config = ExportConfig(model="resnext_mini", out=str(tmp_path / "m"), num_classes=4, threads=1, latency_runs=0,
                          progress_bars=False, reporter=SilentReporter(), fp32_rtol=0.0,
                          session_factory=lambda path, threads: _OffByRounding(ort_session(path, threads)))
    with pytest.raises(VerificationError, match=r"max\|diff\|/scale \S+ > 0e\+00"):
        export(config)
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- files and output


def test_files_are_readable_by_others_as_the_umask_says(tmp_path, capsys):
    """A Triton server running as another user must read model.onnx: its mode is 0o666 less the
    umask, like every other file the export writes, not a temporary file's owner-only 0o600."""
    previous = os.umask(0o027)
    try:
        code, _, err = run(capsys, "resnext_mini", "--out", str(tmp_path / "m"), "--num-classes", "3", "--triton")
    finally:
        os.umask(previous)
    assert code == 0, err
    model_dir = tmp_path / "m" / "resnext_mini"
    for path in (model_dir / "1" / "model.onnx", model_dir / "labels.txt", model_dir / "config.pbtxt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))
    assert os.listdir(model_dir / "1") == ["model.onnx"]


def test_each_step_is_reported_once(tmp_path, capsys):
    code, out, err = run(capsys, "resnext_mini", "--out", str(tmp_path / "m"), "--num-classes", "3",
                         "--precision", "fp16")
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert len(steps) == 9, err
    for i, line in enumerate(steps, 1):
        # "[3/9] export (torchscript, opset 17, dynamic batch) 1.2s": numbered once, with its duration
        assert re.match(rf"\[{i}/9\] \w.* \d+\.\ds(: .+)?$", line) and " ..." not in line, line
    assert "written" in summary(out)
