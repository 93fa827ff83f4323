"""Server-side input preparation, numpy + Pillow only: images and tensors -> model-ready arrays.

Images go through ``contract.preprocess``, the transform training validated with; this module
adds what only a server needs: the formats and sizes it accepts, and wire tensors. Every
failure raises :class:`InputError` with a message meant for the client.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from contract import preprocess

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

    The declared size is checked against ``max_pixels`` before any pixel is decoded.
    """
    try:
        return preprocess.decode_image(data, IMAGE_FORMATS, max_pixels)
    except preprocess.PreprocessError as e:
        raise InputError(str(e)) from None


def image_from_pixels(pixels: np.ndarray) -> Image.Image:
    """A PIL image from uint8 ``[H, W]`` or ``[H, W, C]`` (C = 1, 3, 4) pixels."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    mode = "L" if pixels.ndim == 2 else _PIXEL_MODES[pixels.shape[2]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def val_transform(image: Image.Image, input_size: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], crop_pct: float, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Training's eval transform (``contract.preprocess.val_transform``), float32 ``[C, H, W]``.

    An aspect ratio so extreme that the resized image would exceed ``max_pixels`` is refused (a
    1 x 10^6 strip would resize to 10^9 pixels).
    """
    try:
        config = preprocess.PreprocessConfig(tuple(input_size), tuple(mean), tuple(std), crop_pct)
        return preprocess.val_transform(image, config, max_pixels)
    except preprocess.PreprocessError as e:
        raise InputError(str(e)) from None


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
