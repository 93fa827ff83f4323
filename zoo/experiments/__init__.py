"""``python -m zoo.experiments NAME``: small, reproducible checks of the textbook's claims.

    python -m zoo.experiments optimizers     # the seven rules on one CNN + 2-D trajectories
    python -m zoo.experiments norm-batch     # BN / GN / LN / IN at batch 32, 16, 8, 4, 2
    python -m zoo.experiments activations    # vanishing gradients per activation, with BN and residuals
    python -m zoo.experiments attention      # SE / ECA / CBAM: FLOPs against measured time
    python -m zoo.experiments compression    # int8, pruning, distillation on one Pareto chart
    python -m zoo.experiments norm-batch --quick --out /tmp/exp    # seconds, synthetic data

Each writes ``OUT/NAME/report.md`` (command, settings, tables and a verdict computed from the
numbers), ``OUT/NAME/NAME.png`` and ``OUT/NAME/results.json`` (the raw numbers). A ``--quick``
run writes to ``OUT/quick/NAME/`` instead, and its report opens by saying it is a smoke run: its
verdicts come from a few dozen synthetic images and say nothing about the claims.

- ``optimizers``: every rule of :data:`zoo.optim.OPTIMIZERS` trains the same model
  from the same initial weights on the same batches, each at its :data:`zoo.config.TRAIN_LR`;
  the table gives the final train loss, val top-1 and the time per step. The same rules also
  run on two 2-D surfaces (:data:`SURFACES`): Rosenbrock from (-1.5, 2) and the saddle
  ``x^2 - y^2`` from (1, 1e-3), next to which plain gradient descent should linger.
- ``norm-batch``: the four norms of :data:`zoo.nn.norm.NORMS` at each batch size,
  momentum SGD with the learning rate scaled linearly with the batch (as in the GN paper). The
  budget is a fixed number of training images: every cell sees the same images in the same
  order, only grouped into batches differently, so a batch of 2 takes 16x the steps of 32.
- ``activations``, ``attention``, ``compression``: see their modules.

The full budgets fit in under 10 minutes each on a 2-core CPU: the digits are trained at their
native 8 x 8 (resnext_mini's CIFAR stem keeps the resolution, so its stages run at 8, 4 and 2
pixels), several times faster than at the model's default 32 x 32 and with nothing lost to
upsampling; on these budgets GN, LN and IN also reached lower errors at 8 x 8 than at 16 x 16.

Every cell trains through :func:`zoo.engine.train_one_epoch`, as ``python -m zoo.train`` does.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from zoo.config import DEFAULTS as TRAIN_DEFAULTS
from zoo.config import TRAIN_LR
from zoo.data import DataError
from zoo.experiments.activations import activations_verdict, run_activations
from zoo.experiments.attention import attention_verdict, run_attention
from zoo.experiments.compression import pareto_front, run_compression
from zoo.experiments.norm_batch import norm_batch_verdict, run_norm_batch
from zoo.experiments.optimizers import run_optimizers
from zoo.experiments.report import differs
from zoo.experiments.surfaces import SURFACES, Surface, escape_step, trajectory
from zoo.fileio import atomic_write
from zoo.nn.norm import NORMS
from zoo.registry import get_model_spec

__all__ = ["EXPERIMENTS", "SURFACES", "Experiment", "Surface", "activations_verdict", "attention_verdict", "differs",
           "escape_step", "get_experiment", "main", "norm_batch_verdict", "pareto_front", "trajectory"]


@dataclass(frozen=True)
class Experiment:
    """An experiment's runner and its settings.

    ``run(settings, out_dir, command)`` writes the PNG and ``results.json`` into ``out_dir`` and
    returns a dict whose ``report`` is the markdown report. In the settings, ``input_size`` is
    the side of the square input and ``epochs`` counts passes over the images of an epoch (the
    training set rounded down to a multiple of the largest batch, so every batch size sees
    exactly the same images).
    """

    run: Callable[[dict[str, Any], str, str], dict[str, Any]]
    settings: dict[str, Any]  # every default of the experiment, in one place
    quick: dict[str, Any]  # --quick: the same code paths on a budget of seconds (tests, smoke runs)


# Name -> experiment, the one place an experiment's name is tied to its code and settings.
_EXPERIMENT_MAP: dict[str, Experiment] = {
    "optimizers": Experiment(
        run_optimizers,
        settings=dict(model="resnext_mini", data="digits", input_size=8, epochs=8, batch_size=32,
                      schedule="cosine", weight_decay=TRAIN_DEFAULTS["weight_decay"], norm="bn", seed=0,
                      train_images=None),
        quick=dict(data="synthetic", input_size=8, epochs=1, train_images=64)),
    "norm-batch": Experiment(
        run_norm_batch,
        settings=dict(model="resnext_mini", data="digits", input_size=8, epochs=4,
                      batch_sizes=(32, 16, 8, 4, 2), norms=NORMS, optimizer="momentum",
                      base_lr=TRAIN_LR["momentum"], base_batch=32, schedule="cosine",
                      weight_decay=TRAIN_DEFAULTS["weight_decay"], gn_groups=32, seed=0, train_images=None),
        quick=dict(data="synthetic", input_size=8, epochs=1, train_images=32)),
    "activations": Experiment(
        run_activations,
        settings=dict(depth=20, width=16, grad_side=8, grad_batch=32, grad_seeds=3,
                      grad_acts=("sigmoid", "tanh", "relu", "gelu", "silu"),
                      model="resnext_mini", data="digits", input_size=8, epochs=6, batch_size=32,
                      race_acts=("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu", "mish", "hardswish"),
                      optimizer="adam", schedule="cosine", weight_decay=TRAIN_DEFAULTS["weight_decay"], norm="bn",
                      seed=0, train_images=None),
        quick=dict(width=8, grad_batch=8, grad_seeds=1, data="synthetic", epochs=1, train_images=64,
                   race_acts=("sigmoid", "tanh", "relu", "gelu", "silu"))),
    "attention": Experiment(
        run_attention,
        settings=dict(model="resnext_mini", data="digits", input_size=8, epochs=6, batch_size=32, optimizer="adam",
                      schedule="cosine", weight_decay=TRAIN_DEFAULTS["weight_decay"], seed=0, train_images=None,
                      ort_threads=1, rounds=200, profile_runs=50),
        quick=dict(data="synthetic", epochs=1, train_images=64, rounds=5, profile_runs=3)),
    "compression": Experiment(
        run_compression,
        settings=dict(model="resnext_mini", data="digits", input_size=8, epochs=12, batch_size=32, optimizer="adam",
                      lr=TRAIN_LR["adam"], schedule="cosine", weight_decay=TRAIN_DEFAULTS["weight_decay"], seed=0,
                      train_images=None, prune_ratios=(0.3, 0.5, 0.7), criterion="l1", finetune_epochs=6,
                      finetune_lr=1e-3, student_prune=0.7, student_epochs=12, kd_temperature=4.0, kd_alpha=0.9,
                      ort_threads=1, rounds=300),
        quick=dict(data="synthetic", epochs=1, train_images=64, finetune_epochs=1, student_epochs=1, rounds=3)),
}
EXPERIMENTS = tuple(_EXPERIMENT_MAP)


def get_experiment(name: str) -> Experiment:
    """The experiment ``name``; ValueError listing the experiments otherwise."""
    if name not in _EXPERIMENT_MAP:
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return _EXPERIMENT_MAP[name]


# ------------------------------------------------------------------------------ CLI

SMOKE_RUN_NOTE = ("**Smoke run (`--quick`)**: a budget of seconds on a few dozen images, to check that the "
                  "code runs. The numbers and verdicts below mean nothing about the claims; run without "
                  "`--quick` for those.")


def output_dir(out: str, name: str, quick: bool) -> str:
    """Where experiment ``name`` writes: ``OUT/NAME``, or ``OUT/quick/NAME`` for a smoke run,
    so a smoke run never replaces a full run's report."""
    return os.path.join(out, "quick", name) if quick else os.path.join(out, name)


