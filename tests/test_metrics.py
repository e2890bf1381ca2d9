"""Metric functions: hand-made masks with answers worked out by hand, empty-mask conventions, and MONAI itself."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from _analysis_fixtures import thin_branch_mask, vessel_mask
from scipy import ndimage
from skimage import draw

from vesselnb import metrics as vm


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# --- overlap ------------------------------------------------------------------------------------------------------


def test_overlap_metrics_on_hand_counted_masks() -> None:
    gt = np.zeros((4, 4), dtype=bool)
    gt[0, :] = True  # 4 pixels
    pred = np.zeros_like(gt)
    pred[0, :2] = True  # 2 of them
    pred[3, 3] = True  # plus one false positive
    # TP 2, FP 1, FN 2, TN 11
    assert vm.confusion(gt, pred) == vm.Confusion(tp=2, fp=1, fn=2, tn=11)
    assert vm.dice(gt, pred) == pytest.approx(4 / 7)
    assert vm.iou(gt, pred) == pytest.approx(2 / 5)
    assert vm.precision(gt, pred) == pytest.approx(2 / 3)
    assert vm.recall(gt, pred) == pytest.approx(2 / 4)
    assert vm.specificity(gt, pred) == pytest.approx(11 / 12)


@pytest.mark.parametrize(
    ("gt_empty", "pred_empty", "expected"),
    [
        (True, True, {"dice": "nan", "iou": "nan", "precision": "nan", "recall": "nan", "hd95": "nan",
                      "assd": "nan", "nsd": "nan", "cldice": "nan", "betti0_error": 0}),
        (True, False, {"dice": "nan", "iou": "nan", "precision": 0.0, "recall": "nan", "hd95": "inf",
                       "assd": "inf", "nsd": 0.0, "cldice": "nan", "betti0_error": 1}),
        (False, True, {"dice": 0.0, "iou": 0.0, "precision": "nan", "recall": 0.0, "hd95": "inf",
                       "assd": "inf", "nsd": 0.0, "cldice": 0.0, "betti0_error": 1}),
    ],
)
def test_empty_mask_conventions(gt_empty: bool, pred_empty: bool, expected: dict[str, object]) -> None:
    blob = square(16, 4, 4, 5)
    empty = np.zeros_like(blob)
    values = vm.sample_metrics(empty if gt_empty else blob, empty if pred_empty else blob)
    for key, want in expected.items():
        got = values[key]
        if want == "nan":
            assert math.isnan(got), key
        elif want == "inf":
            assert math.isinf(got) and got > 0, key
        else:
            assert got == want, key


def test_identical_masks_are_perfect() -> None:
    mask = vessel_mask(64, 3)
    values = vm.sample_metrics(mask, mask)
    assert values["dice"] == values["iou"] == values["cldice"] == values["nsd"] == 1.0
    assert values["hd95"] == values["assd"] == 0.0
    assert values["betti0_error"] == values["betti1_error"] == 0


# --- topology -----------------------------------------------------------------------------------------------------


def test_cldice_of_a_broken_one_pixel_vessel() -> None:
    gt = np.zeros((9, 50), dtype=bool)
    gt[4, 5:45] = True  # a 40-pixel centre line: its own skeleton
    pred = gt.copy()
    pred[4, 20:24] = False  # broken: 36 of 40 pixels, in two pieces
    assert np.array_equal(vm.skeleton(gt), gt)
    # Tprec = 36/36 = 1, Tsens = 36/40 = 0.9, clDice = 2 * 0.9 / 1.9
    assert vm.cldice(gt, pred) == pytest.approx(2 * 0.9 / 1.9)
    assert vm.cldice(gt, gt) == 1.0
    assert vm.betti_errors(gt, pred) == (1, 0)


def test_cldice_penalises_a_gap_more_than_dice_on_a_wide_vessel() -> None:
    gt = np.zeros((20, 80), dtype=bool)
    gt[7:12, 5:75] = True
    pred = gt.copy()
    pred[:, 38:44] = False
    assert vm.cldice(gt, pred) < vm.dice(gt, pred) < 1.0
    assert vm.betti_errors(gt, pred)[0] == 1


def test_betti_numbers_count_components_and_holes() -> None:
    ring = np.zeros((30, 30), dtype=bool)
    ring[draw.disk((15, 15), 10)] = True
    ring[draw.disk((15, 15), 4)] = False
    assert vm.betti_numbers(ring) == (1, 1)
    two_blobs = square(30, 2, 2, 5) | square(30, 20, 20, 5)
    assert vm.betti_numbers(two_blobs) == (2, 0)
    diagonal = np.eye(10, dtype=bool)  # 8-connected: one component
    assert vm.betti_numbers(diagonal) == (1, 0)
    assert vm.betti_errors(ring, two_blobs) == (1, 1)


def test_fast_euler_number_agrees_with_scikit_image_and_labelling() -> None:
    from skimage.measure import euler_number

    rng = np.random.default_rng(3)
    for _ in range(100):
        mask = rng.random((30, 40)) < rng.uniform(0.1, 0.8)
        assert vm.euler_number_8(mask) == euler_number(mask, connectivity=2)
        _, components = ndimage.label(mask, structure=np.ones((3, 3)))
        _, background = ndimage.label(~np.pad(mask, 1))
        assert vm.betti_numbers(mask) == (components, background - 1)


def test_skeleton_survives_inputs_that_crashed_scikit_image() -> None:
    """An all-foreground frame and masks touching the border once segfaulted skeletonize: run in a subprocess."""
    code = (
        "import numpy as np\n"
        "from vesselnb.metrics import skeleton, sample_metrics\n"
        "full = np.ones((64, 64), bool)\n"
        "assert skeleton(full).any()\n"
        "print(sample_metrics(full, full)['cldice'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.0"


# --- boundary -----------------------------------------------------------------------------------------------------


def test_surface_metrics_on_two_points_five_pixels_apart() -> None:
    gt = np.zeros((10, 20), dtype=bool)
    pred = np.zeros_like(gt)
    gt[5, 5] = True
    pred[2, 9] = True  # distance sqrt(3² + 4²) = 5
    assert vm.hd95(gt, pred) == pytest.approx(5.0)
    assert vm.assd(gt, pred) == pytest.approx(5.0)
    assert vm.nsd(gt, pred, tolerance=2.0) == 0.0
    assert vm.nsd(gt, pred, tolerance=5.0) == 1.0


def test_far_distances_beyond_the_exact_disc_are_exact() -> None:
    gt = np.zeros((40, 40), dtype=bool)
    gt[3, 3] = True
    target = np.zeros_like(gt)
    target[30, 33] = True
    assert vm.nearest_distances(gt, target)[0] == pytest.approx(math.hypot(27, 30))


def test_millimetre_values_scale_the_pixel_values() -> None:
    gt, pred = vessel_mask(64, 1), vessel_mask(64, 2)
    plain = vm.sample_metrics(gt, pred)
    scaled = vm.sample_metrics(gt, pred, pixel_spacing_mm=0.25)
    assert scaled["hd95_mm"] == pytest.approx(plain["hd95"] * 0.25)
    assert scaled["assd_mm"] == pytest.approx(plain["assd"] * 0.25)
    assert "hd95_mm" not in plain


# --- width-stratified recall --------------------------------------------------------------------------------------


def test_width_recall_separates_thin_medium_and_thick_vessels() -> None:
    gt = np.zeros((60, 60), dtype=bool)
    gt[10, 5:55] = True  # width 1: thin
    gt[24:27, 5:55] = True  # width 3: medium
    gt[40:49, 5:55] = True  # width 9: thick
    thick_only = np.zeros_like(gt)
    thick_only[40:49, 5:55] = True
    recall = vm.width_recall(gt, thick_only, bins_px=(2.0, 5.0))
    assert recall == {"thin": 0.0, "medium": 0.0, "thick": 1.0}
    assert vm.width_recall(gt, gt) == {"thin": 1.0, "medium": 1.0, "thick": 1.0}
    blob = np.zeros((40, 40), dtype=bool)
    blob[draw.disk((20, 20), 8)] = True  # its centre line is only a few pixels at the centre: thick
    only_thick = vm.width_recall(blob, blob)
    assert math.isnan(only_thick["thin"]) and math.isnan(only_thick["medium"]) and only_thick["thick"] == 1.0


def test_width_recall_sees_missed_thin_branches_that_dice_hides() -> None:
    gt = vessel_mask(96, 5)
    pred = gt & ~thin_branch_mask(96, 5)
    values = vm.sample_metrics(gt, pred)
    assert values["dice"] > 0.9
    assert values["recall_thin"] < values["dice"] - 0.15  # the loss is visible here, not in Dice
    assert values["recall_thick"] == 1.0


# --- dataset level ------------------------------------------------------------------------------------------------


def test_ciou_and_giou_follow_sa2va() -> None:
    intersections, unions = [1, 0, 0], [2, 0, 4]  # IoU 0.5, empty-vs-empty (=1 in gIoU), 0
    assert vm.cumulative_iou(intersections, unions) == pytest.approx(1 / 6)
    assert vm.mean_iou_sa2va(intersections, unions) == pytest.approx(0.5)
    assert vm.pooled_metrics(tp=2, fp=1, fn=2, tn=11)["dice"] == pytest.approx(4 / 7)


# --- against MONAI ------------------------------------------------------------------------------------------------


def _monai(gt: np.ndarray, pred: np.ndarray, tolerance: float) -> dict[str, float]:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")

    def tensor(mask: np.ndarray):
        return torch.from_numpy(mask[None, None].astype(np.float32))

    p, g = tensor(pred), tensor(gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": metrics.compute_dice(p, g).item(),
            "iou": metrics.compute_iou(p, g).item(),
            "hd95": metrics.compute_hausdorff_distance(p, g, percentile=95).item(),
            "assd": metrics.compute_average_surface_distance(p, g, symmetric=True).item(),
            "nsd": metrics.compute_surface_dice(p, g, class_thresholds=[tolerance]).item(),
        }


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    cases = []
    for seed in range(4):
        gt = vessel_mask(128, seed)
        cases.append((f"vessel-thin-missed-{seed}", gt, gt & ~thin_branch_mask(128, seed)))
        cases.append((f"vessel-eroded-noisy-{seed}", gt, ndimage.binary_erosion(gt) | (rng.random(gt.shape) < 0.002)))
        cases.append((f"vessel-other-{seed}", gt, vessel_mask(128, seed + 10)))
    for seed in range(3):
        cases.append((f"random-{seed}", rng.random((48, 64)) < 0.3, rng.random((48, 64)) < 0.3))
    cases.append(("touching-border", np.ones((32, 32), bool), square(32, 0, 0, 20)))
    return cases


@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_matches_monai_on_random_and_vessel_masks(tolerance: float) -> None:
    for name, gt, pred in _cases():
        ours = vm.sample_metrics(gt, pred, nsd_tolerance_px=tolerance)
        theirs = _monai(gt, pred, tolerance)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key, ours[key], value)


def test_empty_cases_against_monai() -> None:
    blob = square(24, 5, 5, 6)
    empty = np.zeros_like(blob)
    for gt, pred in ((empty, empty), (empty, blob), (blob, empty)):
        ours = vm.sample_metrics(gt, pred)
        theirs = _monai(gt, pred, 2.0)
        for key in ("dice", "iou", "assd", "nsd"):
            assert ours[key] == pytest.approx(theirs[key], nan_ok=True), key
        if gt.any() != pred.any():
            # Documented deviation: MONAI's torch.quantile turns the all-inf distances into NaN; we keep inf.
            assert math.isnan(theirs["hd95"]) and math.isinf(ours["hd95"])
        else:
            assert math.isnan(theirs["hd95"]) and math.isnan(ours["hd95"])


# --- fragments, calibration, temporal consistency -----------------------------------------------------------------


def test_spurious_components_are_the_predicted_blobs_that_touch_no_vessel() -> None:
    gt = vessel_mask(96, seed=3)
    pred = gt.copy()
    specks = [square(96, 2, 2, 2), square(96, 90, 2, 5), square(96, 2, 88, 1)]  # 4, 25 and 1 px, far from the tree
    for speck in specks:
        assert not (speck & ndimage.binary_dilation(gt, iterations=2)).any()
        pred |= speck
    found = vm.fragments(gt, pred)
    assert found.spurious_sizes == (25, 4, 1) and found.largest_spurious == 25 and found.spurious_area == 30
    assert found.n_pred_components == found.n_gt_components + 3
    assert vm.fragments(gt, gt).n_spurious == 0 and vm.fragments(gt, np.zeros_like(gt)).n_pred_components == 0
    row = vm.sample_metrics(gt, pred)
    assert (row["spurious_components"], row["largest_spurious_px"], row["spurious_area_px"]) == (3, 25, 30)
    assert vm.fragment_size_histogram(found.spurious_sizes) == {
        "1-4 px": 2, "5-16 px": 0, "17-64 px": 1, "65-256 px": 0, ">256 px": 0}


def _brute_force_average_precision(probability: np.ndarray, gt: np.ndarray) -> float:
    """scikit-learn's definition written out: precision at each distinct score, weighted by the recall step."""
    scores, labels = probability.ravel().astype(float), gt.ravel()
    total = 0.0
    previous_recall = 0.0
    for value in np.unique(scores)[::-1]:
        claimed = scores >= value
        recall = (claimed & labels).sum() / labels.sum()
        total += (recall - previous_recall) * (claimed & labels).sum() / claimed.sum()
        previous_recall = recall
    return total


