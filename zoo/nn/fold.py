"""Fold BatchNorm into the layers around it for inference.

In eval mode BatchNorm is the affine map y = gamma * (x - mean) / sqrt(var + eps) + beta with
fixed statistics (test phase). After a conv it merges into the conv:

    W' = W * gamma / sqrt(var + eps)          b' = (b - mean) * gamma / sqrt(var + eps) + beta

A BN with no conv right before it (DenseNet's pre-activation norms, transitions, ``norm5``)
becomes a per-channel :class:`ScaleShift`. GN/LN/IN normalize with the statistics of the
sample at hand, which exist only at test time, so they cannot be folded into weights.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F


class ScaleShift(nn.Module):
    """y = x * scale + shift, per channel: an eval-mode BatchNorm with its statistics folded in.

    Computed as a batch norm with identity statistics (mean 0, variance 1, eps 0), which is the
    same map: it exports to one ONNX BatchNormalization node, one pass over the activations in
    onnxruntime, where ``x * scale + shift`` exports to a Mul and an Add, two passes (and
    ``torch.addcmul`` to three); ``python -m bench.export`` shows the folded densenet121 export
    as fast as the unfolded one.
    """

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        # Not saved: they are constants, and checkpoints of folded models stay scale + shift.
        self.register_buffer("zeros", torch.zeros_like(self.scale), persistent=False)
        self.register_buffer("ones", torch.ones_like(self.scale), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.zeros, self.ones, self.scale, self.shift, training=False, momentum=0.0, eps=0.0)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to ``bn(conv(x))`` in eval mode (computed in float64, stored in conv's dtype)."""
    scale, shift = _bn_scale_shift(bn)
    fused = copy.deepcopy(conv)
    w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight = nn.Parameter(w.to(conv.weight.dtype))
    fused.bias = nn.Parameter((b * scale + shift).to(conv.weight.dtype))
    return fused


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` and at every other name of the module there (one module
    registered twice, ``self.b = self.a``, is one set of weights that fx names once)."""
    old = root.get_submodule(target)
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if m is old:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm folded away.

    Conv->BN pairs (every call of the conv is read by that BN alone, and the BN reads nothing
    else) become one conv with a bias; any other BatchNorm becomes a :class:`ScaleShift`. The
    model's own forward code is kept: modules are
    swapped in place (the BN of a pair becomes ``nn.Identity``), so checkpoints' module names
    still describe the folded model. Models with GN/LN/IN and no BatchNorm are returned
    (as an eval copy) unchanged, with a warning.

    Raises:
        RuntimeError: if ``model`` is in training mode (its BNs would use batch statistics).
    """
    if model.training:
        raise RuntimeError("fold_batchnorm needs an eval-mode model (call model.eval() first): "
                           "in training mode BatchNorm uses batch statistics, which cannot be folded")
    folded = copy.deepcopy(model).eval()
    if not _has_batchnorm(folded):
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm to fold: GroupNorm/LayerNorm/InstanceNorm "
            "normalize with statistics of the input itself at test time, so they stay as they are",
            stacklevel=2,
        )
        return folded

    # Trace the graph to find the conv->BN pairs that can merge. A module called at several
    # places is one set of weights: merging a BN into a conv changes every call of the conv, and
    # turning the BN into an identity changes every call of the BN. So a pair merges only when
    # every call of the conv is read by a call of that BN alone, and every call of the BN reads a
    # call of that conv.
    graph = torch.fx.symbolic_trace(folded).graph
    modules = dict(folded.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    # Weights read directly (``self.conv.weight`` in forward) would see the merged values too.
    read_directly = {node.target.rpartition(".")[0] for node in graph.nodes if node.op == "get_attr"}

    def only_reader(node: torch.fx.Node) -> str | None:
        """The module whose call alone reads ``node``, with ``node`` as its input."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        return user.target if user.op == "call_module" and user.args[:1] == (node,) else None

    for bn_name, bn_calls in calls.items():
        if not isinstance(modules[bn_name], nn.modules.batchnorm._BatchNorm) or bn_name in read_directly:
            continue
        sources = {n.args[0].target if n.args and isinstance(n.args[0], torch.fx.Node)
                   and n.args[0].op == "call_module" else None for n in bn_calls}
        conv_name = sources.pop() if len(sources) == 1 else None
        if (conv_name is None or not isinstance(modules[conv_name], nn.Conv2d) or conv_name in read_directly
                or any(only_reader(n) != bn_name for n in calls[conv_name])):
            continue
        _set_submodule(folded, conv_name, fold_conv_bn(modules[conv_name], modules[bn_name]))
        _set_submodule(folded, bn_name, nn.Identity())

    # What is left has no conv to merge into.
    for name, m in list(folded.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            scale, shift = _bn_scale_shift(m)
            dtype = m.running_mean.dtype
            _set_submodule(folded, name, ScaleShift(scale.to(dtype), shift.to(dtype)))
    return folded.eval()
