"""Per-frame metrics on boolean masks: overlap, topology (clDice, Betti errors), boundary (HD95, ASSD, NSD) and
recall stratified by vessel width, plus the dataset-level cIoU / gIoU that Sa2VA's referring-segmentation evals report.

All functions take ``(gt, pred)`` boolean 2-D arrays of the same shape and are pure (no I/O, no state).

Empty masks follow MONAI (``monai.metrics``, 1.6) so numbers can be compared with papers that use it:

====================  =================  ========================  =========================
metric                GT and pred empty  GT empty, pred not         pred empty, GT not
====================  =================  ========================  =========================
dice, iou             NaN                NaN (``ignore_empty``)     0
precision             NaN                0                          NaN
recall                NaN                NaN                        0
specificity           1 (NaN if no bg)   < 1                        1
cldice, width recall  NaN                NaN                        0
hd95, assd            NaN                inf                        inf
nsd                   NaN                0                          0
betti errors          0                  counts of pred             counts of GT
====================  =================  ========================  =========================

Boundaries are MONAI's: the mask minus its binary erosion (cross structuring element, pixels outside the frame
count as background), distances are Euclidean between boundary pixel centres; HD95 is the larger of the two
directed 95th percentiles (linear interpolation), ASSD the mean over the pooled distances of both directions, NSD
the fraction of boundary pixels of both masks within ``tolerance`` of the other boundary. Pixel spacing is
isotropic (``pixel_spacing_mm``), so the mm values are the pixel values times the spacing.

Summaries must count NaN and inf instead of dropping them silently (see :mod:`vesselnb.analysis`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.morphology import skeletonize

NAN = float("nan")
INF = float("inf")
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
WIDTH_BIN_NAMES = ("thin", "medium", "thick")


@dataclass(frozen=True)
class MetricInfo:
    """How a report names a metric: label, unit and direction, so no table or figure states a bare number."""

    label: str
    unit: str  # "" for a ratio in [0, 1]; "px", "mm", "components", "pixels"
    higher_is_better: bool | None  # None: a quantity with no better direction (an area, a count of frames)
    description: str

    @property
    def direction(self) -> str:
        """``↑ better`` or ``↓ better`` (empty when neither is): the arrow every report prints beside the metric."""
        if self.higher_is_better is None:
            return ""
        return "↑ better" if self.higher_is_better else "↓ better"

    def heading(self, statistic: str = "") -> str:
        """``HD95 (px, median, ↓ better)``: the label with its unit, statistic and direction."""
        parts = [part for part in (self.unit, statistic, self.direction) if part]
        return f"{self.label} ({', '.join(parts)})" if parts else self.label


_RATIO = ""
# Every per-frame quality metric a summary or comparison reports, in the order of the reports.
METRICS: dict[str, MetricInfo] = {
    "dice": MetricInfo("Dice", _RATIO, True, "2|P∩G| / (|P|+|G|)"),
    "iou": MetricInfo("IoU", _RATIO, True, "|P∩G| / |P∪G|"),
    "cldice": MetricInfo("clDice", _RATIO, True, "centreline Dice (skeleton overlap)"),
    "precision": MetricInfo("Precision", _RATIO, True, "|P∩G| / |P|"),
    "recall": MetricInfo("Recall", _RATIO, True, "|P∩G| / |G|"),
    "specificity": MetricInfo("Specificity", _RATIO, True, "true-negative pixels / background pixels"),
    "nsd": MetricInfo("NSD", _RATIO, True, "boundary pixels within the tolerance of the other boundary"),
    "recall_thin": MetricInfo("Recall, thin vessels", _RATIO, True, "recall on GT pixels of the thinnest width bin"),
    "recall_medium": MetricInfo("Recall, medium vessels", _RATIO, True, "recall on GT pixels of the middle width bin"),
    "recall_thick": MetricInfo("Recall, thick vessels", _RATIO, True, "recall on GT pixels of the widest width bin"),
    "hd95": MetricInfo("HD95", "px", False, "95th-percentile symmetric Hausdorff distance of the boundaries"),
    "assd": MetricInfo("ASSD", "px", False, "average symmetric surface distance"),
    "betti0_error": MetricInfo("Betti-0 error", "components", False, "|#components(P) − #components(G)|"),
    "betti1_error": MetricInfo("Betti-1 error", "loops", False, "|#loops(P) − #loops(G)|"),
    "spurious_components": MetricInfo("Spurious components", "components", False,
                                      "predicted components touching no GT pixel"),
    "largest_spurious_px": MetricInfo("Largest spurious component", "px²", False,
                                      "area of the largest spurious component"),
    "spurious_area_px": MetricInfo("Spurious area", "px²", False, "area of all spurious components"),
    "brier": MetricInfo("Brier score", _RATIO, False, "mean squared error of the probability map"),
    "average_precision": MetricInfo("Average precision", _RATIO, True, "area under the pixel precision–recall curve"),
    "hd95_mm": MetricInfo("HD95", "mm", False, "HD95 times the pixel spacing"),
    "assd_mm": MetricInfo("ASSD", "mm", False, "ASSD times the pixel spacing"),
}
# metric -> higher is better (kept for the callers that need only the direction).
HIGHER_IS_BETTER: dict[str, bool] = {name: bool(info.higher_is_better) for name, info in METRICS.items()}


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name``; an unknown name gets a neutral entry (its own name, no unit)."""
    return METRICS.get(name, MetricInfo(name, "", None, ""))


