"""Knowledge distillation: the loss (zoo.losses.DistillationLoss), the teacher in the engine, and
``python -m zoo.train --teacher``."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.engine import train_one_epoch
from zoo.losses import DistillationLoss, create_loss
from zoo.registry import create_model
from zoo.train import main

TINY = ["--data", "synthetic", "--batch-size", "32", "--no-progress", "--seed", "3", "--input-size", "16", "16"]


def _kd(student, target, teacher, temperature, alpha, label_smoothing=0.0):
    return DistillationLoss(create_loss("ce", label_smoothing=label_smoothing), temperature, alpha)(
        student, target, teacher)


def test_kd_loss_matches_a_hand_computation():
    # T = 2: the teacher's [2 ln 3, 0] / T is [ln 3, 0], softmax [3/4, 1/4]; the student's [0, 0]
    # gives [1/2, 1/2]. KL = 3/4 ln(3/2) + 1/4 ln(1/2); CE on class 0 = ln 2. With alpha = 1/2:
    # 1/2 * 4 * KL + 1/2 * ln 2 = 3/2 ln(3/2) - 1/2 ln 2 + 1/2 ln 2 = 3/2 ln(3/2).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    loss = _kd(student, torch.tensor([0]), teacher, temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(1.5 * math.log(1.5), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_the_kl_div_and_cross_entropy_composition(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    target = torch.randint(0, 5, (8,), generator=g)
    kl = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                  reduction="batchmean")
    ce = F.cross_entropy(student, target, label_smoothing=0.1)
    got = _kd(student, target, teacher, temperature, alpha=0.7, label_smoothing=0.1)
    assert got.item() == pytest.approx(0.7 * temperature ** 2 * kl.item() + 0.3 * ce.item(), rel=1e-5)
    # alpha = 1 is the distillation term alone, scaled by T^2
    assert _kd(student, target, teacher, temperature, alpha=1.0).item() == pytest.approx(
        temperature ** 2 * kl.item(), rel=1e-5)


def test_alpha_zero_is_the_plain_loss_on_hard_and_soft_targets():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    hard = torch.randint(0, 4, (6,), generator=g)
    soft = F.softmax(torch.randn(6, 4, generator=g), 1)  # mixup's targets
    for target, smoothing in ((hard, 0.0), (hard, 0.2), (soft, 0.0)):
        plain = F.cross_entropy(student, target, label_smoothing=smoothing)
        assert _kd(student, target, teacher, 4.0, alpha=0.0, label_smoothing=smoothing).item() == pytest.approx(
            plain.item(), rel=1e-6)


def test_kd_loss_gives_the_teacher_no_gradient():
    student, teacher = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    _kd(student, torch.tensor([0, 1, 2, 0]), teacher, 4.0, 0.9).backward()
    assert student.grad is not None and teacher.grad is None


def test_engine_runs_the_teacher_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    student = create_model("resnext_mini", num_classes=3)
    teacher = create_model("densenet_mini", num_classes=3).train()  # the engine must switch it to eval
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    stats = train_one_epoch(student, DistillationLoss(nn.CrossEntropyLoss()), opt, loader, torch.device("cpu"),
                            teacher=teacher)
    assert stats.images == 16 and len(seen) == 2
    assert seen == [(False, False), (False, False)]  # eval mode, no autograd graph
    assert all(p.grad is None for p in teacher.parameters())
    # eval mode: BatchNorm's running statistics are not updated by the teacher's forwards
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(TINY + ["--model", "densenet_mini", "--epochs", "1", "--out", str(out)]) == 0
    return out / "best.pt"


def test_resume_with_a_teacher_equals_a_straight_run(tmp_path, teacher_ckpt, capsys):
    """2 epochs + resume to 4 == 4 straight; the teacher's path and checksum are in the saved config."""
    common = TINY + ["--optimizer", "momentum", "--schedule", "none", "--teacher", str(teacher_ckpt),
                     "--kd-temperature", "3", "--kd-alpha", "0.8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--epochs", "4", "--out", str(straight)]) == 0
    assert main(common + ["--epochs", "2", "--out", str(split)]) == 0
    out = capsys.readouterr().out
    assert f"distilling from {teacher_ckpt}" in out and "T=3, alpha=0.8" in out
    config = load_checkpoint(split / "last.pt")["config"]
    assert config["teacher"] == str(teacher_ckpt) and config["kd_temperature"] == 3.0 and config["kd_alpha"] == 0.8
    import hashlib
    assert config["teacher_sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()

    assert main(["--resume", str(split / "last.pt"), "--epochs", "4", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["epoch"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a plain run from the same seed ends elsewhere: the teacher did change the training
    plain = tmp_path / "plain"
    assert main(TINY + ["--optimizer", "momentum", "--schedule", "none", "--epochs", "4", "--out", str(plain)]) == 0
    c = load_checkpoint(plain / "last.pt")
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resume_refuses_a_teacher_file_that_changed(tmp_path, teacher_ckpt, capsys):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, teacher)
    run = tmp_path / "run"
    assert main(TINY + ["--teacher", str(teacher), "--epochs", "2", "--schedule", "none", "--out", str(run)]) == 0
    ckpt = load_checkpoint(teacher)
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    save_checkpoint(teacher, ckpt)  # still a valid checkpoint, of other weights
    capsys.readouterr()
    assert main(["--resume", str(run / "last.pt"), "--epochs", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--teacher {teacher} changed since the run started" in err[0], err


@pytest.mark.parametrize("flags, message", [
    (["--input-size", "32", "32"], "takes 3x16x16 inputs; this run trains at 3x32x32"),
    (["--data", "digits", "--epochs", "1"], "predicts 4 classes"),
])
def test_a_teacher_of_other_classes_or_input_size_is_one_line_exit_2(tmp_path, teacher_ckpt, capsys, flags, message):
    argv = TINY + ["--teacher", str(teacher_ckpt), "--out", str(tmp_path / "run")] + flags
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher") and message in err[0], err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--kd-temperature", "0"], "--kd-temperature must be > 0"),
    (["--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1]"),
    (["--teacher", "missing.pt"], "--teacher missing.pt: no such checkpoint file"),
])
def test_bad_distillation_settings_are_one_line_exit_2(tmp_path, capsys, flags, message):
    assert main(TINY + flags + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
