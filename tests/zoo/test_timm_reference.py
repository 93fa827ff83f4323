"""The SE-ResNeXts are timm's: same keys, shapes, parameter count and outputs (recorded reference)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.zoo import timm_reference as tref
from tests.zoo import torchvision_reference as tvref
from zoo.nn.attention import get_attn_layer
from zoo.registry import count_params, create_model


@pytest.fixture(scope="module")
def reference():
    with open(tref.PATH) as f:
        return json.load(f)


@pytest.mark.parametrize("name", tref.MODELS)
def test_timm_keys_shapes_params(name, reference):
    with torch.device("meta"):
        model = create_model(name)
    ref = reference["models"][name]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["keys"]
    assert count_params(model) == ref["params"]


def test_seresnext50_param_count_is_timms():
    with torch.device("meta"):
        assert count_params(create_model("seresnext50_32x4d")) == 27_559_896


@pytest.mark.parametrize("name", tref.MODELS)
def test_timm_outputs(name, reference):
    """Same logits as timm for the same weights, in float64 (a wrong SE placement, pooling or
    gate changes them well beyond rounding)."""
    logits = tvref.reference_logits(create_model(name, num_classes=10))
    expected = torch.tensor(reference["models"][name]["logits"], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("key", ["se_64", "se_256", "eca_64", "eca_256"])
def test_attention_blocks_match_timm(key, reference):
    """SE and ECA are timm's modules: same keys, shapes and outputs (CBAM differs on purpose:
    no BatchNorm in its spatial branch, as in the paper)."""
    attn, channels = key.split("_")
    module = get_attn_layer(attn)(int(channels))
    ref = reference["blocks"][key]
    assert {k: list(v.shape) for k, v in module.state_dict().items()} == ref["keys"]
    out = tref.block_output(module, int(channels)).reshape(-1)
    torch.testing.assert_close(out, torch.tensor(ref["output"], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_seresnext_fixes_se():
    with pytest.raises(ValueError, match="fixes attn='se'"):
        create_model("seresnext_mini", attn="eca")
    with torch.device("meta"):
        same = create_model("seresnext_mini", attn="se")
        plain = create_model("resnext_mini", attn="se")
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