def _check(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"gt and pred must be 2-D masks of the same shape, got {gt.shape} and {pred.shape}")
    return gt, pred


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else NAN


# --- overlap ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Pixel counts; kept per sample so pooled (micro) values and cIoU can be computed later."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion(gt: np.ndarray, pred: np.ndarray) -> Confusion:
    """TP / FP / FN / TN pixel counts."""
    gt, pred = _check(gt, pred)
    tp = int(np.count_nonzero(gt & pred))
    gt_area = int(np.count_nonzero(gt))
    pred_area = int(np.count_nonzero(pred))
    fp, fn = pred_area - tp, gt_area - tp
    return Confusion(tp, fp, fn, gt.size - tp - fp - fn)


def dice_from_counts(c: Confusion) -> float:
    """MONAI ``compute_dice(ignore_empty=True)``: NaN when the GT is empty."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn) if c.tp + c.fn > 0 else NAN


def iou_from_counts(c: Confusion) -> float:
    """MONAI ``compute_iou(ignore_empty=True)``: NaN when the GT is empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn) if c.tp + c.fn > 0 else NAN


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """2|G∩P| / (|G|+|P|); NaN for an empty GT (MONAI ``ignore_empty``)."""
    return dice_from_counts(confusion(gt, pred))


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|G∩P| / |G∪P|; NaN for an empty GT (MONAI ``ignore_empty``)."""
    return iou_from_counts(confusion(gt, pred))


def precision(gt: np.ndarray, pred: np.ndarray) -> float:
    """TP / (TP+FP); NaN for an empty prediction (nothing was claimed)."""
    c = confusion(gt, pred)
    return _ratio(c.tp, c.tp + c.fp)


def recall(gt: np.ndarray, pred: np.ndarray) -> float:
    """TP / (TP+FN) (sensitivity); NaN for an empty GT."""
    c = confusion(gt, pred)
    return _ratio(c.tp, c.tp + c.fn)


def specificity(gt: np.ndarray, pred: np.ndarray) -> float:
    """TN / (TN+FP); NaN only when the GT covers the whole frame."""
    c = confusion(gt, pred)
    return _ratio(c.tn, c.tn + c.fp)


# --- topology -----------------------------------------------------------------------------------------------------


def skeleton(mask: np.ndarray) -> np.ndarray:
    """One-pixel centre lines (scikit-image ``skeletonize``, Zhang's thinning, keeps connectivity).

    The mask is handed over as uint8 and padded when it touches the frame border: scikit-image 0.26's Zhang
    thinning crashed the interpreter (segfault) on some boolean inputs here, never on the same data as uint8; and
    thinning should treat the outside of the frame as background anyway.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        return skeletonize(np.pad(mask, 1).view(np.uint8))[1:-1, 1:-1]
    return skeletonize(mask.view(np.uint8))


def cldice_from_skeletons(
    gt: np.ndarray, pred: np.ndarray, gt_skeleton: np.ndarray, pred_skeleton: np.ndarray
) -> tuple[float, float, float]:
    """(clDice, topology precision, topology sensitivity) from precomputed skeletons (Shit et al., CVPR 2021).

    Tprec = |S(P) ∩ G| / |S(P)|, Tsens = |S(G) ∩ P| / |S(G)|, clDice = their harmonic mean. NaN for an empty GT,
    0 when the prediction is empty, so it lines up with Dice's convention.
    """
    n_gt_skel = int(np.count_nonzero(gt_skeleton))
    n_pred_skel = int(np.count_nonzero(pred_skeleton))
    if n_gt_skel == 0:
        return NAN, _ratio(np.count_nonzero(pred_skeleton & gt), n_pred_skel), NAN
    t_sens = np.count_nonzero(gt_skeleton & pred) / n_gt_skel
    if n_pred_skel == 0:
        return 0.0, NAN, float(t_sens)
    t_prec = np.count_nonzero(pred_skeleton & gt) / n_pred_skel
    value = 0.0 if t_prec + t_sens == 0 else 2.0 * t_prec * t_sens / (t_prec + t_sens)
    return float(value), float(t_prec), float(t_sens)


def cldice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Centre-line Dice: how much of each skeleton lies inside the other mask (broken vessels score low)."""
    gt, pred = _check(gt, pred)
    return cldice_from_skeletons(gt, pred, skeleton(gt), skeleton(pred))[0]


def euler_number_8(mask: np.ndarray) -> int:
    """Euler number (components − holes) with 8-connected foreground, 4-connected background.

    Gray's bit-quad count over the zero-padded mask: (n(Q1) − n(Q3) − 2·n(Qdiag)) / 4. The same number as
    ``skimage.measure.euler_number(mask, connectivity=2)``, in a few vectorised passes (3x faster here).
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1).view(np.uint8)
    a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    total = a + b + c + d
    ones = np.count_nonzero(total == 1)
    threes = np.count_nonzero(total == 3)
    diagonal = np.count_nonzero((total == 2) & (a == d))
    return (ones - threes - 2 * diagonal) // 4


