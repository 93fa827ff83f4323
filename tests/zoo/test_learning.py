"""Training end to end, through ``python -m zoo.train``'s ``main``: a short digits run learns,
its ``best.pt`` scores the accuracy the run logged, and the runtime flags (``--amp``,
``--channels-last``, ``--workers``) keep that true and resume exactly."""
import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

from zoo.checkpoint import load_checkpoint, model_from_checkpoint
from zoo.data import build_datasets
from zoo.train import main

# resnext_mini with adam (the defaults) on digits at a quarter of its input side: two epochs
# reach far above BAR, so only a run that stopped learning falls below it.
DIGITS = ["--data", "digits", "--input-size", "16", "16", "--epochs", "2", "--device", "cpu", "--no-progress"]
# Half-way between chance on ten classes and what DIGITS reaches.
BAR = 0.5
# Cross-entropy of a uniform guess over ten classes: a model that learned nothing sits near it.
CHANCE_LOSS = math.log(10)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _val_correct(ckpt):
    """(images right, images) of the checkpoint's model, rebuilt without the training code, on
    the val split its config names, normalised with the mean/std it carries for export."""
    config = ckpt["config"]
    data = build_datasets(config["data"], tuple(ckpt["input_size"]), seed=config["seed"],
                          val_fraction=config["val_fraction"])
    assert list(data.mean) == ckpt["mean"] and list(data.std) == ckpt["std"]
    model = model_from_checkpoint(ckpt).eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(data.val, batch_size=256):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct, len(data.val)


def _assert_learned(out):
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[1] < losses[0] and losses[1] < CHANCE_LOSS / 2, losses
    best = max(r["val_acc"] for r in rows)
    assert best > BAR, rows
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["best_metric"] == best
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    assert main(DIGITS + ["--out", str(out)]) == 0
    return out


def test_a_short_digits_run_learns_and_best_pt_scores_what_it_logged(fp32_run):
    ckpt = _assert_learned(fp32_run)
    correct, total = _val_correct(ckpt)
    # The same images through the same float32 arithmetic: the same score, to the last image.
    assert correct / total == ckpt["best_metric"], (correct, total, ckpt["best_metric"])


@pytest.mark.parametrize("flag", ["--amp", "--channels-last"])
def test_amp_and_channels_last_runs_learn_and_reload_as_logged(fp32_run, tmp_path, flag):
    """The flags change how the run computes, not what it learns or saves: float32 weights that
    a plain model loads and that score the logged accuracy."""
    out = tmp_path / "run"
    assert main(DIGITS + [flag, "--out", str(out)]) == 0
    ckpt = _assert_learned(out)
    # Scored in float32 and contiguous, as it is exported: the run's bfloat16 or channels-last
    # arithmetic may flip a borderline image, no more.
    correct, total = _val_correct(ckpt)
    assert abs(correct - ckpt["best_metric"] * total) <= 1, (correct, total, ckpt["best_metric"])
    if flag == "--amp":  # bfloat16 arithmetic took part: not the float32 run's weights
        fp32 = load_checkpoint(fp32_run / "last.pt")["model"]
        mine = load_checkpoint(out / "last.pt")["model"]
        assert any(not torch.equal(fp32[k], mine[k]) for k in fp32 if fp32[k].is_floating_point())


def test_resume_with_dataloader_workers_equals_a_straight_run(tmp_path, capsys):
    """With workers, the train-time shifts are drawn in the worker processes, which each epoch
    seeds from the main RNG that the checkpoint restores: 1 epoch + resume to 2 (with the same
    --workers) == 2 straight."""
    common = ["--data", "synthetic", "--input-size", "16", "16", "--batch-size", "32", "--seed", "3",
              "--optimizer", "momentum", "--schedule", "none", "--device", "cpu", "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--workers", "2", "--epochs", "2", "--out", str(straight)]) == 0
    assert main(common + ["--workers", "2", "--epochs", "1", "--out", str(split)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(split / "last.pt"), "--workers", "2", "--epochs", "2", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    losses = [r["train_loss"] for r in _rows(straight)]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in _rows(split)] == losses
