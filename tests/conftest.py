"""Shared fixtures: tiny models drive behaviour tests; full-size ones appear in a few tests only."""
from __future__ import annotations

import pytest
import torch

from zoo.registry import get_model_spec, list_models

MINI_MODELS = [n for n in list_models() if "mini" in n]
FULL_MODELS = [n for n in list_models() if "mini" not in n]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Give BatchNorms non-trivial statistics and affine terms so folding has work to do."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


def mini_input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *get_model_spec(name).input_size)


@pytest.fixture(scope="session")
def kserve_python() -> str:
    """The Python of ``make kserve-env`` (or ``$ZOO_KSERVE_PYTHON``); the test skips without it."""
    import os

    from bench.serve.peer import default_python

    python = default_python()
    if not os.access(python, os.X_OK):
        pytest.skip(f"no KServe environment at {python}: run `make kserve-env`")
    return python
