"""The one mask resize: nearest neighbour, boolean out, the same pixels for inference, ground truth and figures."""

from __future__ import annotations

import doctest

import numpy as np

import vesselnb.masks
from vesselnb.masks import resize_mask


def test_docstring_examples() -> None:
    result = doctest.testmod(vesselnb.masks)
    assert result.attempted >= 2 and result.failed == 0


def test_round_trip_by_an_integer_factor_is_exact() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((16, 24)) > 0.7
    up = resize_mask(mask, (64, 96))
    assert up.dtype == bool and up.shape == (64, 96)
    np.testing.assert_array_equal(up[::4, ::4], mask)
    np.testing.assert_array_equal(resize_mask(up, (16, 24)), mask)


def test_same_shape_is_not_resampled_and_labels_stay_binary() -> None:
    labels = np.array([[0, 3], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_mask(labels, (2, 2)), [[False, True], [True, False]])
    assert set(np.unique(resize_mask(labels, (7, 5)))) <= {False, True}