def smoke_run_report(report: str) -> str:
    """``report`` with :data:`SMOKE_RUN_NOTE` under its title."""
    title, _, rest = report.partition("\n")
    return f"{title}\n\n{SMOKE_RUN_NOTE}\n{rest}"



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoo.experiments", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default="runs/experiments", help="results go to OUT/NAME/ (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: a budget of seconds on synthetic data, written to OUT/quick/NAME/")
    g = p.add_argument_group("overrides (default: the experiment's settings)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--input-size", type=int, help="side of the square input")
    g.add_argument("--train-images", type=int, help="use only this many training images")
    g.add_argument("--data", choices=("digits", "synthetic"))
    g.add_argument("--model", help="e.g. resnext_mini, densenet_mini")
    g.add_argument("--seed", type=int)
    # Tiny tensors gain little from intra-op threads, and on a shared 2-core machine the second
    # thread's spin-waits made steps 10-100x slower whenever another process held a core.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    experiment = get_experiment(args.name)
    cfg = dict(experiment.settings)
    if args.quick:
        cfg.update(experiment.quick)
    for key in ("epochs", "input_size", "train_images", "data", "model", "seed"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        experiment = get_experiment(args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in ("epochs", "input_size", "train_images", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    cfg = resolve_settings(args)
    try:
        get_model_spec(cfg["model"])
    except ValueError as e:
        parser.error(str(e))
    out_dir = output_dir(args.out, args.name, args.quick)
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "zoo.experiments", *argv])
    t0 = time.perf_counter()
    try:
        report = experiment.run(cfg, out_dir, command)["report"]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    if args.quick:
        report = smoke_run_report(report)
    atomic_write(os.path.join(out_dir, "report.md"),
                 report + f"\nWall time: {elapsed:.0f} s with {args.threads} torch thread(s).\n")
    print(f"done in {elapsed:.0f}s: {out_dir}/report.md", flush=True)
    return 0
