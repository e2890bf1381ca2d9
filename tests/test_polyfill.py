"""The scanline polygon fill gives exactly ``skimage.draw.polygon``'s pixels, and ``polygons_to_mask`` exactly the
masks of its former per-pixel implementation, on the demo's real annotations and on boundary cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import draw

from vesselnb.data import polygons_to_mask
from vesselnb.demo.assets import DemoSettings, write_demo_dataset
from vesselnb.polyfill import polygon_pixels


def skimage_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[draw.polygon(points[:, 1], points[:, 0], shape)] = True
    return mask


def scanline_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    row0, col0, inside = polygon_pixels(points, shape)
    mask[row0 : row0 + inside.shape[0], col0 : col0 + inside.shape[1]] = inside
    return mask


def former_polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int], polygon_fill: str) -> np.ndarray:
    """``vesselnb.data.polygons_to_mask`` as it was before the scanline fill (per-pixel skimage.draw.polygon)."""
    mask = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64)
        if len(points) < 3:
            continue
        if polygon_fill == "even_odd":
            mask[draw.polygon(points[:, 1], points[:, 0], shape)] ^= True
            continue
        points = points.astype(np.int32)
        mask[draw.polygon(points[:, 1], points[:, 0], shape)] = True
        mask[draw.polygon_perimeter(points[:, 1], points[:, 0], shape, clip=False)] = True
    return mask


@pytest.fixture(scope="module")
def demo_annotations(tmp_path_factory: pytest.TempPathFactory) -> list[list[np.ndarray]]:
    """Polygons per frame from the demo's own annotation writer (outlines on pixel edges, holes, border contact)."""
    root = tmp_path_factory.mktemp("polyfill_demo")
    settings = DemoSettings(n_patients=3, sequences_per_patient=1, frames_per_sequence=3)
    write_demo_dataset(root / "images", root / "annotations.json", settings)
    records = json.loads((root / "annotations.json").read_text(encoding="utf-8"))
    return [[np.asarray(flat, dtype=np.float64).reshape(-1, 2) for flat in record["mask"]] for record in records]


@pytest.mark.parametrize("polygon_fill", ["even_odd", "union"])
def test_demo_annotations_rasterise_exactly_as_before(demo_annotations: list[list[np.ndarray]],
                                                      polygon_fill: str) -> None:
    touching_border = 0
    for polygons in demo_annotations:
        touching_border += any(p.min() < 0 or p.max() > 255 for p in polygons)
        expected = former_polygons_to_mask(polygons, (256, 256), polygon_fill)
        assert expected.any()
        np.testing.assert_array_equal(polygons_to_mask(polygons, (256, 256), polygon_fill), expected)
    assert touching_border  # the demo's vessels leave the frame: the border case is exercised on real data


def test_every_demo_polygon_matches_skimage_also_shifted_off_the_grid(demo_annotations) -> None:
    # Shifting by a quarter pixel or by exactly one pixel moves vertices off / onto pixel-centre lines.
    for polygons in demo_annotations[:3]:
        for points in polygons:
            for shift in (0.0, 0.25, 1.0, -0.5):
                moved = points + shift
                np.testing.assert_array_equal(scanline_mask(moved, (256, 256)), skimage_mask(moved, (256, 256)))


BOUNDARY_CASES = {
    "vertices on pixel centres (edges through centres)": [[2, 2], [12, 2], [12, 9], [2, 9]],
    "diagonal edges through centres": [[0, 5], [5, 0], [10, 5], [5, 10]],
    "half-integer outline (demo style)": [[1.5, 1.5], [8.5, 1.5], [8.5, 6.5], [1.5, 6.5]],
    "self-intersecting bow tie (even-odd)": [[1, 1], [11, 9], [11, 1], [1, 9]],
    "touching the top-left border": [[-0.5, -0.5], [6, -0.5], [6, 4], [-0.5, 4]],
    "reaching beyond the bottom-right border": [[8, 8], [30, 9], [25, 40]],
    "entirely outside": [[20, 20], [30, 20], [25, 30]],
    "entirely left of the frame": [[-9, 2], [-3, 2], [-6, 8]],
    "collinear (zero area) on a pixel row": [[1, 4], [6, 4], [11, 4]],
    "collinear diagonal": [[0, 0], [3, 3], [7, 7]],
    "repeated vertex": [[2, 2], [2, 2], [9, 3], [5, 8]],
    "one-pixel sliver between rows": [[1, 3.2], [11, 3.2], [11, 3.6], [1, 3.6]],
    "near-horizontal edge": [[0, 4.0], [12, 4.0000000001], [6, 9]],
    "vertex a hair off a centre": [[3 + 1e-13, 3], [9, 3.5], [4, 8]],
}


@pytest.mark.parametrize("name", list(BOUNDARY_CASES))
def test_boundary_cases_match_skimage(name: str) -> None:
    points = np.array(BOUNDARY_CASES[name], dtype=np.float64)
    for shape in ((12, 14), (10, 10)):
        np.testing.assert_array_equal(scanline_mask(points, shape), skimage_mask(points, shape), err_msg=name)


def test_holes_cancel_and_union_outline_as_before() -> None:
    outer = np.array([[2, 2], [17, 2], [17, 17], [2, 17]], dtype=np.float64)
    hole = np.array([[6.5, 6.5], [12.5, 6.5], [12.5, 12.5], [6.5, 12.5]])
    crossing = np.array([[0, 10], [19.7, 9.3], [10, 19]])
    for fill in ("even_odd", "union"):
        mask = polygons_to_mask([outer, hole, crossing], (20, 20), fill)
        np.testing.assert_array_equal(mask, former_polygons_to_mask([outer, hole, crossing], (20, 20), fill))
    assert not polygons_to_mask([outer, hole], (20, 20), "even_odd")[9, 9]
    assert polygons_to_mask([outer, hole], (20, 20), "union")[9, 9]


def test_random_polygons_on_and_off_the_grid_match_skimage() -> None:
    rng = np.random.default_rng(7)
    for index in range(600):
        n = int(rng.integers(3, 10))
        half_integers = rng.integers(-6, 44, (n, 2)) / 2.0
        grid = (half_integers, rng.uniform(-4, 24, (n, 2)), np.round(rng.uniform(-2, 22, (n, 2)), 1))
        points = grid[index % 3]
        shape = (20, int(rng.integers(12, 24)))
        np.testing.assert_array_equal(scanline_mask(points, shape), skimage_mask(points, shape), err_msg=str(points))


def test_large_coordinates_match_skimage() -> None:
    # Far from the origin the rounding of either crossing computation grows; the margin scales with it.
    points = np.array([[-1e6, 3.0], [10.0, 3.0], [10.0, 9.0], [4.0, 1e6]], dtype=np.float64)
    np.testing.assert_array_equal(scanline_mask(points, (16, 16)), skimage_mask(points, (16, 16)))
