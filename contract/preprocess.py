"""The evaluation transform, numpy + Pillow only: one copy for training's val set and for serving.

``zoo.data`` applies :func:`val_transform` to its val images (then ``torch.from_numpy``), and
``serve.preprocess`` applies it to client images with the settings an export stored in its
metadata (:mod:`contract.metadata`), so a served model sees its inputs exactly as it was
validated. :class:`PreprocessConfig` keeps those settings together, as timm's pretrained cfg
does. Every failure raises :class:`PreprocessError` with a one-line message; callers translate it
into their own error type.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

# Resize the shorter side to size / CROP_PCT, then center-crop size: the ImageNet convention
# (224 from 256), the default for image folders and torchvision weights.
CROP_PCT = 0.875
# Pillow's resampling filter for each interpolation name.
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_MODES = {1: "L", 3: "RGB"}


class PreprocessError(ValueError):
    """An image or a preprocessing setting that cannot be used; the message says what was wrong."""


def image_mode(channels: int) -> str:
    """The Pillow mode a ``channels``-channel model takes: ``L`` for 1, ``RGB`` for 3."""
    if channels not in _MODES:
        raise PreprocessError(f"unsupported channel count {channels}: images are 1 (L) or 3 (RGB) channels")
    return _MODES[channels]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model's input is made from an image.

    Args:
        input_size: ``(C, H, W)`` of the model; C is 1 or 3.
        mean, std: one value per channel, on the 0..1 pixel scale: ``x = (pixel / 255 - mean) / std``.
        crop_pct: share of the resized shorter side kept by the center crop, in (0, 1]: 0.875 for
            photos; 1.0 resizes straight to the input size (what the tensor data sets do).
        interpolation: the resize filter, a key of :data:`INTERPOLATIONS`.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = CROP_PCT
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = tuple(self.input_size)
        if (len(size) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                      for v in size)):
            raise PreprocessError(f"input_size must be (C, H, W) of positive integers, got {size!r}")
        channels = int(size[0])
        image_mode(channels)
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != channels or len(std) != channels:
            raise PreprocessError(f"mean/std need {channels} values each, got {len(mean)} and {len(std)}")
        if not all(s > 0 for s in std):
            raise PreprocessError(f"std must be positive, got {list(std)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise PreprocessError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"unknown interpolation {self.interpolation!r}; choose one of: "
                                  f"{', '.join(INTERPOLATIONS)}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))


def decode_image(data: bytes, formats: Sequence[str] | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes into a loaded image of its own mode, EXIF orientation applied.

    Args:
        data: the encoded file.
        formats: Pillow format names to accept (``("JPEG", "PNG")``); None accepts all of them.
        max_pixels: refuse an image that declares more pixels, before decoding any (a few KB of
            PNG can declare gigapixels); None: only Pillow's own ``Image.MAX_IMAGE_PIXELS`` guard.
    """
    if not data:
        raise PreprocessError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise PreprocessError(f"image too large: {width}x{height} = {width * height:,} pixels, "
                                      f"the limit is {max_pixels:,}")
            return ImageOps.exif_transpose(image)  # loads (decodes) a copy, rotated if EXIF says so
    except Image.DecompressionBombError as e:  # Pillow's own guard, declared size > 2x its limit
        raise PreprocessError(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        expected = f": expected {', '.join(formats)}" if formats else ""
        raise PreprocessError(f"not a readable image ({len(data):,} bytes){expected}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's truncated/corrupt-data errors
        if isinstance(e, PreprocessError):
            raise
        raise PreprocessError(f"cannot decode image: {e}") from None


def to_chw(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``float32 / 255``, then ``(x - mean) / std`` per channel in float32, then HWC -> CHW."""
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def resized_size(width: int, height: int, size: int, crop_pct: float) -> tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``round(size / crop_pct)``.

    The longer side is ``int(S * long / short)``, truncated as torchvision computes it.
    """
    resize = round(size / crop_pct)
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def val_transform(image: Image.Image, config: PreprocessConfig, max_pixels: int | None = None) -> np.ndarray:
    """The evaluation transform: a decoded image of any mode and size -> float32 ``(C, H, W)``.

    Steps, exactly:

    1. ``image.convert("L")`` for a 1-channel model, ``image.convert("RGB")`` for 3 channels.
    2. Resize so the shorter side is ``S = round(size / crop_pct)`` (Python ``round``) with the
       config's interpolation; the longer side becomes ``int(S * long / short)`` (truncated, as
       torchvision computes it).
    3. Center-crop ``size x size`` at ``top = int(round((new_h - size) / 2.0))`` and the same
       for ``left`` (Python ``round`` rounds halves to even, as torchvision's center_crop does).
    4. ``float32 / 255``, then ``(x - mean) / std`` per channel in float32, then HWC -> CHW.

    Args:
        image: a decoded PIL image.
        config: the model's settings; its input size must be square (``H == W``).
        max_pixels: refuse an image whose resized size would exceed this many pixels (a 1 x 10^6
            strip would resize to 10^9 pixels); None: no limit.
    """
    channels, height, width = config.input_size
    if height != width:
        raise PreprocessError(f"val_transform needs a square input size, got {height}x{width}")
    size = height
    mode = image_mode(channels)
    w, h = image.size
    new_w, new_h = resized_size(w, h, size, config.crop_pct)
    if max_pixels is not None and new_w * new_h > max_pixels:
        raise PreprocessError(f"image aspect ratio too extreme: {w}x{h} would resize to {new_w}x{new_h}, "
                              f"over the limit of {max_pixels:,} pixels")
    image = image.convert(mode).resize((new_w, new_h), INTERPOLATIONS[config.interpolation])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return to_chw(image, config.mean, config.std)
