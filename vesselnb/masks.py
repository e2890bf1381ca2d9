"""Resizing a boolean mask to a frame's size: one nearest-neighbour rule shared by inference, ground truth, scoring
and figures.

Why one place: a prediction resized one way and its ground truth another would be scored on different pixels, and
the figures would show a third version. Nearest neighbour keeps labels binary (no threshold to choose) and matches
what Sa2VA's own evaluation does when it brings masks back to the frame size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` (any dtype, non-zero = inside) as a boolean array of ``shape`` = (height, width), nearest neighbour.

    A mask already of that shape is returned as booleans without resampling.

    >>> resize_mask(np.array([[1, 0], [0, 1]]), (4, 4)).astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    >>> resize_mask(np.ones((3, 3), bool), (2, 5)).shape
    (2, 5)
    """
    mask = np.asarray(mask).astype(bool)
    height, width = int(shape[0]), int(shape[1])
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(resized) > 127
