"""Server-side input preparation, numpy + Pillow only: images and tensors -> model-ready arrays.

:func:`val_transform` mirrors ``zoo.data.val_transform`` step for step (a test proves them
equal), without importing ``zoo``, which imports torch. Every failure raises
:class:`InputError` with a message meant for the client.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

# Decoded images above this many pixels are refused before any pixel is decoded: 40 MP covers
# a 7,300 x 5,470 photo and bounds one decode at ~120 MB of RGB. A few KB of PNG can declare
# gigapixels ("decompression bomb"). Pillow's own guard (Image.MAX_IMAGE_PIXELS) is set to the
# same figure by the server as a second line.
MAX_IMAGE_PIXELS = 40_000_000
# What the server decodes; everything else is refused (a smaller attack surface than all of
# Pillow's plugins).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
TENSOR_DTYPES = ("float32", "float16", "uint8")
# Wire dtypes are little-endian, row-major.
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "uint8": np.dtype("u1")}
_PIXEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Import Pillow's format plugins now rather than inside the first request's decode (~10 ms).
Image.init()


class InputError(ValueError):
    """The client's input cannot be used; the message says what was wrong."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/BMP/WebP bytes into a loaded image, EXIF orientation applied.

    The declared size is checked against ``max_pixels`` before decoding (as
    ``zoo.data.decode_image`` otherwise does: ``ImageOps.exif_transpose`` of the opened image).
    """
    if not data:
        raise InputError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"image too large: {width}x{height} = {width * height:,} pixels, "
                                 f"the limit is {max_pixels:,}")
            return ImageOps.exif_transpose(image)  # loads (decodes) a rotated copy
    except Image.DecompressionBombError as e:  # Pillow's own guard, declared size > 2x its limit
        raise InputError(f"image too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"not a readable image ({len(data):,} bytes): expected {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's truncated/corrupt-data errors
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot decode image: {e}") from None


def image_from_pixels(pixels: np.ndarray) -> Image.Image:
    """A PIL image from uint8 ``[H, W]`` or ``[H, W, C]`` (C = 1, 3, 4) pixels."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    mode = "L" if pixels.ndim == 2 else _PIXEL_MODES[pixels.shape[2]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def _image_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise InputError(f"unsupported channel count {channels}: images are 1 (L) or 3 (RGB) channels")
    return "L" if channels == 1 else "RGB"


def to_chw(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def val_transform(image: Image.Image, input_size: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], crop_pct: float, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Training's eval transform (``zoo.data.val_transform``), float32 ``[C, H, W]``.

    Convert to L/RGB; resize the shorter side to ``round(H / crop_pct)`` (bilinear, the longer
    side truncated as torchvision does); center-crop ``H x W`` at Python-``round``ed offsets;
    ``/ 255``; ``(x - mean) / std``; HWC -> CHW. An aspect ratio so extreme that the resized
    image would exceed ``max_pixels`` is refused (a 1 x 10^6 strip would resize to 10^9 pixels).
    """
    channels, height, width = (int(v) for v in input_size)
    if height != width:
        raise InputError(f"val_transform needs a square input size, got {height}x{width}")
    size = height
    image = image.convert(_image_mode(channels))
    resize = round(size / crop_pct)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if new_w * new_h > max_pixels:
        raise InputError(f"image aspect ratio too extreme: {w}x{h} would resize to {new_w}x{new_h}, "
                         f"over the limit of {max_pixels:,} pixels")
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return to_chw(image, mean, std)


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def parse_tensor(shape: Sequence[int], dtype: str, data: bytes, input_size: Sequence[int],
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, np.ndarray]:
    """Validate a wire tensor and view it as an array.

    Returns:
        ``("pixels", uint8 [H, W(, C)])`` for raw pixels, to be preprocessed like an image, or
        ``("tensor", float32 [C, H, W])``, model-ready.
    """
    if dtype not in TENSOR_DTYPES:
        raise InputError(f"tensor dtype {dtype!r} is not supported: expected one of {', '.join(TENSOR_DTYPES)}")
    shape = [int(d) for d in shape]
    expected = [int(v) for v in input_size]
    if dtype == "uint8":
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in _PIXEL_MODES) or min(shape, default=0) < 1:
            raise InputError(f"uint8 tensor shape {_shape_text(shape)}: expected raw pixels [H, W, C] "
                             "with C = 1, 3 or 4 (or [H, W])")
        if shape[0] * shape[1] > max_pixels:
            raise InputError(f"uint8 tensor too large: {shape[1]}x{shape[0]} pixels, the limit is {max_pixels:,}")
    elif shape not in (expected, [1] + expected):
        raise InputError(f"tensor shape {_shape_text(shape)} does not fit the model: expected "
                         f"{_shape_text(expected)} or {_shape_text([1] + expected)}")
    np_dtype = _NUMPY_DTYPES[dtype]
    need = math.prod(shape) * np_dtype.itemsize
    if len(data) != need:
        raise InputError(f"tensor data has {len(data):,} bytes; shape {_shape_text(shape)} {dtype} needs {need:,}")
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if dtype == "uint8":
        return "pixels", array
    array = array.reshape(expected)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise InputError(f"tensor holds {bad} NaN or Inf value(s); expected finite numbers")
    return "tensor", array.astype(np.float32)  # a copy: frombuffer views are read-only
