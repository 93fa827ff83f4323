"""SE, ECA and CBAM: what each computes, where each sits in both families, and that models with
them train, fold their BatchNorms and export with parity."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.convert import count_batchnorm_with_statistics
from tests.conftest import randomize_bn_stats
from tests.zoo.test_act import SIDE, _checkpoint, export_checkpoint
from zoo.flops import count_flops
from zoo.models.resnext import Bottleneck
from zoo.nn import fold_batchnorm
from zoo.nn.attention import ATTNS, CBAM, EfficientChannelAttn, SqueezeExcite, eca_kernel_size, get_attn_layer
from zoo.registry import count_params, create_model

FAMILIES = ["resnext_mini", "resnext_mini_dw", "densenet_mini", "densenet_mini_dw"]


def test_every_attn_builds_and_an_unknown_one_lists_them():
    for name in ATTNS:
        assert get_attn_layer(name)(32)(torch.randn(2, 32, 4, 4)).shape == (2, 32, 4, 4)
    assert get_attn_layer(None) is None and get_attn_layer("none") is None
    for build in (get_attn_layer, lambda a: create_model("resnext_mini", attn=a)):
        with pytest.raises(ValueError) as e:
            build("nope")
        assert str(e.value) == f"Unknown attn 'nope'; choose one of: none, {', '.join(ATTNS)}"
    with pytest.raises(ValueError, match="attn_reduction"):
        create_model("resnext_mini", attn="se", attn_reduction=0)


def test_se_is_squeeze_excite():
    """Global average pool, reduce, ReLU, expand, sigmoid: one gate per channel and sample."""
    torch.manual_seed(0)
    se, x = SqueezeExcite(64, reduction=4), torch.randn(3, 64, 5, 5)
    assert se.fc1.out_channels == 16
    s = x.mean((2, 3))
    gate = torch.sigmoid(F.linear(F.relu(F.linear(s, se.fc1.weight[:, :, 0, 0], se.fc1.bias)),
                                  se.fc2.weight[:, :, 0, 0], se.fc2.bias))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_eca_kernel_grows_with_channels_and_mixes_neighbours_only():
    assert [eca_kernel_size(c) for c in (16, 64, 256, 512, 2048)] == [3, 3, 5, 5, 7]
    torch.manual_seed(0)
    eca, x = EfficientChannelAttn(64), torch.randn(2, 64, 3, 3)
    k = eca.conv.weight.view(-1)
    s = F.pad(x.mean((2, 3)), (1, 1))
    gate = torch.sigmoid(torch.stack([s[:, c:c + 3] @ k for c in range(64)], 1))
    torch.testing.assert_close(eca(x), x * gate[:, :, None, None])


def test_cbam_is_channel_then_spatial():
    torch.manual_seed(0)
    cbam, x = CBAM(32, reduction=8), torch.randn(2, 32, 6, 6)
    ch = cbam.channel

    def mlp(v):
        return ch.fc2(F.relu(ch.fc1(v)))
    y = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    maps = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
    torch.testing.assert_close(cbam(x), y * torch.sigmoid(cbam.spatial.conv(maps)))


@pytest.mark.parametrize("attn", ATTNS)
def test_resnext_attention_sits_before_the_residual_add(attn):
    """SENet's and timm's place: on bn3's output, then add the shortcut, then the activation."""
    model = create_model("resnext_mini", num_classes=4, attn=attn).eval()
    block = model.layer2[0]
    assert isinstance(block, Bottleneck) and isinstance(block.se, type(get_attn_layer(attn)(8)))
    seen = {}
    block.bn3.register_forward_hook(lambda m, i, o: seen.update(bn3=o))
    block.se.register_forward_hook(lambda m, i, o: seen.update(se_in=i[0], se_out=o))
    block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    with torch.no_grad():
        model(torch.randn(2, 3, SIDE, SIDE))
        identity = block.downsample(seen["x"])
    assert seen["se_in"] is seen["bn3"]
    torch.testing.assert_close(seen["out"], F.relu(seen["se_out"] + identity))


