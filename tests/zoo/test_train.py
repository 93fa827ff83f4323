import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import zoo
import zoo.train
from zoo.checkpoint import load_checkpoint, model_from_checkpoint
from zoo.data import build_datasets
from zoo.optim import create_scheduler
from zoo.train import build_parser, main

FAST = ["--data", "synthetic", "--batch-size", "32", "--no-progress", "--seed", "3"]
TINY = FAST + ["--input-size", "16", "16"]  # 4x fewer pixels: for tests that only need a run


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    return a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


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
    val = build_datasets("synthetic", tuple(ckpt["input_size"]), seed=3).val
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in torch.utils.data.DataLoader(val, 256))
    assert correct / len(val) == ckpt["val_acc"], (correct, len(val), ckpt["val_acc"])


def test_interrupted_run_resumes_exactly_into_its_own_folder(tmp_path, monkeypatch, capsys):
    """A cosine --epochs 2 run stopped after epoch 1 and resumed with just --resume OUT/last.pt
    ends with the same weights as 2 straight (CPU, fixed seed): --epochs comes from the
    checkpoint, the outputs go to the checkpoint's folder, and nothing is warned about."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(TINY + ["--optimizer", "momentum", "--epochs", "2", "--out", str(straight)]) == 0

    def interrupt(*_):  # Ctrl-C right after epoch 1's checkpoint and metrics are written
        raise KeyboardInterrupt
    monkeypatch.setattr(zoo.train, "plot_curves", interrupt)
    assert main(TINY + ["--optimizer", "momentum", "--epochs", "2", "--out", str(split)]) == 130
    monkeypatch.undo()
    assert load_checkpoint(split / "last.pt")["epoch"] == 1
    capsys.readouterr()

    assert main(["--resume", str(split / "last.pt"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert f"writing to {split}" in out and "epoch 2/2  train_loss" in out
    assert sorted(os.listdir(split)) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    assert load_checkpoint(split / "last.pt")["epoch"] == 2
    assert _same_weights(straight / "last.pt", split / "last.pt")
    assert [r["lr"] for r in _rows(split)] == [r["lr"] for r in _rows(straight)]
    assert [r["epoch"] for r in _rows(split)] == [1, 2]


def test_resume_to_more_epochs_with_a_fixed_schedule_equals_a_straight_run(tmp_path, capsys):
    """--schedule none does not depend on --epochs: 1 epoch + resume to 2 == 2 straight."""
    common = TINY + ["--optimizer", "momentum", "--schedule", "none"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--epochs", "2", "--out", str(straight)]) == 0
    assert main(common + ["--epochs", "1", "--out", str(split)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(split / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert load_checkpoint(split / "last.pt")["epoch"] == 2
    assert _same_weights(straight / "last.pt", split / "last.pt")
    assert [r["epoch"] for r in _rows(split)] == [1, 2]


def test_resume_warns_about_ignored_flags_and_a_reshaped_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--out", str(run)]) == 0  # cosine, adam at its default lr
    capsys.readouterr()
    # --model and --data repeat the checkpoint's values: not named; --lr and --batch-size differ
    assert main(["--resume", str(run / "last.pt"), "--epochs", "2", "--model", "resnext_mini", "--data",
                 "synthetic", "--lr", "0.1", "--batch-size", "16", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    ignored, reshaped = warnings
    assert "--lr 0.1 (checkpoint: 0.003)" in ignored and "--batch-size 16 (checkpoint: 32)" in ignored
    assert "--model" not in ignored and "--data" not in ignored
    assert "--epochs 1" in reshaped and "--epochs 2" in reshaped and "cosine" in reshaped
    ckpt = load_checkpoint(run / "last.pt")  # the checkpoint's settings won, in its own folder
    assert ckpt["epoch"] == 2 and ckpt["config"]["batch_size"] == 32 and ckpt["config"]["lr"] is None
    assert [r["lr"] for r in _rows(run)][0] == pytest.approx(3e-3)
    assert f"outputs in {run}:" in out


def test_step_schedule_decays_every_third_of_the_epochs(tmp_path):
    """--schedule step multiplies the lr by 0.1 every --step-epochs, by default --epochs // 3."""
    out = tmp_path / "step"
    assert main(TINY + ["--schedule", "step", "--epochs", "3", "--out", str(out)]) == 0
    assert [r["lr"] for r in _rows(out)] == pytest.approx([3e-3, 3e-4, 3e-5])
    assert load_checkpoint(out / "last.pt")["config"]["step_epochs"] is None
    out = tmp_path / "step2"
    assert main(TINY + ["--schedule", "step", "--step-epochs", "2", "--epochs", "3", "--out", str(out)]) == 0
    assert [r["lr"] for r in _rows(out)] == pytest.approx([3e-3, 3e-3, 3e-4])


