import math

import pytest
import torch
import torch.nn.functional as F

from zoo.losses import LOSSES, FocalLoss, create_loss

# Two samples, three classes, with logits = log(p) so that softmax(logits) = p exactly.
P = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
LOGITS = P.log()
TARGET = torch.tensor([0, 2])  # p_t = 0.7 and 0.5


def test_focal_is_cross_entropy_at_gamma_0_alpha_1():
    torch.manual_seed(0)
    logits = torch.randn(16, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (16,))
    focal = create_loss("focal", gamma=0.0, alpha=1.0)
    torch.testing.assert_close(focal(logits, target), F.cross_entropy(logits, target))


def test_focal_by_hand():
    # FL = -alpha * (1 - p_t)^gamma * log(p_t), gamma = 2, alpha = 0.25:
    #   sample 1: 0.25 * 0.3^2 * -ln 0.7 = 0.25 * 0.09 * 0.35667494 = 0.00802519
    #   sample 2: 0.25 * 0.5^2 * -ln 0.5 = 0.25 * 0.25 * 0.69314718 = 0.04332170
    #   mean = 0.02567344
    loss = create_loss("focal", gamma=2.0, alpha=0.25)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(0.02567344, abs=1e-8)


def test_focal_per_class_alpha_by_hand():
    # alpha = (0.5, 1, 2): sample 1 takes alpha_0 = 0.5, sample 2 alpha_2 = 2.
    #   0.5 * 0.09 * 0.35667494 = 0.01605037;  2 * 0.25 * 0.69314718 = 0.34657359
    #   mean = 0.18131198 (a plain mean over samples, not divided by the sum of the weights)
    loss = create_loss("focal", num_classes=3, gamma=2.0, alpha=[0.5, 1.0, 2.0])(LOGITS, TARGET)
    assert loss.item() == pytest.approx(0.18131198, abs=1e-8)
    none = FocalLoss(gamma=2.0, alpha=[0.5, 1.0, 2.0], reduction="none")(LOGITS, TARGET)
    torch.testing.assert_close(none, torch.tensor([0.01605037, 0.34657359], dtype=torch.float64),
                               atol=1e-8, rtol=0)


def test_label_smoothing_by_hand():
    # eps = 0.1, C = 3: loss = 0.9 * -ln p_y + 0.1 * mean_c(-ln p_c)
    #   sample 1: 0.9 * 0.35667494 + 0.1 * (0.35667494 + 1.60943791 + 2.30258509) / 3
    #           = 0.32100745 + 0.14228993 = 0.46329738
    #   sample 2: 0.9 * 0.69314718 + 0.1 * (1.38629436 + 1.38629436 + 0.69314718) / 3
    #           = 0.62383246 + 0.11552453 = 0.73935699
    #   mean = 0.60132719
    loss = create_loss("ce", label_smoothing=0.1)(LOGITS, TARGET)
    assert loss.item() == pytest.approx(0.60132719, abs=1e-7)
    assert create_loss("ce")(LOGITS, TARGET).item() == pytest.approx(
        (-math.log(0.7) - math.log(0.5)) / 2, abs=1e-12)


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e30])
@pytest.mark.parametrize("loss_args", [
    dict(name="ce"),
    dict(name="ce", label_smoothing=0.1),
    dict(name="focal", gamma=0.0),
    dict(name="focal", gamma=0.5),
    dict(name="focal", gamma=2.0, alpha=0.25),
    dict(name="focal", gamma=2.0, alpha=[1.0, 2.0, 0.5]),
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_gradients_finite_for_extreme_logits(scale, loss_args):
    # Row 1 is confidently right (p_t rounds to 1), row 2 confidently wrong (p_t underflows to 0).
    logits = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]) * scale
    logits.requires_grad_(True)
    loss = create_loss(**loss_args)(logits, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[4.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([0])
    focal, ce = create_loss("focal", gamma=2.0), create_loss("ce")
    # The easy sample loses far more of its cross-entropy than the hard one.
    assert focal(easy, t) / ce(easy, t) < focal(hard, t) / ce(hard, t) < 1


def test_focal_alpha_is_a_buffer_that_follows_the_module():
    loss = create_loss("focal", alpha=[1.0, 2.0])
    assert "alpha" in dict(loss.named_buffers())
    assert loss.to(torch.float64)(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1])).dtype == torch.float64


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mse"), "Unknown loss 'mse'; choose one of: ce, focal"),
    (dict(name="ce", label_smoothing=1.0), "Invalid label_smoothing: 1.0"),
    (dict(name="ce", label_smoothing=-0.1), "Invalid label_smoothing: -0.1"),
    (dict(name="focal", label_smoothing=0.1), "only supported by 'ce'"),
    (dict(name="focal", gamma=-1.0), "Invalid focal gamma: -1.0"),
    (dict(name="focal", gamma=float("nan")), "Invalid focal gamma: nan"),
    (dict(name="focal", alpha=0.0), "Invalid focal alpha: 0.0"),
    (dict(name="focal", alpha=[1.0, -1.0]), r"Invalid focal alpha: \[1.0, -1.0\]"),
    (dict(name="focal", alpha=[[1.0]]), "Invalid focal alpha"),
    (dict(name="focal", num_classes=3, alpha=[1.0, 2.0]), r"2 weights; expected one per class \(3\)"),
    (dict(name="ce", num_classes=0), "Invalid num_classes: 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loss(**kwargs)


def test_alpha_length_checked_against_logits():
    with pytest.raises(ValueError, match="2 weights but the logits have 3 classes"):
        create_loss("focal", alpha=[1.0, 2.0])(LOGITS, TARGET)


def test_every_loss_builds():
    for name in LOSSES:
        assert torch.isfinite(create_loss(name, num_classes=3)(LOGITS, TARGET))
