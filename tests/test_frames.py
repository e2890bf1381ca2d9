"""Frames as users export them: 16-bit greyscale PNG/TIFF windowed (not clipped to white), blank frames refused."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from PIL import Image
from skimage.exposure import rescale_intensity

import vesselnb.frames as frames_module
from vesselnb.errors import DataError
from vesselnb.frames import open_frame_rgb, window_to_uint8


def _angiogram_like(shape=(48, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    background = np.linspace(9000, 14000, shape[1])[None, :].repeat(shape[0], axis=0)
    background[20:24, :] = 3000  # a dark "vessel"
    return (background + rng.normal(0, 200, shape)).clip(0, 65535).astype(np.uint16)


def test_doctests() -> None:
    assert doctest.testmod(frames_module).failed == 0


def test_windowing_matches_scikit_image() -> None:
    pixels = _angiogram_like()
    reference = np.rint(rescale_intensity(pixels.astype(np.float64), out_range=(0.0, 255.0))).astype(np.uint8)
    assert np.array_equal(window_to_uint8(pixels), reference)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_greyscale_is_windowed_not_white(tmp_path, suffix) -> None:
    pixels = _angiogram_like()
    path = tmp_path / f"frame{suffix}"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")  # really a 16-bit file
        assert np.asarray(written.convert("RGB")).min() == 255  # what PIL alone makes of it: all white
    rgb = np.asarray(open_frame_rgb(path))
    assert rgb.shape == (*pixels.shape, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], window_to_uint8(pixels))
    assert rgb[21, :, 0].mean() < 60 < rgb[5, :, 0].mean()  # the vessel stays dark, the background light


@pytest.mark.parametrize(("value", "word"), [(255, "saturated"), (0, "black"), (77, "constant")])
def test_constant_frame_is_refused_naming_the_file(tmp_path, value, word) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=rf"blank\.png: the frame is {word}"):
        open_frame_rgb(path)


def test_8_bit_rgb_frame_is_unchanged(tmp_path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(np.asarray(open_frame_rgb(path)), rgb)
