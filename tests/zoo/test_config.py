"""zoo.config: the frozen TrainConfig, its checkpoint schema and the resume rules."""
from __future__ import annotations

import dataclasses

import pytest

from zoo.config import DEFAULTS, RESUME_KEYS, ConfigError, TrainConfig, optimizer_hparams, resumed, validated
from zoo.train import build_parser, config_from_args

# The ``config`` of a checkpoint written by ``python -m zoo.train --data synthetic --seed 3
# --input-size 16 16 --epochs 1`` before TrainConfig existed (the run config was then an
# argparse.Namespace): checkpoints like it must keep resuming.
SAVED_BEFORE = {
    "model": "resnext_mini", "norm": "bn", "gn_groups": 32, "input_size": [16, 16], "init_weights": None,
    "optimizer": "adam", "lr": None, "momentum": None, "weight_decay": 0.0005, "epochs": 1, "batch_size": 32,
    "schedule": "cosine", "warmup_epochs": 0, "step_epochs": None, "loss": "ce", "label_smoothing": 0.0,
    "focal_gamma": 2.0, "data": "synthetic", "val_fraction": 0.2, "out": "runs/old", "resume": None, "seed": 3,
    "device": "auto", "workers": 0, "amp": False, "channels_last": False,
}


def cli(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint path in a folder of its own (the rules look for a last.pt beside it)."""
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"")
    return str(path)


def test_checkpoint_schema_is_the_plain_dict_older_checkpoints_hold():
    config = TrainConfig.from_dict(SAVED_BEFORE)
    assert config.input_size == (16, 16) and config.seed == 3
    saved = config.to_dict()
    assert {k: saved[k] for k in SAVED_BEFORE} == SAVED_BEFORE  # same values, lists not tuples
    # settings added since take their defaults, so an old checkpoint resumes as it ran
    assert {k: v for k, v in saved.items() if k not in SAVED_BEFORE} == \
        {k: DEFAULTS[k] for k in saved if k not in SAVED_BEFORE}
    assert DEFAULTS["weight_decay"] == 5e-4 and "progress" not in DEFAULTS and "given" not in DEFAULTS


def test_checkpoints_from_before_step_epochs_and_init_weights_still_load():
    older = {k: v for k, v in SAVED_BEFORE.items() if k not in ("step_epochs", "init_weights")}
    assert TrainConfig.from_dict(dict(older, schedule="step")).step_epochs == 30  # decayed every 30 epochs then
    assert TrainConfig.from_dict(older).step_epochs is None
    assert TrainConfig.from_dict(older).init_weights is None


def test_config_is_frozen_and_knows_what_the_command_line_gave():
    config = cli("--lr", "0.1", "--input-size", "16", "16", "--amp", "--no-progress")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.2
    assert config.given == {"lr", "input_size", "amp"}
    assert config.input_size == (16, 16) and config.amp and not config.progress
    assert config.epochs == DEFAULTS["epochs"] and not config.channels_last
    assert cli().given == frozenset() and cli() == TrainConfig()


def test_resume_takes_the_checkpoints_settings_and_names_the_ignored_flags(ckpt):
    given = cli("--resume", ckpt, "--lr", "0.1", "--batch-size", "32", "--model", "resnext_mini",
                "--input-size", "16", "16", "--workers", "2")
    config, warnings = resumed(given, SAVED_BEFORE)
    saved = TrainConfig.from_dict(SAVED_BEFORE)
    assert [getattr(config, k) for k in RESUME_KEYS] == [getattr(saved, k) for k in RESUME_KEYS]
    assert config.lr is None and config.workers == 2  # a runtime setting given on the command line wins
    # only --lr differs: equal values (--input-size as given, --model) are not named; an unset lr
    # shows as the value the run used (adam's default), and another worker count is not exact
    assert warnings == ["resuming keeps the checkpoint's settings; ignoring --lr 0.1 (checkpoint: 0.003)",
                        "resuming with --workers 2 (checkpoint: 0): the result will differ from an uninterrupted run"]


def test_resume_takes_the_checkpoints_runtime_settings_unless_given(ckpt):
    saved = dict(SAVED_BEFORE, workers=2, amp=True, channels_last=True)
    config, warnings = resumed(cli("--resume", ckpt), saved)
    assert (config.workers, config.amp, config.channels_last) == (2, True, True) and warnings == []
    config, warnings = resumed(cli("--resume", ckpt, "--workers", "2"), saved)
    assert config.workers == 2 and warnings == []


def test_resume_canonicalises_model_aliases_before_comparing(ckpt):
    saved = dict(SAVED_BEFORE, model="resnext50_32x4d")
    assert resumed(cli("--resume", ckpt, "--model", "resnext50"), saved)[1] == []
    _, warnings = resumed(cli("--resume", ckpt, "--model", "densenet_mini"), saved)
    assert "--model densenet_mini (checkpoint: resnext50_32x4d)" in warnings[0]


def test_resume_goes_on_in_the_checkpoints_folder_for_the_checkpoints_epochs(ckpt):
    config, warnings = resumed(cli("--resume", ckpt), dict(SAVED_BEFORE, epochs=5))
    assert config.out == ckpt.rpartition("/")[0] and config.epochs == 5 and warnings == []
    config, _ = resumed(cli("--resume", ckpt, "--out", "elsewhere"), SAVED_BEFORE)
    assert config.out == "elsewhere"


def test_resuming_beside_another_last_pt_is_refused(ckpt):
    best = ckpt.replace("last.pt", "best.pt")
    open(best, "wb").close()
    with pytest.raises(ConfigError, match="holds the run's last.pt.*pass --out for the resumed run"):
        resumed(cli("--resume", best), SAVED_BEFORE)
    assert resumed(cli("--resume", best, "--out", "new"), SAVED_BEFORE)[0].out == "new"


@pytest.mark.parametrize("schedule, step_epochs, warned", [
    ("cosine", None, True),  # laid out over --epochs
    ("step", None, True),  # a third of --epochs: 3 -> 1 becomes 6 -> 2
    ("step", 1, False),  # an explicit --step-epochs does not move
    ("none", None, False),
])
def test_more_epochs_warn_when_they_reshape_the_schedule(ckpt, schedule, step_epochs, warned):
    saved = dict(SAVED_BEFORE, epochs=3, schedule=schedule, step_epochs=step_epochs)
    config, warnings = resumed(cli("--resume", ckpt, "--epochs", "6"), saved)
    assert config.epochs == 6
    assert bool(warnings) == warned
    if warned:
        assert warnings == [f"the checkpoint's run was --epochs 3: resuming with --epochs 6 reshapes its {schedule} lr "
                            "schedule over 6 epochs, so the result differs from an uninterrupted run of either length"]


@pytest.mark.parametrize("changes, message", [
    (dict(model="resnet9"), "Unknown model 'resnet9'"),
    (dict(norm="batch"), "Unknown norm 'batch'; choose one of: bn, gn, ln, in"),
    (dict(schedule="poly"), "Unknown schedule 'poly'; choose one of: none, step, cosine"),
    (dict(loss="mse"), "Unknown loss 'mse'; choose one of: ce, focal"),
    (dict(epochs=0), "--epochs must be >= 1, got 0"),
    (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
    (dict(lr=-1.0), "--lr must be > 0, got -1.0"),
    (dict(warmup_epochs=8), "--warmup-epochs must be >= 0 and less than --epochs (8), got 8"),
])
def test_validated_names_the_first_bad_setting(changes, message):
    with pytest.raises(ConfigError) as e:
        validated(TrainConfig(**changes))
    assert message in str(e.value)


def test_validated_canonicalises_the_model_and_optimizer_hparams_check_momentum():
    assert validated(TrainConfig(model="resnext50")).model == "resnext50_32x4d"
    assert optimizer_hparams(TrainConfig()) == {"weight_decay": 5e-4, "lr": 3e-3}
    assert optimizer_hparams(TrainConfig(optimizer="nesterov", momentum=0.5))["momentum"] == 0.5
    with pytest.raises(ConfigError, match="--momentum applies to momentum/nesterov, not adam"):
        optimizer_hparams(TrainConfig(momentum=0.5))
