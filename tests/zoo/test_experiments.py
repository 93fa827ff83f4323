"""zoo.experiments: the 2-D trajectories, the verdict arithmetic and both experiments in --quick mode."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from zoo.experiments import (EXPERIMENTS, SURFACES, differs, escape_step, main, norm_batch_verdict, pareto_front,
                             trajectory)
from zoo.nn.norm import NORMS
from zoo.optim import OPTIMIZERS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


# --- 2-D trajectories ----------------------------------------------------------------------------
@pytest.mark.parametrize("surface", list(SURFACES))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trajectory_loss_decreases(name, surface):
    s = SURFACES[surface]
    path, losses = trajectory(name, surface)
    assert path.shape[1] == 2 and len(path) == len(losses) >= 2
    np.testing.assert_allclose(path[0], s.start)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, s.fn(path[:, 0], path[:, 1]))
    if surface == "rosenbrock":  # every rule gets well down the valley at its table lr
        assert losses[-1] < losses[0] / 10


def test_saddle_plain_sgd_lingers_while_momentum_escapes():
    # At the same lr, the y-offset grows by (1 + 2 lr) per step for sgd: 1e-3 * 1.02^300 < 1.
    _, sgd = trajectory("sgd", "saddle")
    _, mom = trajectory("momentum", "saddle")
    assert escape_step(sgd) is None
    assert escape_step(mom) is not None
    assert len(sgd) == SURFACES["saddle"].steps + 1


def test_trajectory_overrides_steps_and_lr():
    path, _ = trajectory("adam", "rosenbrock", steps=5, lr=1e-3)
    assert len(path) == 6
    assert np.abs(path[-1] - path[0]).max() <= 5 * 1e-3 * 1.01  # Adam moves about lr per step


def test_escape_step():
    assert escape_step(np.array([1.0, 0.0, -0.5, -1.5, -3.0])) == 3
    assert escape_step(np.array([1.0, 0.5, -0.9])) is None


# --- verdict arithmetic --------------------------------------------------------------------------
def test_differs_uses_twice_the_standard_error():
    assert not differs(0.05, 0.06, 400)  # se of the difference ~0.016
    assert differs(0.05, 0.15, 400)
    assert not differs(0.0, 0.0, 100)


CLAIM = "the textbook's claim that GN holds as the batch shrinks while BN degrades"


@pytest.mark.parametrize("bn_small, gn_small, verdict, reason", [
    (0.30, 0.05, "bears out", "."),
    (0.30, 0.30, "only partly bears out", ": BN degrades, but so does GN."),
    (0.05, 0.05, "does not bear out", ": BN's val error does not rise beyond the noise."),
    (0.05, 0.30, "does not bear out", ": GN degrades and BN does not."),
])
def test_norm_batch_verdict_follows_the_numbers(bn_small, gn_small, verdict, reason):
    err = {("bn", 32): 0.04, ("gn", 32): 0.05, ("bn", 2): bn_small, ("gn", 2): gn_small}
    text = norm_batch_verdict(err, ("bn", "gn"), (32, 2), n_val=400)
    assert f"This {verdict} {CLAIM}{reason}" in text
    assert "BN (4.00%) < GN (5.00%)" in text and "this matches" in text


def test_norm_batch_verdict_reports_the_train_loss_trend():
    err = {("bn", 32): 0.04, ("gn", 32): 0.05, ("bn", 2): 0.05, ("gn", 2): 0.05}
    loss = {("bn", 32): 0.1, ("gn", 32): 0.2, ("bn", 2): 0.4, ("gn", 2): 0.1}
    text = norm_batch_verdict(err, ("bn", "gn"), (32, 2), n_val=400, train_loss=loss)
    assert "BN 0.100 -> 0.400, GN 0.200 -> 0.100. BN's rises the most" in text


# --- CLI -----------------------------------------------------------------------------------------
def test_unknown_experiment_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'nope'" in err and all(name in err for name in EXPERIMENTS)
    assert not any(tmp_path.iterdir())


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 300


def _rows(markdown, first_cell):
    """The table rows of ``markdown`` whose first cell is ``first_cell``, as lists of cells."""
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    for name in EXPERIMENTS:
        assert main([name, "--quick", "--out", str(out)]) == 0
    return out


def test_quick_optimizers_writes_report_and_png(quick_out):
    d = quick_out / "quick" / "optimizers"
    _check_png(d / "optimizers.png")
    assert (d / "results.json").is_file()
    md = (d / "report.md").read_text()
    assert "python -m zoo.experiments optimizers --quick" in md
    for name in OPTIMIZERS:
        cnn, surface = _rows(md, name)  # one row in the CNN table, one in the 2-D table
        assert all(re.fullmatch(NUMBER, c) for c in cnn[1:6]), cnn
        assert re.fullmatch(NUMBER, surface[2]), surface
    assert re.search(r"Saddle\b.*(bears out|does not bear out)", md)
    assert re.search(r"Adaptive rules\b.*(bears out|does not bear out)", md)


def test_quick_norm_batch_writes_report_and_png(quick_out):
    d = quick_out / "quick" / "norm-batch"
    _check_png(d / "norm-batch.png")
    md = (d / "report.md").read_text()
    assert "python -m zoo.experiments norm-batch --quick" in md
    assert "fixed number of training images seen" in md
    for norm in NORMS:
        cells = _rows(md, norm.upper())
        grid = [c for c in cells if len(c) == 6]  # the norm x batch table
        every = [c for c in cells if len(c) == 8]  # one row per (norm, batch) cell
        assert len(grid) == 1 and all(re.fullmatch(NUMBER, c) for c in grid[0][1:])
        assert [int(c[1]) for c in every] == [32, 16, 8, 4, 2]
        for c in every:
            assert all(re.fullmatch(NUMBER, v) for v in c[2:]), c
            assert int(c[3]) * int(c[1]) == int(every[0][3]) * 32  # same images seen at every batch
    assert re.search(r"This (bears out|only partly bears out|does not bear out)", md)


def test_quick_runs_are_kept_apart_and_say_they_are_smoke_runs(quick_out):
    """A smoke run's verdicts come from a few dozen images: they never land where a full run's
    report goes, and the report says, right under its title, that they mean nothing."""
    assert sorted(p.name for p in quick_out.iterdir()) == ["quick"]
    for name in EXPERIMENTS:
        title, blank, note = (quick_out / "quick" / name / "report.md").read_text().splitlines()[:3]
        assert title == f"# Experiment: {name}" and blank == ""
        assert note.startswith("**Smoke run (`--quick`)**") and "mean nothing" in note


# --- activations and attention -------------------------------------------------------------------
def test_activations_verdict_follows_the_numbers():
    from zoo.experiments.activations import activations_verdict

    def ratios(plain_sigmoid, bn_sigmoid):
        r = {}
        for variant in ("plain", "bn", "residual"):
            for act in ("sigmoid", "tanh", "relu"):
                r[(variant, act)] = 1.0
        r[("plain", "sigmoid")], r[("plain", "tanh")], r[("bn", "sigmoid")] = plain_sigmoid, 0.01, bn_sigmoid
        r[("bn", "tanh")] = 0.01
        return r

    text = activations_verdict(ratios(1e-9, 0.5), {"sigmoid": 0.5, "tanh": 0.4, "relu": 0.05}, n_val=400)
    assert "sigmoid, tanh vanished. This bears out" in text
    assert ("With BatchNorm: sigmoid 0.5, tanh 0.01, relu 1. It fixes the vanishing gradient of sigmoid but not "
            "of tanh.") in text
    assert "ahead of sigmoid, tanh beyond twice" in text and "This bears out the textbook's claim that the ReLU" in text
    text = activations_verdict(ratios(0.5, 0.5), {"sigmoid": 0.05, "tanh": 0.05, "relu": 0.05}, n_val=400)
    assert "tanh vanished. This only partly bears out" in text
    assert "ahead of neither saturating one" in text and "This does not bear out the textbook's claim that the ReLU" \
        in text
    text = activations_verdict(ratios(1e-9, 0.5), {"sigmoid": 0.05, "tanh": 0.05, "relu": 0.05}, n_val=400,
                               race_loss={"sigmoid": 0.3, "tanh": 0.01, "relu": 0.05})
    assert "sigmoid 0.3000, tanh 0.0100, relu 0.0500; sigmoid trained slower than relu." in text


def test_attention_verdict_compares_time_with_flops():
    from zoo.experiments.attention import attention_verdict

    def row(flops, ms1, ms8, attn_ms=0.0):
        return dict(flops=flops, ms_b1=ms1, ms_b8=ms8, profile=dict(total_ms=10.0, attn_ms=attn_ms))

    rows = dict(none=row(100, 1.0, 8.0), se=row(101, 1.2, 9.6, 1.0), eca=row(100, 1.1, 8.8), cbam=row(110, 1.1, 8.8))
    text = attention_verdict(rows)
    assert "**se**: +1.00% FLOPs; time +20.0% at batch 1, +20.0% at batch 8; 10.0% of the profiled" in text
    assert "**cbam**: +10.00% FLOPs" in text and text.count("costs time out of proportion") == 2
    assert "This only partly bears out the claim" in text


def test_quick_activations_writes_report_and_png(quick_out):
    d = quick_out / "quick" / "activations"
    _check_png(d / "activations.png")
    assert (d / "results.json").is_file()
    md = (d / "report.md").read_text()
    assert "python -m zoo.experiments activations --quick" in md
    for act in ("sigmoid", "tanh", "relu", "gelu", "silu"):
        grad, race = _rows(md, act)  # one row in the gradient table, one in the race
        assert len(grad) == 8 and all(re.fullmatch(NUMBER, c) for c in grad[2:]), grad
        assert all(re.fullmatch(NUMBER, c) for c in race[1:]), race
    assert re.search(r"vanished\. This (bears out|only partly bears out|does not bear out)", md)
    assert re.search(r"on the same budget.*", md)


def test_quick_attention_writes_report_and_png(quick_out):
    d = quick_out / "quick" / "attention"
    _check_png(d / "attention.png")
    md = (d / "report.md").read_text()
    assert "python -m zoo.experiments attention --quick" in md
    for attn in ("none", "se", "eca", "cbam"):
        cost, profile, whole = _rows(md, attn)
        assert re.fullmatch(r"[\d,]+", cost[1]) and all(re.fullmatch(NUMBER + "x?", c) for c in cost[2:]), cost
        assert all(re.fullmatch(NUMBER + "%?", c) for c in profile[1:] + whole[1:]), (profile, whole)
    none_profile = _rows(md, "none")[1]
    assert none_profile[2] == "0.000"  # no attention nodes in the model without attention
    for attn in ("se", "eca", "cbam"):
        assert float(_rows(md, attn)[1][2]) > 0, attn  # its nodes found in the profile
    assert re.search(r"This (bears out|only partly bears out|does not bear out) the claim", md)


# --- compression ---------------------------------------------------------------------------------
COMPRESSION_ROWS = ("fp32", "int8", "pruned 30%", "pruned 50%", "pruned 50% + int8", "pruned 70%", "student alone",
                    "student distilled")


def test_pareto_front_hand_example():
    points = {"slow_best": (3.0, 0.9), "mid": (2.0, 0.8), "dominated": (2.5, 0.7), "tie_slower": (2.0001, 0.8),
              "fast_worst": (1.0, 0.5), "failed": (0.5, float("nan")), "same_as_mid": (2.0, 0.8)}
    # Equal points do not dominate each other; a strictly slower twin of "mid" is dominated.
    assert pareto_front(points) == ["slow_best", "mid", "fast_worst", "same_as_mid"]
    assert pareto_front({"only": (1.0, 0.1)}) == ["only"]


def test_quick_compression_writes_report_and_png(quick_out):
    import json

    d = quick_out / "quick" / "compression"
    _check_png(d / "compression.png")
    md = (d / "report.md").read_text()
    assert "python -m zoo.experiments compression --quick" in md
    table = {}
    for name in COMPRESSION_ROWS:
        (cells,) = _rows(md, name)
        assert re.fullmatch(r"[\d,]+", cells[1]) and len(cells) == 14, cells
        assert all(re.fullmatch(NUMBER + "x?", c) for c in cells[2:12]), cells
        table[name] = cells
    assert table["fp32"][7:12] == ["1.000x"] * 5  # the ratios are against fp32
    assert table["int8"][1] == table["fp32"][1] and float(table["int8"][3]) < float(table["fp32"][3])
    for ratio, smaller in (("30%", "fp32"), ("50%", "pruned 30%"), ("70%", "pruned 50%")):
        assert int(table[f"pruned {ratio}"][1].replace(",", "")) < int(table[smaller][1].replace(",", ""))
    # The Pareto columns follow the measured accuracy and latency (the unrounded ones in results.json).
    saved = json.loads((d / "results.json").read_text())
    assert list(saved["rows"]) == list(COMPRESSION_ROWS)
    for col, batch in ((12, 1), (13, 8)):
        front = pareto_front({k: (r[f"ms_b{batch}"], r["onnx_acc"]) for k, r in saved["rows"].items()})
        assert front and saved["pareto"][str(batch)] == front
        assert [k for k, c in table.items() if c[col] == "yes"] == front
        line = next(x for x in md.splitlines() if x.startswith(f"- batch {batch}: "))
        assert sorted(re.findall(r"\*\*(.+?)\*\*", line)) == sorted(front)


def test_compression_verdict_separates_noise_from_a_clear_loss():
    from zoo.experiments.compression import compression_verdict

    def row(acc, ms):
        return dict(onnx_acc=acc, ms_b1=ms, ms_b8=8 * ms)

    rows = {"fp32": row(0.97, 1.0), "student alone": row(0.96, 2.0), "student distilled": row(0.50, 0.5),
            "pruned 50%": row(0.60, 3.0)}
    fronts = {1: ["fp32", "student distilled"], 8: ["fp32", "student distilled"]}
    text = compression_verdict(rows, fronts, n_val=400)
    assert "- batch 1: **student distilled** (50.00%, 0.50x fp32's time), **fp32** (97.00%, 1.00x" in text
    # One point behind a faster row on 400 images is noise; 37 points behind is not.
    assert "at some batch size (noise, not a verdict): student alone." in text
    assert "from 96.00% to 50.00% (-46.00 points)" in text
