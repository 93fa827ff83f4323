"""Each kind of name resolves through one table: every listed name builds (a name listed but not
implemented fails here), and an unknown name is a ValueError that lists them all."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from zoo.data import DATA_SPECS, build_datasets
from zoo.experiments import EXPERIMENTS, get_experiment
from zoo.losses import LOSSES, create_loss
from zoo.nn.norm import NORMS, get_norm_layer
from zoo.optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler


def _optimizer() -> torch.optim.Optimizer:
    return create_optimizer("sgd", [torch.zeros(1, requires_grad=True)], lr=0.1)


def _folder(root) -> str:
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (80 * i, 40, 200)).save(root / label / f"{i}.png")
    return str(root)


TABLES = {
    "norm": (NORMS, lambda name, _: get_norm_layer(name)(8)),
    "loss": (LOSSES, lambda name, _: create_loss(name)),
    "optimizer": (OPTIMIZERS, lambda name, _: create_optimizer(name, [torch.zeros(1, requires_grad=True)])),
    "schedule": (SCHEDULERS, lambda name, _: create_scheduler(name, _optimizer(), epochs=3, steps_per_epoch=2)),
    "data": (DATA_SPECS, lambda name, tmp: build_datasets(name.replace("PATH", _folder(tmp)), (3, 8, 8))),
    "experiment": (EXPERIMENTS, lambda name, _: get_experiment(name)),
}


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, (names, _) in TABLES.items() for name in names])
def test_every_listed_name_builds(kind, name, tmp_path):
    assert TABLES[kind][1](name, tmp_path) is not None


@pytest.mark.parametrize("kind", TABLES)
def test_an_unknown_name_lists_the_valid_ones(kind, tmp_path):
    names, build = TABLES[kind]
    with pytest.raises(ValueError) as e:
        build("nope", tmp_path)
    assert "'nope'" in str(e.value) and f"choose one of: {', '.join(names)}" in str(e.value)
