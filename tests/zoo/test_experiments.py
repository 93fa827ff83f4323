"""zoo.experiments: the 2-D trajectories, the verdict arithmetic and both experiments in --quick mode."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from zoo.experiments import (EXPERIMENTS, SURFACES, differs, escape_step, main, norm_batch_verdict,
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
