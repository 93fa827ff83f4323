import copy

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


# A misplaced eps (sqrt(var) + eps for sqrt(var + eps)) shifts a whole model's outputs by too little
# for a float32 tolerance that leaves room for rounding across a deep net. float64 rounding is
# negligible next to it, so the arithmetic is checked there; the float32 fold (what export runs) loosely.
FOLD_RTOL_FP64 = 1e-10
FOLD_RTOL_FP32 = 1e-5


def _fold_keeps_outputs(model, x):
    """``fold_batchnorm(model)``, after checking it against ``model`` in float32 and, folded
    again from a float64 copy, in float64."""
    folded = fold_batchnorm(model)
    model64 = copy.deepcopy(model).double()
    folded64 = fold_batchnorm(model64)
    with torch.no_grad():
        assert _rel_diff(model(x), folded(x)) < FOLD_RTOL_FP32
        assert _rel_diff(model64(x.double()), folded64(x.double())) < FOLD_RTOL_FP64
    return folded


def _check_fold(name, x):
    model = randomize_bn_stats(create_model(name, num_classes=10)).eval()
    folded = _fold_keeps_outputs(model, x)
    assert _count_bn(model) > 0 and _count_bn(folded) == 0
    assert not folded.training
    return model, folded


@pytest.mark.parametrize("name", MINI_MODELS)
def test_fold_mini_models(name):
    _check_fold(name, mini_input(name, 4))


@pytest.mark.parametrize("name", ["resnext50_32x4d", "densenet121"])
def test_fold_full_size(name):
    _check_fold(name, torch.randn(1, 3, 64, 64))


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


class _ConvReadTwice(nn.Module):
    """conv1's output feeds bn1 and also a second reader: a pre-norm skip connection, or a second BN."""

    def __init__(self, second_reader: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.other = nn.BatchNorm2d(8) if second_reader == "bn" else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(torch.relu(self.bn1(y)) + self.other(y)))


@pytest.mark.parametrize("second_reader", ["add", "bn"])
def test_fold_leaves_a_conv_with_two_readers_unfolded(second_reader):
    # Merging bn1 into conv1 would hand the other reader bn1's output instead of the conv's.
    model = randomize_bn_stats(_ConvReadTwice(second_reader)).eval()
    folded = _fold_keeps_outputs(model, torch.randn(2, 3, 12, 12))
    assert _count_bn(folded) == 0
    assert folded.conv1.bias is None and torch.equal(folded.conv1.weight, model.conv1.weight)
    assert isinstance(folded.bn1, ScaleShift)
    # the conv->BN pair downstream, whose conv has one reader, still merges
    assert isinstance(folded.bn2, nn.Identity) and not torch.equal(folded.conv2.bias, model.conv2.bias)


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


class _ConvCalledTwice(nn.Module):
    """One conv module called at two places: ``a(conv(x)) + b(conv(2 * x))``, or with ``a`` at both."""

    def __init__(self, same_bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a = nn.BatchNorm2d(8)
        self.b = self.a if same_bn else nn.BatchNorm2d(8)

    def forward(self, x):
        return self.a(self.conv(x)) + self.b(self.conv(2 * x))


def test_fold_leaves_a_conv_called_before_two_different_bns_unfolded():
    # Merging a into conv would make the second call, which b normalizes, use a's merged weights.
    model = randomize_bn_stats(_ConvCalledTwice(same_bn=False)).eval()
    folded = _fold_keeps_outputs(model, torch.randn(2, 3, 12, 12))
    assert _count_bn(folded) == 0
    assert folded.conv.bias is None and torch.equal(folded.conv.weight, model.conv.weight)
    assert isinstance(folded.a, ScaleShift) and isinstance(folded.b, ScaleShift)


def test_fold_merges_a_conv_called_twice_before_the_same_bn():
    model = randomize_bn_stats(_ConvCalledTwice(same_bn=True)).eval()
    folded = _fold_keeps_outputs(model, torch.randn(2, 3, 12, 12))
    assert isinstance(folded.a, nn.Identity) and folded.conv.bias is not None
