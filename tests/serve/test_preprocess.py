"""serve.preprocess: the formats, sizes and wire tensors a server accepts, and its answers to bad input.

The transform itself is ``contract.preprocess``'s (tests/contract), the one training applies too.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from contract.preprocess import PreprocessConfig
from contract.preprocess import val_transform as contract_val_transform
from serve import preprocess
from tests.serve.conftest import png_bytes, random_image

MEAN3, STD3 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("JPEG", {"quality": 90}), ("BMP", {}), ("WEBP", {"quality": 80})])
def test_served_formats_decode_to_the_transform_training_uses(fmt, kwargs):
    data = png_bytes(random_image(3), fmt, **kwargs)
    image = preprocess.decode_image(data)
    got = preprocess.val_transform(image, (3, 32, 32), MEAN3, STD3, 0.875)
    np.testing.assert_array_equal(got, contract_val_transform(image, PreprocessConfig((3, 32, 32), MEAN3, STD3)))


def test_pixels_equal_decoded_image():
    pixels = random_image(5)
    kind, array = preprocess.parse_tensor(pixels.shape, "uint8", pixels.tobytes(), (3, 32, 32))
    assert kind == "pixels"
    from_pixels = preprocess.val_transform(preprocess.image_from_pixels(array), (3, 32, 32), MEAN3, STD3, 0.875)
    from_png = preprocess.val_transform(preprocess.decode_image(png_bytes(pixels)), (3, 32, 32), MEAN3, STD3, 0.875)
    np.testing.assert_array_equal(from_pixels, from_png)


def test_decompression_bomb_refused_before_decoding():
    # 1 bit per pixel, all zero: a few KB of PNG that declares 50 MP.
    bomb = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(bomb, "PNG")
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(preprocess.InputError, match="too large: 10000x5000"):
        preprocess.decode_image(bomb.getvalue())
    with pytest.raises(preprocess.InputError, match="too large"):
        preprocess.decode_image(png_bytes(random_image(0, 64, 64)), max_pixels=1000)


def test_resize_bomb_refused():
    strip = Image.new("L", (100_000, 1))  # 100 kP, but 32 px tall means 3.2 GP wide
    with pytest.raises(preprocess.InputError, match="aspect ratio too extreme: 100000x1 would resize to 3200000x32"):
        preprocess.val_transform(strip, (3, 32, 32), MEAN3, STD3, 1.0)


def test_pillow_guard_also_answers_with_input_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises inside Image.open above 200
    with pytest.raises(preprocess.InputError, match="image too large"):
        preprocess.decode_image(png_bytes(random_image(0, 64, 64)))


@pytest.mark.parametrize("data,match", [
    (b"", "image is empty"),
    (b"definitely not an image", "not a readable image"),
    (png_bytes(random_image(1))[:200], "cannot decode image"),  # truncated PNG
])
def test_bad_images(data, match):
    with pytest.raises(preprocess.InputError, match=match):
        preprocess.decode_image(data)


def test_unsupported_format_refused():
    buf = io.BytesIO()
    Image.fromarray(random_image(2)).save(buf, "TIFF")
    with pytest.raises(preprocess.InputError, match="expected JPEG, PNG, BMP, WEBP"):
        preprocess.decode_image(buf.getvalue())


GOOD = np.zeros((3, 32, 32), np.float32)


@pytest.mark.parametrize("shape,dtype,data,match", [
    ([3, 32, 32], "float64", GOOD.astype(np.float64).tobytes(), "dtype 'float64' is not supported"),
    ([3, 28, 28], "float32", np.zeros((3, 28, 28), np.float32).tobytes(),
     r"shape \[3, 28, 28\] does not fit the model: expected \[3, 32, 32\]"),
    ([2, 3, 32, 32], "float32", np.zeros((2, 3, 32, 32), np.float32).tobytes(),
     r"expected \[3, 32, 32\] or \[1, 3, 32, 32\]"),
    ([3, 32, 32], "float32", GOOD.tobytes()[:-4], "has 12,284 bytes; shape \\[3, 32, 32\\] float32 needs 12,288"),
    ([3, 32, 32], "float16", GOOD.tobytes(), "needs 6,144"),
    ([3, 32, 32], "float32", np.full((3, 32, 32), np.nan, np.float32).tobytes(), "3072 NaN or Inf"),
    ([3, 32, 32], "float16", np.full((3, 32, 32), np.inf, np.float16).tobytes(), "NaN or Inf"),
    ([10, 10, 2], "uint8", bytes(200), "C = 1, 3 or 4"),
    ([0, 10, 3], "uint8", b"", "C = 1, 3 or 4"),
    ([10, 10, 3], "uint8", bytes(299), "needs 300"),
    ([10_000, 10_000, 1], "uint8", b"", "too large"),
])
def test_bad_tensors(shape, dtype, data, match):
    with pytest.raises(preprocess.InputError, match=match):
        preprocess.parse_tensor(shape, dtype, data, (3, 32, 32))


def test_good_tensors():
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    kind, got = preprocess.parse_tensor(x.shape, "float32", x.tobytes(), (3, 32, 32))
    assert kind == "tensor" and got.shape == (3, 32, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x[0])
    kind, got = preprocess.parse_tensor([3, 32, 32], "float16", x.astype(np.float16).tobytes(), (3, 32, 32))
    np.testing.assert_array_equal(got, x[0].astype(np.float16).astype(np.float32))
    assert got.flags.writeable  # a copy the server owns, not a view of the request bytes
