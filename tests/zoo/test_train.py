import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from zoo.checkpoint import load_checkpoint, model_from_checkpoint
from zoo.train import main

FAST = ["--data", "synthetic", "--batch-size", "32", "--no-progress", "--seed", "3"]


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_train_writes_checkpoints_metrics_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--model", "densenet_mini", "--norm", "gn", "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2  train_loss" in printed and "val_top1" in printed
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"epoch", "train_loss", "val_loss", "val_acc", "lr"} <= rows[0].keys()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model_name"] == "densenet_mini" and ckpt["model_args"]["norm"] == "gn"
    assert ckpt["classes"] == ["pattern0", "pattern1", "pattern2", "pattern3"] and ckpt["input_size"] == [3, 32, 32]
    assert len(ckpt["mean"]) == len(ckpt["std"]) == 3 and ckpt["data"] == "synthetic"
    assert ckpt["epoch"] == 2 and ckpt["config"]["optimizer"] == "adam"
    assert {"optimizer", "scheduler", "rng"} <= ckpt.keys()
    # the checkpoint rebuilds its model without the training code and reproduces val_acc
    model = model_from_checkpoint(ckpt).eval()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_continues_exactly(tmp_path):
    """2 epochs + resume to 4 gives the same weights as 4 straight (CPU, fixed seed)."""
    common = FAST + ["--optimizer", "momentum", "--schedule", "none"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--epochs", "4", "--out", str(straight)]) == 0
    assert main(common + ["--epochs", "2", "--out", str(split)]) == 0
    assert main(["--resume", str(split / "last.pt"), "--epochs", "4", "--out", str(split), "--no-progress"]) == 0
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_resume_of_a_finished_run_and_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    assert main(["--resume", str(out / "last.pt"), "--epochs", "1", "--out", str(out)]) == 2
    assert "already finished epoch 1; pass --epochs larger than 1" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "last.pt").read_bytes()[:1000])
    assert main(["--resume", str(bad), "--out", str(out)]) == 2
    assert f"{bad}: corrupt or truncated checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--model", "resnet9", "Unknown model 'resnet9'"),
    ("--optimizer", "lion", "Unknown optimizer 'lion'; choose one of: sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam"),
    ("--norm", "batch", "Unknown norm 'batch'; choose one of: bn, gn, ln, in"),
    ("--data", "folder:/nonexistent/dir", "/nonexistent/dir"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, "-m", "zoo.train", flag, value, "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not os.listdir(tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--epochs", "1", "--out", str(out)]) == 0
    before = _sha(out / "last.pt")
    code = main(FAST + ["--epochs", "1", "--out", str(out), "--optimizer", "sgd", "--lr", "1e30"])
    assert code == 1
    err = capsys.readouterr().err
    assert "at epoch 1, step" in err and "last good checkpoint" in err
    assert _sha(out / "last.pt") == before
    load_checkpoint(out / "last.pt")


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "zoo.train", *FAST, "--epochs", "2", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch 2/2  train_loss") == 1  # only rank 0 reports
    assert "2 process(es)" in proc.stdout
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