def betti_numbers(mask: np.ndarray) -> tuple[int, int]:
    """(β0, β1) of a 2-D mask: connected components (8-connected) and holes (4-connected background components
    not touching the frame border), the dual connectivities that make β0 − β1 the Euler number.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0, 0
    _, b0 = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return int(b0), int(b0 - euler_number_8(mask))


def betti_errors(gt: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    """(|β0(P) − β0(G)|, |β1(P) − β1(G)|): fragments and spurious / missing loops."""
    gt, pred = _check(gt, pred)
    g0, g1 = betti_numbers(gt)
    p0, p1 = betti_numbers(pred)
    return abs(p0 - g0), abs(p1 - g1)


# --- distances between pixel sets ---------------------------------------------------------------------------------

# Most boundary distances of a usable prediction are a few pixels: those are read off a small disc of offsets around
# each pixel (exact, vectorised); only the rest go to a KD-tree. Both give exact Euclidean distances.
_RING_RADIUS = 3.0


@functools.lru_cache(maxsize=8)
def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, distance) of all integer offsets within ``radius``, nearest first."""
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    dist = np.hypot(dy, dx).ravel()
    keep = dist <= radius
    order = np.argsort(dist[keep], kind="stable")
    return dy.ravel()[keep][order], dx.ravel()[keep][order], dist[keep][order]


