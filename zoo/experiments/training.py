"""One cell of an experiment: a model trained from fixed weights on a fixed image order, through
:func:`zoo.engine.train_one_epoch` as ``python -m zoo.train`` trains; and the data it trains on."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from zoo.data import DataBundle, DataError, build_datasets
from zoo.engine import epoch_order, evaluate, seed_everything, train_one_epoch
from zoo.losses import create_loss
from zoo.optim import create_optimizer, create_scheduler
from zoo.registry import create_model, get_model_spec


def train_cell(data: DataBundle, *, model: str, norm: str, optimizer: str, lr: float, batch_size: int,
               epochs: int, images_per_epoch: int, seed: int, weight_decay: float, schedule: str,
               gn_groups: int = 32, act: str = "relu", attn: str | None = None) -> dict[str, Any]:
    """Train one configuration from the initial weights fixed by ``seed``; return its numbers.

    The result holds ``train_loss`` (mean over the last epoch), ``val_acc``, ``val_loss``,
    ``step_ms`` (median wall time of a whole training step: forward, backward, update),
    ``update_ms`` (median time of ``optimizer.step()`` alone), ``losses`` (every step's),
    ``val_history`` (val top-1 after each epoch), ``steps``, ``seconds`` and ``diverged``
    (the step at which the loss stopped being finite, or None).
    """
    seed_everything(seed)
    in_chans = data.input_size[0]
    net = create_model(model, num_classes=data.num_classes, norm=norm, gn_groups=gn_groups, in_chans=in_chans,
                       act=act, attn=attn)
    opt = create_optimizer(optimizer, net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = images_per_epoch // batch_size
    sched = create_scheduler(schedule, opt, epochs=epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = create_loss("ce")
    val_loader = DataLoader(data.val, batch_size=256, shuffle=False)
    cpu = torch.device("cpu")
    losses: list[float] = []
    step_s: list[float] = []
    update_s: list[float] = []
    val_history: list[float] = []
    val_loss = val_acc = math.nan
    diverged = None
    t_start = time.perf_counter()
    for epoch in range(epochs):
        # Every cell draws the same images in the same order; batch sizes differ only in how
        # they are grouped.
        order = epoch_order(len(data.train), seed, epoch)[:images_per_epoch]
        loader = DataLoader(data.train, batch_size=batch_size, sampler=order, drop_last=True)
        stats = train_one_epoch(net, loss_fn, opt, loader, cpu, scheduler=sched)
        losses += stats.losses
        step_s += stats.step_s
        update_s += stats.update_s
        if stats.nonfinite is not None:
            diverged = len(losses) + 1
            break
        val_loss, val_acc = evaluate(net, loss_fn, val_loader, cpu)
        val_history.append(val_acc)
    seconds = time.perf_counter() - t_start
    if diverged is not None:
        val_loss, val_acc, train_loss = math.nan, math.nan, math.nan
    else:
        train_loss = statistics.fmean(losses[-steps_per_epoch:])
    return dict(train_loss=train_loss, val_acc=val_acc, val_loss=val_loss,
                step_ms=1e3 * statistics.median(step_s) if step_s else math.nan,
                update_ms=1e3 * statistics.median(update_s) if update_s else math.nan,
                losses=losses, val_history=val_history, steps=len(losses), seconds=seconds,
                diverged=diverged)


def load_data(cfg: dict[str, Any], max_batch: int) -> tuple[DataBundle, int]:
    """The experiment's data at ``input_size`` and the images per epoch (a multiple of max_batch).

    With ``train_images`` set, the train split is cut to that many images, drawn at random
    (seeded) so every class keeps its share on average.
    """
    spec = get_model_spec(cfg["model"])
    size = (spec.input_size[0], cfg["input_size"], cfg["input_size"])
    data = build_datasets(cfg["data"], size, seed=cfg["seed"])
    if cfg["train_images"] is not None and cfg["train_images"] < len(data.train):
        g = torch.Generator().manual_seed(cfg["seed"])
        keep = torch.randperm(len(data.train), generator=g)[:cfg["train_images"]].sort().values.tolist()
        data = dataclasses.replace(data, train=Subset(data.train, keep))
    n = len(data.train)
    per_epoch = n // max_batch * max_batch
    if per_epoch < max_batch:
        raise DataError(f"{n} training images are fewer than one batch of {max_batch}")
    return data, per_epoch
