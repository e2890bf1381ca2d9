"""Ground-truth readers: every format, size mismatches, clipping, missing annotations and the polygon fill rule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vesselnb.data import list_samples, load_ground_truth, parse_sample_name, polygons_to_mask
from vesselnb.errors import DataError

NAME = "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034"


def test_parse_users_frame_names() -> None:
    assert parse_sample_name(NAME) == ("Chen_Fang_0000103366", "1-4_1_04B2D3CF", 34)
    assert parse_sample_name("odd_name") == ("odd_name", "odd_name", 0)
    assert parse_sample_name("p7_s2_f9", r"^(?P<patient>p\d+)_(?P<sequence>s\d+)_f(?P<frame>\d+)$") == ("p7", "s2", 9)


def _frames(folder: Path, names: list[str], size: tuple[int, int] = (64, 64)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", (size[1], size[0]), 128).save(folder / f"{name}.jpg")
    return list_samples(folder)


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# --- fill rule ----------------------------------------------------------------------------------------------------


def test_union_fill_keeps_overlaps_and_even_odd_cancels_them() -> None:
    a = np.array(square(10, 10, 30, 30), dtype=float).reshape(-1, 2)
    b = np.array(square(20, 20, 40, 40), dtype=float).reshape(-1, 2)
    union = polygons_to_mask([a, b], (50, 50), "union")
    even_odd = polygons_to_mask([a, b], (50, 50), "even_odd")
    assert union[25, 25]  # in both polygons: the users' cv2.fillPoly loop fills it
    assert not even_odd[25, 25]  # even-odd: covered twice = outside
    assert union[15, 15] and even_odd[15, 15]


def test_union_fill_includes_the_outline_like_cv2() -> None:
    # A polygon one pixel tall has no pixel centre strictly inside, yet cv2.fillPoly draws its outline.
    thin = np.array([[5, 10.2], [30, 10.2], [30, 10.6], [5, 10.6]])
    mask = polygons_to_mask([thin], (20, 40), "union")
    assert mask[10, 5:31].all() and mask.sum() == 26
    outline_free = polygons_to_mask([thin], (20, 40), "even_odd")
    assert outline_free.sum() == 0


def test_even_odd_draws_holes_from_inner_polygons() -> None:
    outer = np.array(square(5, 5, 35, 35), dtype=float).reshape(-1, 2)
    inner = np.array(square(15, 15, 25, 25), dtype=float).reshape(-1, 2)
    assert not polygons_to_mask([outer, inner], (40, 40), "even_odd")[20, 20]
    assert polygons_to_mask([outer, inner], (40, 40), "union")[20, 20]


# --- formats ------------------------------------------------------------------------------------------------------


def test_sa2va_annotations_union_entries_and_report_missing(tmp_path: Path) -> None:
    names = [NAME, NAME.replace("000034", "000035"), NAME.replace("000034", "000036")]
    samples = _frames(tmp_path / "images", names)
    entries = [
        {"image": f"{names[0]}.jpg", "mask": [square(2, 2, 10, 10)], "text": ["blood vessel"]},
        {"image": f"images/{names[0]}.jpg", "mask": [square(20, 20, 30, 30), [1, 2]], "text": ["x", "y"]},
        {"image": f"{names[1]}.jpg", "mask": [], "text": []},  # annotated, no vessel: an empty GT
        {"image": "not_in_folder.jpg", "mask": [square(1, 1, 5, 5)], "text": ["blood vessel"]},
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(entries))
    gt = load_ground_truth(path, samples)
    assert gt.report.annotation_format == "sa2va"
    first = gt.mask(names[0])
    assert first[5, 5] and first[25, 25] and not first[15, 15]
    assert gt.mask(names[1]).sum() == 0
    assert names[2] not in gt and gt.report.missing == [names[2]]
    with pytest.raises(DataError, match="no annotation"):
        gt.mask(names[2])
    assert gt.report.unmatched == ["not_in_folder"]
    assert gt.report.skipped_polygons == 1


def test_frames_left_out_by_limit_are_not_reported_as_unknown(tmp_path: Path) -> None:
    names = [NAME, NAME.replace("000034", "000035")]
    samples = _frames(tmp_path / "images", names)
    entries = [{"image": f"{name}.jpg", "mask": [square(2, 2, 10, 10)], "text": ["blood vessel"]} for name in names]
    entries.append({"image": "not_in_folder.jpg", "mask": [square(1, 1, 5, 5)], "text": ["blood vessel"]})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(entries))
    gt = load_ground_truth(path, samples[:1], frames_in_folder={s.sample_id for s in samples})
    assert gt.report.unmatched == ["not_in_folder"]
    assert gt.report.missing == [] and gt.report.annotated == 1


def test_labelme_declared_size_is_rescaled_with_a_logged_warning(tmp_path: Path, caplog) -> None:
    samples = _frames(tmp_path / "images", [NAME], size=(64, 64))
    folder = tmp_path / "json"
    folder.mkdir()
    shape = {"label": "vessel", "points": [[0, 0], [50, 0], [50, 50], [0, 50]], "shape_type": "polygon"}
    (folder / f"{NAME}.json").write_text(json.dumps({"shapes": [shape], "imageWidth": 100, "imageHeight": 100}))
    with caplog.at_level(logging.WARNING, logger="vesselnb.data"):
        gt = load_ground_truth(folder, samples)
    assert gt.report.annotation_format == "labelme"
    assert gt.report.rescaled == {NAME: ((100, 100), (64, 64))}
    assert any("rescaled" in record.message for record in caplog.records)
    mask = gt.mask(NAME)
    # 50 px at 100 px -> 32 px at 64 px: rows/cols 0..32 filled (outline included), nothing beyond
    assert mask[:33, :33].all() and not mask[34:, :].any() and not mask[:, 34:].any()


def test_quiet_reading_records_warnings_without_logging_them(tmp_path: Path, caplog) -> None:
    # compare's panels re-read a dataset stage 03 already reported: same masks and report, no second log.
    samples = _frames(tmp_path / "images", [NAME], size=(32, 32))
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([{"image": f"{NAME}.jpg", "mask": [square(20, 20, 60, 60)], "text": ["v"]},
                                {"image": "elsewhere.jpg", "mask": [square(1, 1, 5, 5)], "text": ["v"]}]))
    with caplog.at_level(logging.WARNING, logger="vesselnb.data"):
        quiet = load_ground_truth(path, samples, quiet=True)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="vesselnb.data"):
        loud = load_ground_truth(path, samples)
    assert [r.message for r in caplog.records] == loud.report.warnings == quiet.report.warnings
    assert len(quiet.report.warnings) == 2  # clipped polygon, annotation of a frame not in the folder
    np.testing.assert_array_equal(quiet.mask(NAME), loud.mask(NAME))


def test_polygons_outside_the_frame_are_clipped_and_counted(tmp_path: Path) -> None:
    samples = _frames(tmp_path / "images", [NAME], size=(32, 32))
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([{"image": f"{NAME}.jpg", "mask": [square(20, 20, 60, 60)], "text": ["v"]}]))
    gt = load_ground_truth(path, samples)
    assert gt.report.clipped_polygons == 1 and gt.report.clipped_points == 3
    assert gt.mask(NAME)[20:, 20:].all() and gt.mask(NAME).shape == (32, 32)
    assert any("outside" in warning for warning in gt.report.warnings)


def test_coco_polygons_and_uncompressed_rle(tmp_path: Path) -> None:
    names = [NAME, NAME.replace("000034", "000035")]
    samples = _frames(tmp_path / "images", names, size=(20, 30))
    rle_mask = np.zeros((20, 30), dtype=bool)
    rle_mask[3:6, 4] = True  # column-major runs: skip 4*20+3, take 3
    coco = {
        "images": [{"id": 1, "file_name": f"{names[0]}.jpg", "width": 30, "height": 20},
                   {"id": 2, "file_name": f"{names[1]}.jpg", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": [square(2, 2, 8, 8)]},
            {"id": 2, "image_id": 2, "segmentation": {"size": [20, 30], "counts": [4 * 20 + 3, 3, 600 - 86]}},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    gt = load_ground_truth(path, samples)
    assert gt.report.annotation_format == "coco"
    assert gt.mask(names[0])[2:9, 2:9].all()
    assert np.array_equal(gt.mask(names[1]), rle_mask)


def test_mask_png_folder_with_suffix_values_and_size(tmp_path: Path) -> None:
    names = [NAME, NAME.replace("000034", "000035")]
    samples = _frames(tmp_path / "images", names, size=(32, 32))
    folder = tmp_path / "masks"
    folder.mkdir()
    ones = np.zeros((32, 32), dtype=np.uint8)
    ones[4:10, 4:10] = 1  # a 0/1 mask
    Image.fromarray(ones).save(folder / f"{names[0]}_mask.png")
    big = np.zeros((64, 64), dtype=np.uint8)
    big[:32, :32] = 255  # drawn at twice the size
    Image.fromarray(big).save(folder / f"{names[1]}.png")
    gt = load_ground_truth(folder, samples)
    assert gt.report.annotation_format == "mask_png"
    assert gt.mask(names[0]).sum() == 36
    assert gt.mask(names[1])[:16, :16].all() and gt.mask(names[1]).sum() == 256
    assert names[1] in gt.report.rescaled


def test_unreadable_or_unknown_annotations_raise_data_errors(tmp_path: Path) -> None:
    samples = _frames(tmp_path / "images", [NAME])
    with pytest.raises(DataError, match="not found"):
        load_ground_truth(tmp_path / "nope.json", samples)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_ground_truth(bad, samples)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"something": 1}))
    with pytest.raises(DataError, match="annotation_format"):
        load_ground_truth(odd, samples)


def test_nested_polygons_are_reported_under_union_and_become_holes_under_even_odd(tmp_path: Path) -> None:
    samples = _frames(tmp_path / "images", [NAME], size=(40, 40))
    path = tmp_path / "annotations.json"
    entry = {"image": f"{NAME}.jpg", "mask": [square(5, 5, 35, 35), square(15, 15, 25, 25)], "text": ["v", "v"]}
    path.write_text(json.dumps([entry]))
    union = load_ground_truth(path, samples)
    assert union.report.nested_polygons == 1 and union.mask(NAME)[20, 20]
    assert any("even_odd" in warning for warning in union.report.warnings)
    even_odd = load_ground_truth(path, samples, polygon_fill="even_odd")
    assert not even_odd.mask(NAME)[20, 20] and even_odd.mask(NAME)[10, 10]
    assert even_odd.report.nested_polygons == 0 and not even_odd.report.warnings


def test_demo_annotations_read_back_to_the_demo_masks_with_even_odd(demo_assets) -> None:
    """The demo's Sa2VA annotations draw holes as inner polygons: even-odd must give back the raster masks exactly,
    and the users' union rule must say that it sees nested polygons instead of silently filling the holes."""
    from vesselnb.demo.assets import demo_raster_masks

    truth = demo_raster_masks(demo_assets)
    samples = list_samples(demo_assets.images_dir)
    gt = load_ground_truth(demo_assets.annotations, samples, "sa2va", polygon_fill="even_odd")
    assert gt.report.missing == [] and len(gt) == len(truth)
    for sample_id, mask in truth.items():
        assert np.array_equal(gt.mask(sample_id), mask), sample_id
    assert not gt.report.warnings
    union = load_ground_truth(demo_assets.annotations, samples, "sa2va")
    assert union.report.nested_polygons > 0
