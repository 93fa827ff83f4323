"""zoo.engine: the epoch loop the CLI and the experiments share, evaluation, and the epoch order."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from zoo.engine import epoch_order, evaluate, train_one_epoch
from zoo.optim import create_optimizer, create_scheduler

CPU = torch.device("cpu")


def _data(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_epoch_order_is_the_seeded_random_samplers_and_depends_on_seed_and_epoch_only():
    """The CLI drew its batches from RandomSampler(generator seeded seed * 1000 + epoch): the
    same order keeps runs resumed from earlier checkpoints exact."""
    data = _data(50)
    for seed, epoch in ((0, 0), (3, 1), (7, 12)):
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        torch.manual_seed(seed + 99)  # the global generator plays no part
        assert epoch_order(len(data), seed, epoch) == list(sampler)
    assert epoch_order(50, 0, 0) != epoch_order(50, 0, 1) != epoch_order(50, 1, 1)
    assert sorted(epoch_order(50, 2, 3)) == list(range(50))


def test_train_one_epoch_steps_the_optimizer_and_schedule_once_per_batch():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = create_optimizer("momentum", model.parameters(), lr=0.1)
    sched = create_scheduler("cosine", opt, epochs=2, steps_per_epoch=3)
    loader = DataLoader(_data(), batch_size=8)
    first = evaluate(model, nn.CrossEntropyLoss(), loader)[0]
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), opt, loader, CPU, scheduler=sched)
    assert sched.last_epoch == 3 and len(stats.losses) == len(stats.step_s) == len(stats.update_s) == 3
    assert stats.lr == 0.1 and opt.param_groups[0]["lr"] == pytest.approx(0.05)  # half way down the cosine
    assert stats.images == 24 and stats.loss == pytest.approx(sum(stats.losses) / 3)
    assert stats.nonfinite is None and model.training
    assert evaluate(model, nn.CrossEntropyLoss(), loader)[0] < first


def test_a_non_finite_loss_stops_the_epoch_before_its_update():
    data = _data(32)
    torch.manual_seed(0)
    model, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    calls = []

    def nan_on_third_step(logits, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, y)
        return loss * math.nan if len(calls) == 3 else loss

    opt = create_optimizer("sgd", model.parameters(), lr=0.1)
    stats = train_one_epoch(model, nan_on_third_step, opt, DataLoader(data, batch_size=8), CPU)
    assert stats.nonfinite is not None and stats.nonfinite[0] == 3 and math.isnan(stats.nonfinite[1])
    assert len(stats.losses) == 2 and len(calls) == 3  # the fourth batch never ran
    assert stats.images == 16 and stats.loss == pytest.approx(sum(stats.losses) / 2)
    # the weights are those after the two good steps: the third made no update
    two_steps = DataLoader(torch.utils.data.Subset(data, range(16)), batch_size=8)
    train_one_epoch(reference, nn.CrossEntropyLoss(), create_optimizer("sgd", reference.parameters(), lr=0.1),
                    two_steps, CPU)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_evaluate_is_the_mean_loss_per_image_and_top1():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 0])  # right, wrong, right
    loss, acc = evaluate(model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=2))
    assert acc == pytest.approx(2 / 3)
    assert loss == pytest.approx(nn.functional.cross_entropy(x, y).item())  # batches of 2 and 1, weighted
    assert not model.training
