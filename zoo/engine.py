"""The training engine: one epoch of training, one evaluation, and the run's randomness.

``python -m zoo.train`` and ``python -m zoo.experiments`` both train through
:func:`train_one_epoch` and measure through :func:`evaluate` (the shape of torchvision's
``references/classification/train.py``); so does any fine-tune. The caller builds the model,
optimizer, schedule and loaders, and decides what to do with each epoch's :class:`EpochStats`.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm import tqdm

LossFn = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------ randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (the weights' initialisation, the
    train-time augmentation)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain values (``torch.load(weights_only=True)``
    reads it back)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` (0-based) visits ``n`` training items.

    Drawn from a generator seeded by (seed, epoch) alone, not from the global one, so the order
    does not depend on what ran before: a resumed run sees the same batches as an uninterrupted
    one, and every cell of an experiment sees the same images in the same order. (The same
    permutation as a ``RandomSampler`` with that generator.)
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ------------------------------------------------------------------------------ loops


@dataclass
class EpochStats:
    """What one call of :func:`train_one_epoch` did."""

    loss: float  # mean training loss per image (over every process under torch.distributed)
    images: int  # images this process trained on
    seconds: float  # wall time of the epoch
    lr: float  # learning rate of the epoch's first step
    losses: list[float] = field(default_factory=list)  # each step's loss
    step_s: list[float] = field(default_factory=list)  # wall time of each whole step (forward, backward, update)
    update_s: list[float] = field(default_factory=list)  # time of each optimizer step alone
    # (step, loss) where the loss stopped being finite, 1-based within the epoch; the epoch
    # stopped before that step's update, so the weights are those of the step before.
    nonfinite: tuple[int, float] | None = None


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: Optimizer,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "",
    world_size: int = 1,
    mixup: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ema: Any = None,
    teacher: nn.Module | None = None,
) -> EpochStats:
    """Train ``model`` for one pass over ``loader``, stepping ``scheduler`` after every update.

    Args:
        model: the model to train (wrapped in DistributedDataParallel under torchrun).
        loss_fn: ``loss_fn(logits, target)``; the logits are cast to float32 first.
        optimizer: its ``step()`` is the update.
        loader: ``(images, targets)`` batches.
        device: where the batches go.
        scheduler: a per-step lr schedule, or None.
        scaler: a ``GradScaler`` for float16 autocast on CUDA, or None.
        amp_dtype: autocast to this dtype (``torch.bfloat16`` on CPU), or None for float32.
        channels_last: feed the images in channels-last memory format.
        progress: show a progress bar on stderr, with the loss, images/s and lr.
        desc: the bar's label.
        world_size: processes training together, for the bar's images/s.
        mixup: ``mixup(images, targets) -> (images, soft targets)`` on each batch (a
            :class:`zoo.augment.Mixup`), before the forward; ``loss_fn`` then gets the soft targets.
        ema: a :class:`zoo.ema.ModelEma` updated from the model after every optimizer step.
        teacher: a model to distil from: it sees the same (augmented, mixed) batch, in eval mode
            without gradients, and ``loss_fn(logits, target, teacher_logits)`` is called (a
            :class:`zoo.losses.DistillationLoss`).

    Returns:
        :class:`EpochStats`. A loss that is not finite stops the epoch at once (before its
        update) and is reported in ``nonfinite``; the caller decides whether that is an error.
    """
    model.train()
    t_start = time.perf_counter()
    stats = EpochStats(loss=0.0, images=0, seconds=0.0, lr=optimizer.param_groups[0]["lr"])
    loss_sum = 0.0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr)
    for step, (x, y) in enumerate(bar):
        t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            if teacher is None:
                loss = loss_fn(logits.float(), y)
            else:
                # Set on every step: a caller's model.train() on a wrapper would reach it otherwise.
                teacher.eval()
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = loss_fn(logits.float(), y, teacher_logits.float())
        if not torch.isfinite(loss):
            stats.nonfinite = (step + 1, loss.item())
            break
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        t1 = time.perf_counter()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        t2 = time.perf_counter()
        if ema is not None:
            ema.update(model)
        if scheduler is not None:
            scheduler.step()
        value = loss.item()
        stats.losses.append(value)
        stats.step_s.append(t2 - t0)
        stats.update_s.append(t2 - t1)
        loss_sum += value * x.shape[0]
        stats.images += x.shape[0]
        if progress:
            rate = stats.images * world_size / (time.perf_counter() - t_start)
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    stats.seconds = time.perf_counter() - t_start
    stats.loss = loss_sum / max(stats.images, 1)
    if stats.nonfinite is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([loss_sum, stats.images], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        stats.loss = (t[0] / t[1]).item()
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, loader: Iterable[tuple[Tensor, Tensor]],
             device: torch.device = torch.device("cpu"), *, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, float]:
    """Mean loss per image and top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        total_loss += loss_fn(logits.float(), y).item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
    return total_loss / max(count, 1), correct / max(count, 1)
