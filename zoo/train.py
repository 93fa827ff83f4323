"""``python -m zoo.train``: train a classifier on the bundled digits or an image folder.

    python -m zoo.train                                   # resnext_mini on digits with adam
    python -m zoo.train --model densenet_mini --norm gn --optimizer nesterov --lr 0.05
    python -m zoo.train --data folder:data/flowers --model resnext50 --batch-size 32
    python -m zoo.train --resume runs/train/last.pt --epochs 20   # continue to epoch 20, in runs/train
    torchrun --nproc-per-node 2 -m zoo.train --data synthetic      # DistributedDataParallel

Under ``--out``: ``last.pt`` and ``best.pt`` (written atomically, see :mod:`zoo.checkpoint`),
``metrics.jsonl`` (one JSON object per epoch; ``lr`` is the learning rate of the epoch's first
step) and ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from zoo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from zoo.data import DATA_SPECS, DataError, build_datasets
from zoo.losses import LOSSES, create_loss
from zoo.nn.norm import NORMS
from zoo.optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler
from zoo.registry import get_model_spec, create_model, list_models
from zoo.weights import WeightsError, load_state, read_weights

# Every default in one place. The defaults train resnext_mini on digits to >= 95% val top-1
# in well under two minutes on a 2-core CPU.
DEFAULTS = dict(
    model="resnext_mini", norm="bn", gn_groups=32, optimizer="adam", lr=None, momentum=None,
    weight_decay=5e-4, epochs=8, batch_size=32, schedule="cosine", warmup_epochs=0, step_epochs=None,
    loss="ce", label_smoothing=0.0, focal_gamma=2.0, data="digits", val_fraction=0.2, out="runs/train",
    seed=0, device="auto", workers=0, amp=False, channels_last=False, input_size=None, init_weights=None,
)


# The settings a resumed run takes from its checkpoint (the model, data and optimization); the
# command line still says how far to go (--epochs), where to write (--out) and how to run.
RESUME_KEYS = ("model", "norm", "gn_groups", "input_size", "init_weights", "data", "val_fraction", "seed",
               "optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule",
               "warmup_epochs", "step_epochs", "loss", "label_smoothing", "focal_gamma")

# Options whose parser default is None, so train() can tell a value given on the command line
# from a default: the resumed settings, --epochs and --out (DEFAULTS fills in the rest).
_UNSET_KEYS = (*RESUME_KEYS, "epochs", "out")

# --schedule step multiplies the lr by this every --step-epochs epochs (torchvision's reference).
STEP_GAMMA = 0.1

# Learning rates for training these nets with batch 32-64 when --lr is not given (the
# optimizers' own defaults suit their update rule, not this task).
TRAIN_LR = dict(sgd=0.1, momentum=0.05, nesterov=0.05, adagrad=0.01, adadelta=1.0, rmsprop=1e-3, adam=3e-3)


class TrainError(Exception):
    """A problem to report to the user in one line (exit 2 for bad input, 1 for a failed run)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Each help text states its default once (taken from :data:`DEFAULTS`)."""
    p = argparse.ArgumentParser(
        prog="python -m zoo.train", description=__doc__.split("\n")[0].replace("``", ""),
        epilog="With --resume, the model, data and optimization settings come from the checkpoint.")
    p.set_defaults(**{k: None if k in _UNSET_KEYS else v for k, v in DEFAULTS.items()})

    def d(key: str) -> str:
        return f" (default: {DEFAULTS[key]})"

    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"one of: {', '.join(list_models())}" + d("model"))
    g.add_argument("--norm", help=f"one of: {', '.join(NORMS)}" + d("norm"))
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (largest divisor <= this)" + d("gn_groups"))
    g.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="train at H x W (default: the model's input size)")
    g.add_argument("--init-weights", metavar="PATH",
                   help="fine-tune: start from these weights (a torchvision .pth of the same model, e.g. "
                        "resnext50_32x4d-7cdf4587.pth, or a zoo checkpoint), all but the classifier head, "
                        "which is sized for --data's classes (default: random initialisation)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)}" + d("optimizer"))
    g.add_argument("--lr", type=float, help="learning rate (default per optimizer: "
                   + ", ".join(f"{k} {v:g}" for k, v in TRAIN_LR.items()) + ")")
    g.add_argument("--momentum", type=float, help="momentum/nesterov gamma (default: 0.9)")
    g.add_argument("--weight-decay", type=float, metavar="WD",
                   help="L2 penalty added to the gradient by the optimizer" + d("weight_decay"))
    g.add_argument("--epochs", type=int, help="total epochs, counted from the start of the run; with "
                   f"--resume, train up to this many (default: {DEFAULTS['epochs']}; with --resume, the "
                   "checkpoint's run's --epochs)")
    g.add_argument("--batch-size", type=int, help="images per step, per process" + d("batch_size"))
    g.add_argument("--schedule", help="learning-rate schedule, laid out over --epochs, one of: "
                   f"{', '.join(SCHEDULERS)}" + d("schedule"))
    g.add_argument("--warmup-epochs", type=int, help="linear warmup before the schedule" + d("warmup_epochs"))
    g.add_argument("--step-epochs", type=int, metavar="N",
                   help=f"--schedule step: multiply the lr by {STEP_GAMMA:g} every N epochs "
                        "(default: a third of --epochs, at least 1)")
    g.add_argument("--loss", help=f"one of: {', '.join(LOSSES)}" + d("loss"))
    g.add_argument("--label-smoothing", type=float, metavar="EPS",
                   help="--loss ce: share of the target spread evenly over all classes, in [0, 1)"
                   + d("label_smoothing"))
    g.add_argument("--focal-gamma", type=float, metavar="GAMMA",
                   help="--loss focal: focusing exponent (0 is cross-entropy)" + d("focal_gamma"))
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help=f"one of: {', '.join(DATA_SPECS)}" + d("data"))
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of the images held out for validation" + d("val_fraction"))
    g.add_argument("--out", help=f"output directory (default: {DEFAULTS['out']}; "
                   "with --resume, the checkpoint's folder)")
    g.add_argument("--resume", metavar="PATH", help="continue from this checkpoint (e.g. OUT/last.pt)")
    g.add_argument("--seed", type=int, help="seed of the weights, the data split and the batch order" + d("seed"))
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available, else cpu" + d("device"))
    g.add_argument("--workers", type=int, help="DataLoader worker processes" + d("workers"))
    g.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    g.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for the model and inputs")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    return p


# ------------------------------------------------------------------------------------ setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def validate(args: argparse.Namespace) -> None:
    """One clear line for each bad setting, before any work starts."""
    try:
        args.model = get_model_spec(args.model).name
    except ValueError as e:
        raise TrainError(str(e)) from None
    for value, choices, what in ((args.norm, NORMS, "norm"), (args.optimizer, OPTIMIZERS, "optimizer"),
                                 (args.schedule, SCHEDULERS, "schedule"), (args.loss, LOSSES, "loss")):
        if value not in choices:
            raise TrainError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise TrainError(f"--workers must be >= 0, got {args.workers}")
    if args.lr is not None and not args.lr > 0:
        raise TrainError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise TrainError(f"--warmup-epochs must be >= 0 and less than --epochs ({args.epochs}), "
                         f"got {args.warmup_epochs}")
    if args.step_epochs is not None and args.step_epochs < 1:
        raise TrainError(f"--step-epochs must be >= 1, got {args.step_epochs}")


def step_every(step_epochs: int | None, epochs: int) -> int:
    """Epochs between the step schedule's decays: --step-epochs, else a third of --epochs."""
    return step_epochs if step_epochs is not None else max(1, epochs // 3)


def schedule_reshaped(config: dict[str, Any], epochs: int) -> bool:
    """Whether the lr schedule of a run with these settings changes when --epochs becomes ``epochs``."""
    if config["schedule"] == "cosine":
        return epochs != config["epochs"]
    if config["schedule"] == "step":
        return step_every(config["step_epochs"], epochs) != step_every(config["step_epochs"], config["epochs"])
    return False


def apply_resume(args: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """Take the resumed run's settings from its checkpoint config; return warning lines.

    Options left at None by the parser were not given on the command line: --out becomes the
    checkpoint's folder and --epochs the checkpoint's run's total.
    """
    saved = dict(saved)
    # Checkpoints from before --step-epochs decayed the step schedule every 30 epochs.
    saved.setdefault("step_epochs", 30 if saved["schedule"] == "step" else None)
    saved.setdefault("init_weights", None)  # before --init-weights
    ignored = []
    for key in RESUME_KEYS:
        given, kept = getattr(args, key), saved[key]
        if given is not None and _canonical(key, given) != _canonical(key, kept):
            ignored.append(f"{_flag(key)} {_show(given)} (checkpoint: {_show(kept)})")
        setattr(args, key, kept)
    if args.out is None:
        folder = os.path.dirname(args.resume) or "."
        last = os.path.join(folder, "last.pt")
        if os.path.isfile(last) and not os.path.samefile(last, args.resume):
            raise TrainError(f"{folder} holds the run's last.pt, which resuming {args.resume} there would "
                             "overwrite (with its later epochs of metrics.jsonl): pass --out for the resumed run")
        args.out = folder
    warnings = []
    if ignored:
        warnings.append("resuming keeps the checkpoint's settings; ignoring " + ", ".join(ignored))
    if args.epochs is None:
        args.epochs = saved["epochs"]
    elif schedule_reshaped(saved, args.epochs):
        warnings.append(f"the checkpoint's run was --epochs {saved['epochs']}: resuming with --epochs "
                        f"{args.epochs} reshapes its {saved['schedule']} lr schedule over {args.epochs} epochs, "
                        "so the result differs from an uninterrupted run of either length")
    return warnings


def init_weights(model: nn.Module, path: str, name: str, norm: str, gn_groups: int) -> None:
    """--init-weights: load all but the head of ``path`` (read once) into ``model``. A zoo
    checkpoint must hold the same model and normalization: GroupNorm with another group count,
    or LN/IN, would load silently, their weights having the same shapes. Other files (torchvision's)
    are checked by their keys and shapes."""
    try:
        state, about = read_weights(path)
        if about:
            check_same_model(path, about, name, norm, gn_groups)
        load_state(model, state, head=False, source=path)
    except WeightsError as e:
        raise TrainError(f"--init-weights {e}") from None


def check_same_model(path: str, about: dict[str, Any], model: str, norm: str, gn_groups: int) -> None:
    args = about.get("model_args", {})
    theirs = (get_model_spec(about["model_name"]).name, args.get("norm", "bn"),
              args.get("gn_groups", 32) if args.get("norm") == "gn" else None)
    ours = (model, norm, gn_groups if norm == "gn" else None)
    if theirs != ours:
        def show(t: tuple) -> str:
            return f"{t[0]} (norm={t[1]}" + (f", gn_groups={t[2]})" if t[2] else ")")
        raise TrainError(f"--init-weights {path} holds {show(theirs)}; this run trains {show(ours)}")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _canonical(key: str, value: Any) -> Any:
    if key == "model":
        try:
            return get_model_spec(value).name
        except ValueError:
            return value
    if key == "input_size" and value is not None:
        return [int(v) for v in value]
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_hparams(args: argparse.Namespace) -> dict[str, Any]:
    hp: dict[str, Any] = {"weight_decay": args.weight_decay,
                          "lr": args.lr if args.lr is not None else TRAIN_LR[args.optimizer]}
    if args.momentum is not None:
        if args.optimizer not in ("momentum", "nesterov"):
            raise TrainError(f"--momentum applies to momentum/nesterov, not {args.optimizer}")
        hp["momentum"] = args.momentum
    return hp


# ------------------------------------------------------------------------------------ loops


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool) -> tuple[float, float]:
    """Mean val loss and top-1 accuracy."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
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


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="val accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def read_history(path: str, up_to_epoch: int) -> list[dict[str, Any]]:
    """metrics.jsonl rows of epochs <= up_to_epoch (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as configured; return the last epoch's metrics.

    ``args`` comes from :func:`build_parser`; options it leaves at None take their value from
    the checkpoint (with ``--resume``) or from :data:`DEFAULTS`.
    """
    resume_ckpt, warnings = None, []
    if args.resume:
        try:
            resume_ckpt = load_checkpoint(args.resume)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        # The model and data come from the checkpoint; the run continues with its settings
        # except the ones that only say how far and where to go.
        warnings = apply_resume(args, resume_ckpt["config"])
    for key in _UNSET_KEYS:
        if getattr(args, key, None) is None:
            setattr(args, key, DEFAULTS[key])
    validate(args)
    device = resolve_device(args.device)
    ddp = init_distributed(device)
    if ddp.main:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    try:
        return _train(args, device, ddp, resume_ckpt)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device, ddp: Dist,
           resume_ckpt: dict[str, Any] | None) -> dict[str, Any]:
    spec = get_model_spec(args.model)
    input_size = (spec.input_size[0], *args.input_size) if args.input_size else spec.input_size
    seed_everything(args.seed)
    try:
        data = build_datasets(args.data, input_size, seed=args.seed, val_fraction=args.val_fraction)
    except DataError as e:
        raise TrainError(str(e)) from None

    model_args = dict(num_classes=data.num_classes, norm=args.norm, gn_groups=args.gn_groups,
                      in_chans=input_size[0])
    model = create_model(args.model, **model_args)
    if args.init_weights and resume_ckpt is None:
        init_weights(model, args.init_weights, spec.name, args.norm, args.gn_groups)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    hparams = optimizer_hparams(args)
    optimizer = create_optimizer(args.optimizer, model.parameters(), **hparams)

    sampler = (DistributedSampler(data.train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                  seed=args.seed, drop_last=True) if ddp.world > 1 else None)
    steps_per_epoch = (len(sampler) if sampler else len(data.train)) // args.batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(data.train)} images per process)")
    scheduler = create_scheduler(args.schedule, optimizer, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                                 warmup_epochs=args.warmup_epochs, decay_rate=STEP_GAMMA,
                                 decay_epochs=step_every(args.step_epochs, args.epochs))
    try:
        loss_fn = create_loss(args.loss, num_classes=data.num_classes, label_smoothing=args.label_smoothing,
                              gamma=args.focal_gamma)
    except ValueError as e:
        raise TrainError(str(e)) from None
    use_cuda_amp = args.amp and device.type == "cuda"
    amp_dtype = (torch.float16 if use_cuda_amp else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)

    start_epoch, best_acc = 0, -1.0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        # The lr the (possibly reshaped: another --epochs) schedule gives at this step; the
        # optimizer's saved lr is the old schedule's. Equal when nothing was reshaped.
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, best_acc = resume_ckpt["epoch"], resume_ckpt["best_metric"]
        set_rng_state(resume_ckpt["rng"])
        if start_epoch >= args.epochs:
            raise TrainError(f"{args.resume} already finished epoch {start_epoch}; "
                             f"pass --epochs larger than {start_epoch} to train further")

    train_model: nn.Module = model
    if ddp.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    val_loader = DataLoader(data.val, batch_size=256, shuffle=False, num_workers=args.workers)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    history = read_history(metrics_path, start_epoch) if ddp.main else []
    config = {k: v for k, v in vars(args).items() if k != "no_progress"}
    show = ddp.main and not args.no_progress
    if ddp.main:
        print(f"training {args.model} (norm={args.norm}, {sum(p.numel() for p in model.parameters()):,} params) "
              f"on {data.name}: {len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
              f"{args.optimizer} lr={optimizer.param_groups[0]['lr']:g}, {ddp.world} process(es) on {device}",
              flush=True)
        if resume_ckpt is not None:
            print(f"resuming {args.resume} after epoch {start_epoch}, up to epoch {args.epochs}; "
                  f"writing to {args.out}", flush=True)

    row: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        train_model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader_sampler = sampler
        else:
            # A generator seeded per epoch makes the order independent of what ran before,
            # so a resumed run sees the same batches as an uninterrupted one.
            loader_sampler = RandomSampler(data.train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        loader = DataLoader(data.train, batch_size=args.batch_size, sampler=loader_sampler,
                            num_workers=args.workers, drop_last=True,
                            persistent_workers=False, pin_memory=device.type == "cuda")
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        epoch_lr = optimizer.param_groups[0]["lr"]  # the lr of the epoch's first step
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = train_model(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                if epoch == 0:
                    kept = "no checkpoint was written"
                else:  # epoch `epoch` is the last one completed: saved by this run or resumed from
                    path = os.path.join(args.out, "last.pt") if epoch > start_epoch else args.resume
                    kept = f"the last good checkpoint, {path} (epoch {epoch}), is untouched"
                raise TrainError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: stopping; "
                                 f"{kept} (try a lower --lr)", code=1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * y.numel()
            seen += y.numel()
            if show:
                rate = seen * ddp.world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        train_time = time.perf_counter() - t0
        train_loss = loss_sum / max(seen, 1)
        if ddp.world > 1:  # average the train loss over processes
            t = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            train_loss = (t[0] / t[1]).item()

        if ddp.main:
            val_loss, val_acc = evaluate(model, val_loader, loss_fn, device, amp_dtype, args.channels_last)
            is_best = val_acc > best_acc
            best_acc = max(best_acc, val_acc)
            row = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                       lr=epoch_lr, epoch_time_s=round(train_time, 3),
                       img_per_s=round(seen * ddp.world / train_time, 1))
            history.append(row)
            ckpt = dict(
                model=model.state_dict(), model_name=args.model, model_args=model_args,
                classes=list(data.classes), input_size=list(input_size), mean=list(data.mean),
                std=list(data.std), crop_pct=data.crop_pct, data=data.name, epoch=epoch + 1, best_metric=best_acc,
                val_acc=val_acc, config=config, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if use_cuda_amp else {},
                rng=rng_state(),
            )
            save_checkpoint(os.path.join(args.out, "last.pt"), ckpt)
            if is_best:
                save_checkpoint(os.path.join(args.out, "best.pt"), ckpt)
            write_history(metrics_path, history)
            plot_curves(history, os.path.join(args.out, "curves.png"))
            print(f"epoch {epoch + 1}/{args.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                  f"val_top1 {100 * val_acc:.2f}%  {row['img_per_s']:.0f} img/s  {train_time:.1f}s"
                  + ("  *best" if is_best else ""), flush=True)
        if ddp.world > 1:
            dist.barrier()
    if ddp.main:
        print(f"done: best val top-1 {100 * best_acc:.2f}%; outputs in {args.out}: "
              "last.pt best.pt metrics.jsonl curves.png", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is in place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
