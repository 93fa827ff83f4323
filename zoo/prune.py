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
import copy
import math
import os
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

from zoo import pruned
from zoo.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from zoo.flops import count_flops
from zoo.registry import count_params

CRITERIA = ("l1", "l2", "taylor")
TARGETS = ("flops", "channels")
# onnxruntime's x86 conv path (MLAS NCHWc) runs channels in blocks of 8 (AVX2) or 16 (AVX-512) and
# takes a conv only when its channels (per group, for a grouped conv) fill whole blocks; a pruned width
# off that grid falls back to plain NCHW with layout reorders around it, and the pruned model can run
# slower than the original. 16 suits both.
DEFAULT_ROUND_TO = 16


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


def _meta_pruner(model: nn.Module, input_size: tuple[int, int, int], criterion: str,
                 ratios: dict[nn.Module, float] | None = None) -> Any:
    import torch_pruning as tp

    # Local pruning (each layer group ranks its own channels) with a ratio per group from ``ratios``;
    # a group left out keeps its channels. Torch-Pruning's own round_to is not used: with grouped
    # convs it rounds the per-group count against the whole layer's channels and can empty a group.
    return tp.pruner.MetaPruner(
        model, torch.zeros(1, *input_size), importance=_importance(criterion), pruning_ratio=0.0,
        pruning_ratio_dict=ratios or None, ignored_layers=[model.get_classifier()],
        customized_pruners={nn.GroupNorm: _group_norm_func()},
    )


class LayerGroup(NamedTuple):
    """A set of channels the pruner removes together: ``units x groups`` channels at its root
    layer, and the ``(layer name, "in" | "out")`` sides that lose a channel with each of them;
    ``conv_groups``: the group count of a grouped (not depthwise) conv among those sides, else 1."""
    units: int
    groups: int
    sides: frozenset
    conv_groups: int = 1


def layer_groups(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, LayerGroup]:
    """``root layer name -> LayerGroup`` for every channel group the pruner can shrink.

    A grouped conv (or GroupNorm) that reads or writes a group's channels loses the same units in
    each of its ``groups``; anything else has ``groups`` 1.
    """
    _check_supported(model)
    pruner = _meta_pruner(model, input_size, "l1")
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        root = group[0].dep.target.module
        groups = pruner._get_channel_groups(group)  # the grouping MetaPruner itself applies to this group
        sides = frozenset((names[item.dep.target.module], "out" if pruner.DG.is_out_channel_pruning_fn(
            item.dep.handler) else "in") for item in group if item.dep.target.module in names)
        convs = [item.dep.target.module for item in group if isinstance(item.dep.target.module, nn.Conv2d)]
        conv_groups = max([c.groups for c in convs if 1 < c.groups < c.out_channels] or [1])
        out[names[root]] = LayerGroup(pruner.DG.get_out_channels(root) // groups, groups, sides, conv_groups)
    return out


def pruned_architecture(model: nn.Module, layers: dict[str, LayerGroup], keep: dict[str, int]) -> dict[str, Any]:
    """The layer sizes (:func:`zoo.pruned.record`) ``model`` has once each group keeps ``keep``
    units, worked out without pruning: every side of a group loses one channel per root channel."""
    lost: dict[tuple[str, str], int] = {}
    for name, g in layers.items():
        for side in g.sides:
            lost[side] = lost.get(side, 0) + (g.units - keep[name]) * g.groups
    arch = pruned.record(model)
    for name, d in arch.items():
        out, inp = lost.get((name, "out"), 0), lost.get((name, "in"), 0)
        if d["kind"] == "conv2d":
            depthwise = d["groups"] == d["in_channels"] == d["out_channels"] and d["groups"] > 1
            d["out_channels"] -= out
            d["in_channels"] -= inp
            if depthwise:
                d["in_channels"] = d["groups"] = d["out_channels"] = min(d["in_channels"], d["out_channels"])
        elif d["kind"] == "linear":
            d["in_features"] -= inp
        elif d["kind"] == "batchnorm2d":
            d["num_features"] -= max(out, inp)
        elif d["kind"] == "groupnorm":
            per_channel = d["num_groups"] == d["num_channels"]
            d["num_channels"] -= max(out, inp)
            if per_channel:
                d["num_groups"] = d["num_channels"]
    return arch


def kept_units(layers: dict[str, LayerGroup], channel_ratio: float, round_to: int) -> dict[str, int]:
    """Units each group keeps when ``channel_ratio`` of its channels go, its channel count then
    rounded to the nearest multiple of ``round_to`` (a grouped layer: a multiple of ``groups`` too,
    so every group keeps the same units). A grouped conv whose groups are each at least ``round_to``
    wide keeps a multiple of ``round_to`` in each group: onnxruntime's blocked kernels take a grouped
    conv only then. A group too narrow to round keeps what the ratio leaves."""
    out = {}
    for name, (units, groups, _, conv_groups) in layers.items():
        keep = max(1, int(units * (1.0 - channel_ratio)))  # Torch-Pruning's own count
        block = round_to * conv_groups if units * groups >= round_to * conv_groups else round_to
        step = block // math.gcd(block, groups)  # units per block of channels
        if step > 1 and keep < units:
            keep = min(units, max(step, step * round(keep / step)))
        out[name] = keep
    return out


def _prune_to(model: nn.Module, input_size: tuple[int, int, int], layers: dict[str, LayerGroup],
              keep: dict[str, int], criterion: str, calibration: Any = None, loss_fn: Any = None) -> nn.Module:
    modules = dict(model.named_modules())
    # Half a unit of slack: MetaPruner keeps int(units * (1 - ratio)) units.
    ratios = {modules[n]: 1.0 - (keep[n] + 0.5) / g.units for n, g in layers.items() if keep[n] < g.units}
    pruner = _meta_pruner(model, input_size, criterion, ratios)
    if criterion == "taylor":
        if calibration is None or loss_fn is None:
            raise PruneError("the taylor criterion needs data to compute gradients")
        model.zero_grad()
        for x, y in calibration:
            loss_fn(model(x), y).backward()
    if ratios:
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def _check_supported(model: nn.Module) -> None:
    # A layer that reduces over channels with a fixed kernel (ECA's conv1d) has no channel dimension to prune.
    unsupported = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d, nn.LayerNorm))]
    if unsupported:
        raise PruneError(f"cannot prune {type(model).__name__} with layer {unsupported[0]} "
                         f"({type(dict(model.named_modules())[unsupported[0]]).__name__})")


