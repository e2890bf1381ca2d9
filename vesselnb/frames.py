"""Decoding one angiography frame to the 8-bit RGB picture the model sees, honestly or not at all.

Why a module of its own: X-ray exports are often 16-bit greyscale (PIL modes ``I;16``, ``I``, ``F``). PIL's
``convert("RGB")`` clips those to 255, so a 16-bit frame becomes all white and the model answers with an empty mask
that would be recorded as ``ok``. Here such frames are windowed to 8 bit by their own minimum and maximum (the
file carries no window otherwise), and a frame that is constant after loading (all white, all black, a blank
export) is refused with the reason, so it becomes an ``error`` record rather than a prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vesselnb.errors import DataError

HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max window any numeric greyscale array to uint8 (0 at its minimum, 255 at its maximum).

    >>> window_to_uint8(np.array([[1000, 3000], [2000, 3000]], dtype=np.uint16)).tolist()
    [[0, 255], [128, 255]]
    """
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def open_frame_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and return it as 8-bit RGB; 16-bit greyscale is min-max windowed.

    Raises :class:`DataError` naming the file when the picture is constant after loading (nothing to segment).
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in HIGH_BIT_DEPTH_MODES:
            grey = window_to_uint8(np.asarray(image))
            rgb = Image.fromarray(grey).convert("RGB")
        else:
            rgb = image.convert("RGB")
    extremes = rgb.getextrema()
    if all(low == high for low, high in extremes):
        values = {low for low, _ in extremes}
        kind = "saturated (all 255)" if values == {255} else "black (all 0)" if values == {0} else "constant"
        raise DataError(f"{path}: the frame is {kind} after loading; nothing to segment. Re-export the frame.")
    return rgb
