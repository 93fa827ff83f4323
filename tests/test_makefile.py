"""The venv rule of the Makefile, read with `make -n` (prints the recipe, runs nothing)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def recipe(*overrides: str) -> list[str]:
    # -B: as if .venv were out of date, so the whole recipe prints even where .venv exists.
    out = subprocess.run(["make", "-n", "-B", "venv", *overrides], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()


def torch_step(lines: list[str]) -> str:
    (line,) = [ln for ln in lines if "pip install" in ln and '"torch' in ln]
    return line


def test_torch_index_is_an_extra_index_for_the_torch_step_only() -> None:
    lines = recipe(f"TORCH_INDEX={CPU_INDEX}")
    step = torch_step(lines)
    assert f"--extra-index-url {CPU_INDEX}" in step and '"torch==' in step
    project = [ln for ln in lines if "install" in ln and "-e " in ln]
    assert project and all(CPU_INDEX not in ln for ln in project)
    assert lines.index(step) < lines.index(project[0]), "torch must be in place before the project's dependencies"


def test_default_uses_no_index_and_a_changed_index_rebuilds() -> None:
    default = recipe()
    assert "--extra-index-url" not in torch_step(default)
    stamp = [ln for ln in default if ln.startswith("touch ")]
    with_index = [ln for ln in recipe(f"TORCH_INDEX={CPU_INDEX}") if ln.startswith("touch ")]
    assert stamp and with_index and stamp != with_index, (
        "the stamp must change with the index, or make keeps the old torch")
