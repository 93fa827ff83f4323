"""FLOPs of a model's forward pass (a multiply-add counts as 2 FLOPs)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1) -> int:
    """Forward FLOPs of conv and matmul layers at ``batch x input_size`` (MAC = 2 FLOPs).

    Norms, activations and pooling are not counted (they are <1% of these nets' FLOPs).
    Build the model under ``torch.device("meta")`` to count it in milliseconds.
    """
    was_training = model.training
    model.eval()
    # On the model's device: a model built on the "meta" device is counted from shapes alone,
    # with no memory for weights or activations and no arithmetic.
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(batch, *input_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())
