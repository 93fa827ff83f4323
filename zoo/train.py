"""``python -m zoo.train``: train a classifier on the bundled digits or an image folder.

    python -m zoo.train                                   # resnext_mini on digits with adam
    python -m zoo.train --model densenet_mini --norm gn --optimizer nesterov --lr 0.05
    python -m zoo.train --data folder:data/flowers --model resnext50 --batch-size 32
    python -m zoo.train --resume runs/train/last.pt --epochs 20   # continue to epoch 20, in runs/train
    torchrun --nproc-per-node 2 -m zoo.train --data synthetic      # DistributedDataParallel

Under ``--out``: ``last.pt`` and ``best.pt`` (written atomically, see :mod:`zoo.checkpoint`),
``metrics.jsonl`` (one JSON object per epoch; ``lr`` is the learning rate of the epoch's first
step) and ``curves.png``. An ``--out`` that already holds a run is refused unless ``--force``
(as timm's ``--experiment``): a second run would silently replace the first. ``--resume``
writes into its checkpoint's own folder.

The command line becomes a :class:`zoo.config.TrainConfig` (every default is there); the epochs
run through :mod:`zoo.engine`, as the experiments' do.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from zoo import pruned
from zoo.augment import AA_HELP, DEFAULT_HFLIP, DEFAULT_SCALE, Mixup
from zoo.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from zoo.config import DEFAULTS, STEP_GAMMA, TRAIN_LR, ConfigError, TrainConfig, optimizer_hparams, resumed
from zoo.config import augmentation, step_every, validated
from zoo.data import DATA_SPECS, DataError, build_datasets, class_count_lines, skipped_line
from zoo.ema import ModelEma
from zoo.engine import epoch_order, evaluate, rng_state, seed_everything, set_rng_state, train_one_epoch
from zoo.fileio import file_sha256
from zoo.history import plot_curves, read_history, write_history
from zoo.losses import LOSSES, DistillationLoss, create_loss
from zoo.nn.act import ACTS
from zoo.nn.attention import ATTNS
from zoo.nn.norm import NORMS
from zoo.optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler
from zoo.registry import create_model, get_model_spec, list_models
from zoo.weights import WeightsError, classifier_prefix, load_state, read_weights

# The measured case for turning them off, quoted by --help (README's training section has the commands).
AUG_MEASURED = ("Measured on the digits written out as a folder of PNGs (resnext_mini, 8 epochs, best val top-1): "
                "default 76.3%, --hflip 0 93.3%, --hflip 0 --scale 0.5 1 95.5%, --no-aug 99.2%; the README's "
                "training section has the commands.")

# What a run writes under --out that a second run there would replace (curves.png is drawn from
# metrics.jsonl).
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


class TrainError(Exception):
    """A problem to report to the user in one line (exit 2 for bad input, 1 for a failed run)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The CLI. Each help text states its default once (taken from :data:`zoo.config.DEFAULTS`);
    every option is left at None when not given (:func:`config_from_args`)."""
    p = argparse.ArgumentParser(
        prog="python -m zoo.train", description=__doc__.split("\n")[0].replace("``", ""),
        epilog="With --resume, the model, data and optimization settings come from the checkpoint.")

    def d(key: str) -> str:
        return f" (default: {DEFAULTS[key]})"

    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"one of: {', '.join(list_models())}" + d("model"))
    g.add_argument("--norm", help=f"one of: {', '.join(NORMS)}" + d("norm"))
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (largest divisor <= this)" + d("gn_groups"))
    g.add_argument("--act", help=f"activation, one of: {', '.join(ACTS)}" + d("act"))
    g.add_argument("--attn", help=f"attention block, one of: none, {', '.join(ATTNS)} (default: the model's own: "
                   "se for seresnext*, none for the others)")
    g.add_argument("--attn-reduction", type=int, metavar="R",
                   help="channel reduction of se and cbam" + d("attn_reduction"))
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
    g = p.add_argument_group(
        "augmentation (train split only; timm's names)",
        "Flips and small crops destroy images whose orientation or framing is the class (digits, text, documents, "
        "many medical and industrial images): turn them off there (--hflip 0, --scale 0.5 1 or higher, or "
        "--no-aug). " + AUG_MEASURED)
    g.add_argument("--no-aug", action="store_true", default=None,
                   help="no augmentation: train on the val transform (mixup/cutmix still apply)")
    g.add_argument("--hflip", type=float, metavar="P",
                   help=f"horizontal flip probability (default: {DEFAULT_HFLIP:g} for folder:PATH, 0 for digits and "
                        "synthetic)")
    g.add_argument("--vflip", type=float, metavar="P", help="vertical flip probability" + d("vflip"))
    g.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random resized crop: share of the image area kept (default: "
                        f"{DEFAULT_SCALE[0]:g} {DEFAULT_SCALE[1]:g} for folder:PATH; digits and synthetic: no crop, "
                        "a shift of up to 1/16 of the side)")
    g.add_argument("--ratio", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random resized crop: aspect ratio range (default: 3/4 4/3)")
    g.add_argument("--color-jitter", type=float, metavar="F",
                   help="brightness, contrast and saturation factors in [1-F, 1+F] (e.g. 0.4)" + d("color_jitter"))
    g.add_argument("--aa", metavar="POLICY", help=f"auto-augment policy, as timm spells it: {AA_HELP} "
                   "(default: none)")
    g.add_argument("--reprob", type=float, metavar="P",
                   help="random erasing probability (a box of normal noise)" + d("reprob"))
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup Beta(alpha, alpha); 0: off" + d("mixup"))
    g.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix Beta(alpha, alpha); 0: off" + d("cutmix"))
    g.add_argument("--mixup-prob", type=float, metavar="P",
                   help="share of batches mixed when --mixup or --cutmix is on" + d("mixup_prob"))
    g.add_argument("--mixup-switch-prob", type=float, metavar="P",
                   help="with both on: share of mixed batches that use cutmix" + d("mixup_switch_prob"))
    g = p.add_argument_group("knowledge distillation")
    g.add_argument("--teacher", metavar="CKPT",
                   help="distil from this zoo checkpoint (any model of the same classes and input size): the loss "
                        "becomes alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * --loss "
                        "(default: no teacher)")
    g.add_argument("--kd-temperature", type=float, metavar="T", help="softmax temperature" + d("kd_temperature"))
    g.add_argument("--kd-alpha", type=float, metavar="A",
                   help="weight of the distillation term, in [0, 1]" + d("kd_alpha"))
    g = p.add_argument_group("data and output")
    g.add_argument("--data", help=f"one of: {', '.join(DATA_SPECS)}" + d("data"))
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="share of the images held out for validation" + d("val_fraction"))
    g.add_argument("--out", help=f"output directory, refused when it holds another run (default: {DEFAULTS['out']}; "
                   "with --resume, the checkpoint's folder)")
    g.add_argument("--force", action="store_true", default=None,
                   help=f"overwrite the run already in --out ({', '.join(RUN_FILES)})")
    g.add_argument("--model-ema", action="store_true", default=None,
                   help="also keep an exponential moving average of the weights, evaluated and saved beside them; "
                        "best.pt keeps whichever scored higher and says which (timm's --model-ema)")
    g.add_argument("--model-ema-decay", type=float, metavar="D",
                   help="EMA decay, capped at (1+k)/(10+k) for the k-th step so short runs average too"
                   + d("model_ema_decay"))
    g.add_argument("--resume", metavar="PATH", help="continue from this checkpoint (e.g. OUT/last.pt)")
    g.add_argument("--seed", type=int, help="seed of the weights, the data split and the batch order" + d("seed"))
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available, else cpu" + d("device"))
    g.add_argument("--workers", type=int, help="DataLoader worker processes" + d("workers"))
    g.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format for the model and inputs")
    g.add_argument("--progress", dest="progress", action="store_const", const=True,
                   help="progress bars on stderr (default: only when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bars (logs stay)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings from :func:`build_parser`'s arguments; the ones left at None were not
    given and take :class:`TrainConfig`'s defaults (or, with --resume, the checkpoint's)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("progress", "force")}
    for key in ("input_size", "scale", "ratio"):
        if key in given:
            given[key] = tuple(given[key])
    return TrainConfig(**given, progress=args.progress, force=bool(args.force), given=frozenset(given))


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


def init_weights(model: nn.Module, path: str, name: str, norm: str, gn_groups: int) -> str:
    """--init-weights: load all but the head of ``path`` (read once) into ``model``; return one
    line saying what was loaded and which head was skipped. A zoo checkpoint must hold the same
    model and normalization: GroupNorm with another group count, or LN/IN, would load silently,
    their weights having the same shapes. Other files (torchvision's) are checked by their keys
    and shapes."""
    try:
        state, about = read_weights(path)
        if about:
            check_same_model(path, about, name, norm, gn_groups)
        prefix = classifier_prefix(model)
        if about.get("pruned"):
            narrow_like(model, about["pruned"], prefix)
        load_state(model, state, head=False, source=path)
    except WeightsError as e:
        raise TrainError(f"--init-weights {e}") from None
    loaded = sum(not k.startswith(prefix) for k in state)
    theirs, ours = state.get(prefix + "weight"), model.state_dict()[prefix + "weight"]
    held = f"{theirs.shape[0]} classes in the file" if theirs is not None else "not in the file"
    return (f"--init-weights {path}: loaded {loaded} tensors; skipped the classifier head {prefix[:-1]} "
            f"({held}): it starts fresh, sized for --data's {ours.shape[0]} classes")


def narrow_like(model: nn.Module, arch: dict[str, Any], head_prefix: str) -> None:
    """Give ``model`` a pruned checkpoint's layer sizes (:mod:`zoo.pruned`) except its head's class
    count: the body as pruned, a fresh head on the pruned width for this run's classes."""
    head = head_prefix[:-1]
    pruned.apply(model, {k: v for k, v in arch.items() if k != head})
    if head in arch:
        model.num_features = arch[head]["in_features"]
        model.reset_classifier(model.num_classes)


def load_teacher(config: TrainConfig, classes: list[str], input_size: tuple[int, ...],
                 device: torch.device) -> nn.Module:
    """--teacher: the checkpoint's model (the weights that scored its val accuracy), frozen in eval
    mode; refused unless it matches ``config.teacher_sha256`` and predicts the same classes from
    the same input size as the student."""
    path = str(config.teacher)
    if config.teacher_sha256 is not None and os.path.isfile(path) and file_sha256(path) != config.teacher_sha256:
        raise TrainError(f"--teacher {path} changed since the run started (sha256 {config.teacher_sha256[:12]}...): "
                         "resuming with another teacher would not continue the same run")
    try:
        ckpt = load_checkpoint(path)
        teacher = model_from_checkpoint(ckpt, path, ema=None)
    except CheckpointError as e:
        raise TrainError(f"--teacher {e}") from None
    if list(ckpt["classes"]) != list(classes):
        raise TrainError(f"--teacher {path} predicts {len(ckpt['classes'])} classes ({', '.join(ckpt['classes'][:5])}"
                         f"{', ...' if len(ckpt['classes']) > 5 else ''}); this run's data has {len(classes)} "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if list(ckpt["input_size"]) != list(input_size):
        raise TrainError(f"--teacher {path} takes {'x'.join(map(str, ckpt['input_size']))} inputs; this run trains "
                         f"at {'x'.join(map(str, input_size))}")
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_same_model(path: str, about: dict[str, Any], model: str, norm: str, gn_groups: int) -> None:
    args = about.get("model_args", {})
    theirs = (get_model_spec(about["model_name"]).name, args.get("norm", "bn"),
              args.get("gn_groups", 32) if args.get("norm") == "gn" else None)
    ours = (model, norm, gn_groups if norm == "gn" else None)
    if theirs != ours:
        def show(t: tuple) -> str:
            return f"{t[0]} (norm={t[1]}" + (f", gn_groups={t[2]})" if t[2] else ")")
        raise TrainError(f"--init-weights {path} holds {show(theirs)}; this run trains {show(ours)}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training as configured; return the last epoch's metrics.

    With ``config.resume``, the settings come from the checkpoint as :func:`zoo.config.resumed`
    says; warnings about them go to stderr.
    """
    resume_ckpt, warnings = None, []
    try:
        if config.resume:
            try:
                resume_ckpt = load_checkpoint(config.resume)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            config, warnings = resumed(config, resume_ckpt["config"])
        config = validated(config)
    except ConfigError as e:
        raise TrainError(str(e)) from None
    if config.teacher is not None and config.teacher_sha256 is None:
        if not os.path.isfile(config.teacher):
            raise TrainError(f"--teacher {config.teacher}: no such checkpoint file")
        config = replace(config, teacher_sha256=file_sha256(config.teacher))
    if not config.force:
        check_out_is_free(config)
    device = resolve_device(config.device)
    ddp = init_distributed(device)
    if ddp.main:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    try:
        return _train(config, device, ddp, resume_ckpt)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def check_out_is_free(config: TrainConfig) -> None:
    """Refuse an ``out`` that holds a run this one would overwrite: any ``out`` but a resumed
    checkpoint's own folder. (Every process of a torchrun launch checks before any writes.)"""
    found = [name for name in RUN_FILES if os.path.isfile(os.path.join(config.out, name))]
    if not found:
        return
    if config.resume and os.path.samefile(config.out, os.path.dirname(config.resume) or "."):
        return
    what = f"--out {config.out} already holds a run ({', '.join(found)}), which this run would overwrite"
    if config.resume:
        raise TrainError(f"{what}: pass another --out, or --force to overwrite it")
    raise TrainError(f"{what}: pass another --out, --resume {os.path.join(config.out, 'last.pt')} to continue "
                     "it, or --force to overwrite it")


def _train(config: TrainConfig, device: torch.device, ddp: Dist,
           resume_ckpt: dict[str, Any] | None) -> dict[str, Any]:
    spec = get_model_spec(config.model)
    input_size = (spec.input_size[0], *config.input_size) if config.input_size else spec.input_size
    seed_everything(config.seed)
    augment = augmentation(config)
    try:
        data = build_datasets(config.data, input_size, seed=config.seed, val_fraction=config.val_fraction,
                              augment=augment)
    except DataError as e:
        raise TrainError(str(e)) from None

    model_args = dict(num_classes=data.num_classes, norm=config.norm, gn_groups=config.gn_groups,
                      in_chans=input_size[0], act=config.act, attn=config.attn, attn_reduction=config.attn_reduction)
    model = create_model(config.model, **model_args)
    as_built = pruned.record(model)
    if resume_ckpt is not None:
        pruned.apply(model, resume_ckpt.get("pruned"))  # a run started from a pruned model stays pruned
    if config.init_weights and resume_ckpt is None:
        loaded = init_weights(model, config.init_weights, spec.name, config.norm, config.gn_groups)
        if ddp.main:
            print(loaded, flush=True)
    # Layer sizes that differ from the registry's (a pruned model) travel in every checkpoint.
    arch = pruned.record(model)
    arch = arch if arch != as_built else None
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        hparams = optimizer_hparams(config)
    except ConfigError as e:
        raise TrainError(str(e)) from None
    optimizer = create_optimizer(config.optimizer, model.parameters(), **hparams)

    sampler = (DistributedSampler(data.train, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                  seed=config.seed, drop_last=True) if ddp.world > 1 else None)
    steps_per_epoch = (len(sampler) if sampler else len(data.train)) // config.batch_size
    if steps_per_epoch < 1:
        raise TrainError(f"--batch-size {config.batch_size} is larger than the training set "
                         f"({len(data.train)} images per process)")
    scheduler = create_scheduler(config.schedule, optimizer, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                                 warmup_epochs=config.warmup_epochs, decay_rate=STEP_GAMMA,
                                 decay_epochs=step_every(config.step_epochs, config.epochs))
    try:
        loss_fn = create_loss(config.loss, num_classes=data.num_classes, label_smoothing=config.label_smoothing,
                              gamma=config.focal_gamma)
    except ValueError as e:
        raise TrainError(str(e)) from None
    # Mixup's soft targets carry the label smoothing, so its training loss must not smooth again;
    # validation keeps the configured loss on hard labels.
    mixup, train_loss_fn = None, loss_fn
    if config.mixup or config.cutmix:
        mixup = Mixup(data.num_classes, mixup=config.mixup, cutmix=config.cutmix, prob=config.mixup_prob,
                      switch_prob=config.mixup_switch_prob, label_smoothing=config.label_smoothing)
        train_loss_fn = create_loss("ce")
    teacher = None
    if config.teacher is not None:
        teacher = load_teacher(config, list(data.classes), tuple(input_size), device)
        if config.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        train_loss_fn = DistillationLoss(train_loss_fn, temperature=config.kd_temperature, alpha=config.kd_alpha)
    use_cuda_amp = config.amp and device.type == "cuda"
    amp_dtype = (torch.float16 if use_cuda_amp else torch.bfloat16) if config.amp else None
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
        if start_epoch >= config.epochs:
            raise TrainError(f"{config.resume} already finished epoch {start_epoch}; "
                             f"pass --epochs larger than {start_epoch} to train further")
    ema = ModelEma(model, config.model_ema_decay) if config.model_ema else None
    if ema is not None and resume_ckpt is not None:
        if resume_ckpt.get("model_ema") is None:
            raise TrainError(f"{config.resume} holds no EMA weights to resume --model-ema from")
        ema.load_state_dict(resume_ckpt["model_ema"], resume_ckpt["ema_updates"])

    train_model: nn.Module = model
    if ddp.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    val_loader = DataLoader(data.val, batch_size=256, shuffle=False, num_workers=config.workers)
    os.makedirs(config.out, exist_ok=True)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    history = read_history(metrics_path, start_epoch) if ddp.main else []
    saved_config = config.to_dict()
    # As pip does: bars redraw a line in place, which in a log file is one line per refresh.
    show = ddp.main and (config.progress if config.progress is not None else sys.stderr.isatty())
    if ddp.main:
        print(f"training {config.model} (norm={config.norm}, {sum(p.numel() for p in model.parameters()):,} params) "
              f"on {data.name}: {len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
              f"{config.optimizer} lr={optimizer.param_groups[0]['lr']:g}, {ddp.world} process(es) on {device}",
              flush=True)
        print(f"augmentation: {augment.describe()}"
              + (f"; mixup {config.mixup:g}, cutmix {config.cutmix:g} (prob {config.mixup_prob:g}, "
                 f"switch {config.mixup_switch_prob:g})" if mixup else "")
              + (f"; model EMA decay {config.model_ema_decay:g}" if ema else ""), flush=True)
        if teacher is not None:
            print(f"distilling from {config.teacher} (sha256 {str(config.teacher_sha256)[:12]}, "
                  f"{sum(p.numel() for p in teacher.parameters()):,} params): T={config.kd_temperature:g}, "
                  f"alpha={config.kd_alpha:g}", flush=True)
        if data.skipped:
            print(skipped_line(data.skipped), flush=True)
        for line in class_count_lines(data):
            print(line, flush=True)
        if resume_ckpt is not None:
            print(f"resuming {config.resume} after epoch {start_epoch}, up to epoch {config.epochs}; "
                  f"writing to {config.out}", flush=True)

    row: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        order = sampler if sampler is not None else epoch_order(len(data.train), config.seed, epoch)
        loader = DataLoader(data.train, batch_size=config.batch_size, sampler=order, num_workers=config.workers,
                            drop_last=True, persistent_workers=False, pin_memory=device.type == "cuda")
        stats = train_one_epoch(train_model, train_loss_fn, optimizer, loader, device, scheduler=scheduler,
                                scaler=scaler if use_cuda_amp else None, amp_dtype=amp_dtype,
                                channels_last=config.channels_last, progress=show,
                                desc=f"epoch {epoch + 1}/{config.epochs}", world_size=ddp.world,
                                mixup=mixup, ema=ema, teacher=teacher)
        if stats.nonfinite is not None:
            step, value = stats.nonfinite
            if epoch == 0:
                kept = "no checkpoint was written"
            else:  # epoch `epoch` is the last one completed: saved by this run or resumed from
                path = os.path.join(config.out, "last.pt") if epoch > start_epoch else config.resume
                kept = f"the last good checkpoint, {path} (epoch {epoch}), is untouched"
            raise TrainError(f"loss became {value} at epoch {epoch + 1}, step {step}: stopping; "
                             f"{kept} (try a lower --lr)", code=1)

        if ddp.main:
            val_loss, val_acc = evaluate(model, loss_fn, val_loader, device, amp_dtype=amp_dtype,
                                         channels_last=config.channels_last)
            score, selected = val_acc, "model"
            ema_metrics: dict[str, Any] = {}
            if ema is not None:
                ema_loss, ema_acc = evaluate(ema.module, loss_fn, val_loader, device, amp_dtype=amp_dtype,
                                             channels_last=config.channels_last)
                ema_metrics = dict(ema_val_loss=ema_loss, ema_val_acc=ema_acc)
                if ema_acc > val_acc:
                    score, selected = ema_acc, "ema"
            is_best = score > best_acc
            best_acc = max(best_acc, score)
            row = dict(epoch=epoch + 1, train_loss=stats.loss, val_loss=val_loss, val_acc=val_acc, **ema_metrics,
                       lr=stats.lr, epoch_time_s=round(stats.seconds, 3),
                       img_per_s=round(stats.images * ddp.world / stats.seconds, 1))
            history.append(row)
            ckpt = dict(
                model=model.state_dict(), model_name=config.model, model_args=model_args,
                classes=list(data.classes), input_size=list(input_size), mean=list(data.mean),
                std=list(data.std), crop_pct=data.crop_pct, data=data.name, epoch=epoch + 1, best_metric=best_acc,
                val_acc=val_acc, config=saved_config, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if use_cuda_amp else {},
                rng=rng_state(), augment=augment.to_dict(), selected=selected,
            )
            if arch is not None:
                ckpt["pruned"] = arch
            if ema is not None:
                ckpt.update(model_ema=ema.state_dict(), ema_updates=ema.updates)
            save_checkpoint(os.path.join(config.out, "last.pt"), ckpt)
            if is_best:
                save_checkpoint(os.path.join(config.out, "best.pt"), ckpt)
            write_history(metrics_path, history)
            plot_curves(history, os.path.join(config.out, "curves.png"))
            print(f"epoch {epoch + 1}/{config.epochs}  train_loss {stats.loss:.4f}  val_loss {val_loss:.4f}  "
                  f"val_top1 {100 * val_acc:.2f}%"
                  + (f"  ema_val_top1 {100 * ema_metrics['ema_val_acc']:.2f}%" if ema_metrics else "")
                  + f"  {row['img_per_s']:.0f} img/s  {stats.seconds:.1f}s"
                  + (("  *best (ema)" if selected == "ema" else "  *best") if is_best else ""), flush=True)
        if ddp.world > 1:
            dist.barrier()
    if ddp.main:
        print(f"done: best val top-1 {100 * best_acc:.2f}%; outputs in {config.out}: "
              "last.pt best.pt metrics.jsonl curves.png", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    try:
        train(config)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch's checkpoint is in place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