def test_calibration_brier_ece_and_average_precision_from_the_histogram() -> None:
    rng = np.random.default_rng(0)
    gt = vessel_mask(64, seed=1)
    probability = np.clip(np.where(gt, 170, 60) + rng.normal(0, 40, gt.shape), 0, 255).astype(np.uint8)
    result = vm.calibration(vm.probability_histogram(gt, probability))
    p = probability / 255.0
    assert result.brier == pytest.approx(np.mean((p - gt) ** 2))
    assert result.average_precision == pytest.approx(_brute_force_average_precision(probability, gt))
    bins = np.clip((p * 10).astype(int), 0, 9)
    ece = sum((bins == b).sum() / p.size * abs(gt[bins == b].mean() - p[bins == b].mean())
              for b in range(10) if (bins == b).any())
    assert result.ece == pytest.approx(ece)
    assert result.n_pixels == gt.size and result.bins["n_pixels"].sum() == gt.size
    perfect = vm.calibration(vm.probability_histogram(gt, np.where(gt, 255, 0).astype(np.uint8)))
    assert perfect.brier == 0 and perfect.ece == 0 and perfect.average_precision == 1
    with pytest.raises(ValueError, match="uint8"):
        vm.probability_histogram(gt, p)


def test_frame_to_frame_iou() -> None:
    a, b = square(10, 0, 0, 4), square(10, 0, 2, 4)
    assert list(vm.frame_to_frame_iou([a, a, b])) == pytest.approx([1.0, 8 / 24])
    empty = np.zeros((10, 10), dtype=bool)
    assert list(vm.frame_to_frame_iou([empty, empty])) == [1.0]
