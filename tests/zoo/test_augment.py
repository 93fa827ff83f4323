"""Each augmentation flag's effect on a fixed-seed transform, and mixup/cutmix targets."""
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.augment import (Augment, AugmentError, Mixup, _kornia_magnitude, _aa_module, apply_aa, one_hot, parse_aa,
                         random_resized_crop_box, resolve_augment)
from zoo.data import TensorImageDataset, train_transform, val_transform
from zoo.losses import create_loss
from zoo.train import main

SIZE = (3, 16, 16)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(n=2, channels=3, side=16):
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(5))


def _item(augment, images=None, seed=0, index=0):
    ds = TensorImageDataset(images if images is not None else _images(), [0, 1], SIZE, MEAN, STD, augment=augment)
    torch.manual_seed(seed)
    return ds[index][0]


PLAIN = Augment()  # enabled, but every step off


def test_every_step_off_is_the_val_item():
    assert torch.equal(_item(PLAIN), _item(None))
    assert torch.equal(_item(Augment(enabled=False, hflip=1.0)), _item(None))


@pytest.mark.parametrize("flag, dim", [("hflip", -1), ("vflip", -2)])
def test_flip_probability_one_flips_and_zero_does_not(flag, dim):
    assert torch.equal(_item(Augment(**{flag: 1.0})), _item(None).flip(dim))
    assert torch.equal(_item(Augment(**{flag: 0.0})), _item(None))
    # at 0.5, some of a fixed seed's draws flip and some do not
    seen = {torch.equal(_item(Augment(**{flag: 0.5}), seed=s), _item(None)) for s in range(12)}
    assert seen == {True, False}


def test_scale_crops_the_box_random_resized_crop_draws():
    images = _images(side=32)
    torch.manual_seed(7)
    left, top, right, bottom = random_resized_crop_box(32, 32, (0.1, 0.2), (0.5, 2.0))
    crop = torch.nn.functional.interpolate(images[:1, :, top:bottom, left:right], size=(16, 16), mode="bilinear",
                                           align_corners=False)[0]
    expected = (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    got = _item(Augment(scale=(0.1, 0.2), ratio=(0.5, 2.0)), images, seed=7)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (right - left) * (bottom - top) <= 0.2 * 32 * 32 * 1.1  # a small crop, not the whole image
    # scale 1 at ratio 1 is the whole image: the val item
    assert torch.allclose(_item(Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0)), images), _item(None, images), atol=1e-6)


def test_shift_moves_the_image_with_zero_fill():
    x = _item(Augment(shift=1 / 8), seed=3)  # up to 2 px of 16
    plain = _item(None)
    fill = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
    shifted = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if torch.allclose(x, _shift(plain, fill, dy, dx), atol=1e-6)]
    assert len(shifted) == 1 and shifted[0] != (0, 0)


def _shift(x, fill, dy, dx):
    out = fill.expand_as(x).clone()
    h, w = x.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_color_jitter_changes_colors_only_reproducibly_and_within_range():
    a, b = _item(Augment(color_jitter=0.4), seed=1), _item(Augment(color_jitter=0.4), seed=1)
    assert torch.equal(a, b) and not torch.allclose(a, _item(None), atol=1e-3)
    pixels = a * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    gray = TensorImageDataset(_images(channels=1), [0, 1], (1, 16, 16), (0.5,), (0.2,),
                              augment=Augment(color_jitter=0.4))
    assert gray[0][0].shape == (1, 16, 16)


def test_random_erasing_replaces_one_box_with_noise():
    erased, plain = _item(Augment(reprob=1.0), seed=2), _item(None)
    changed = (erased != plain).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert changed.sum() > 0
    # the changed pixels fill exactly their bounding box
    assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert torch.equal(_item(Augment(reprob=0.0), seed=2), plain)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5", "trivial", "original"])
def test_aa_policies_run_reproducibly_and_change_the_image(spec):
    a = _item(Augment(aa=spec), seed=4)
    assert torch.equal(a, _item(Augment(aa=spec), seed=4))
    assert any(not torch.allclose(_item(Augment(aa=spec), seed=s), _item(None), atol=1e-4) for s in range(4))


def test_parse_aa_reads_timm_spelling():
    p = parse_aa("rand-m9-n3-mstd0.5-mmax10-inc1")
    assert (p.kind, p.magnitude, p.num_ops, p.magnitude_std, p.magnitude_max) == ("rand", 9.0, 3, 0.5, 10.0)
    assert parse_aa("rand-m7").num_ops == 2 and parse_aa("rand-m7").magnitude_std == 0.0
    assert parse_aa("original").policy == "imagenet" and parse_aa("trivial").kind == "trivial"
    # timm's 0..10 magnitude onto kornia's 0..30, kept inside kornia's open range
    assert _kornia_magnitude(9) == pytest.approx(27) and 0 < _kornia_magnitude(0) < _kornia_magnitude(10) < 30
    assert _aa_module("rand-m5-n1").n == 1 and _aa_module("rand-m5-n1").m == pytest.approx(15)
    for bad in ("rand-x9", "autoaug", "rand-m11", "rand-m9-n0", "augmix-m5"):
        with pytest.raises(AugmentError, match="--aa"):
            parse_aa(bad)


