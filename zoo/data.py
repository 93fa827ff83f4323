"""Datasets for training, resolved from one spec string by :func:`build_datasets`.

- ``digits``: scikit-learn's bundled 1,797 8x8 handwritten digits (no download). Pixels 0..16
  are scaled to 0..1, upsampled bilinearly to the model's H x W and replicated to 3 channels
  for RGB models. mean/std are measured on the *train* split at the model's resolution, so the
  val split is normalised with statistics it did not contribute to.
- ``synthetic``: a small generated set for smoke tests: per class, a grating of its own
  orientation and brightness (and tint, for RGB) plus noise. Deterministic for a seed and easy
  to learn.
- ``folder:PATH``: one subfolder of PATH per class (sorted names are the class labels), JPEG or
  PNG files of any size; or, when PATH holds ``train/`` and ``val/`` (ImageNet's layout), those
  two as given, with the same class subfolders. Val: :func:`val_transform`. ImageNet mean/std.

``digits`` and ``synthetic`` are held as tensors (the model never waits on decoding). Train items
are augmented as :mod:`zoo.augment` resolves the run's flags: by default a random resized crop
and horizontal flip for folders, a random shift of up to 1/16 of the image for the tensor sets.
A random split is stratified and deterministic for a seed (:func:`stratified_split`).

Datasets hold only tensors, paths and plain settings, so they pickle into DataLoader workers
and work under a ``DistributedSampler``. Train-time randomness comes from torch's global RNG,
which the DataLoader seeds differently in each worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from contract import preprocess
from zoo.augment import DEFAULT_RATIO, DEFAULT_SCALE, TENSOR_SHIFT, Augment, photometric, random_erase
from zoo.augment import random_resized_crop_box, random_shift, resolve_augment
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Val/serving: resize the shorter side to size / CROP_PCT, then center-crop size (the
# ImageNet convention: 224 <- 256).
CROP_PCT = preprocess.CROP_PCT
# Train on folders by default: torchvision's RandomResizedCrop defaults (Szegedy et al. 2015);
# on tensors: a random shift of up to a fraction of the side (zoo.augment).
RRC_SCALE = DEFAULT_SCALE
RRC_RATIO = DEFAULT_RATIO
SHIFT_FRACTION = TENSOR_SHIFT
# Synthetic set: classes, images per class, and the largest side it is generated at (then
# upsampled like the digits).
SYNTHETIC_CLASSES = 4
SYNTHETIC_PER_CLASS = 64
SYNTHETIC_SIDE = 32
# Tensor sets are upsampled once up front when the result fits in this many bytes; beyond it
# (digits at 224 x 224 would be ~1 GB) each item is upsampled when it is read.
PRECOMPUTE_MAX_BYTES = 256 * 2**20


class DataError(ValueError):
    """A problem with the data the user pointed at; the message is one line meant for them."""


@dataclass
class DataBundle:
    """What the trainer needs: datasets, labels and the normalisation to export with the model."""

    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    name: str
    skipped: list[str] = field(default_factory=list)  # "path (reason)" of unreadable images
    # val_transform's crop_pct that reproduces this val set from an image file (1.0 for the
    # tensor sets: their images are upsampled whole; CROP_PCT for folders).
    crop_pct: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- image decoding


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) into a loaded PIL image.

    EXIF orientation is applied (phone photos store it there). The image keeps its own mode;
    :func:`val_transform` converts it. ``contract.preprocess.decode_image``, any Pillow format.
    """
    try:
        return preprocess.decode_image(data)
    except preprocess.PreprocessError as e:
        raise DataError(str(e)) from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """:func:`decode_image` of the file at ``path``."""
    try:
        return decode_image(Path(path).read_bytes())
    except (DataError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _unreadable(path: str) -> str | None:
    """Why ``path`` is not a usable image, or None. Checks the header and structure only."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many types here (OSError, SyntaxError, struct.error, ...)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


# --------------------------------------------------------------------------- transforms


def _image_mode(channels: int) -> str:
    try:
        return preprocess.image_mode(channels)
    except preprocess.PreprocessError:
        raise DataError(f"Unsupported channel count {channels}: images are 1 (L) or 3 (RGB) channels") from None


def val_transform(image: Image.Image, input_size: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], crop_pct: float = CROP_PCT) -> np.ndarray:
    """The eval transform the server applies too: ``contract.preprocess.val_transform`` (bilinear).

    Resize the shorter side to ``round(size / crop_pct)``, center-crop ``size x size``,
    ``(x / 255 - mean) / std``, HWC -> CHW; the contract's docstring gives each step exactly.

    Args:
        image: a decoded PIL image of any mode and size.
        input_size: ``(C, H, W)`` of the model, square (``H == W``).
        mean, std: one value per channel, on the 0..1 scale.
        crop_pct: share of the resized shorter side kept by the crop: 0.875 for photos (the
            ImageNet convention, 224 from 256); 1.0 resizes straight to the input size, which is
            what ``digits`` and ``synthetic`` models saw in training (bilinear upsampling).

    Returns:
        float32 array of shape ``(C, H, W)``.

    Raises:
        DataError: a setting the transform cannot take (a non-square size, mean/std of the wrong
            length, crop_pct outside (0, 1], a channel count other than 1 or 3).
    """
    try:
        config = preprocess.PreprocessConfig(tuple(input_size), tuple(mean), tuple(std), crop_pct)
        return preprocess.val_transform(image, config)
    except preprocess.PreprocessError as e:
        raise DataError(str(e)) from None


def train_transform(image: Image.Image, input_size: Sequence[int], mean: Sequence[float],
                    std: Sequence[float], augment: Augment | None = None) -> np.ndarray:
    """One training image from a decoded file: ``augment``'s steps (:mod:`zoo.augment`).

    None: the folder default (timm's: random resized crop at scale 0.08-1, hflip 0.5). A crop is
    resized to ``H x W`` (bilinear); without one (``--no-aug``) this is :func:`val_transform`.
    """
    augment = augment if augment is not None else resolve_augment(data="folder:")
    channels, height, width = (int(v) for v in input_size)
    if not augment.enabled or augment.scale is None:
        array = val_transform(image, input_size, mean, std)
        if not augment.enabled:
            return array
        x01 = torch.from_numpy(array) * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        image = image.convert(_image_mode(channels))
        box = random_resized_crop_box(*image.size, scale=augment.scale, ratio=augment.ratio)
        image = image.resize((width, height), Image.BILINEAR, box=box)
        x01 = torch.from_numpy(preprocess.to_chw(image, (0.0,) * channels, (1.0,) * channels))
    return _finish(x01, augment, mean, std).numpy()


def _finish(x01: Tensor, augment: Augment, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Flips, jitter and policy on an image in 0..1, then normalise and erase."""
    x01 = photometric(x01, augment)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return random_erase((x01 - mean_t) / std_t, augment.reprob)


# --------------------------------------------------------------------------- datasets


class ImageFolderDataset(Dataset):
    """Images on disk: ``samples`` is a list of ``(path, class_index)``."""

    def __init__(self, samples: list[tuple[str, int]], input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], train: bool, augment: Augment | None = None) -> None:
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.input_size = tuple(int(v) for v in input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.train = train
        self.augment = augment if augment is not None else resolve_augment(data="folder:")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        image = load_image(path)
        if self.train:
            return torch.from_numpy(train_transform(image, self.input_size, self.mean, self.std, self.augment)), target
        return torch.from_numpy(val_transform(image, self.input_size, self.mean, self.std)), target


class TensorImageDataset(Dataset):
    """Images held as a float tensor ``(N, C0, h, w)`` in 0..1 (C0 is 1 or the model's C).

    Items are upsampled to the model's H x W if stored smaller, replicated to C channels and
    normalised. Train items (``augment`` given) are first augmented as :mod:`zoo.augment` says:
    a random resized crop of the stored image when ``augment.scale`` is set, else a random shift
    of up to ``augment.shift`` of the side (zero fill), then flips, jitter, policy and erasing.
    """

    def __init__(self, images: Tensor, targets: Sequence[int], input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], augment: Augment | None = None) -> None:
        self.input_size = tuple(int(v) for v in input_size)
        assert images.dim() == 4 and images.shape[1] in (1, self.input_size[0]), images.shape
        self.images = images
        self.targets = [int(t) for t in targets]
        self.augment = augment if augment is not None and augment.enabled else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        channels, height, width = self.input_size
        x = self.images[index]
        augment = self.augment
        if augment is not None and augment.scale is not None:
            left, top, right, bottom = random_resized_crop_box(x.shape[-1], x.shape[-2], augment.scale, augment.ratio)
            x = _upsample(x[None, :, top:bottom, left:right], (height, width))[0]
        elif x.shape[-2:] != (height, width):
            x = _upsample(x[None], (height, width))[0]
        if augment is None:
            return (x.expand(channels, -1, -1) - self.mean) / self.std, self.targets[index]
        if augment.scale is None and augment.shift:
            x = random_shift(x, max(1, round(max(height, width) * augment.shift)))
        return _finish(x.expand(channels, -1, -1), augment, self.mean, self.std), self.targets[index]


def _upsample(images: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _upsampled_chunks(images: Tensor, size: tuple[int, int], chunk: int = 256) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk]
        yield part if part.shape[-2:] == size else _upsample(part, size)


# --------------------------------------------------------------------------- splitting


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int = 0,
                     classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, val_indices)``, the same for the same seed.

    Each class puts ``round(n * val_fraction)`` of its ``n`` items into val, but at least one
    and never all of them, so every class is in both splits even in a small folder (where
    scikit-learn's ``train_test_split(stratify=...)`` would refuse or leave a class out).
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) < 2:
            name = classes[c] if classes is not None else str(c)
            raise DataError(f"class {name!r} has only {len(idx)} image(s); each class needs at "
                            f"least 2 (one for training, one for validation)")
        idx = rng.permutation(idx)
        n_val = min(max(int(round(len(idx) * val_fraction)), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------- builders


def _tensor_bundle(name: str, images: Tensor, targets: np.ndarray, classes: list[str],
                   input_size: tuple[int, int, int], seed: int, val_fraction: float,
                   augment: Augment) -> DataBundle:
    channels, height, width = input_size
    size = (height, width)
    train_idx, val_idx = stratified_split(targets, val_fraction, seed, classes)
    upsampled_bytes = images.shape[0] * images.shape[1] * height * width * images.element_size()
    if images.shape[-2:] != size and upsampled_bytes <= PRECOMPUTE_MAX_BYTES:
        images = torch.cat(list(_upsampled_chunks(images, size)))
    train_images = images[torch.from_numpy(train_idx)]
    # Per-channel mean/std of the train split at the model's resolution, accumulated in float64.
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for part in _upsampled_chunks(train_images, size):
        part = part.double()
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
        count += part.shape[0] * height * width
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    if images.shape[1] == 1 and channels > 1:
        mean, std = mean.expand(channels), std.expand(channels)
    mean_t, std_t = tuple(mean.tolist()), tuple(std.tolist())
    return DataBundle(
        train=TensorImageDataset(train_images, targets[train_idx], input_size, mean_t, std_t, augment=augment),
        val=TensorImageDataset(images[torch.from_numpy(val_idx)], targets[val_idx], input_size, mean_t, std_t),
        classes=classes, mean=mean_t, std=std_t, input_size=input_size, name=name)


def _digits(input_size: tuple[int, int, int], seed: int, val_fraction: float, augment: Augment) -> DataBundle:
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / np.float32(16.0)).unsqueeze(1)
    classes = [str(i) for i in range(10)]
    return _tensor_bundle("digits", images, digits.target.astype(np.int64), classes, input_size,
                          seed, val_fraction, augment)


def synthetic_images(input_size: Sequence[int], seed: int = 0) -> tuple[Tensor, np.ndarray]:
    """The synthetic set before splitting: images ``(N, C, h, w)`` in 0..1 and their targets.

    Class ``k`` of ``K``: brightness ``0.25 + 0.5 k / (K - 1)``, a sine grating at angle
    ``pi k / K`` with 3 periods across the image and a random phase, a per-class tint for RGB,
    and Gaussian noise (sigma 0.1). Generated at most ``SYNTHETIC_SIDE`` pixels a side.
    """
    channels, height, width = (int(v) for v in input_size)
    h, w = min(height, SYNTHETIC_SIDE), min(width, SYNTHETIC_SIDE)
    k_count, per_class = SYNTHETIC_CLASSES, SYNTHETIC_PER_CLASS
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(k_count), per_class)
    k = targets[:, None, None, None].astype(np.float64)
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    theta = np.pi * k / k_count
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(len(targets), 1, 1, 1))
    grating = 0.2 * np.sin(2.0 * np.pi * 3.0 * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    brightness = 0.25 + 0.5 * k / (k_count - 1)
    tint = 1.0 + 0.2 * np.cos(2.0 * np.pi * (k / k_count + np.arange(channels)[None, :, None, None] / 3.0))
    tint = tint if channels > 1 else np.ones_like(tint)
    noise = rng.normal(0.0, 0.1, size=(len(targets), channels, h, w))
    images = np.clip(brightness * tint + grating + noise, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(images), targets


def _synthetic(input_size: tuple[int, int, int], seed: int, val_fraction: float, augment: Augment) -> DataBundle:
    images, targets = synthetic_images(input_size, seed)
    classes = [f"pattern{k}" for k in range(SYNTHETIC_CLASSES)]
    return _tensor_bundle("synthetic", images, targets, classes, input_size, seed, val_fraction, augment)


def scan_folder(root: str | os.PathLike,
                allow_empty: bool = False) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """``(classes, samples, skipped)`` for a folder with one subfolder per class.

    Subfolders are searched recursively for :data:`IMAGE_EXTENSIONS` (any case); hidden files
    and folders (``.ipynb_checkpoints``, ``.DS_Store``) are ignored. Files that do not open as
    images are left out and listed in ``skipped`` as ``"path (reason)"``. A class folder with no
    readable image is an error unless ``allow_empty`` (a val split may lack a class).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data folder is not a directory: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class subfolders "
                        f"(expected one subfolder per class, e.g. {root / 'cat' / '1.jpg'})")
    if len(classes) < 2:
        raise DataError(f"data folder {root} has one class ({classes[0]}); at least two are needed")
    samples: list[tuple[str, int]] = []
    skipped: list[str] = []
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, filename)
                reason = _unreadable(path)
                if reason is None:
                    samples.append((path, index))
                else:
                    skipped.append(f"{path} ({reason})")
    if not samples and not allow_empty:
        raise DataError(f"data folder {root} has no readable images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    counts = np.bincount([t for _, t in samples], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty and not allow_empty:
        raise DataError(f"class folder(s) with no readable images in {root}: {', '.join(empty)}")
    return classes, samples, skipped


def _folder(spec: str, path: str, input_size: tuple[int, int, int], seed: int,
            val_fraction: float, augment: Augment) -> DataBundle:
    channels, height, width = input_size
    if height != width:
        raise DataError(f"folder data needs a square input size, got {height}x{width}")
    root = Path(path).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_samples, skipped = scan_folder(root / "train")
        val_classes, val_samples, val_skipped = scan_folder(root / "val", allow_empty=True)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            differ = "; ".join(f"only in {where}/: {', '.join(names)}"
                               for where, names in (("train", only_train), ("val", only_val)) if names)
            raise DataError(f"data folder {root}: train/ and val/ must hold the same class subfolders; {differ}"
                            if differ else f"data folder {root}: train/ and val/ class subfolders differ")
        skipped += val_skipped
    else:
        classes, samples, skipped = scan_folder(root)
        train_idx, val_idx = stratified_split([t for _, t in samples], val_fraction, seed, classes)
        train_samples, val_samples = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    if channels == 3:
        mean, std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    else:  # grayscale: the ImageNet statistics averaged over the three channels
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return DataBundle(
        train=ImageFolderDataset(train_samples, input_size, mean, std, train=True, augment=augment),
        val=ImageFolderDataset(val_samples, input_size, mean, std, train=False),
        classes=classes, mean=mean, std=std, input_size=input_size, name=spec, skipped=skipped,
        crop_pct=CROP_PCT)


def skipped_line(skipped: Sequence[str], shown: int = 3) -> str:
    """One line for the unreadable files of :func:`scan_folder`: every one when few, else the
    count and the first ``shown``."""
    if len(skipped) == 1:
        return f"skipped 1 unreadable image: {skipped[0]}"
    if len(skipped) <= shown:
        return f"skipped {len(skipped)} unreadable images: {'; '.join(skipped)}"
    return f"skipped {len(skipped)} unreadable images; the first {shown}: {'; '.join(skipped[:shown])}"


def class_counts(bundle: DataBundle) -> tuple[list[int], list[int]]:
    """Images per class in the train and the val split."""
    def count(ds: Dataset) -> list[int]:
        return np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=bundle.num_classes).tolist()
    return count(bundle.train), count(bundle.val)


def class_count_lines(bundle: DataBundle, shown: int = 20) -> list[str]:
    """Lines saying the images per class (train/val), and any class without a val image."""
    train, val = class_counts(bundle)
    pairs = [f"{name} {t}/{v}" for name, t, v in zip(bundle.classes, train, val)]
    if len(pairs) <= shown:
        lines = ["images per class (train/val): " + ", ".join(pairs)]
    else:
        lines = [f"images per class (train/val), {len(pairs)} classes: train {min(train)}-{max(train)}, "
                 f"val {min(val)}-{max(val)}; first {shown}: " + ", ".join(pairs[:shown])]
    missing = [name for name, v in zip(bundle.classes, val) if v == 0]
    if missing:
        lines.append(f"warning: {len(missing)} class(es) with no val image (their accuracy is not measured): "
                     + ", ".join(missing[:shown]) + (" ..." if len(missing) > shown else ""))
    return lines


@dataclass(frozen=True)
class DataSource:
    """What a ``--data`` name builds. ``build(input_size, seed, val_fraction, augment)`` makes the
    :class:`DataBundle`; a source that takes an argument (``folder:PATH``) is called as
    ``build(spec, argument, input_size, seed, val_fraction, augment)``."""

    build: Callable[..., DataBundle]
    arg: str | None = None  # the argument's name in ``NAME:ARG``; None: the source takes none
    example: str = ""  # a spec with its argument, shown when the argument is missing


# Name -> source, the one place a data name is tied to its builder.
DATA_SOURCES: dict[str, DataSource] = {
    "digits": DataSource(_digits),
    "synthetic": DataSource(_synthetic),
    "folder": DataSource(_folder, arg="PATH", example="folder:data/flowers"),
}
# The spellings users type, for help texts and errors: digits, synthetic, folder:PATH.
DATA_SPECS = tuple(name if s.arg is None else f"{name}:{s.arg}" for name, s in DATA_SOURCES.items())


def build_datasets(spec: str, input_size: Sequence[int], seed: int = 0,
                   val_fraction: float = 0.2, augment: Augment | None = None) -> DataBundle:
    """Train and val datasets for ``spec``: ``digits``, ``synthetic`` or ``folder:PATH``.

    Args:
        spec: which data (see the module docstring).
        input_size: the model's ``(C, H, W)``; C is 1 or 3.
        seed: fixes the split (and the synthetic images).
        val_fraction: share of each class held out for validation, in (0, 1).
        augment: the train split's augmentation (:func:`zoo.augment.resolve_augment`); None:
            the data's default.

    Raises:
        DataError: a one-line message for an unknown spec, a missing or empty folder, fewer
            than two classes, or a class with fewer than two images. Unreadable images are
            skipped with a warning and listed in ``DataBundle.skipped``.
    """
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise DataError(f"Invalid input_size: {tuple(input_size)!r} (expected positive (C, H, W))")
    size = (int(input_size[0]), int(input_size[1]), int(input_size[2]))
    _image_mode(size[0])
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"Invalid val_fraction: {val_fraction} (must be in (0, 1))")
    name, colon, arg = spec.partition(":")
    source = DATA_SOURCES.get(name)
    if source is None or bool(colon) != (source.arg is not None):
        raise DataError(f"Unknown data {spec!r}; choose one of: {', '.join(DATA_SPECS)}")
    if augment is None:
        augment = resolve_augment(data=spec)
    if source.arg is None:
        return source.build(size, seed, val_fraction, augment)
    if not arg:
        raise DataError(f"{name}: needs a {source.arg.lower()}, e.g. {source.example}")
    return source.build(spec, arg, size, seed, val_fraction, augment)
