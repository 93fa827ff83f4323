import pytest
import torch
import torch.nn.functional as F

from zoo.nn.batchnorm import ReferenceBatchNorm, batch_norm

SHAPES = [(6, 4), (3, 4, 5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_hand_derived_backward(shape, training):
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(c, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(c, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    # running statistics are not touched by gradcheck's repeated calls when they are None
    fn = (lambda x, g, b: batch_norm(x, g, b, None, None, True)) if training else \
         (lambda x, g, b: batch_norm(x, g, b, rm, rv, False))
    assert torch.autograd.gradcheck(fn, (x, gamma, beta))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_batch_norm(shape, training):
    torch.manual_seed(1)
    c = shape[1]
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1)
    gamma, beta = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    dy = torch.randn(*shape, dtype=torch.float64)
    results = []
    for impl in (batch_norm, F.batch_norm):
        rm, rv = torch.zeros(c, dtype=torch.float64) + 0.3, torch.ones(c, dtype=torch.float64) * 1.7
        xi, gi, bi = (t.clone().requires_grad_() for t in (x, gamma, beta))
        y = impl(xi, gi, bi, rm, rv, training, 0.1, 1e-5) if impl is batch_norm else \
            impl(xi, rm, rv, gi, bi, training, 0.1, 1e-5)
        y.backward(dy)
        results.append((y, xi.grad, gi.grad, bi.grad, rm, rv))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, atol=1e-10)


def test_running_statistics_are_the_seeds():
    """r = 0.9 r + 0.1 batch statistic, with the unbiased m/(m-1) variance."""
    x = torch.tensor([[1.0], [2.0], [4.0], [9.0]])  # (N=4, C=1), mean 4, biased var 9.5
    bn = ReferenceBatchNorm(1)
    bn(x)
    assert bn.running_mean.item() == pytest.approx(0.9 * 0 + 0.1 * 4.0)
    assert bn.running_var.item() == pytest.approx(0.9 * 1 + 0.1 * 9.5 * 4 / 3)


def test_reference_module_is_a_drop_in_for_batchnorm2d():
    torch.manual_seed(2)
    ours, theirs = ReferenceBatchNorm(3), torch.nn.BatchNorm2d(3)
    assert ours.state_dict().keys() - {"num_batches_tracked"} <= theirs.state_dict().keys()
    x = torch.randn(5, 3, 4, 4)
    for _ in range(3):
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    ours.eval(), theirs.eval()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ReferenceBatchNorm(3).train()(torch.randn(1, 3))
