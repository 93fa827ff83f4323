import pytest
import torch
from torch import nn

from zoo.nn.norm import NORMS, get_norm_layer, gn_num_groups


def test_factory_names_and_unknown():
    assert isinstance(get_norm_layer("bn")(8), nn.BatchNorm2d)
    assert get_norm_layer("bn")(8).momentum == 0.1  # the textbook's running-average beta 0.9
    gn, ln, inorm = (get_norm_layer(n)(64) for n in ("gn", "ln", "in"))
    assert (gn.num_groups, ln.num_groups, inorm.num_groups) == (32, 1, 64)
    assert inorm.weight.shape == (64,)  # IN keeps a per-channel affine
    with pytest.raises(ValueError, match="Unknown norm 'batch'; choose one of: bn, gn, ln, in"):
        get_norm_layer("batch")
    with pytest.raises(ValueError, match="Invalid gn_groups: 0"):
        get_norm_layer("gn", gn_groups=0)


@pytest.mark.parametrize("channels,groups,expected", [(64, 32, 32), (24, 32, 24), (48, 32, 24), (36, 32, 18),
                                                      (7, 32, 7), (100, 32, 25), (13, 4, 1), (1, 32, 1)])
def test_gn_group_rule(channels, groups, expected):
    """Largest divisor of the channel count that is <= the requested groups."""
    assert gn_num_groups(channels, groups) == expected
    assert get_norm_layer("gn", groups)(channels).num_groups == expected


def _affine_identity(m):
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.zero_()
    return m


def test_gn_with_one_group_is_ln_and_with_c_groups_is_in():
    """G=1 gives LN, G=C gives IN."""
    x = torch.randn(3, 6, 5, 5)
    assert torch.allclose(get_norm_layer("gn", 1)(6)(x), get_norm_layer("ln")(6)(x), atol=1e-6)
    assert torch.allclose(get_norm_layer("gn", 6)(6)(x), get_norm_layer("in")(6)(x), atol=1e-6)
    # and both against torch's own LayerNorm / InstanceNorm without affine terms
    assert torch.allclose(get_norm_layer("ln")(6)(x), nn.functional.layer_norm(x, x.shape[1:]), atol=1e-5)
    assert torch.allclose(get_norm_layer("in")(6)(x), nn.functional.instance_norm(x), atol=1e-5)


def _hand_normalize(x, dims):
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_statistics_axes_match_the_seed_figure():
    """Batch=3, C=6 as in the textbook's figure: BN over (N,H,W), LN over (C,H,W), IN over (H,W),
    GN over (C/G,H,W) within each of G=2 groups."""
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    bn = _affine_identity(get_norm_layer("bn")(6).double()).train()
    assert torch.allclose(bn(x), _hand_normalize(x, (0, 2, 3)), atol=1e-6)
    assert torch.allclose(get_norm_layer("ln")(6).double()(x), _hand_normalize(x, (1, 2, 3)), atol=1e-6)
    assert torch.allclose(get_norm_layer("in")(6).double()(x), _hand_normalize(x, (2, 3)), atol=1e-6)
    grouped = _hand_normalize(x.view(3, 2, 3, 4, 4), (2, 3, 4)).view_as(x)
    assert torch.allclose(get_norm_layer("gn", 2)(6).double()(x), grouped, atol=1e-6)


@pytest.mark.parametrize("name", NORMS)
def test_batch_independence(name):
    """GN/LN/IN outputs for one sample ignore the rest of the batch; BN's (train mode) do not."""
    layer = get_norm_layer(name, 4)(8).train()
    x = torch.randn(4, 8, 5, 5)
    other = x.clone()
    other[1:] = torch.randn(3, 8, 5, 5) * 3 + 1
    same = torch.allclose(layer(x)[0], layer(other)[0], atol=1e-6)
    assert same == (name != "bn")