def plan_for_flops(model: nn.Module, input_size: tuple[int, int, int], ratio: float,
                   round_to: int = DEFAULT_ROUND_TO) -> tuple[dict[str, LayerGroup], dict[str, int], float]:
    """Units each layer group keeps so that pruning removes the share of ``model``'s FLOPs closest
    to ``ratio``: ``(layer groups, units kept per group, share of the FLOPs removed)``.

    Removing a share ``c`` of every group's channels shrinks both sides of most convs, so about
    ``1 - (1 - c)^2`` of the FLOPs go. The search starts there and bisects on ``c``, counting the
    FLOPs of the narrower architecture each step leads to (:func:`pruned_architecture`, no pruning).
    Rounding to ``round_to`` makes the FLOPs jump between neighbouring ``c``; then the deepest
    groups take the narrower of the two widths first, one more at a time, to land between them.
    """
    layers = layer_groups(model, input_size)
    flops0 = count_flops(model, input_size)
    shapes = copy.deepcopy(model).to("meta")  # counted from shapes alone: no weights copied per candidate
    seen: dict[tuple[int, ...], float] = {}

    def removed(keep: dict[str, int]) -> float:
        key = tuple(keep.values())
        if key not in seen:
            narrow = pruned.apply(copy.deepcopy(shapes), pruned_architecture(model, layers, keep))
            seen[key] = 1.0 - count_flops(narrow, input_size) / flops0
        return seen[key]

    full = {n: g.units for n, g in layers.items()}
    if ratio <= 0.0:
        return layers, full, 0.0
    lo, hi = (0.0, full), (0.99, kept_units(layers, 0.99, round_to))  # (channel ratio, keep) around the target
    c = 1.0 - math.sqrt(1.0 - ratio)
    for _ in range(16):
        keep = kept_units(layers, c, round_to)
        got = removed(keep)
        if abs(got - ratio) < 1e-3:
            return layers, keep, got
        lo, hi = ((c, keep), hi) if got < ratio else (lo, (c, keep))
        c = (lo[0] + hi[0]) / 2
    # Between lo's widths and hi's: the last n differing groups (deepest first) take hi's width.
    differ = [n for n in full if lo[1][n] != hi[1][n]][::-1]

    def mixed(n: int) -> dict[str, int]:
        return {k: hi[1][k] if k in differ[:n] else lo[1][k] for k in full}

    a, b = 0, len(differ)
    while b - a > 1:
        m = (a + b) // 2
        a, b = (m, b) if removed(mixed(m)) < ratio else (a, m)
    keep = min((mixed(a), mixed(b)), key=lambda k: abs(removed(k) - ratio))
    return layers, keep, removed(keep)