def nearest_distances(
    source: np.ndarray,
    target: np.ndarray,
    exact_within: float = _RING_RADIUS,
    beyond: str = "exact",
    background_border: int = 0,
) -> np.ndarray:
    """Euclidean distance from each ``source`` pixel (row-major order) to the nearest ``target`` pixel.

    Distances up to ``exact_within`` come from a disc of offsets; the others from a KD-tree over the target pixels
    (``beyond="exact"``) or are left at ``inf`` (``beyond="inf"``, when only "farther than" matters). ``inf`` when
    ``target`` is empty. Pixels outside the frame are never targets. ``background_border``: how many outer rows and
    columns of ``source`` are known to be empty (callers that padded already save two copies).
    """
    source = np.asarray(source, dtype=bool)
    target = np.asarray(target, dtype=bool)
    reach = int(np.floor(exact_within))
    pad = 0 if background_border >= reach else reach
    width = target.shape[1] + 2 * pad
    # Flat indices into the padded frame: one nonzero pass, and each offset is a single integer shift.
    flat = np.flatnonzero(np.pad(source, pad) if pad else source)
    if flat.size == 0:
        return np.zeros(0)
    if not target.any():
        return np.full(flat.size, np.inf)
    padded = (np.pad(target, pad) if pad else target).ravel()
    result = np.full(flat.size, np.inf)
    open_ = np.arange(flat.size)
    for dy, dx, dist in zip(*_disc_offsets(exact_within), strict=True):
        hit = padded[flat[open_] + (dy * width + dx)]
        if hit.any():
            result[open_[hit]] = dist
            open_ = open_[~hit]
            if open_.size == 0:
                return result
    if beyond == "exact":
        from scipy.spatial import cKDTree

        rows, cols = np.divmod(flat[open_], width)
        result[open_] = cKDTree(np.argwhere(target)).query(np.column_stack([rows - pad, cols - pad]))[0]
    return result