@pytest.mark.parametrize("attn", ATTNS)
def test_densenet_attention_follows_each_dense_block(attn):
    model = create_model("densenet_mini", num_classes=4, attn=attn)
    names = [n for n, _ in model.features.named_children()]
    blocks = [n for n in names if n.startswith("denseblock")]
    assert [names[names.index(b) + 1] for b in blocks] == [f"attn{i + 1}" for i in range(len(blocks))]
    seen = {}
    for i, b in enumerate(blocks):
        getattr(model.features, b).register_forward_hook(lambda m, inp, o, i=i: seen.update({f"b{i}": o}))
        getattr(model.features, f"attn{i + 1}").register_forward_hook(
            lambda m, inp, o, i=i: seen.update({f"a{i}": inp[0]}))
    model.eval()(torch.randn(2, 3, SIDE, SIDE))
    assert all(seen[f"a{i}"] is seen[f"b{i}"] for i in range(len(blocks)))


def test_no_attention_leaves_the_models_unchanged_and_reduction_sizes_se():
    plain = create_model("resnext_mini")
    assert not any(isinstance(m, (SqueezeExcite, EfficientChannelAttn, CBAM)) for m in plain.modules())
    assert count_params(create_model("resnext_mini", attn="none")) == count_params(plain)
    se16 = create_model("resnext_mini", attn="se").layer3[0].se
    se4 = create_model("resnext_mini", attn="se", attn_reduction=4).layer3[0].se
    assert (se16.fc1.in_channels, se16.fc1.out_channels, se4.fc1.out_channels) == (256, 16, 64)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_attn_trains_a_step_and_folds(name, attn):
    """The attention's own weights learn, and BatchNorm folding is unchanged: every BN still
    merges or becomes a scale/shift, with the same outputs."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, attn=attn, act="silu")
    attn_params = [p for n, p in model.named_parameters() if ".se." in n or ".attn" in n]
    assert attn_params
    before = [p.detach().clone() for p in attn_params]
    x = torch.randn(4, 3, SIDE, SIDE)
    loss = F.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, attn_params))

    model = randomize_bn_stats(model).eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    plain = fold_batchnorm(randomize_bn_stats(create_model(name, num_classes=4)).eval())
    merged = sum(isinstance(m, nn.Identity) for m in folded.modules()) - sum(
        isinstance(m, nn.Identity) for m in model.modules())
    merged_plain = sum(isinstance(m, nn.Identity) for m in plain.modules()) - sum(
        isinstance(m, nn.Identity) for m in create_model(name, num_classes=4).modules())
    assert merged == merged_plain > 0  # the attention blocks stop no conv->BN pair from merging


# The ops that prove the gate is in the exported graph.
GATE_OPS = {"se": {"Sigmoid", "Mul"}, "eca": {"Sigmoid", "Conv"}, "cbam": {"Sigmoid", "ReduceMax", "Concat"}}


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ["resnext_mini", "densenet_mini"])
def test_every_attn_exports_with_parity(name, attn, tmp_path):
    result = export_checkpoint(_checkpoint(tmp_path / "c.pt", name, "relu", attn), tmp_path / "m")
    assert result.parities and all(p.rel_diff < 1e-4 and p.agreement == 1.0 for p in result.parities)
    graph = onnx.load(result.path)
    assert count_batchnorm_with_statistics(graph) == 0
    ops = {n.op_type for n in graph.graph.node}
    assert GATE_OPS[attn] <= ops, sorted(ops)


def test_attention_adds_few_flops():
    """Pooling and tiny 1x1 convs: a few percent of the FLOPs at most (the cost is time, which
    ``python -m zoo.experiments attention`` measures)."""
    with torch.device("meta"):
        base = count_flops(create_model("resnext_mini"), (3, 32, 32))
        for attn in ATTNS:
            extra = count_flops(create_model("resnext_mini", attn=attn), (3, 32, 32)) - base
            assert 0 < extra < 0.03 * base, attn


def test_zoo_list_shows_attn_and_builds_act_attn_variants(capsys):
    from zoo.__main__ import main

    assert main(["list", "seresnext50_32x4d", "resnext_mini"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("seresnext50_32x4d"))
    assert row.split()[1:5] == ["27,559,896", "8.466", "3x224x224", "se"]
    assert "--act (relu, relu6," in out and "--attn (none, se, eca, cbam;" in out
    assert main(["list", "resnext_mini", "--act", "prelu", "--attn", "cbam"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resnext_mini"))
    want = count_params(create_model("resnext_mini", act="prelu", attn="cbam"))
    assert row.split()[1] == f"{want:,}" and row.split()[4] == "cbam"
    with pytest.raises(SystemExit) as e:
        main(["list", "--act", "nope"])
    assert e.value.code == 2 and "Unknown act 'nope'" in capsys.readouterr().err
