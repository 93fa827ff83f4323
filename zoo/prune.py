"""``python -m zoo.prune``: structured pruning of a trained checkpoint, then a fine-tune.

Whole channels leave the model (smaller convs, not masks: onnxruntime runs zeros as fast as
anything else). Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023,
https://arxiv.org/abs/2301.12900) finds what must shrink together: a residual add's operands,
every DenseNet concatenation that reads a pruned feature map, the norms after a conv. Rules the
zoo adds:

- the classifier keeps its outputs (the classes);
- a grouped conv keeps its group count and loses the same channels in every group; a depthwise
  conv stays depthwise (its input and output channels are pruned together);
- GroupNorm keeps its group count and loses the same channels in every group (``gn``); LN (one
  group) stays one group; IN (a group per channel) keeps one group per remaining channel.

The pruned layer sizes travel in the checkpoint (``pruned``, :mod:`zoo.pruned`), so loading
needs neither this module nor torch_pruning.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn

from zoo import pruned
from zoo.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from zoo.flops import count_flops
from zoo.registry import count_params

CRITERIA = ("l1", "l2", "taylor")


class PruneError(ValueError):
    """Input the pruner cannot take; the message is one line."""


def _importance(criterion: str) -> Any:
    import torch_pruning as tp

    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=1 if criterion == "l1" else 2)


def _group_norm_func() -> Any:
    """Torch-Pruning's GroupNorm handler, except that IN (a group per channel) keeps one group per
    remaining channel; its stock rule would prune nothing from a layer whose groups hold one channel."""
    import torch_pruning as tp

    base = tp.pruner.function.GroupNormPruner

    class GroupNormFunc(base):
        def prune_out_channels(self, layer: nn.GroupNorm, idxs: list) -> nn.Module:
            per_channel = layer.num_groups == layer.num_channels
            layer = base.prune_out_channels(self, layer, idxs)
            if per_channel:
                layer.num_groups = layer.num_channels
            return layer

        prune_in_channels = prune_out_channels

        def get_in_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1 if layer.num_groups == layer.num_channels else layer.num_groups

        get_out_channel_groups = get_in_channel_groups

    return GroupNormFunc()


def prune_model(model: nn.Module, input_size: tuple[int, int, int], ratio: float, criterion: str = "l1",
                calibration: Any = None, loss_fn: Any = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer group of ``model``, in place.

    Args:
        model: a zoo model (ResNeXt or DenseNet family).
        input_size: ``(C, H, W)`` to trace the graph with.
        ratio: share of channels to remove, in [0, 1).
        criterion: ``l1``/``l2`` (weight magnitude) or ``taylor`` (|weight x gradient| from
            ``calibration`` batches and ``loss_fn``).
    """
    import torch_pruning as tp

    model.eval()
    example = torch.zeros(1, *input_size)
    head = model.get_classifier()
    ignored = [head]
    # A layer that reduces over channels with a fixed kernel (ECA's conv1d) has no channel dimension to prune.
    unsupported = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.LayerNorm))]
    if unsupported:
        raise PruneError(f"cannot prune {type(model).__name__} with layer {unsupported[0]} "
                         f"({type(dict(model.named_modules())[unsupported[0]]).__name__})")
    pruner = tp.pruner.MetaPruner(
        model, example, importance=_importance(criterion), pruning_ratio=ratio, ignored_layers=ignored,
        customized_pruners={nn.GroupNorm: _group_norm_func()},
    )
    if criterion == "taylor":
        if calibration is None or loss_fn is None:
            raise PruneError("the taylor criterion needs data to compute gradients")
        model.zero_grad()
        for x, y in calibration:
            loss_fn(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def check_structure(model: nn.Module) -> None:
    """Every group count still divides its channels (an internal invariant after pruning)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name


def _summary_line(label: str, params: int, flops: int) -> str:
    return f"{label:<8} {params:>12,} {flops / 1e9:>8.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.prune",
                                     description="Remove whole channels from a trained checkpoint, then fine-tune.")
    parser.add_argument("--checkpoint", required=True, help="a zoo.train checkpoint (e.g. runs/train/best.pt)")
    parser.add_argument("--ratio", type=float, required=True, help="share of channels to remove, in [0, 1)")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1",
                        help="channel importance: l1/l2 weight norm, taylor |w * dL/dw| (default l1)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="fine-tune epochs after pruning (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate, adam (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output directory (default: beside the checkpoint, pruned/)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.ratio < 1.0:
        parser.error(f"Invalid --ratio: {args.ratio} (must be in [0, 1))")
    if args.finetune_epochs < 0:
        parser.error(f"Invalid --finetune-epochs: {args.finetune_epochs} (must be >= 0)")
    try:
        return _run(args)
    except (PruneError, CheckpointError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name == "torch_pruning":
            print("error: zoo.prune needs torch-pruning (pip install torch-pruning)", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from zoo.data import DataError, build_datasets
    from zoo.engine import evaluate, seed_everything, train_one_epoch
    from zoo.losses import create_loss
    from zoo.optim import create_optimizer

    ckpt = load_checkpoint(args.checkpoint)  # an already pruned one loads narrower and prunes again
    model = model_from_checkpoint(ckpt, args.checkpoint, ema=None)
    input_size = tuple(int(v) for v in ckpt["input_size"])
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    seed_everything(args.seed)
    try:
        data = build_datasets(str(ckpt.get("data", "digits")), input_size, seed=int(config.get("seed", 0)),
                              val_fraction=float(config.get("val_fraction", 0.2)))
    except DataError as e:
        raise PruneError(f"{args.checkpoint}: its data cannot be loaded: {e}") from None
    train_loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(data.val, batch_size=256)
    loss_fn = create_loss("ce")
    device = torch.device("cpu")

    params0, flops0 = count_params(model), count_flops(model, input_size)
    _, acc0 = evaluate(model, loss_fn, val_loader, device)
    calibration = [b for _, b in zip(range(8), train_loader)] if args.criterion == "taylor" else None
    try:
        prune_model(model, input_size, args.ratio, args.criterion, calibration, loss_fn)
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    except PruneError:
        raise
    except Exception as e:  # the dependency graph met an operation it cannot follow
        raise PruneError(f"cannot prune {ckpt['model_name']}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    check_structure(model)
    params1, flops1 = count_params(model), count_flops(model, input_size)
    _, acc_pruned = evaluate(model, loss_fn, val_loader, device)

    optimizer = create_optimizer("adam", model.parameters(), lr=args.lr)
    # The saved weights are the fine-tune epoch that scored best on val, as zoo.train's best.pt.
    acc1, best = acc_pruned, {k: v.detach().clone() for k, v in model.state_dict().items()}
    for epoch in range(args.finetune_epochs):
        train_one_epoch(model, loss_fn, optimizer, train_loader, device, progress=not args.no_progress,
                        desc=f"fine-tune {epoch + 1}/{args.finetune_epochs}")
        _, acc = evaluate(model, loss_fn, val_loader, device)
        if acc > acc1:
            acc1, best = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "pruned")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "best.pt")
    keep = {k: ckpt[k] for k in ("model_name", "model_args", "classes", "input_size", "mean", "std", "crop_pct",
                                 "data", "config", "augment") if k in ckpt}
    save_checkpoint(path, dict(
        keep, model=best,
        pruned=pruned.record(model), epoch=0, best_metric=acc1, selected="model",
        prune={"ratio": args.ratio, "criterion": args.criterion, "finetune_epochs": args.finetune_epochs,
               "source": os.path.abspath(args.checkpoint), "source_checksum": ckpt["checksum"]},
    ))
    print(f"{'':<8} {'params':>12} {'GFLOPs':>8}")
    print(_summary_line("before", params0, flops0))
    print(_summary_line("after", params1, flops1))
    print(f"ratio    {params1 / params0:>12.3f} {flops1 / flops0:>8.3f}")
    print(f"val top-1: {acc0:.4f} before, {acc_pruned:.4f} pruned, {acc1:.4f} after "
          f"{args.finetune_epochs} fine-tune epoch(s) (the best epoch's, saved)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