def test_magnitude_std_draws_each_images_magnitude():
    torch.manual_seed(0)
    seen = set()
    for _ in range(5):
        apply_aa(torch.rand(3, 8, 8), "rand-m9-mstd0.5")
        seen.add(_aa_module("rand-m9-mstd0.5").m)
    assert len(seen) == 5 and all(abs(m - 27) < 15 for m in seen)
    apply_aa(torch.rand(3, 8, 8), "rand-m9")
    assert _aa_module("rand-m9").m == pytest.approx(27)


def test_resolved_defaults_follow_the_data():
    folder = resolve_augment(data="folder:x")
    assert (folder.scale, folder.hflip, folder.shift) == ((0.08, 1.0), 0.5, 0.0)
    digits = resolve_augment(data="digits")
    assert (digits.scale, digits.hflip, digits.shift) == (None, 0.0, 1 / 16)
    assert resolve_augment(data="digits", scale=(0.5, 1.0)).shift == 0.0
    assert resolve_augment(data="folder:x", hflip=0.0).hflip == 0.0
    assert not resolve_augment(data="folder:x", no_aug=True).enabled
    assert Augment.from_dict(folder.to_dict()) == folder
    for bad in (dict(hflip=1.5), dict(reprob=-0.1), dict(scale=(0.5, 0.2)), dict(ratio=(0.0, 1.0)),
                dict(color_jitter=-1.0), dict(aa="nope")):
        with pytest.raises(AugmentError):
            resolve_augment(data="digits", **bad)


def test_folder_train_transform_flags():
    image = Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8))
    whole = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    resized = np.asarray(image.resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    expected = ((resized - MEAN) / np.asarray(STD, dtype=np.float32)).transpose(2, 0, 1)
    torch.manual_seed(0)
    assert np.allclose(train_transform(image, SIZE, MEAN, STD, whole), expected, atol=1e-5)
    torch.manual_seed(0)
    flipped = train_transform(image, SIZE, MEAN, STD, Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0))
    assert np.allclose(flipped, expected[:, :, ::-1], atol=1e-5)
    assert np.array_equal(train_transform(image, SIZE, MEAN, STD, Augment(enabled=False)),
                          val_transform(image, SIZE, MEAN, STD))


# ------------------------------------------------------------------------------ mixup / cutmix


@pytest.mark.parametrize("kwargs", [dict(mixup=0.4), dict(cutmix=1.0), dict(mixup=0.4, cutmix=1.0),
                                    dict(mixup=0.4, label_smoothing=0.1), dict(cutmix=1.0, prob=0.0)])
def test_mixed_targets_sum_to_one(kwargs):
    np.random.seed(0)
    mix = Mixup(num_classes=5, **kwargs)
    for _ in range(10):
        _, target = mix(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]))
        assert target.shape == (6, 5) and torch.allclose(target.sum(1), torch.ones(6))
        assert (target >= 0).all()


def test_mixup_blends_images_with_the_targets_lam():
    np.random.seed(1)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, target = Mixup(num_classes=4, mixup=1.0)(x, y)
    lam = target[0, 0].item()
    assert 0 < lam < 1 and target[0, 3].item() == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_cutmix_target_is_the_share_of_pixels_each_image_gives():
    import random
    random.seed(2)
    np.random.seed(2)
    x = torch.stack([torch.full((1, 10, 10), float(i)) for i in range(4)])
    mixed, target = Mixup(num_classes=4, cutmix=1.0)(x, torch.arange(4))
    own = (mixed[0] == 0).float().mean().item()  # image 0's own pixels; the rest came from image 3
    assert 0 < own < 1
    assert target[0, 0].item() == pytest.approx(own) and target[0, 3].item() == pytest.approx(1 - own)


def test_soft_target_loss_with_smoothing_equals_label_smoothing():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = create_loss("ce", label_smoothing=0.1)(logits, y)
    assert torch.allclose(create_loss("ce")(logits, one_hot(y, 5, 0.1)), smoothed, atol=1e-6)
    # no mixing (prob 0) leaves exactly the label-smoothed one-hot targets
    _, target = Mixup(num_classes=5, mixup=1.0, prob=0.0, label_smoothing=0.1)(torch.rand(6, 1, 2, 2), y)
    assert torch.allclose(create_loss("ce")(logits, target), smoothed, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--hflip", "1.5"], "--hflip must be a probability in [0, 1], got 1.5"),
    (["--aa", "rand-q9"], "--aa rand-q9: cannot read 'q9'"),
    (["--scale", "0.9", "0.1"], "--scale MIN MAX must satisfy"),
    (["--mixup", "0.2", "--loss", "focal"], "--mixup/--cutmix need soft targets"),
    (["--mixup-prob", "2"], "--mixup-prob must be in [0, 1]"),
    (["--model-ema-decay", "1"], "--model-ema-decay must be in (0, 1)"),
])
def test_bad_augmentation_flags_are_one_line_exit_2(tmp_path, capsys, flags, message):
    assert main(["--data", "synthetic", "--out", str(tmp_path / "r"), "--no-progress"] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