def _erode_padded(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the cross element for a mask with a background border (views, no copies)."""
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return np.pad(inner, 1)


def boundary(mask: np.ndarray) -> np.ndarray:
    """MONAI's surface: the mask minus its binary erosion (pixels outside the frame are background)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask)


def _boundary_padded(mask: np.ndarray) -> np.ndarray:
    """:func:`boundary` for a mask whose outermost rows and columns are background (the hot path)."""
    return mask & ~_erode_padded(mask)


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed boundary distances in pixels, as MONAI's ``get_edge_surface_distance(symmetric=True)`` returns.

    ``pred_to_gt`` has one value per prediction boundary pixel, ``gt_to_pred`` one per GT boundary pixel; when the
    other mask is empty they are ``inf`` (and, as in MONAI, both directions list the non-empty mask's boundary).
    """

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray


def surface_distances(gt: np.ndarray, pred: np.ndarray) -> SurfaceDistances:
    """Both directed boundary-distance sets (MONAI boundaries, exact Euclidean distances)."""
    gt, pred = _check(gt, pred)
    return _surface_distances(boundary(gt), boundary(pred))


def _surface_distances(gt_edge: np.ndarray, pred_edge: np.ndarray, border: int = 0) -> SurfaceDistances:
    has_gt, has_pred = gt_edge.any(), pred_edge.any()
    if not (has_gt and has_pred):
        present = gt_edge if has_gt else pred_edge
        infs = np.full(int(np.count_nonzero(present)), np.inf)
        return SurfaceDistances(infs, infs.copy())
    return SurfaceDistances(
        nearest_distances(pred_edge, gt_edge, background_border=border),
        nearest_distances(gt_edge, pred_edge, background_border=border),
    )


def hd95_from_distances(d: SurfaceDistances, percentile: float = 95.0) -> float:
    """Max of the two directed percentiles, as MONAI ``compute_hausdorff_distance(percentile=95)``.

    One empty mask gives ``inf`` here; MONAI 1.6 returns NaN in that case only because ``torch.quantile`` of all-inf
    values interpolates to NaN (its ``percentile=None`` Hausdorff distance gives inf). A missed vessel tree is the
    worst boundary error, not an undefined one, so we keep inf and count it in summaries.
    """
    if d.pred_to_gt.size == 0 and d.gt_to_pred.size == 0:
        return NAN
    if np.isinf(d.pred_to_gt).any() or np.isinf(d.gt_to_pred).any():
        return INF
    return float(max(np.percentile(d.pred_to_gt, percentile), np.percentile(d.gt_to_pred, percentile)))


def assd_from_distances(d: SurfaceDistances) -> float:
    """Mean of the pooled distances of both directions (MONAI ``compute_average_surface_distance(symmetric=True)``)."""
    pooled = np.concatenate([d.pred_to_gt, d.gt_to_pred])
    return float(pooled.mean()) if pooled.size else NAN


def nsd_from_distances(d: SurfaceDistances, tolerance: float) -> float:
    """Normalised surface Dice at ``tolerance`` (MONAI ``compute_surface_dice``, no sub-pixel areas)."""
    total = d.pred_to_gt.size + d.gt_to_pred.size
    if total == 0:
        return NAN
    within = np.count_nonzero(d.pred_to_gt <= tolerance) + np.count_nonzero(d.gt_to_pred <= tolerance)
    return float(within / total)


def hd95(gt: np.ndarray, pred: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels (NaN both empty, inf one empty)."""
    return hd95_from_distances(surface_distances(gt, pred))


def assd(gt: np.ndarray, pred: np.ndarray) -> float:
    """Average symmetric surface distance in pixels (NaN both empty, inf one empty)."""
    return assd_from_distances(surface_distances(gt, pred))


def nsd(gt: np.ndarray, pred: np.ndarray, tolerance: float = 2.0) -> float:
    """Normalised surface Dice NSD(τ), τ in pixels: Metrics Reloaded's boundary metric for tubular structures."""
    return nsd_from_distances(surface_distances(gt, pred), tolerance)


# --- width-stratified recall --------------------------------------------------------------------------------------


def vessel_width(
    gt: np.ndarray, gt_skeleton: np.ndarray | None = None, exact_up_to: float | None = None, border: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(skeleton pixel coordinates, local vessel width in px) along the GT centre line.

    Width = 2·d − 1 with d the distance from the centre-line pixel to the nearest background pixel (the GT's
    distance transform read on its skeleton), so a one-pixel line has width 1 and a 5-pixel-wide vessel width 5.
    With ``exact_up_to`` (px), wider places are reported as ``inf``: enough for binning and much faster.
    """
    gt = np.asarray(gt, dtype=bool)
    if gt_skeleton is None:
        gt_skeleton = skeleton(gt)
    coords = np.nonzero(gt_skeleton)
    if coords[0].size == 0:
        return coords, np.zeros(0)
    radius = _RING_RADIUS if exact_up_to is None else max(1.0, (exact_up_to + 1.0) / 2.0)
    beyond = "exact" if exact_up_to is None else "inf"
    # Padding makes pixels outside the frame background, as for the boundary metrics.
    if border < 1:
        gt_skeleton, gt = np.pad(gt_skeleton, 1), np.pad(gt, 1)
        border = 1
    inside = nearest_distances(gt_skeleton, ~gt, exact_within=radius, beyond=beyond, background_border=border)
    return coords, 2.0 * inside - 1.0


def width_bin_index(widths: np.ndarray, bins_px: Sequence[float]) -> np.ndarray:
    """0 thin (w ≤ bins[0]), 1 medium (bins[0] < w ≤ bins[1]), 2 thick (w > bins[1])."""
    return np.searchsorted(np.asarray(bins_px, dtype=float), widths, side="left")


def width_recall(
    gt: np.ndarray,
    pred: np.ndarray,
    bins_px: Sequence[float] = (2.0, 5.0),
    gt_skeleton: np.ndarray | None = None,
    border: int = 0,
) -> dict[str, float]:
    """Share of GT centre-line pixels covered by the prediction, per width bin (thin / medium / thick).

    Thin vessels are a few percent of the pixels, so Dice hides missing them; this does not. NaN for a bin the GT
    has no centre line in.
    """
    gt, pred = _check(gt, pred)
    if len(bins_px) != 2 or bins_px[0] >= bins_px[1]:
        raise ValueError(f"width bins must be two increasing widths in px, got {list(bins_px)}")
    coords, widths = vessel_width(gt, gt_skeleton, exact_up_to=float(bins_px[1]), border=border)
    hit = pred[coords] if widths.size else np.zeros(0, dtype=bool)
    which = width_bin_index(widths, bins_px)
    result = {}
    for index, name in enumerate(WIDTH_BIN_NAMES):
        selected = which == index
        result[name] = float(hit[selected].mean()) if selected.any() else NAN
    return result


# --- fragments ----------------------------------------------------------------------------------------------------

FRAGMENT_SIZE_BINS_PX = (1, 5, 17, 65, 257)  # spurious component sizes: 1-4, 5-16, 17-64, 65-256, >256 px


@dataclass(frozen=True)
class Fragments:
    """Connected components (8-connected) of the prediction, and those that touch no ground-truth pixel.

    A *spurious* component is a predicted blob with no GT pixel in it: specks and false vessels, which Dice barely
    notices but Betti-0 and a reader do.
    """

    n_pred_components: int
    n_gt_components: int
    spurious_sizes: tuple[int, ...]  # pixel area of each spurious component, largest first

    @property
    def n_spurious(self) -> int:
        return len(self.spurious_sizes)

    @property
    def largest_spurious(self) -> int:
        return self.spurious_sizes[0] if self.spurious_sizes else 0

    @property
    def spurious_area(self) -> int:
        return int(sum(self.spurious_sizes))


def fragments(gt: np.ndarray, pred: np.ndarray) -> Fragments:
    """Components of ``pred`` and which of them are spurious (no overlap with ``gt``).

    >>> gt = np.zeros((8, 8), bool); gt[1:3, 1:6] = True
    >>> pred = gt.copy(); pred[6, 6] = True
    >>> fragments(gt, pred).spurious_sizes
    (1,)
    """
    gt, pred = _check(gt, pred)
    labels, n_pred = ndimage.label(pred, structure=EIGHT_CONNECTED)
    _, n_gt = ndimage.label(gt, structure=EIGHT_CONNECTED)
    if n_pred == 0:
        return Fragments(0, int(n_gt), ())
    sizes = np.bincount(labels.ravel(), minlength=n_pred + 1)[1:]
    touching = np.bincount(labels[gt].ravel(), minlength=n_pred + 1)[1:] > 0
    spurious = np.sort(sizes[~touching])[::-1]
    return Fragments(int(n_pred), int(n_gt), tuple(int(v) for v in spurious))


def fragment_size_histogram(sizes: Sequence[int]) -> dict[str, int]:
    """Counts of spurious component sizes in :data:`FRAGMENT_SIZE_BINS_PX` bins, labelled like ``"5-16 px"``."""
    edges = list(FRAGMENT_SIZE_BINS_PX)
    labels = [f"{lo}-{hi - 1} px" if hi - 1 > lo else f"{lo} px" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f">{edges[-1] - 1} px")
    index = np.searchsorted(np.asarray(edges), np.asarray(sizes, dtype=int), side="right") - 1
    counts = np.bincount(index[index >= 0], minlength=len(labels)) if len(index) else np.zeros(len(labels), int)
    return {label: int(c) for label, c in zip(labels, counts, strict=True)}


# --- temporal consistency -----------------------------------------------------------------------------------------


def frame_to_frame_iou(masks: Sequence[np.ndarray]) -> np.ndarray:
    """IoU of each mask with the next one in a sequence (length n − 1); 1 when both are empty (nothing changed).

    For predictions, the same numbers computed on the ground truth say how much the anatomy itself moves: a
    prediction far less consistent than its GT flickers.
    """
    values = []
    for first, second in zip(masks[:-1], masks[1:], strict=True):
        first, second = _check(first, second)
        union = np.count_nonzero(first | second)
        values.append(np.count_nonzero(first & second) / union if union else 1.0)
    return np.asarray(values, dtype=float)

# --- calibration (from uint8 probability maps) --------------------------------------------------------------------


def probability_histogram(gt: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """(256, 2) pixel counts per uint8 probability value: column 0 background, column 1 vessel.

    Calibration, Brier score and the precision-recall curve of a whole dataset follow exactly from the sum of these
    histograms over frames (the maps are stored as uint8, p = value / 255), so no pixel has to be kept.
    """
    gt = np.asarray(gt, dtype=bool)
    probability = np.asarray(probability)
    if probability.shape != gt.shape or probability.dtype != np.uint8:
        raise ValueError(f"probability must be a uint8 map of the GT's shape {gt.shape}, "
                         f"got {probability.dtype} {probability.shape}")
    codes = probability.astype(np.int64) * 2 + gt
    return np.bincount(codes.ravel(), minlength=512).reshape(256, 2)


@dataclass(frozen=True)
class Calibration:
    """Pixel-level calibration of probability maps: reliability bins, ECE, Brier score, PR curve and AP."""

    bins: pd.DataFrame  # bin_low, bin_high, n_pixels, mean_probability, vessel_fraction
    ece: float  # Σ_bins n_b / N · |vessel fraction − mean probability| (Guo et al. 2017, equal-width bins)
    brier: float  # mean (p − y)²
    average_precision: float  # Σ_k (R_k − R_{k−1}) P_k over decreasing thresholds (scikit-learn's definition)
    precision: np.ndarray  # PR curve, thresholds from high to low
    recall: np.ndarray
    n_pixels: int


def calibration(histogram: np.ndarray, n_bins: int = 10) -> Calibration:
    """Calibration of a (256, 2) :func:`probability_histogram` (summed over frames for a dataset).

    Pixels with value v have probability v / 255; the PR curve predicts "vessel" for values ≥ each v. AP is NaN
    without vessel pixels, ECE / Brier NaN without pixels.
    """
    hist = np.asarray(histogram, dtype=float).reshape(256, 2)
    p = np.arange(256) / 255.0
    negatives, positives = hist[:, 0], hist[:, 1]
    total = hist.sum()
    n_pos = positives.sum()
    if total == 0:
        empty = pd.DataFrame(columns=["bin_low", "bin_high", "n_pixels", "mean_probability", "vessel_fraction"])
        return Calibration(empty, NAN, NAN, NAN, np.zeros(0), np.zeros(0), 0)
    brier = float(np.sum(negatives * p**2 + positives * (1 - p) ** 2) / total)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    rows, ece = [], 0.0
    for b in range(n_bins):
        inside = which == b
        n = hist[inside].sum()
        mean_p = float(np.sum(p[inside] * hist[inside].sum(axis=1)) / n) if n else NAN
        fraction = float(positives[inside].sum() / n) if n else NAN
        if n:
            ece += n / total * abs(fraction - mean_p)
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "n_pixels": int(n),
                     "mean_probability": mean_p, "vessel_fraction": fraction})
    tp = np.cumsum(positives[::-1])  # predicted positive: value >= v, v from 255 down
    fp = np.cumsum(negatives[::-1])
    claimed = tp + fp
    keep = claimed > 0
    precision = tp[keep] / claimed[keep]
    recall = tp[keep] / n_pos if n_pos else np.full(int(keep.sum()), NAN)
    if n_pos:
        previous = np.concatenate([[0.0], recall[:-1]])
        average_precision = float(np.sum((recall - previous) * precision))
    else:
        average_precision = NAN
    return Calibration(pd.DataFrame(rows), float(ece), brier, average_precision, precision, recall, int(total))


# --- everything for one sample ------------------------------------------------------------------------------------


def sample_metrics(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    nsd_tolerance_px: float = 2.0,
    width_bins_px: Sequence[float] = (2.0, 5.0),
    pixel_spacing_mm: float | None = None,
) -> dict[str, float]:
    """Every per-frame metric, sharing the crop, skeletons and boundaries between them.

    Keys: ``gt_area pred_area tp fp fn tn dice iou precision recall specificity cldice cl_tprec cl_tsens
    betti0_error betti1_error n_components spurious_components largest_spurious_px spurious_area_px hd95 assd nsd
    recall_thin recall_medium recall_thick`` (+ ``hd95_mm assd_mm``).
    """
    gt, pred = _check(gt, pred)
    counts = confusion(gt, pred)
    out: dict[str, float] = {
        "gt_area": counts.tp + counts.fn,
        "pred_area": counts.tp + counts.fp,
        "tp": counts.tp,
        "fp": counts.fp,
        "fn": counts.fn,
        "tn": counts.tn,
        "dice": dice_from_counts(counts),
        "iou": iou_from_counts(counts),
        "precision": _ratio(counts.tp, counts.tp + counts.fp),
        "recall": _ratio(counts.tp, counts.tp + counts.fn),
        "specificity": _ratio(counts.tn, counts.tn + counts.fp),
    }
    union = gt | pred
    if union.any():
        # Everything below is translation invariant: work on the union's box, padded so that pixels outside the
        # frame stay background (as MONAI's erosion assumes).
        rows = np.flatnonzero(union.any(axis=1))
        cols = np.flatnonzero(union.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        # One padding wide enough for every offset disc below, so no helper has to copy the frame again.
        border = int(max(_RING_RADIUS, (float(width_bins_px[1]) + 1.0) / 2.0)) + 1
        gt_c, pred_c = np.pad(gt[box], border), np.pad(pred[box], border)
        gt_skel, pred_skel = skeleton(gt_c), skeleton(pred_c)
        distances = _surface_distances(_boundary_padded(gt_c), _boundary_padded(pred_c), border=border - 1)
    else:
        border = 1
        gt_c = pred_c = gt_skel = pred_skel = np.zeros((1, 1), dtype=bool)
        distances = SurfaceDistances(np.zeros(0), np.zeros(0))
    out["cldice"], out["cl_tprec"], out["cl_tsens"] = cldice_from_skeletons(gt_c, pred_c, gt_skel, pred_skel)
    g0, g1 = betti_numbers(gt_c)
    p0, p1 = betti_numbers(pred_c)
    out["betti0_error"], out["betti1_error"] = abs(p0 - g0), abs(p1 - g1)
    found = fragments(gt_c, pred_c)
    out["n_components"] = found.n_pred_components
    out["spurious_components"] = found.n_spurious
    out["largest_spurious_px"] = found.largest_spurious
    out["spurious_area_px"] = found.spurious_area
    out["hd95"] = hd95_from_distances(distances)
    out["assd"] = assd_from_distances(distances)
    out["nsd"] = nsd_from_distances(distances, nsd_tolerance_px)
    for name, value in width_recall(gt_c, pred_c, width_bins_px, gt_skeleton=gt_skel, border=border).items():
        out[f"recall_{name}"] = value
    if pixel_spacing_mm is not None:
        out["hd95_mm"] = out["hd95"] * pixel_spacing_mm
        out["assd_mm"] = out["assd"] * pixel_spacing_mm
    return out


# --- dataset level ------------------------------------------------------------------------------------------------


def cumulative_iou(intersections: Sequence[float], unions: Sequence[float]) -> float:
    """Sa2VA's cIoU: Σ intersection / Σ union over all samples (large masks weigh more)."""
    total_union = float(np.sum(unions))
    return float(np.sum(intersections)) / total_union if total_union > 0 else NAN


def mean_iou_sa2va(intersections: Sequence[float], unions: Sequence[float]) -> float:
    """Sa2VA's gIoU: mean per-sample IoU where an empty GT with an empty prediction scores 1 (not NaN as in MONAI)."""
    inter = np.asarray(intersections, dtype=float)
    union = np.asarray(unions, dtype=float)
    if inter.size == 0:
        return NAN
    per_sample = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    return float(per_sample.mean())


def pooled_metrics(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Micro (pooled-pixel) values over a whole dataset from summed confusion counts."""
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }
