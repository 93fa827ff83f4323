"""contract.preprocess: the one evaluation transform training and serving both apply."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from contract.preprocess import (CROP_PCT, INTERPOLATIONS, PreprocessConfig, PreprocessError, decode_image,
                                 image_mode, resized_size, to_chw, val_transform)

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth-ish RGB content (low-res noise upsampled), so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 4, 1), max(width // 4, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def encoded(array: np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------- the transform


def test_crop_by_hand():
    # 10 x 8 image, size 7: S = round(7 / 0.875) = 8 = the short side, so no resize;
    # top = round((8 - 7) / 2) = round(0.5) = 0, left = round((10 - 7) / 2) = round(1.5) = 2
    # (halves round to even), so the crop is rows 0..6, columns 2..8.
    pixels = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)
    mean, std = (0.5, 0.25, 0.0), (0.5, 1.0, 2.0)
    out = val_transform(Image.fromarray(pixels), PreprocessConfig((3, 7, 7), mean, std))
    assert out.shape == (3, 7, 7) and out.dtype == np.float32 and out.flags.c_contiguous
    # Channel 0 at (0, 0) is pixel (row 0, col 2, ch 0) = 6 -> (6/255 - 0.5) / 0.5.
    assert out[0, 0, 0] == pytest.approx((6 / 255 - 0.5) / 0.5, abs=1e-6)
    # Channel 2 at (6, 6) is pixel (row 6, col 8, ch 2) = 6*30 + 8*3 + 2 = 206 -> 206/255 / 2.
    assert out[2, 6, 6] == pytest.approx(206 / 255 / 2, abs=1e-6)
    crop = pixels[0:7, 2:9].astype(np.float32) / 255
    np.testing.assert_allclose(out, ((crop - mean) / std).transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_grayscale_by_hand():
    # RGB (200, 100, 50) -> L = (200*299 + 100*587 + 50*114) / 1000 = 124.2 -> 124 (ITU-R 601-2).
    out = val_transform(Image.new("RGB", (33, 17), (200, 100, 50)), PreprocessConfig((1, 16, 16), (0.5,), (0.25,)))
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out, (124 / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)


def test_resizes_shorter_side_then_center_crops():
    # 20 x 40 image, size 16: S = round(18.29) = 18; long side int(18 * 40 / 20) = 36;
    # top = round((36 - 16) / 2) = 10, left = round((18 - 16) / 2) = 1.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8))
    config = PreprocessConfig((3, 16, 16), (0.0,) * 3, (1.0,) * 3)
    out = val_transform(image, config)
    expected = np.asarray(image.resize((18, 36), Image.BILINEAR).crop((1, 10, 17, 26)), np.float32) / 255
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(out, val_transform(image, config))


def test_resized_size_by_hand():
    assert resized_size(20, 40, 16, 0.875) == (18, 36)  # portrait: the width is the short side
    assert resized_size(40, 20, 16, 0.875) == (36, 18)
    assert resized_size(300, 7, 32, 1.0) == (1371, 32)  # int(32 * 300 / 7) = int(1371.43)
    assert resized_size(224, 224, 224, CROP_PCT) == (256, 256)  # the ImageNet convention


@pytest.mark.parametrize("size,crop_pct", [(32, 1.0), (32, 0.875), (224, 0.875), (17, 0.9)])
@pytest.mark.parametrize("hw", [(40, 52), (52, 40), (32, 32), (7, 300), (301, 299)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_documented_steps_exactly(size, crop_pct, hw, mode):
    """Bit for bit the four steps of the docstring, over sizes, crops, aspect ratios and modes."""
    image = Image.fromarray(noise(sum(hw) + size, *hw)).convert(mode)
    for channels, mean, std in ((3, MEAN3, STD3), (1, (0.5,), (0.25,))):
        got = val_transform(image, PreprocessConfig((channels, size, size), mean, std, crop_pct))
        w, h = image.size
        s = round(size / crop_pct)
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        step = image.convert("RGB" if channels == 3 else "L").resize((new_w, new_h), Image.BILINEAR)
        step = np.asarray(step.crop((left, top, left + size, top + size)), dtype=np.float32).reshape(size, size, -1)
        want = (step / np.float32(255) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        assert got.dtype == np.float32 and got.shape == (channels, size, size) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want.transpose(2, 0, 1))


@pytest.mark.parametrize("name", sorted(INTERPOLATIONS))
def test_interpolation_is_the_resize_filter(name):
    image = Image.fromarray(noise(3, 40, 52))
    out = val_transform(image, PreprocessConfig((3, 16, 16), (0.0,) * 3, (1.0,) * 3, 1.0, name))
    # 52 x 40 at size 16: S = 16, long side int(16 * 52 / 40) = 20, left = round(2.0) = 2.
    expected = np.asarray(image.resize((20, 16), INTERPOLATIONS[name]).crop((2, 0, 18, 16)), np.float32) / 255
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))


def test_to_chw_normalises_per_channel():
    pixels = np.array([[[0, 51, 255]]], dtype=np.uint8)  # one pixel
    out = to_chw(Image.fromarray(pixels), (0.0, 0.1, 0.5), (1.0, 0.5, 0.25))
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [0.0, (0.2 - 0.1) / 0.5, (1.0 - 0.5) / 0.25], rtol=1e-6)
    assert to_chw(Image.new("L", (4, 2), 255), (0.0,), (1.0,)).shape == (1, 2, 4)


def test_transform_refuses_what_it_cannot_take():
    with pytest.raises(PreprocessError, match="square input size, got 16x20"):
        val_transform(Image.new("RGB", (30, 30)), PreprocessConfig((3, 16, 20), MEAN3, STD3))
    strip = Image.new("L", (100_000, 1))  # 100 kP, but 32 px tall means 3.2 GP wide
    with pytest.raises(PreprocessError, match="aspect ratio too extreme: 100000x1 would resize to 3200000x32"):
        val_transform(strip, PreprocessConfig((3, 32, 32), MEAN3, STD3, 1.0), max_pixels=40_000_000)


# --------------------------------------------------------------------------- the config


def test_config_is_frozen_hashable_and_normalised():
    config = PreprocessConfig([3, 32, 32], [0.5, 0.5, 0.5], np.array([0.25, 0.25, 0.25]), crop_pct=1)
    assert config.input_size == (3, 32, 32) and config.mean == (0.5, 0.5, 0.5) and config.std == (0.25,) * 3
    assert type(config.std[0]) is float and type(config.crop_pct) is float
    assert config.interpolation == "bilinear" and PreprocessConfig((1, 8, 8), (0.5,), (0.5,)).crop_pct == CROP_PCT
    assert config == PreprocessConfig((3, 32, 32), (0.5,) * 3, (0.25,) * 3, 1.0) and hash(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.crop_pct = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("args,match", [
    (((3, 32), MEAN3, STD3), r"input_size must be \(C, H, W\) of positive integers, got \(3, 32\)"),
    (((3, 0, 32), MEAN3, STD3), "input_size must be"),
    (((3, 32.0, 32), MEAN3, STD3), "input_size must be"),
    (((2, 32, 32), (0.5,) * 2, (0.5,) * 2), "unsupported channel count 2: images are 1 .L. or 3 .RGB. channels"),
    (((3, 32, 32), (0.5,), (0.5,)), "mean/std need 3 values each, got 1 and 1"),
    (((3, 32, 32), MEAN3, (0.2, 0.0, 0.2)), "std must be positive"),
    (((3, 32, 32), MEAN3, STD3, 0.0), r"crop_pct must be in \(0, 1\], got 0.0"),
    (((3, 32, 32), MEAN3, STD3, 1.5), r"crop_pct must be in \(0, 1\], got 1.5"),
    (((3, 32, 32), MEAN3, STD3, 1.0, "lanczos"), "unknown interpolation 'lanczos'; choose one of: bilinear, bicubic"),
])
def test_config_refuses_bad_settings(args, match):
    with pytest.raises(PreprocessError, match=match):
        PreprocessConfig(*args)


def test_image_mode():
    assert image_mode(1) == "L" and image_mode(3) == "RGB"
    with pytest.raises(PreprocessError, match="unsupported channel count 4"):
        image_mode(4)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_decode_lossless_formats_give_back_the_pixels(fmt, kwargs):
    pixels = noise(1, 30, 45)
    image = decode_image(encoded(pixels, fmt, **kwargs))
    assert image.mode == "RGB" and image.size == (45, 30)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_decode_keeps_the_mode_and_loads():
    image = decode_image(encoded(noise(2, 20, 20)[:, :, 0]))
    assert image.mode == "L"
    jpeg = decode_image(encoded(noise(2, 20, 24), "JPEG", quality=95))
    assert jpeg.mode == "RGB" and jpeg.size == (24, 20)
    assert np.abs(np.asarray(jpeg, np.int16) - noise(2, 20, 24)).mean() < 8  # lossy, but the same picture


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.fromarray(noise(4, 30, 50)).save(buf, "PNG", exif=exif.tobytes())
    got = decode_image(buf.getvalue())
    assert got.size == (30, 50)  # width and height swapped
    np.testing.assert_array_equal(np.asarray(got), np.rot90(noise(4, 30, 50), k=-1))


def test_decode_formats_and_size_limits():
    tiff = encoded(noise(5, 16, 16), "TIFF")
    assert decode_image(tiff).size == (16, 16)  # every Pillow format without a list
    with pytest.raises(PreprocessError, match=r"not a readable image \([0-9,]+ bytes\): expected JPEG, PNG$"):
        decode_image(tiff, formats=("JPEG", "PNG"))
    # 1 bit per pixel, all zero: a few KB of PNG that declares 50 MP, refused before decoding.
    bomb = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(bomb, "PNG")
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(PreprocessError, match="image too large: 10000x5000 = 50,000,000 pixels, the limit is 1,000"):
        decode_image(bomb.getvalue(), max_pixels=1000)
    assert decode_image(encoded(noise(6, 20, 50)), max_pixels=1000).size == (50, 20)  # exactly at the limit
    with pytest.raises(PreprocessError, match="image too large: 50x20 = 1,000 pixels, the limit is 999$"):
        decode_image(encoded(noise(6, 20, 50)), max_pixels=999)


@pytest.mark.parametrize("data,match", [
    (b"", r"image is empty \(0 bytes\)"),
    (b"definitely not an image", r"not a readable image \(23 bytes\)$"),
    (encoded(noise(1, 40, 52))[:200], "cannot decode image"),  # truncated PNG
])
def test_bad_images(data, match):
    with pytest.raises(PreprocessError, match=match):
        decode_image(data)
