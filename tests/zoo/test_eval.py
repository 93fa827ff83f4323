"""python -m zoo.eval on a checkpoint and on its ONNX export: the same images, the same answers."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import export.onnx as exp
import torch
from zoo.checkpoint import load_checkpoint
from zoo.eval import compute_metrics, eval_dataset, load_subject, main, run
from zoo.registry import create_model
from zoo.train import main as train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny resnext_mini trained one epoch on a train/ val/ folder of three classes, with EMA,
    and its ONNX export (BatchNorm folded, as served)."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("circle", "square", "stripe")):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (24, 20, 3), dtype=np.uint8)
                pixels[:, :, c] += 120  # the class is the dominant channel: learnable in an epoch
                Image.fromarray(pixels).save(root / "data" / split / name / f"{i}.png")
    run_dir = root / "run"
    assert train(["--data", f"folder:{root / 'data'}", "--input-size", "16", "16", "--batch-size", "8",
                  "--epochs", "1", "--model-ema", "--out", str(run_dir), "--no-progress", "--seed", "1"]) == 0
    assert exp.main(["--checkpoint", str(run_dir / "best.pt"), "--out", str(root / "models"), "--val-samples", "0",
                     "--latency-runs", "0", "--threads", "1", "--no-progress"]) == 0
    onnx = root / "models" / "resnext_mini" / "1" / "model.onnx"
    return dict(root=root, ckpt=str(run_dir / "best.pt"), onnx=str(onnx), data=f"folder:{root / 'data'}")


def test_checkpoint_and_its_onnx_export_agree(trained):
    ckpt, onnx = load_subject(trained["ckpt"]), load_subject(trained["onnx"])
    assert (ckpt.kind, onnx.kind) == ("checkpoint", "onnx") and ckpt.labels == onnx.labels
    # each through its own preprocessing: the checkpoint's settings, the ONNX metadata's
    a, targets, inputs = run(ckpt, eval_dataset(ckpt, trained["data"], "all", 0, 0.2)[0])
    b, targets_b, inputs_b = run(onnx, eval_dataset(onnx, trained["data"], "all", 0, 0.2)[0])
    assert len(targets) == 36 and np.array_equal(targets, targets_b) and np.array_equal(inputs, inputs_b)
    assert np.allclose(a, b, atol=1e-4) and np.array_equal(a.argmax(1), b.argmax(1))


def test_cli_writes_the_same_metrics_for_both(trained, tmp_path, capsys):
    outs = {}
    for kind in ("ckpt", "onnx"):
        outs[kind] = tmp_path / kind
        assert main([trained[kind], "--data", trained["data"], "--out", str(outs[kind])]) == 0
    printed = capsys.readouterr().out
    assert printed.count("top-1 ") == 2
    assert len(re.findall(r"^class +precision +recall +f1 +images$", printed, re.M)) == 2
    ours, served = (json.loads((outs[k] / "metrics.json").read_text()) for k in ("ckpt", "onnx"))
    for key in ("top1", "top5", "per_class", "confusion", "confusion_counts"):
        assert ours[key] == served[key], key  # the same predictions, so the same counts
    assert ours["images"] == 12 and ours["split"] == "val" and ours["weights"] in ("model", "ema")
    assert served["kind"] == "onnx" and served["weights"] == "fp32"
    for value in [ours["top1"], ours["top5"], *(v for row in ours["confusion"] for v in row),
                  *(v[m] for v in ours["per_class"].values() for m in ("precision", "recall", "f1"))]:
        assert 0.0 <= value <= 1.0
    assert all(abs(sum(row) - 1) < 1e-9 for row in ours["confusion"])
    for name in ("confusion.png", "errors.png"):
        assert (outs["ckpt"] / name).read_bytes()[:8] == PNG


def test_checkpoint_weights_are_chosen_with_ema_flags(trained, tmp_path):
    for flag, weights in (("--ema", "ema"), ("--no-ema", "model")):
        assert main([trained["ckpt"], "--out", str(tmp_path / flag), flag]) == 0  # --data: the checkpoint's
        assert json.loads((tmp_path / flag / "metrics.json").read_text())["weights"] == weights
    # and the logits are those of the chosen weights
    ckpt = load_checkpoint(trained["ckpt"])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for ema, key in ((True, "model_ema"), (False, "model")):
        model = create_model(ckpt["model_name"], **ckpt["model_args"]).eval()
        model.load_state_dict(ckpt[key])
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert np.allclose(load_subject(trained["ckpt"], ema=ema).predict(x), expected, atol=1e-6), key


def test_metrics_by_hand():
    logits = np.array([[3.0, 1, 0], [0, 2, 1], [0, 1, 2], [2, 1, 0]])
    m = compute_metrics(logits, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert m["top1"] == 0.5 and m["confusion_counts"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert m["per_class"]["a"] == dict(precision=0.5, recall=1.0, f1=pytest.approx(2 / 3), support=1)
    assert m["per_class"]["b"] == dict(precision=1.0, recall=0.5, f1=pytest.approx(2 / 3), support=2)
    assert m["per_class"]["c"]["precision"] == 0.0 and m["confusion"][1] == [0.0, 0.5, 0.5]
    assert m["top5"] == 1.0  # three classes: the top "5" is all of them
    assert m["most_confused"][0] == dict(true="b", predicted="c", count=1)


@pytest.mark.parametrize("args, message", [
    (["missing.pt"], "missing.pt: no such file"),
    (["{onnx}", "--ema"], "--ema/--no-ema choose a checkpoint's weights"),
    (["{ckpt}", "--data", "digits"], "has other classes than --data digits"),
])
def test_user_errors_are_one_line_exit_2(trained, tmp_path, capsys, args, message):
    args = [a.format(**trained) for a in args] + ["--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_export_takes_the_weights_the_ema_flags_choose(trained, tmp_path, capsys):
    import onnxruntime as ort

    from contract.metadata import read_metadata

    ckpt = load_checkpoint(trained["ckpt"])
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    default = read_metadata(trained["onnx"])
    assert default["weights"] == ckpt["selected"] and default["act"] == "relu"
    for flag, key, weights in (("--ema", "model_ema", "ema"), ("--no-ema", "model", "model")):
        out = tmp_path / flag
        assert exp.main(["--checkpoint", trained["ckpt"], "--out", str(out), flag, "--val-samples", "0",
                         "--latency-runs", "0", "--threads", "1", "--no-progress"]) == 0
        onnx = str(out / "resnext_mini" / "1" / "model.onnx")
        assert read_metadata(onnx)["weights"] == weights
        model = create_model(ckpt["model_name"], **ckpt["model_args"]).eval()
        model.load_state_dict(ckpt[key])
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert np.allclose(got, expected, atol=1e-4), flag
    capsys.readouterr()
    assert exp.main(["resnext_mini", "--ema", "--out", str(tmp_path / "x")]) == 2
    assert "--ema/--no-ema choose a checkpoint's weights" in capsys.readouterr().err