def _decay_epochs(epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = create_scheduler("step", opt, epochs=epochs, steps_per_epoch=1)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return [e for e in range(1, epochs) if lrs[e] < lrs[e - 1]]


def test_step_scheduler_default_interval_is_a_third_of_the_epochs():
    assert _decay_epochs(90) == [30, 60]  # torchvision's reference recipe
    assert _decay_epochs(8) == [2, 4, 6]
    assert _decay_epochs(2) == [1]


@pytest.mark.parametrize("flags,message", [
    (["--step-epochs", "0"], "--step-epochs must be >= 1, got 0"),
    (["--warmup-epochs", "2", "--epochs", "2"],
     "--warmup-epochs must be >= 0 and less than --epochs (2), got 2"),
])
def test_bad_schedule_settings_are_one_line_exit_2(tmp_path, capsys, flags, message):
    assert main(TINY + flags + ["--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_help_states_each_default_once_and_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and not re.search(r"\(default[^()]*\) \(default", text)
    for flag, default in (("--weight-decay", "0.0005"), ("--epochs", "8"), ("--seed", "0"),
                          ("--val-fraction", "0.2"), ("--focal-gamma", "2.0"), ("--momentum", "0.9")):
        assert f"(default: {default}" in text, flag
    assert "--step-epochs N --schedule step: multiply the lr by 0.1 every N epochs" in text
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        assert action.help.count("default") <= 1, action.help


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
    ("--optimizer", "lion",
     "Unknown optimizer 'lion'; choose one of: sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam"),
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


def test_nan_loss_in_the_first_epoch_stops_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    before = _sha(out / "last.pt")
    code = main(TINY + ["--epochs", "1", "--out", str(out), "--optimizer", "sgd", "--lr", "1e30", "--force"])
    assert code == 1
    err = capsys.readouterr().err
    assert "at epoch 1, step" in err and "no checkpoint was written" in err
    assert "last good checkpoint" not in err
    assert _sha(out / "last.pt") == before  # an earlier run's checkpoint is left alone
    load_checkpoint(out / "last.pt")


def test_nan_loss_after_a_good_epoch_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_create_loss = zoo.train.create_loss

    def create_loss(*args, **kwargs):
        loss_fn, evaluated = real_create_loss(*args, **kwargs), []

        def nan_after_first_eval(logits, y):  # val runs under no_grad; then training goes NaN
            if not torch.is_grad_enabled():
                evaluated.append(True)
            loss = loss_fn(logits, y)
            return loss * float("nan") if evaluated and torch.is_grad_enabled() else loss
        return nan_after_first_eval
    monkeypatch.setattr(zoo.train, "create_loss", create_loss)
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "at epoch 2, step 1" in err
    assert f"the last good checkpoint, {out / 'last.pt'} (epoch 1), is untouched" in err
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_torchrun_two_processes_gloo(tmp_path):
    """EMA, mixup and a distillation teacher (each rank runs its own frozen copy) under DDP."""
    teacher = tmp_path / "teacher"
    assert main(FAST + ["--epochs", "1", "--out", str(teacher)]) == 0
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "zoo.train", *FAST, "--epochs", "2", "--out", str(out), "--model-ema", "--mixup", "0.2",
         "--teacher", str(teacher / "best.pt")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("epoch 2/2  train_loss") == 1  # only rank 0 reports
    assert "2 process(es)" in proc.stdout
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2
    # EMA of the unwrapped model (keys without DDP's "module."), updated on every step of rank 0
    assert ckpt["model_ema"].keys() == ckpt["model"].keys() and ckpt["ema_updates"] > 0
    assert ckpt["config"]["teacher"] == str(teacher / "best.pt") and ckpt["config"]["teacher_sha256"]
    assert "distilling from" in proc.stdout
    assert sorted(os.listdir(out)) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]


def test_ema_cutmix_and_a_teacher_train_with_amp_and_channels_last(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(FAST + ["--epochs", "1", "--out", str(teacher)]) == 0
    out = tmp_path / "student"
    assert main(FAST + ["--epochs", "1", "--out", str(out), "--model-ema", "--cutmix", "0.5", "--amp",
                        "--channels-last", "--teacher", str(teacher / "best.pt")]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["teacher_sha256"] and ckpt["ema_updates"] > 0
    assert ckpt["config"]["amp"] and ckpt["config"]["channels_last"]
    for key in ("model", "model_ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point()), key


def test_init_weights_fine_tunes_a_1000_class_file_into_the_data_classes(tmp_path, capsys):
    """--init-weights loads every weight but the head; an lr of 1e-20 leaves them as loaded."""
    torch.manual_seed(1)
    pretrained = zoo.create_model("resnext_mini")  # 1000 classes, like an ImageNet file
    path = tmp_path / "imagenet.pth"
    torch.save(pretrained.state_dict(), path)
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--optimizer", "sgd", "--lr", "1e-20", "--weight-decay", "0",
                        "--init-weights", str(path),
                        "--out", str(out)]) == 0
    tensors = sum(not k.startswith("fc.") for k in pretrained.state_dict())
    assert (f"--init-weights {path}: loaded {tensors} tensors; skipped the classifier head fc "
            "(1000 classes in the file): it starts fresh, sized for --data's 4 classes\n") in capsys.readouterr().out
    trained = load_checkpoint(out / "last.pt")["model"]
    source = pretrained.state_dict()
    body = [k for k, v in source.items() if not k.startswith("fc.") and v.is_floating_point()
            and "running" not in k]  # BN running statistics move in training mode whatever the lr
    assert body
    for k in body:  # loaded: a fresh initialisation would differ by ~0.1, the 1e-20 steps by ~1e-20
        torch.testing.assert_close(trained[k], source[k], rtol=0, atol=1e-12)
    assert trained["fc.weight"].shape[0] == 4 != source["fc.weight"].shape[0]  # synthetic data: 4 classes

    wrong = tmp_path / "densenet.pth"
    torch.save(zoo.create_model("densenet_mini").state_dict(), wrong)
    assert main(TINY + ["--epochs", "1", "--init-weights", str(wrong), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--init-weights {wrong} does not fit ResNet" in err[0]


def test_resume_with_more_epochs_starts_on_the_reshaped_schedule(tmp_path):
    """A cosine run of 2 epochs resumed to 4: epoch 3 starts at the 4-epoch schedule's lr (half
    the base lr, at the halfway step), not at the end of the 2-epoch one (near 0)."""
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "2", "--out", str(out)]) == 0
    assert main(["--resume", str(out / "last.pt"), "--epochs", "4", "--no-progress"]) == 0
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(zoo.train.TRAIN_LR["adam"] * 0.5, rel=1e-6)


def test_resuming_best_pt_into_a_folder_with_a_later_last_pt_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    before = _sha(out / "last.pt")
    capsys.readouterr()
    assert main(["--resume", str(out / "best.pt"), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --out for the resumed run" in err[0]
    assert _sha(out / "last.pt") == before


def test_init_weights_from_a_checkpoint_of_another_norm_is_refused(tmp_path, capsys):
    """GN and LN weights have the same shapes: the checkpoint's own settings must match."""
    out = tmp_path / "gn"
    assert main(TINY + ["--epochs", "1", "--norm", "gn", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(TINY + ["--epochs", "1", "--norm", "ln", "--init-weights", str(out / "last.pt"),
                        "--out", str(tmp_path / "ln")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("holds resnext_mini (norm=gn, gn_groups=32); "
                              "this run trains resnext_mini (norm=ln)") in err[0]
    assert not (tmp_path / "ln" / "last.pt").exists()
    assert main(TINY + ["--epochs", "1", "--norm", "gn", "--init-weights", str(out / "last.pt"),
                        "--out", str(tmp_path / "gn2")]) == 0  # the same settings: fine-tunes


def test_a_second_run_into_a_folder_holding_a_run_is_refused_unless_forced(tmp_path, capsys):
    """A second run would silently replace the first's checkpoints and metrics: one line, exit 2,
    naming what it would overwrite; --force overwrites. With neither --progress nor
    --no-progress, a stderr that is not a terminal (a log, here pytest's capture) gets no bars."""
    out = tmp_path / "run"
    quiet = [flag for flag in TINY if flag != "--no-progress"]
    assert main(quiet + ["--epochs", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" not in err and "it/s" not in err, err
    before = {name: _sha(out / name) for name in ("last.pt", "best.pt", "metrics.jsonl")}

    assert main(TINY + ["--epochs", "1", "--seed", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} already holds a run (last.pt, best.pt, metrics.jsonl), which this run "
                   f"would overwrite: pass another --out, --resume {out / 'last.pt'} to continue it, or --force "
                   "to overwrite it"]
    assert {name: _sha(out / name) for name in before} == before

    other = tmp_path / "other"  # a resumed run into a third folder holding a run is refused too
    assert main(TINY + ["--epochs", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(out / "last.pt"), "--epochs", "2", "--out", str(other), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err and load_checkpoint(other / "last.pt")["epoch"] == 1

    # --progress draws the bars on stderr all the same
    assert main(quiet + ["--epochs", "1", "--seed", "4", "--out", str(out), "--force", "--progress"]) == 0
    assert "epoch 1/1" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 4 and _sha(out / "last.pt") != before["last.pt"]
