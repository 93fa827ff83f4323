"""Time ``step()`` of each zoo.optim rule against its torch.optim twin, both on the foreach path.

    python -m bench.optim [--model resnext50_32x4d] [--steps N] [--rounds N] [--device cpu]

Every parameter of the model gets a fixed random gradient; ours and torch's each update their own
copy. The two are timed in alternating rounds of ``--steps`` steps (A B B A A B ...) so that drift
in machine load hits both alike, and the median over all timed steps is printed. On a shared,
busy machine, use more rounds. Prints, never asserts.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from zoo.optim import OPTIMIZERS, create_optimizer
from zoo.registry import create_model, list_models

# name -> torch.optim twin with the same hyperparameters as our defaults (the closest torch has:
# Adagrad and RMSprop put eps outside the root, which costs the same).
TWINS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=True),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, foreach=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=1e-8, foreach=True),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.9, eps=1e-6, foreach=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.9, eps=1e-8, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
}


def _copy_with_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p, g in zip(params, grads):
        q = p.detach().clone().requires_grad_()
        q.grad = g.clone()
        out.append(q)
    return out


def _time_steps(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.optim", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnext50_32x4d", choices=list_models())
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
    parser.add_argument("--rounds", type=int, default=5, help="A B rounds per rule")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")

    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    params = [p.detach() for p in model.parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    numel = sum(p.numel() for p in params)
    print(f"{args.model}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, device={device}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'rule':<10} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>11}")
    for name in args.optimizers:
        ours = create_optimizer(name, _copy_with_grads(params, grads))
        theirs = TWINS[name](_copy_with_grads(params, grads))
        ours.step()  # create the lazy state outside the timing
        theirs.step()
        times: dict[str, list[float]] = {"ours": [], "torch": []}
        runs = [("ours", ours), ("torch", theirs)]
        for r in range(args.rounds):
            # A B, then B A: neither side always runs right after the other's allocations.
            for key, opt in runs if r % 2 == 0 else runs[::-1]:
                times[key] += _time_steps(opt, args.steps, device)
        a, b = statistics.median(times["ours"]), statistics.median(times["torch"])
        print(f"{name:<10} {a:9.2f} {b:9.2f} {a / b:10.2f}x", flush=True)
        del ours, theirs
    return 0


if __name__ == "__main__":
    sys.exit(main())
