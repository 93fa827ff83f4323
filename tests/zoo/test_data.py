import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.data as data
from contract import preprocess
from contract.preprocess import PreprocessConfig
from zoo.data import (DataError, build_datasets, load_image, random_resized_crop_box, scan_folder,
                      skipped_line, stratified_split, train_transform, val_transform)
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD

MINI = (3, 32, 32)


def _write(path, size, mode="RGB", seed=0, **save_args):
    """A noise image of ``size`` (w, h) in ``mode``, saved in the format of its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path, **save_args)
    return path


@pytest.fixture
def folder(tmp_path):
    """Three classes of PNG/JPEG files of different sizes and modes, plus files to ignore."""
    root = tmp_path / "pets"
    _write(root / "cat" / "a.png", (40, 30), seed=1)
    _write(root / "cat" / "b.jpg", (25, 50), seed=2)
    _write(root / "cat" / "c.png", (64, 64), "RGBA", seed=3)
    _write(root / "cat" / "sub" / "d.png", (20, 20), "L", seed=4)
    _write(root / "dog" / "a.png", (33, 17), seed=5)
    _write(root / "dog" / "b.jpeg", (50, 40), seed=6)
    _write(root / "dog" / "c.png", (30, 30), "P", seed=7)
    _write(root / "dog" / "d.PNG", (16, 24), seed=8)
    _write(root / "bird" / "a.jpg", (100, 60), seed=9)
    _write(root / "bird" / "b.png", (12, 12), seed=10)
    _write(root / "bird" / "c.png", (45, 45), "LA", seed=11)
    (root / "cat" / "notes.txt").write_text("not an image, not an image extension")
    _write(root / ".ipynb_checkpoints" / "x.png", (8, 8))  # hidden: not a class
    _write(root / "dog" / ".hidden.png", (8, 8))
    return root


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return build_datasets("digits", MINI, seed=0)


def test_digits_shapes_classes_and_split(digits):
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.name == "digits" and digits.input_size == MINI and digits.num_classes == 10
    assert len(digits.train) + len(digits.val) == 1797
    assert len(digits.val) == pytest.approx(0.2 * 1797, abs=10)
    for ds in (digits.train, digits.val):
        x, y = ds[0]
        assert x.shape == MINI and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert len(digits.mean) == len(digits.std) == 3


def test_digits_split_is_stratified(digits):
    train = np.bincount(digits.train.targets, minlength=10)
    val = np.bincount(digits.val.targets, minlength=10)
    total = train + val
    np.testing.assert_array_equal(val, np.round(total * 0.2).astype(int))


def test_digits_are_sklearn_digits_scaled_to_unit():
    from sklearn.datasets import load_digits

    bundle = build_datasets("digits", (1, 8, 8), seed=3)  # no resize at 8x8
    _, val_idx = stratified_split(load_digits().target, 0.2, seed=3)
    np.testing.assert_array_equal(bundle.val.images[:, 0].numpy() * 16, load_digits().images[val_idx])
    x, _ = bundle.val[0]
    mean, std = bundle.mean[0], bundle.std[0]
    torch.testing.assert_close(x * std + mean, bundle.val.images[0])


def test_digits_normalised_with_train_statistics(digits):
    train = torch.stack([digits.train.images[i] for i in range(len(digits.train))])
    assert digits.mean[0] == pytest.approx(train.mean().item(), abs=1e-5)
    assert digits.std[0] == pytest.approx(train.std().item(), abs=1e-4)
    val = torch.stack([digits.val[i][0] for i in range(len(digits.val))])
    assert abs(val.mean().item()) < 0.05 and abs(val.std().item() - 1) < 0.05


def test_digits_deterministic_for_a_seed(digits):
    again = build_datasets("digits", MINI, seed=0)
    assert again.train.targets == digits.train.targets
    torch.testing.assert_close(again.val.images, digits.val.images, rtol=0, atol=0)
    other = build_datasets("digits", MINI, seed=1)
    assert other.val.targets != digits.val.targets or not torch.equal(other.val.images, digits.val.images)


def test_digits_train_augmentation_is_a_small_shift(digits):
    x0, _ = digits.val[0]
    assert torch.equal(digits.val[0][0], x0)  # val: no randomness
    torch.manual_seed(0)
    a = digits.train[5][0]
    torch.manual_seed(0)
    assert torch.equal(digits.train[5][0], a)  # train: reproducible from torch's RNG
    draws = {tuple(digits.train[5][0].flatten()[:64].tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_large_inputs_upsample_per_item_with_the_same_result(monkeypatch):
    eager = build_datasets("synthetic", (3, 48, 48))
    monkeypatch.setattr(data, "PRECOMPUTE_MAX_BYTES", 0)
    lazy = build_datasets("synthetic", (3, 48, 48))
    assert eager.val.images.shape[-1] == 48 and lazy.val.images.shape[-1] == 32
    torch.testing.assert_close(lazy.val[3][0], eager.val[3][0])
    assert lazy.mean == pytest.approx(eager.mean) and lazy.std == pytest.approx(eager.std)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    a = build_datasets("synthetic", MINI, seed=0)
    b = build_datasets("synthetic", MINI, seed=0)
    assert a.classes == ["pattern0", "pattern1", "pattern2", "pattern3"]
    assert a.val.targets == b.val.targets
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(build_datasets("synthetic", MINI, seed=1).val.images, a.val.images)
    assert a.train[0][0].shape == MINI

    targets = np.asarray(a.train.targets)
    means = [a.train.images[torch.from_numpy(targets == k)].mean().item() for k in range(4)]
    assert all(m2 - m1 > 0.1 for m1, m2 in zip(means, means[1:]))  # classes differ in mean
    # A nearest-class-mean classifier on raw pixels already separates the val split.
    centroids = torch.stack([a.train.images[torch.from_numpy(targets == k)].mean(0).flatten()
                             for k in range(4)])
    pred = torch.cdist(a.val.images.flatten(1), centroids).argmin(1)
    assert (pred == torch.tensor(a.val.targets)).float().mean() > 0.9


def test_synthetic_grayscale():
    bundle = build_datasets("synthetic", (1, 20, 24))
    assert bundle.train[0][0].shape == (1, 20, 24) and len(bundle.mean) == 1


# --------------------------------------------------------------------------- folder


def test_folder_datasets(folder):
    bundle = build_datasets(f"folder:{folder}", MINI, seed=0, val_fraction=0.25)
    assert bundle.classes == ["bird", "cat", "dog"]
    assert bundle.skipped == []
    assert bundle.mean == IMAGENET_MEAN and bundle.std == IMAGENET_STD
    assert len(bundle.train) == 8 and len(bundle.val) == 3
    assert sorted(bundle.val.targets) == [0, 1, 2]
    for ds in (bundle.train, bundle.val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == MINI and x.dtype == torch.float32 and torch.isfinite(x).all()
    path, _ = bundle.val.samples[0]
    expected = val_transform(load_image(path), MINI, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_array_equal(bundle.val[0][0].numpy(), expected)
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])


def test_folder_grayscale_model(folder):
    bundle = build_datasets(f"folder:{folder}", (1, 16, 16), val_fraction=0.25)
    assert bundle.train[0][0].shape == (1, 16, 16) and bundle.val[0][0].shape == (1, 16, 16)
    assert len(bundle.mean) == len(bundle.std) == 1


def test_folder_split_deterministic(folder):
    a = build_datasets(f"folder:{folder}", MINI, seed=4, val_fraction=0.25)
    b = build_datasets(f"folder:{folder}", MINI, seed=4, val_fraction=0.25)
    assert a.train.samples == b.train.samples and a.val.samples == b.val.samples


def test_datasets_pickle_and_load_in_workers(folder, digits):
    bundle = build_datasets(f"folder:{folder}", MINI, val_fraction=0.25)
    for ds in (bundle.val, digits.val, build_datasets("synthetic", MINI).val):
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(clone[1][0], ds[1][0]) and clone[1][1] == ds[1][1]
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=4, num_workers=2,
                                         sampler=torch.utils.data.DistributedSampler(
                                             bundle.train, num_replicas=2, rank=0, shuffle=True))
    xs = [x for x, _ in loader]
    assert sum(len(x) for x in xs) == 4 and xs[0].shape[1:] == MINI


# --------------------------------------------------------------------------- transforms


def test_val_transform_is_the_contracts_with_data_errors():
    # The steps are tested in tests/contract; here, that zoo's val set uses them, bilinear, and
    # that a bad setting is zoo's one-line DataError.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8))
    config = PreprocessConfig((3, 16, 16), IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875, interpolation="bilinear")
    np.testing.assert_array_equal(val_transform(image, (3, 16, 16), IMAGENET_MEAN, IMAGENET_STD),
                                  preprocess.val_transform(image, config))
    with pytest.raises(DataError, match="square input size, got 16x20"):
        val_transform(Image.new("RGB", (30, 30)), (3, 16, 20), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(DataError, match="mean/std need 3 values"):
        val_transform(Image.new("RGB", (30, 30)), (3, 16, 16), (0.5,), (0.5,))


def test_random_resized_crop_box():
    torch.manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(50, 30)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top)
        assert 0.06 * 1500 <= area <= 1500
    # Nothing of >= 8% area with aspect <= 4/3 fits in 1000 x 10: the fallback takes the full
    # height and width round(10 * 4/3) = 13, centred at (1000 - 13) // 2 = 493.
    assert random_resized_crop_box(1000, 10) == (493, 0, 506, 10)


def test_train_transform_shapes_and_reproducibility():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    torch.manual_seed(3)
    a = train_transform(image, MINI, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(3)
    b = train_transform(image, MINI, IMAGENET_MEAN, IMAGENET_STD)
    assert a.shape == MINI and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert train_transform(image.convert("L"), (1, 8, 8), (0.5,), (0.5,)).shape == (1, 8, 8)


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _write(tmp_path / "phone.jpg", (40, 20), exif=exif)
    assert load_image(path).size == (20, 40)


def test_load_image_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_image(bad)


# --------------------------------------------------------------------------- errors


def test_unreadable_image_is_skipped_and_reported(folder):
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "cat" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings():  # reported by the caller in one line, not as a Python warning
        warnings.simplefilter("error")
        bundle = build_datasets(f"folder:{folder}", MINI, val_fraction=0.25)
    assert len(bundle.skipped) == 2 and "broken.png" in bundle.skipped[1]
    assert re.fullmatch(r"skipped 2 unreadable images: \S*empty.jpg \(.*\); \S*broken.png \(.*\)",
                        skipped_line(bundle.skipped))
    assert len(bundle.train) + len(bundle.val) == 11


def test_no_warning_when_nothing_skipped(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_datasets(f"folder:{folder}", MINI, val_fraction=0.25)


def _one_class(root):
    _write(root / "only" / "a.png", (8, 8))
    _write(root / "only" / "b.png", (8, 8))


def _empty_class(root):
    _write(root / "a" / "x.png", (8, 8))
    _write(root / "a" / "y.png", (8, 8))
    (root / "b").mkdir()


def _no_images(root):
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("hi")


def _single_image_class(root):
    _write(root / "a" / "x.png", (8, 8))
    _write(root / "a" / "y.png", (8, 8))
    _write(root / "b" / "x.png", (8, 8))


def _file(root):
    root.rmdir()
    root.write_text("a file")


@pytest.mark.parametrize("make, match", [
    (None, "data folder not found: .*missing"),
    (lambda root: None, "has no class subfolders"),
    (_file, "data folder is not a directory"),
    (_one_class, r"has one class \(only\); at least two are needed"),
    (_empty_class, "class folder\\(s\\) with no readable images in .*: b$"),
    (_no_images, "has no readable images"),
    (_single_image_class, "class 'b' has only 1 image"),
], ids=["missing", "empty", "file", "one-class", "empty-class", "no-images", "single-image"])
def test_folder_errors(tmp_path, make, match):
    root = tmp_path / "missing"
    if make is not None:
        root.mkdir()
        make(root)
    with pytest.raises(DataError, match=match) as info:
        build_datasets(f"folder:{root}", MINI)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, match", [
    (("mnist", MINI), r"Unknown data 'mnist'; choose one of: digits, synthetic, folder:PATH"),
    (("folder:", MINI), "folder: needs a path"),
    (("digits", (2, 32, 32)), "Unsupported channel count 2"),
    (("digits", (3, 32)), "Invalid input_size"),
    (("digits", (3, 0, 32)), "Invalid input_size"),
])
def test_bad_specs(args, match):
    with pytest.raises(DataError, match=match):
        build_datasets(*args)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(fraction):
    with pytest.raises(DataError, match=f"Invalid val_fraction: {fraction}"):
        build_datasets("synthetic", MINI, val_fraction=fraction)


def test_folder_needs_square_input(folder):
    with pytest.raises(DataError, match="square input size"):
        build_datasets(f"folder:{folder}", (3, 16, 20))


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_stratified_split_small_classes():
    train, val = stratified_split([0, 0, 1, 1, 1, 2, 2, 2, 2, 2], 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(10))
    # round(2 * .2) = 0 -> at least 1; round(3 * .2) = 1; round(5 * .2) = 1
    assert np.bincount(np.asarray([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])[val]).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(stratified_split([0, 0, 1, 1], 0.9, seed=0)[0].size, 2)  # never all


def test_scan_folder_ignores_hidden_and_other_files(folder):
    classes, samples, skipped = scan_folder(folder)
    assert classes == ["bird", "cat", "dog"] and skipped == []
    names = sorted(os.path.basename(p) for p, _ in samples)
    assert "notes.txt" not in names and ".hidden.png" not in names and "d.PNG" in names
    assert len(samples) == 11
