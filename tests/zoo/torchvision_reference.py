"""Reference figures recorded from torchvision, so tests can check fidelity without it.

``torchvision_reference.json`` holds, per full-size model, torchvision's state_dict keys and
shapes (1000 classes) and the logits it gives (10 classes, float64, train-mode BN, 2x3x64x64
input) after :func:`deterministic_fill`. Regenerate with an environment that has torchvision::

    python tests/zoo/torchvision_reference.py   # writes tests/zoo/data/torchvision_reference.json
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch import nn

MODELS = ["resnet50", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
          "densenet121", "densenet161", "densenet169", "densenet201"]
PATH = os.path.join(os.path.dirname(__file__), "data", "torchvision_reference.json")


@torch.no_grad()
def deterministic_fill(model: nn.Module) -> nn.Module:
    """Give every state_dict entry a value that depends only on its sorted key index and shape.

    Closed-form (sines), so both libraries' models get the same numbers with no RNG involved;
    conv/linear weights are scaled like Kaiming init so activations stay finite through depth.
    """
    state = model.state_dict()
    for i, key in enumerate(sorted(state)):
        t = state[key]
        if not t.is_floating_point():
            continue
        n = t.numel()
        wave = torch.sin(torch.arange(n, dtype=torch.float64) * 0.7311 + i).view(t.shape)
        if key.endswith("running_var"):
            value = 1.0 + 0.5 * wave
        elif t.dim() > 1:  # conv / linear weight
            fan_in = n // t.shape[0]
            value = wave * math.sqrt(4.0 / fan_in)
        else:
            value = 0.1 * wave + (1.0 if key.endswith("weight") else 0.0)
        t.copy_(value.to(t.dtype))
    return model


def reference_input() -> torch.Tensor:
    return torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.01).view(2, 3, 64, 64)


def reference_logits(model: nn.Module) -> torch.Tensor:
    model = deterministic_fill(model.double()).train()
    with torch.no_grad():
        return model(reference_input())


def main() -> None:
    import torchvision.models as tvm

    out = {}
    for name in MODELS:
        full = getattr(tvm, name)()
        small = getattr(tvm, name)(num_classes=10)
        out[name] = {
            "keys": {k: list(v.shape) for k, v in full.state_dict().items()},
            "params": sum(p.numel() for p in full.parameters()),
            "logits": reference_logits(small).tolist(),
        }
        print(name, out[name]["params"])
    with open(PATH, "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    sys.exit(main())
