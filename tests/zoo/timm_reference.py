"""Reference figures recorded from timm, so tests can check timm-exactness without it.

``timm_reference.json`` holds, per SE-ResNeXt, timm's state_dict keys and shapes (1000 classes),
its parameter count and the logits it gives (10 classes, float64, train-mode BN, 2x3x64x64 input)
after :func:`tests.zoo.torchvision_reference.deterministic_fill`; and, per attention block, the
keys, shapes and output of timm's module on a closed-form input. Recorded once with timm 1.0.31;
timm is never a dependency. Regenerate with timm importable, e.g. from a throwaway target::

    pip install --no-deps --target /tmp/timm_ref timm==1.0.31
    PYTHONPATH=/tmp/timm_ref python tests/zoo/timm_reference.py   # writes tests/zoo/data/timm_reference.json

timm imports torchvision at import time (for FrozenBatchNorm2d and its data transforms, neither
used here); a ``--no-deps --target`` copy of torchvision on the PYTHONPATH serves.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.zoo.torchvision_reference import deterministic_fill, reference_logits  # noqa: E402

MODELS = ["seresnext50_32x4d", "seresnext101_32x8d"]
# Attention block -> the channel counts its module is recorded at (timm's create_attn names).
BLOCKS = {"se": [64, 256], "eca": [64, 256]}
PATH = os.path.join(os.path.dirname(__file__), "data", "timm_reference.json")


def block_input(channels: int) -> torch.Tensor:
    n = 2 * channels * 2 * 2
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.013 + channels).view(2, channels, 2, 2)


@torch.no_grad()
def block_output(module: nn.Module, channels: int) -> torch.Tensor:
    return deterministic_fill(module.double()).eval()(block_input(channels))


def main() -> None:
    import timm
    from timm.layers import create_attn

    out: dict = {"timm_version": timm.__version__, "models": {}, "blocks": {}}
    for name in MODELS:
        full = timm.create_model(name)
        small = timm.create_model(name, num_classes=10)
        out["models"][name] = {
            "keys": {k: list(v.shape) for k, v in full.state_dict().items()},
            "params": sum(p.numel() for p in full.parameters()),
            "logits": reference_logits(small).tolist(),
        }
        print(name, out["models"][name]["params"])
    for attn, sizes in BLOCKS.items():
        for c in sizes:
            module = create_attn(attn, c)
            out["blocks"][f"{attn}_{c}"] = {
                "keys": {k: list(v.shape) for k, v in module.state_dict().items()},
                "output": block_output(module, c).reshape(-1).tolist(),
            }
    assert all(math.isfinite(v) for m in out["models"].values() for row in m["logits"] for v in row)
    with open(PATH, "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    sys.exit(main())
