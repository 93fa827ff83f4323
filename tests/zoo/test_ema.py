"""The weight average: its update rule by hand, and exact resume with EMA, augmentation and mixup."""
import json

import pytest
import torch
from torch import nn

import zoo.train
from zoo.checkpoint import CheckpointError, checkpoint_weights, load_checkpoint, model_from_checkpoint
from zoo.ema import ModelEma
from zoo.train import main

TINY = ["--data", "synthetic", "--batch-size", "32", "--no-progress", "--seed", "3", "--input-size", "16", "16"]


def test_update_matches_the_hand_computed_average():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.28)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    for k in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and its counter
        steps.append({n: v.clone() for n, v in model.state_dict().items()})
        ema.update(model)
    # d_k = min(0.28, (1 + k) / (10 + k)): 2/11, 3/12, then capped (4/13 > 0.28)
    expected = {n: v.clone().float() for n, v in start.items()}
    for d, state in zip((2 / 11, 3 / 12, 0.28), steps):
        for n, v in state.items():
            if v.dtype.is_floating_point:
                expected[n] = d * expected[n] + (1 - d) * v
    for n, v in ema.module.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, expected[n], atol=1e-6), n
    assert ema.module.state_dict()["1.num_batches_tracked"] == 3 and ema.updates == 3
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.decay_at(10**6) == 0.28 and ModelEma(model).decay_at(10**6) == pytest.approx(0.9998)


def test_resume_with_ema_and_augmentation_is_exact(tmp_path, monkeypatch, capsys):
    flags = TINY + ["--epochs", "2", "--model-ema", "--model-ema-decay", "0.99", "--hflip", "0.5", "--scale",
                    "0.5", "1", "--reprob", "0.5", "--mixup", "0.2", "--cutmix", "1", "--label-smoothing", "0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(flags + ["--out", str(straight)]) == 0

    def interrupt(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(zoo.train, "plot_curves", interrupt)
    assert main(flags + ["--out", str(split)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    # a flag given again with another value is ignored: the checkpoint's augmentation is the run's
    assert main(["--resume", str(split / "last.pt"), "--hflip", "0", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "ignoring --hflip 0 (checkpoint: 0.5)" in err
    assert "augmentation: random resized crop scale 0.5-1 ratio 0.75-1.33, hflip 0.5, reprob 0.5; mixup 0.2" in out

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["ema_updates"] == b["ema_updates"] == 2 * (192 // 32)
    assert b["augment"]["hflip"] == 0.5 and b["augment"]["scale"] == [0.5, 1.0]
    assert b["config"]["model_ema"] and b["config"]["mixup"] == 0.2
    # the EMA is a different set of weights, and the checkpoint says which one scored
    assert not all(torch.equal(a["model"][k], a["model_ema"][k]) for k in a["model"])
    best = load_checkpoint(straight / "best.pt")
    row = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
           if r["epoch"] == best["epoch"]][0]
    assert best["selected"] == ("ema" if row["ema_val_acc"] > row["val_acc"] else "model")
    assert best["best_metric"] == max(row["val_acc"], row["ema_val_acc"])
    state, which = checkpoint_weights(best)
    assert which == best["selected"] and checkpoint_weights(best, ema=True)[1] == "ema"
    assert checkpoint_weights(best, ema=False)[1] == "model"
    ema_model = model_from_checkpoint(best, ema=True)
    assert all(torch.equal(v, best["model_ema"][k]) for k, v in ema_model.state_dict().items())


def test_resuming_with_model_ema_needs_ema_weights_and_raw_runs_have_none(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["selected"] == "model" and "model_ema" not in ckpt
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        checkpoint_weights(ckpt, ema=True)
    assert checkpoint_weights(ckpt)[1] == "model"


def test_corrupt_ema_weights_are_refused(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--model-ema", "--out", str(out)]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    name = next(k for k, v in ckpt["model_ema"].items() if v.dtype.is_floating_point)
    ckpt["model_ema"][name] += 1
    torch.save(ckpt, out / "bad.pt")
    with pytest.raises(CheckpointError, match="the EMA weights are corrupt"):
        load_checkpoint(out / "bad.pt")
