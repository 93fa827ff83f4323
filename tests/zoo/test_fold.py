import pytest
import torch
from torch import nn

from tests.conftest import MINI_MODELS, mini_input, randomize_bn_stats
from zoo import create_model
from zoo.nn import ScaleShift, fold_batchnorm


def _count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel_diff(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _check_fold(name, x):
    model = randomize_bn_stats(create_model(name, num_classes=10)).eval()
    folded = fold_batchnorm(model)
    assert _count_bn(model) > 0 and _count_bn(folded) == 0
    assert not folded.training
    with torch.no_grad():
        assert _rel_diff(model(x), folded(x)) < 1e-4
    return model, folded


@pytest.mark.parametrize("name", MINI_MODELS)
def test_fold_mini_models(name):
    _check_fold(name, mini_input(name, 4))


@pytest.mark.parametrize("name", ["resnext50_32x4d", "densenet121"])
def test_fold_full_size(name):
    _check_fold(name, torch.randn(2, 3, 96, 96))


def test_fold_merges_conv_bn_pairs_and_keeps_the_rest_as_scale_shift():
    model, folded = _check_fold("densenet_mini", mini_input("densenet_mini"))
    # conv0 -> norm0 is a pair: merged into the conv, which gains a bias.
    assert isinstance(folded.features.norm0, nn.Identity) and folded.features.conv0.bias is not None
    # norm1 reads a concatenation (no conv right before it); norm2 reads conv1 alone.
    layer = folded.features.denseblock1.denselayer1
    assert isinstance(layer.norm1, ScaleShift) and isinstance(folded.features.transition1.norm, ScaleShift)
    assert isinstance(layer.norm2, nn.Identity) and layer.conv1.bias is not None
    assert isinstance(folded.features.norm5, ScaleShift)
    # the original is untouched
    assert isinstance(model.features.norm0, nn.BatchNorm2d)

    _, rfolded = _check_fold("resnext_mini", mini_input("resnext_mini"))
    assert not any(isinstance(m, ScaleShift) for m in rfolded.modules())  # every BN follows a conv


def test_fold_formula_on_a_single_pair():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    bn = randomize_bn_stats(nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    folded = fold_batchnorm(bn)
    g, b, mu, var = bn[1].weight, bn[1].bias, bn[1].running_mean, bn[1].running_var
    scale = g / torch.sqrt(var + bn[1].eps)
    assert torch.allclose(folded[0].weight, conv.weight * scale.view(-1, 1, 1, 1))
    assert torch.allclose(folded[0].bias, (conv.bias - mu) * scale + b)


def test_fold_refuses_training_mode():
    with pytest.raises(RuntimeError, match="needs an eval-mode model"):
        fold_batchnorm(create_model("resnext_mini").train())


@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_fold_leaves_group_norms_with_a_warning(norm):
    model = create_model("resnext_mini", num_classes=10, norm=norm).eval()
    with pytest.warns(UserWarning, match="statistics of the input itself at test time"):
        folded = fold_batchnorm(model)
    x = mini_input("resnext_mini")
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))