def prune_model(model: nn.Module, input_size: tuple[int, int, int], ratio: float, criterion: str = "l1",
                calibration: Any = None, loss_fn: Any = None, *, target: str = "flops",
                round_to: int = DEFAULT_ROUND_TO) -> nn.Module:
    """Remove whole channels from ``model`` in place.

    Args:
        model: a zoo model (ResNeXt or DenseNet family).
        input_size: ``(C, H, W)`` to trace the graph with (and count FLOPs at).
        ratio: in [0, 1): with ``target="flops"`` the share of the FLOPs to remove (reached by
            choosing the width of each layer group, :func:`plan_for_flops`); with
            ``target="channels"`` the share of the channels of every prunable layer group.
        criterion: ``l1``/``l2`` (weight magnitude) or ``taylor`` (|weight x gradient| from
            ``calibration`` batches and ``loss_fn``).
        round_to: every pruned group keeps a multiple of this many channels where its width allows
            (1: no rounding); a grouped conv keeps the same channels per group.
    """
    if target not in TARGETS:
        raise PruneError(f"unknown pruning target {target!r}; choose one of: {', '.join(TARGETS)}")
    if round_to < 1:
        raise PruneError(f"round_to must be >= 1, got {round_to}")
    model.eval()
    _check_supported(model)
    if target == "flops":
        layers, keep, _ = plan_for_flops(model, input_size, ratio, round_to)
    else:
        layers = layer_groups(model, input_size)
        keep = kept_units(layers, ratio, round_to)
    return _prune_to(model, input_size, layers, keep, criterion, calibration, loss_fn)


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
    parser.add_argument("--ratio", type=float, required=True,
                        help="share to remove, in [0, 1): of the model's FLOPs (default), or with --target channels "
                             "of every layer group's channels (a channel ratio c removes about 1 - (1 - c)^2 of "
                             "the FLOPs, both sides of a conv shrinking)")
    parser.add_argument("--target", choices=TARGETS, default="flops",
                        help="what --ratio counts: flops (the width of each layer group chosen to remove that "
                             "share of the FLOPs) or channels (default flops)")
    parser.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, metavar="N",
                        help="keep a multiple of N channels in each pruned layer group where its width allows "
                             "(a grouped conv: the same number in each group, a multiple of N per group where "
                             "its groups are N wide); onnxruntime's x86 conv kernels run "
                             f"channels in blocks of 8 (AVX2) or 16 (AVX-512); 1: no rounding "
                             f"(default {DEFAULT_ROUND_TO})")
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
    if args.round_to < 1:
        parser.error(f"Invalid --round-to: {args.round_to} (must be >= 1)")
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
        prune_model(model, input_size, args.ratio, args.criterion, calibration, loss_fn, target=args.target,
                    round_to=args.round_to)
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
        prune={"ratio": args.ratio, "target": args.target, "round_to": args.round_to,
               "flops_ratio": flops1 / flops0, "params_ratio": params1 / params0,
               "criterion": args.criterion, "finetune_epochs": args.finetune_epochs,
               "source": os.path.abspath(args.checkpoint), "source_checksum": ckpt["checksum"]},
    ))
    print(f"{'':<8} {'params':>12} {'GFLOPs':>8}")
    print(_summary_line("before", params0, flops0))
    print(_summary_line("after", params1, flops1))
    print(f"ratio    {params1 / params0:>12.3f} {flops1 / flops0:>8.3f}")
    asked = f"{args.ratio:.0%} of the {'FLOPs' if args.target == 'flops' else 'channels of every layer group'}"
    print(f"removed {1 - flops1 / flops0:.1%} of the FLOPs and {1 - params1 / params0:.1%} of the parameters "
          f"(asked: {asked}; widths rounded to multiples of {args.round_to})")
    print(f"val top-1: {acc0:.4f} before, {acc_pruned:.4f} pruned, {acc1:.4f} after "
          f"{args.finetune_epochs} fine-tune epoch(s) (the best epoch's, saved)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
