"""Stage 03: the error analysis of one run's prediction store against the ground truth.

The per-sample metrics table (``analysis/metrics.parquet``) keeps every sample the store holds: ``no_seg`` and
``error`` samples are scored as the empty masks they are (a missed frame is a miss), frames without annotation are
listed but not scored. Summaries show per-frame means (macro) with 95 % bootstrap CIs resampled **by patient**
(frames of one patient are not independent; :mod:`vesselnb.stats`), the numbers of patients, sequences and frames
beside each, no CI at all below ``analysis.min_patients`` patients, pooled-pixel values (micro), and NaN / inf counts.
Thresholds are recommended by leave-one-patient-out cross-validation with their out-of-fold score (the in-sample
optimum is shown, labelled optimistic). Fragments (spurious components), calibration of the probability maps and the
frame-to-frame consistency of each sequence complete the picture. Sanity flags catch results that are too good or too
bad to be true before anyone reads the numbers.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from vesselnb import headline as hl
from vesselnb import htmlrepr as hr
from vesselnb import metrics as vm
from vesselnb import pseudonym, stats, viz
from vesselnb.data import GroundTruth, list_samples, load_ground_truth, parse_sample_name
from vesselnb.errors import DataError, ParamsError, StageError, StoreError, VesselnbError
from vesselnb.fingerprint import file_digest, new_file_digest
from vesselnb.jsonable import strict_json
from vesselnb.masks import resize_mask
from vesselnb.params import DEFAULT_NAME_REGEX, AnalysisParams, RunParams
from vesselnb.pseudonym import Pseudonyms
from vesselnb.run_folder import RunFolder

SUMMARY_METRICS = vm.HIGHER_IS_BETTER  # metric -> higher is better; the order of the summary table
TABLE_COLUMNS = [
    "sample_id", "patient", "sequence", "frame", "status", "gt_area", "pred_area",
    "dice", "iou", "precision", "recall", "specificity", "cldice", "betti0_error", "betti1_error",
    "hd95", "assd", "nsd", "recall_thin", "recall_medium", "recall_thick",
    "n_components", "spurious_components", "largest_spurious_px", "spurious_area_px", "brier", "average_precision",
]
EXTRA_COLUMNS = ["has_gt", "tp", "fp", "fn", "tn", "cl_tprec", "cl_tsens", "has_probability", "image"]
SWEEP_THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
CLDICE_SWEEP_THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.1), 2)
CLDICE_SWEEP_MAX_SAMPLES = 60  # skeletons per threshold are the costly part; a fixed subsample keeps it bounded
SUSPICIOUS_PERFECT_SHARE = 0.1
IDENTICAL_TO_GT_SHARE = 0.5


# --- scoring ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringSettings:
    """What each worker needs to score a sample (picklable)."""

    store_path: str
    threshold: float
    nsd_tolerance_px: float
    width_bins_px: tuple[float, float]
    pixel_spacing_mm: float | None
    name_regex: str
    sweep: bool
    cldice_sweep_ids: frozenset[str]


_WORKER: dict[str, Any] = {}


def _init_worker(settings: ScoringSettings, gt: GroundTruth, ship_masks: bool = False) -> None:
    """``ship_masks``: a worker process returns each GT mask packed, so the stage's own GroundTruth keeps it and
    the figures after scoring do not rasterise it again."""
    from vesselnb.store import PredictionStore

    _WORKER.update(settings=settings, gt=gt, store=PredictionStore(settings.store_path), ship_masks=ship_masks)


def _prediction_mask(store: Any, sample_id: str, record: dict[str, Any], shape: tuple[int, int],
                     threshold: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The mask to score (and the probability map, if any) at the GT's size.

    At the default threshold 0.5 the stored mask is used as the model produced it; another threshold re-binarises
    the probability map where one exists.
    """
    probability = store.probability(sample_id) if record.get("has_probability") else None
    if probability is not None and probability.shape != shape:
        probability = None
    if probability is not None and not math.isclose(threshold, 0.5):
        return probability > threshold * 255.0, probability
    mask = store.mask(sample_id)
    if mask.shape != shape:
        mask = np.zeros(shape, dtype=bool) if mask.size == 0 else resize_mask(mask, shape)
    return mask, probability


def _sweep_counts(gt: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """(n_thresholds, 3) TP / FP / FN at each sweep threshold, from two 256-bin histograms (no re-thresholding)."""
    codes = probability.astype(np.uint16) | (gt.astype(np.uint16) << 8)  # one pass: value + 256 * inside-GT
    histogram = np.bincount(codes.ravel(), minlength=512)
    on_gt = histogram[256:]
    everywhere = histogram[:256] + on_gt
    cuts = np.floor(SWEEP_THRESHOLDS * 255.0).astype(int) + 1  # predicted = value > t * 255
    above_gt = np.cumsum(on_gt[::-1])[::-1]
    above_all = np.cumsum(everywhere[::-1])[::-1]
    tp = above_gt[cuts]
    fp = above_all[cuts] - tp
    fn = int(gt.sum()) - tp
    return np.stack([tp, fp, fn], axis=1)


def _score_sample(sample_id: str) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """(row, GT mask, prediction as scored); the masks are None for a frame without annotation."""
    settings: ScoringSettings = _WORKER["settings"]
    store = _WORKER["store"]
    gt_source: GroundTruth = _WORKER["gt"]
    record = store.record(sample_id)
    patient, sequence, frame = parse_sample_name(sample_id, settings.name_regex)
    row: dict[str, Any] = {
        "sample_id": sample_id, "patient": patient, "sequence": sequence, "frame": frame,
        "status": record.get("status", "error"), "has_gt": sample_id in gt_source,
        "has_probability": bool(record.get("has_probability")), "image": str(record.get("image", "")),
    }
    if not row["has_gt"]:
        return row, None, None
    gt = gt_source.mask(sample_id)
    pred, probability = _prediction_mask(store, sample_id, record, gt.shape, settings.threshold)
    row.update(vm.sample_metrics(gt, pred, nsd_tolerance_px=settings.nsd_tolerance_px,
                                 width_bins_px=settings.width_bins_px, pixel_spacing_mm=settings.pixel_spacing_mm))
    row["_spurious_sizes"] = vm.fragments(gt, pred).spurious_sizes
    if probability is not None:
        histogram = vm.probability_histogram(gt, probability)
        calibration = vm.calibration(histogram)
        row.update(_hist=histogram, brier=calibration.brier, average_precision=calibration.average_precision)
    if settings.sweep and probability is not None:
        row["_sweep"] = _sweep_counts(gt, probability)
        if sample_id in settings.cldice_sweep_ids:
            gt_skeleton = vm.skeleton(gt)
            values = []
            for t in CLDICE_SWEEP_THRESHOLDS:
                binary = probability > t * 255.0
                values.append(vm.cldice_from_skeletons(gt, binary, gt_skeleton, vm.skeleton(binary))[0])
            row["_cldice_sweep"] = np.array(values)
    return row, gt, pred


def _score_chunk(sample_ids: list[str]) -> list[dict[str, Any]]:
    """Score a run of consecutive frames of one sequence; each row also gets the frame-to-frame IoU with the next
    frame (prediction and GT), so temporal consistency needs no second pass over the masks."""
    rows, previous = [], None
    for sample_id in sample_ids:
        row, gt, pred = _score_sample(sample_id)
        if previous is not None and gt is not None and previous[1] is not None and previous[1].shape == gt.shape:
            previous[0]["_iou_next_pred"] = float(vm.frame_to_frame_iou([previous[2], pred])[0])
            previous[0]["_iou_next_gt"] = float(vm.frame_to_frame_iou([previous[1], gt])[0])
        previous = (row, gt, pred)
        if gt is not None and _WORKER["ship_masks"]:
            row["_gt_packed"] = np.packbits(gt)
        rows.append(row)
    return rows


def _sequence_chunks(ids: list[str], name_regex: str, size: int = 16) -> list[list[str]]:
    """Sample ids grouped by (patient, sequence) in frame order, long sequences cut into runs of ``size``."""
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for sample_id in ids:
        patient, sequence, frame = parse_sample_name(sample_id, name_regex)
        groups.setdefault((patient, sequence), []).append((frame, sample_id))
    chunks = []
    for key in sorted(groups):
        ordered = [sample_id for _, sample_id in sorted(groups[key])]
        chunks += [ordered[i : i + size] for i in range(0, len(ordered), size)]
    return chunks


def score_store(store: Any, gt: GroundTruth, settings: ScoringSettings, workers: int = 0) -> list[dict[str, Any]]:
    """Score every sample of the store; ``workers`` processes (0 = up to 2 on a large store, 1 = in process)."""
    ids = store.sample_ids()
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1) if len(ids) >= 64 else 1
    chunks = _sequence_chunks(ids, settings.name_regex)
    rows: list[dict[str, Any]] = []
    progress = tqdm(total=len(ids), desc="scoring samples", unit="frame", mininterval=2.0)
    if workers == 1:
        _init_worker(settings, gt)
        for chunk in chunks:
            rows.extend(_score_chunk(chunk))
            progress.update(len(chunk))
    else:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                 initializer=_init_worker, initargs=(settings, gt, True)) as pool:
            for chunk_rows in pool.map(_score_chunk, chunks):
                for row in chunk_rows:
                    if "_gt_packed" in row:
                        gt.remember(row["sample_id"], row.pop("_gt_packed"))
                rows.extend(chunk_rows)
                progress.update(len(chunk_rows))
    progress.close()
    return rows


def metrics_table(rows: list[dict[str, Any]], pixel_spacing_mm: float | None = None) -> pd.DataFrame:
    """The contract's table (docs/contracts.md) from scored rows; extra count columns follow the contract ones."""
    columns = list(TABLE_COLUMNS)
    if pixel_spacing_mm is not None:
        columns += ["hd95_mm", "assd_mm"]
    columns += EXTRA_COLUMNS
    plain = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    table = pd.DataFrame(plain).reindex(columns=columns)
    table["has_gt"] = table["has_gt"].fillna(False).astype(bool)
    table["frame"] = table["frame"].fillna(0).astype(int)
    for column in columns:
        if column not in ("sample_id", "patient", "sequence", "frame", "status", "has_gt", "has_probability", "image"):
            table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    return table


# --- summaries ----------------------------------------------------------------------------------------------------


def intervals(table: pd.DataFrame, metrics: Sequence[str], n_boot: int = 1000, seed: int = 0,
              min_patients: int = stats.MIN_PATIENTS) -> dict[str, stats.Interval]:
    """Per metric: the per-frame mean of the scored samples with its patient-cluster bootstrap interval."""
    scored = table[table["has_gt"]]
    return {metric: stats.patient_bootstrap_ci(scored[metric].astype(float), scored["patient"], scored["sequence"],
                                               n_resamples=n_boot, seed=seed, min_patients=min_patients)
            for metric in metrics}


def summary_metrics(table: pd.DataFrame) -> list[str]:
    """The summary's metrics present in ``table`` (mm distances after the pixel ones; all-NaN columns dropped)."""
    metrics = [m for m in SUMMARY_METRICS if m in table.columns]
    return [m for m in metrics if table[m].notna().any() or m not in ("brier", "average_precision")]


def summary_table(table: pd.DataFrame, n_boot: int = 1000, metrics: Sequence[str] | None = None,
                  min_patients: int = stats.MIN_PATIENTS,
                  found: dict[str, stats.Interval] | None = None) -> pd.DataFrame:
    """One row per metric: macro mean with patient-bootstrap CI (or why none), the numbers of patients, sequences
    and frames it rests on, median, micro (pooled pixels), NaN and inf counts."""
    scored = table[table["has_gt"]]
    metrics = list(metrics or summary_metrics(table))
    sums = scored[["tp", "fp", "fn", "tn"]].sum()
    pooled = vm.pooled_metrics(sums["tp"], sums["fp"], sums["fn"], sums["tn"])
    found = found or intervals(table, metrics, n_boot=n_boot, min_patients=min_patients)
    rows = []
    for metric in metrics:
        values = scored[metric].astype(float)
        interval = found[metric]
        rows.append({
            "metric": metric,
            "better": "higher" if SUMMARY_METRICS.get(metric, True) else "lower",
            "mean (macro)": interval.estimate,
            "ci95_low": interval.low if interval.shown else math.nan,
            "ci95_high": interval.high if interval.shown else math.nan,
            "patients": interval.counts.n_patients,
            "sequences": interval.counts.n_sequences,
            "frames": interval.counts.n_frames,
            "median": float(values.dropna().median()) if values.notna().any() else math.nan,
            "micro (pooled)": pooled.get(metric, math.nan),
            "n_nan": int(values.isna().sum()),
            "n_inf": int(np.isinf(values).sum()),
            "no CI because": interval.withheld,
        })
    return pd.DataFrame(rows).set_index("metric")


def patient_values(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per-patient means of finite values (what a report shows instead of a CI when there are too few patients)."""
    scored = table[table["has_gt"]]
    out = {}
    for metric in metrics:
        values = scored[metric].astype(float).where(np.isfinite(scored[metric].astype(float)))
        out[metric] = values.groupby(scored["patient"]).mean()
    frame = pd.DataFrame(out)
    frame.insert(0, "frames", scored.groupby("patient").size())
    frame.index.name = "patient"
    return frame


def threshold_choice(rows: list[dict[str, Any]]) -> stats.ThresholdChoice | None:
    """Leave-one-patient-out threshold for per-frame Dice from the sweep counts; None without probability maps."""
    swept = [row for row in rows if "_sweep" in row and row.get("gt_area", 0) > 0]
    if not swept:
        return None
    scores = stats.dice_from_sweep(np.stack([row["_sweep"] for row in swept]))
    return stats.cv_threshold(scores, [row["patient"] for row in swept], SWEEP_THRESHOLDS,
                              [row["sequence"] for row in swept])


def sweep_frames(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table of per-frame TP / FP / FN at every sweep threshold (``analysis/threshold_sweep.parquet``).

    Stage 04 reads it to compare runs at each one's cross-validated threshold without re-scoring.
    """
    records = []
    for row in rows:
        if "_sweep" not in row:
            continue
        for threshold, (tp, fp, fn) in zip(SWEEP_THRESHOLDS, row["_sweep"], strict=True):
            records.append((row["sample_id"], row["patient"], row["sequence"], float(threshold),
                            int(tp), int(fp), int(fn)))
    return pd.DataFrame(records, columns=["sample_id", "patient", "sequence", "threshold", "tp", "fp", "fn"])


def temporal_consistency(rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    """Per sequence with ≥ 2 scored frames: mean frame-to-frame IoU of predictions (as scored) and of the GT.

    Consecutive *stored* frames of a sequence are paired (a gap in the frame numbers is not bridged by anything).
    """
    pairs = [row for row in rows if "_iou_next_pred" in row]
    if not pairs:
        return None
    frame = pd.DataFrame({"patient": [r["patient"] for r in pairs], "sequence": [r["sequence"] for r in pairs],
                          "pred_iou": [r["_iou_next_pred"] for r in pairs],
                          "gt_iou": [r["_iou_next_gt"] for r in pairs]})
    table = frame.groupby(["patient", "sequence"]).agg(frames=("pred_iou", "size"), pred_iou=("pred_iou", "mean"),
                                                       gt_iou=("gt_iou", "mean"))
    table["frames"] += 1  # n pairs come from n + 1 frames
    table["pred - gt"] = table["pred_iou"] - table["gt_iou"]
    return table


def pooled_calibration(rows: list[dict[str, Any]]) -> vm.Calibration | None:
    """Calibration of all scored frames' probability maps together; None without probability maps."""
    histograms = [row["_hist"] for row in rows if "_hist" in row]
    return vm.calibration(np.sum(histograms, axis=0)) if histograms else None


def fragment_summary(table: pd.DataFrame, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spurious components over the run: total, frames with any, size distribution, the largest and where."""
    scored = table[table["has_gt"]]
    sizes = [size for row in rows if row.get("has_gt") for size in row.get("_spurious_sizes", ())]
    largest = scored.loc[scored["largest_spurious_px"].idxmax()] if len(scored) and scored[
        "largest_spurious_px"].notna().any() else None
    return {
        "spurious_components": int(scored["spurious_components"].fillna(0).sum()),
        "frames_with_spurious": int((scored["spurious_components"].fillna(0) > 0).sum()),
        "frames": len(scored),
        "size_histogram": vm.fragment_size_histogram(sizes),
        "largest_spurious_px": None if largest is None else int(largest["largest_spurious_px"]),
        "largest_spurious_sample": None if largest is None else str(largest["sample_id"]),
    }


GROUP_METRICS = ("dice", "cldice", "nsd", "recall_thin", "betti0_error")  # the per-patient / per-sequence means


def group_table(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per-patient or per-sequence table: frames, failures, mean metrics (HD95 as median: it has infs)."""
    def aggregate(group: pd.DataFrame) -> pd.Series:
        scored = group[group["has_gt"]]
        out = {
            "frames": len(group),
            "scored": len(scored),
            "no_seg": int((group["status"] == "no_seg").sum()),
            "error": int((group["status"] == "error").sum()),
        }
        for metric in GROUP_METRICS:
            finite = scored[metric][np.isfinite(scored[metric])]
            out[metric] = float(finite.mean()) if len(finite) else math.nan
        out["hd95 (median)"] = float(scored["hd95"].median()) if scored["hd95"].notna().any() else math.nan
        out["hd95 inf"] = int(np.isinf(scored["hd95"]).sum())
        return pd.Series(out)

    grouped = table.groupby(list(by), sort=True)
    rows = {key: aggregate(group) for key, group in grouped}
    result = pd.DataFrame.from_dict(rows, orient="index")
    result.index = pd.MultiIndex.from_tuples(result.index, names=list(by)) if len(by) > 1 else pd.Index(
        [k[0] if isinstance(k, tuple) else k for k in result.index], name=by[0])
    for column in ("frames", "scored", "no_seg", "error", "hd95 inf"):
        result[column] = result[column].astype(int)
    return result.sort_values("dice", na_position="first")


def threshold_sweep(rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    """Dice (macro and pooled) and clDice (macro, subsample) per threshold; None without probability maps."""
    sweeps = [row["_sweep"] for row in rows if "_sweep" in row and row.get("gt_area", 0) > 0]
    if not sweeps:
        return None
    counts = np.stack(sweeps)  # (samples, thresholds, 3)
    tp, fp, fn = counts[..., 0].astype(float), counts[..., 1].astype(float), counts[..., 2].astype(float)
    macro = np.mean(2 * tp / np.maximum(2 * tp + fp + fn, 1), axis=0)
    pooled_tp, pooled_fp, pooled_fn = tp.sum(0), fp.sum(0), fn.sum(0)
    frame = pd.DataFrame({
        "threshold": SWEEP_THRESHOLDS,
        "dice": macro,
        "dice (pooled)": 2 * pooled_tp / np.maximum(2 * pooled_tp + pooled_fp + pooled_fn, 1),
        "precision (pooled)": pooled_tp / np.maximum(pooled_tp + pooled_fp, 1),
        "recall (pooled)": pooled_tp / np.maximum(pooled_tp + pooled_fn, 1),
        "n_samples": len(sweeps),
    })
    cl = [row["_cldice_sweep"] for row in rows if "_cldice_sweep" in row and row.get("gt_area", 0) > 0]
    frame["cldice"] = math.nan
    if cl:
        means = np.nanmean(np.stack(cl), axis=0)
        for t, value in zip(CLDICE_SWEEP_THRESHOLDS, means, strict=True):
            frame.loc[np.isclose(frame["threshold"], t), "cldice"] = value
    frame["cldice_samples"] = len(cl)
    return frame


# --- sanity flags -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A sanity finding shown in the banner at the top of the report."""

    level: str  # "error" | "warning"
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The ``summary.json`` form."""
        return {"level": self.level, "code": self.code, "message": self.message}


def sanity_flags(
    table: pd.DataFrame,
    settings: AnalysisParams,
    predictions_hash: str | None = None,
    other_runs: dict[str, str] | None = None,
    gt_warnings: Sequence[str] = (),
) -> list[Flag]:
    """Findings that make the numbers untrustworthy (errors) or need a look (warnings)."""
    flags: list[Flag] = []
    n = len(table)
    scored = table[table["has_gt"]]
    if n == 0:
        return [Flag("error", "empty_store", "the prediction store holds no samples")]
    if len(scored) == 0:
        flags.append(Flag("error", "nothing_scored", "no sample has ground truth: check 'data.annotations'"))
    else:
        identical = int(((scored["fp"] == 0) & (scored["fn"] == 0) & (scored["gt_area"] > 0)).sum())
        if identical >= max(1, IDENTICAL_TO_GT_SHARE * len(scored)):
            flags.append(Flag("error", "predictions_equal_gt",
                              f"{identical} of {len(scored)} predictions are pixel-identical to the ground truth: "
                              "is the store holding the annotations instead of model output?"))
        perfect = int((scored["dice"] >= 1.0).sum())
        if perfect >= 3 and perfect >= SUSPICIOUS_PERFECT_SHARE * len(scored):
            flags.append(Flag("warning", "suspicious_perfect_dice",
                              f"Dice = 1.0 on {perfect} of {len(scored)} samples ({perfect / len(scored):.0%}); "
                              "real vessel segmentations are rarely perfect"))
    if (table["pred_area"].fillna(0) == 0).all() and len(scored):
        flags.append(Flag("error", "all_predictions_empty", f"all {n} predictions are empty masks"))
    for status, limit in (("error", settings.max_error_rate), ("no_seg", settings.max_no_seg_rate)):
        count = int((table["status"] == status).sum())
        if count / n > limit:
            flags.append(Flag("error" if status == "error" else "warning", f"{status}_rate",
                              f"{count} of {n} samples ({count / n:.1%}) have status '{status}' "
                              f"(limit {limit:.0%}); they are scored as empty predictions"))
    for run, other_hash in (other_runs or {}).items():
        if predictions_hash and other_hash == predictions_hash:
            flags.append(Flag("error", "same_predictions_as_other_run",
                              f"predictions are identical to run '{run}' (hash {predictions_hash[:12]}): two "
                              "checkpoints giving the same masks usually means a conversion that dropped the "
                              "fine-tuned weights"))
    missing_gt = int((~table["has_gt"]).sum())
    if missing_gt:
        flags.append(Flag("warning", "frames_without_gt",
                          f"{missing_gt} of {n} predicted frames have no annotation; they are listed, not scored"))
    for message in gt_warnings:
        if "no annotation" in message:
            continue  # already said above, from the table's point of view
        flags.append(Flag("warning", "ground_truth", message))
    return flags


def other_run_hashes(run_dir: Path, compare_to: Sequence[Path]) -> dict[str, str]:
    """``predictions_hash`` of the neighbouring run folders and of ``analysis.compare_to`` (their summary.json)."""
    hashes = {}
    for folder in RunFolder(run_dir).neighbours(compare_to):
        try:
            value = (folder.summary() or {}).get("predictions_hash")
        except VesselnbError:
            continue  # a neighbour's damaged summary is its own problem, not this run's
        if value:
            hashes[folder.name] = str(value)
    return hashes


# --- figures ------------------------------------------------------------------------------------------------------


def histogram_bins(values: np.ndarray) -> np.ndarray:
    """Bin edges for ``values`` chosen from the data, never more bins than values.

    numpy's ``"auto"`` rule (the larger of Sturges and Freedman–Diaconis) capped at one bin per value; integer-valued
    data (Betti errors, counts) get one bin per integer when that many bins fit under the cap, so no bin straddles two
    integers and leaves gaps.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return np.array([0.0, 1.0])
    low, high = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and high - low + 1 <= values.size:
        return np.arange(low - 0.5, high + 1.5)
    edges = np.histogram_bin_edges(values, bins="auto")
    if len(edges) - 1 > values.size:
        edges = np.histogram_bin_edges(values, bins=values.size)
    return edges


HISTOGRAM_METRICS = ("dice", "cldice", "nsd", "hd95", "recall_thin", "betti0_error")
MEAN_COLOUR, MEDIAN_COLOUR = "#d55e00", "#000000"


def histograms(table: pd.DataFrame, metrics: Sequence[str] = HISTOGRAM_METRICS,
               labels: dict[str, str] | None = None) -> Figure:
    """Distribution of per-frame metrics over the scored frames, with the mean and the median marked.

    Bins come from the data (:func:`histogram_bins`); NaN / inf values cannot be binned and are counted under each
    panel. ``labels`` overrides a metric's heading (e.g. with the NSD tolerance or the width-bin limits).
    """
    scored = table[table["has_gt"]]
    rows = math.ceil(len(metrics) / 3)
    fig = Figure(figsize=(3.4 * 3, 2.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 3)).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        info = vm.metric_info(metric)
        values = scored[metric].astype(float)
        finite = values[np.isfinite(values)].to_numpy()
        left_out = [f"{count} {what}" for count, what in ((int(values.isna().sum()), "NaN"),
                                                          (int(np.isinf(values).sum()), "inf")) if count]
        ax.set_title((labels or {}).get(metric) or info.heading(), fontsize=8)
        ax.set_xlabel((info.unit or "ratio") + f" · {len(finite)} frames"
                      + (f" ({', '.join(left_out)} not shown)" if left_out else ""), fontsize=7)
        ax.set_ylabel("frames", fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of frames: no 2.5 ticks
        ax.tick_params(labelsize=7)
        if not len(finite):
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        ax.hist(finite, bins=histogram_bins(finite), color="#4477aa", edgecolor="white", linewidth=0.5)
        ax.axvline(float(np.mean(finite)), color=MEAN_COLOUR, lw=1.2)
        ax.axvline(float(np.median(finite)), color=MEDIAN_COLOUR, lw=1.2, ls="--")
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    fig.legend(handles=[Line2D([], [], color=MEAN_COLOUR, lw=1.2, label="mean per frame"),
                        Line2D([], [], color=MEDIAN_COLOUR, lw=1.2, ls="--", label="median per frame")],
               loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    return fig


def sweep_figure(sweep: pd.DataFrame, current: float, choice: stats.ThresholdChoice | None = None) -> Figure:
    """Dice / clDice vs threshold: the cross-validated threshold, the in-sample optimum (optimistic), the one used.

    The legend sits below the axes, so no curve is drawn over its labels.
    """
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(sweep["threshold"], sweep["dice"], "o-", color="#4477aa", label="Dice, mean per frame")
    ax.plot(sweep["threshold"], sweep["dice (pooled)"], "--", color="#66ccee", label="Dice, pooled pixels")
    if sweep["cldice"].notna().any():
        valid = sweep[sweep["cldice"].notna()]
        ax.plot(valid["threshold"], valid["cldice"], "s-", color="#228833",
                label=f"clDice, mean over {int(sweep['cldice_samples'].iloc[0])} frames")
    best = sweep.loc[sweep["dice"].idxmax()]
    ax.axvline(best["threshold"], color="#cc6677", lw=1.2, ls="--", zorder=3,  # on top when the two coincide
               label=f"in-sample best {best['threshold']:.2f} (optimistic): mean Dice {hr.number(best['dice'])}")
    if choice is not None:
        ax.axvline(choice.recommended, color="#000000", lw=1.5,
                   label=f"cross-validated {choice.recommended:.2f}: out-of-fold mean Dice "
                         f"{hr.number(choice.out_of_fold)}")
    ax.axvline(current, color="#999999", lw=1.2, ls=":", label=f"used {current:.2f}")
    ax.set_xlabel("threshold on the probability map")
    ax.set_ylabel("score (ratio, ↑ better)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"threshold sweep over {int(sweep['n_samples'].iloc[0])} frames (in-sample)", fontsize=9)
    fig.legend(loc="outside lower center", ncols=2, fontsize=7.5, frameon=False)
    return fig


def calibration_figure(calibration: vm.Calibration) -> Figure:
    """Reliability diagram (pixel fraction of vessel against mean probability per bin) and the PR curve."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    bins = calibration.bins[calibration.bins["n_pixels"] > 0]
    left.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    left.plot(bins["mean_probability"], bins["vessel_fraction"], "o-", color="#4477aa", label="this run (pixels)")
    left.legend(fontsize=7, loc="upper left")
    left.set_xlabel("mean predicted probability")
    left.set_ylabel("fraction of vessel pixels")
    left.set_title(f"reliability: ECE {hr.number(calibration.ece)}, Brier {hr.number(calibration.brier)} "
                   "(both ↓ better)", fontsize=9)
    right.plot(calibration.recall, calibration.precision, color="#4477aa")
    right.set_xlabel("recall")
    right.set_ylabel("precision")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.set_title(f"pixel precision-recall: AP {hr.number(calibration.average_precision)} (↑ better)", fontsize=9)
    return fig


def temporal_figure(temporal: pd.DataFrame, names: Pseudonyms | None = None) -> Figure:
    """Per sequence: mean frame-to-frame IoU of the predictions beside the same for the ground truth.

    ``names`` labels the sequences by pseudonym (None: by patient name).
    """
    fig = Figure(figsize=(max(5.0, 0.3 * len(temporal) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(temporal))
    ax.bar(positions - 0.2, temporal["gt_iou"], 0.4, label="ground truth", color="#999")
    ax.bar(positions + 0.2, temporal["pred_iou"], 0.4, label="prediction", color="#4477aa")
    labels = [f"{p if names is None else names.patient(p)}/{q}" for p, q in temporal.index]
    ax.set_xticks(positions, labels, rotation=90, fontsize=6)
    ax.set_ylabel("IoU of consecutive frames\n(mean per sequence)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("temporal consistency within each sequence (consecutive stored frames)", fontsize=9)
    return fig


# --- the report object --------------------------------------------------------------------------------------------

WIDTH_BIN_METRICS = {f"recall_{name}": name for name in vm.WIDTH_BIN_NAMES}


def metric_heading(metric: str, statistic: str = "", nsd_tolerance_px: float | None = None,
                   width_bins_px: Sequence[float] | None = None) -> str:
    """``metrics.metric_info(metric).heading(statistic)``, with NSD's tolerance and the width-bin limits in the label
    when given (``NSD at 2 px (mean per frame, ↑ better)``, ``Recall, thin vessels ≤ 2 px wide (...)``)."""
    info = vm.metric_info(metric)
    label = info.label
    if metric == "nsd" and nsd_tolerance_px is not None:
        label = f"NSD at {nsd_tolerance_px:g} px"
    elif metric in WIDTH_BIN_METRICS and width_bins_px is not None:
        low, high = (float(v) for v in width_bins_px)
        label += {"thin": f" ≤ {low:g} px wide", "medium": f" {low:g}–{high:g} px wide",
                  "thick": f" > {high:g} px wide"}[WIDTH_BIN_METRICS[metric]]
    return replace(info, label=label).heading(statistic)


def spread_ranked(ranked: pd.DataFrame, k: int) -> pd.DataFrame:
    """The first ``k`` rows of ``ranked`` spread over sequences and patients, in ranked order within each round.

    Consecutive frames of one sequence are near-duplicates, so a plain top-k shows one sequence k times. Here every
    sequence's first-ranked frame comes before any sequence's second, and within a round patients take turns (each
    patient's first sequence, then each one's second, ...).
    """
    if ranked.empty or k <= 0:
        return ranked.head(0)
    position = np.arange(len(ranked))
    nth_in_sequence = ranked.groupby(["patient", "sequence"], sort=False).cumcount().to_numpy()
    nth_of_patient = pd.Series(position).groupby([nth_in_sequence, ranked["patient"].to_numpy()],
                                                 sort=False).cumcount().to_numpy()
    order = np.lexsort((position, nth_of_patient, nth_in_sequence))  # the last key sorts first
    return ranked.iloc[order[:k]]


def _section(*parts: str) -> Any:
    """Parts of the report as one object a notebook cell displays (an IPython HTML object; ``.data`` is the HTML)."""
    from IPython.display import HTML

    return HTML(hr.join(*parts))


def table_html(frame: pd.DataFrame, index: bool = False, caption: str | None = None) -> str:
    """A DataFrame as the report's tables are drawn: ``htmlrepr.table`` with body cells that do not wrap, so a
    sequence id such as ``1-4_1_CF364A16`` is never broken at its hyphen while long column headings wrap, and row
    labels (the index) aligned left."""
    drawn = hr.table(frame, index=index, caption=caption)
    head, tbody, body = drawn.partition("<tbody>")
    body = body.replace("<td", '<td style="white-space:nowrap"')
    body = body.replace("<th", '<th style="white-space:nowrap;text-align:left"')  # row labels (lab CSS: right)
    return head + tbody + body


def _figure_html(path: Path | None, caption: str) -> str:
    """A saved figure inlined (the report file stands alone), or a line saying there is none."""
    if path is None or not Path(path).is_file():
        return hr.muted(f"No figure for this run ({caption.split(':')[0]}).")
    return hr.figure(Path(path).read_bytes(), caption=caption)


def _left_out(n_nan: int, n_inf: int) -> str:
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "inf")) if n]
    return " · ".join(parts) if parts else "0"


@dataclass
class AnalysisReport:
    """What stage 03 returns: tables, figures and flags; ``display(report)`` shows the banner and headline.

    The ``*_section()`` methods return the report's other parts ready to display (notebook 03 shows one per cell);
    the plain methods (``per_patient()``, ``ranked()`` ...) return the data as DataFrames.
    """

    run_name: str
    run_dir: Path
    table: pd.DataFrame
    summary: dict[str, Any]
    flags: list[Flag]
    summary_frame: pd.DataFrame
    sweep: pd.DataFrame | None
    gt: GroundTruth
    threshold: float
    gallery_k: int
    figures: dict[str, Path] = field(default_factory=dict)
    threshold_cv: stats.ThresholdChoice | None = None
    calibration: vm.Calibration | None = None
    temporal: pd.DataFrame | None = None
    min_patients: int = stats.MIN_PATIENTS
    names: Pseudonyms | None = None  # patient pseudonyms for figures and tables; None shows the names
    nsd_tolerance_px: float = 2.0
    width_bins_px: tuple[float, float] = (2.0, 5.0)
    # how the report draws a DataFrame; an attribute so the sample browser (imported from here) can use it
    table_html = staticmethod(table_html)

    @property
    def analysis_dir(self) -> Path:
        """``<run_dir>/analysis``."""
        return RunFolder(self.run_dir).analysis_dir

    def heading(self, metric: str, statistic: str = "") -> str:
        """The metric's heading with this run's NSD tolerance and width bins (:func:`metric_heading`)."""
        return metric_heading(metric, statistic, self.nsd_tolerance_px, self.width_bins_px)

    # -- the top of the report: flags, headline, summary --
    def flags_html(self) -> str:
        """The sanity banner: red for errors, amber for warnings, green when nothing was found."""
        if not self.flags:
            return hr.banner("Sanity checks passed: no flags", level="ok")
        return "".join(hr.banner(f"{flag.level.upper()} {flag.code}", level=flag.level, lines=[flag.message])
                       for flag in sorted(self.flags, key=lambda f: f.level != "error"))

    def _giou_shown_once(self) -> bool:
        """gIoU differs from the mean IoU only on frames with an empty ground truth; without any it is shown once."""
        scored = self.table[self.table["has_gt"]]
        return not bool((scored["gt_area"] == 0).any())

    def headline_rows(self) -> list[tuple[str, str]]:
        """(heading, value) of each headline number, as the index prints them; gIoU folded into IoU when equal."""
        values = self.summary["headline"]
        once = self._giou_shown_once()
        rows = []
        for key, value in values.items():
            if key == "giou" and once:
                continue
            label = hl.heading(key, self.nsd_tolerance_px)
            if key == "iou" and once:
                label = label.replace("IoU (", "IoU = Sa2VA gIoU (", 1)
            rows.append((label, hr.number(value)))
        return rows

    def headline_html(self) -> str:
        """The counts and the headline numbers, each with its statistic, unit and direction."""
        s = self.summary
        counts = ", ".join(f"{v} {k}" for k, v in s["status_counts"].items())
        notes = [f"HD95 is {hl.number('hd95').why}; the table below also gives its mean over the finite "
                 "values.",
                 "cIoU (Sa2VA) is the IoU of all frames' pixels pooled: Σ intersection / Σ union, so large masks "
                 "weigh more."]
        if self._giou_shown_once():
            notes.append("gIoU (Sa2VA) is the mean per-frame IoU with an empty ground truth and an empty prediction "
                         "scoring 1; no frame here has an empty ground truth, so it equals the mean IoU.")
        else:
            notes.append("gIoU (Sa2VA) is the mean per-frame IoU with an empty ground truth and an empty prediction "
                         "scoring 1; the mean IoU leaves frames with an empty ground truth out (MONAI).")
        return hr.join(
            hr.heading(f"{self.run_name}: {s['n_samples']} frames ({counts}), {s['n_scored']} scored "
                       f"at threshold {self.threshold:g}"),
            hr.table(self.headline_rows()), hr.notes(notes))

    def counts_html(self) -> str:
        """How many patients, sequences and frames the intervals rest on, and why there are none below the minimum."""
        s = self.summary["units"]
        line = (f"Intervals resample patients: {s['n_patients']} patients · {s['n_sequences']} sequences · "
                f"{s['n_frames']} scored frames.")
        if s["n_patients"] < self.min_patients:
            return hr.banner(f"No confidence intervals: {s['n_patients']} patients are fewer than the minimum of "
                             f"{self.min_patients} (analysis.min_patients)", level="warning",
                             lines=[line, "The per-patient values below show the spread instead."])
        return hr.muted(line)

    def summary_table(self) -> pd.DataFrame:
        """Macro (with patient-bootstrap CI) and micro values, with NaN / inf counts: the data behind the report."""
        return self.summary_frame

    def summary_display(self) -> pd.DataFrame:
        """The summary table as the report shows it: one row per metric (labelled with unit and direction), each
        column a statistic, numbers formatted; the CI column only when some metric has an interval."""
        frame = self.summary_frame
        any_ci = bool(frame["ci95_low"].notna().any())
        rows = []
        for metric, r in frame.iterrows():
            row = {"metric (unit, direction)": self.heading(str(metric)),
                   "mean per frame": hr.number(r["mean (macro)"])}
            if any_ci:
                row["95 % CI, patients resampled"] = (
                    f"{hr.number(r['ci95_low'])} – {hr.number(r['ci95_high'])}" if pd.notna(r["ci95_low"])
                    else f"none: {r['no CI because'] or 'not computable'}")
            row["median per frame"] = hr.number(r["median"])
            row["frames · patients"] = f"{int(r['frames'])} · {int(r['patients'])}"
            row["left out (NaN · inf)"] = _left_out(int(r["n_nan"]), int(r["n_inf"]))
            rows.append(row)
        shown = pd.DataFrame(rows).set_index("metric (unit, direction)")
        shown.index.name, shown.columns.name = None, "metric (unit, direction)"  # one header row, labels at left
        return shown

    def pooled_html(self) -> str:
        """Pooled-pixel (micro) values where they exist, and why the other metrics have none."""
        micro = self.summary.get("micro") or {}
        if not micro:
            return hr.muted("No pooled-pixel values: no frame was scored.")
        rows = [(self.heading(m, "pooled pixels") + (" = Sa2VA cIoU" if m == "iou" else ""), hr.number(v))
                for m, v in micro.items()]
        others = [vm.metric_info(m).label for m in self.summary_frame.index if m not in micro]
        return hr.join(hr.table(rows, caption="Pooled over all pixels of all scored frames (micro)"),
                       hr.muted("Only pixel-count metrics pool (sums of TP / FP / FN / TN over frames). "
                                f"{', '.join(others)} are defined per frame (distances, skeletons, components, "
                                "probabilities), so they have no pooled value." if others else ""))

    def reading_notes(self) -> list[str]:
        """How to read the summary: what mean / median are over, NaN and inf, width bins, NSD tolerance, CIs."""
        low, high = self.width_bins_px
        notes = [
            "Means are over the frames where the metric has a finite value; medians over the frames where it has a "
            "value (an inf ranks last). NaN (undefined: e.g. the precision of an empty prediction, a width bin the "
            "ground truth has no centre line in) and inf (HD95 / ASSD of a frame with one mask empty) are counted "
            "in the last column.",
            f"Vessel width bins (analysis.width_bins_px = [{low:g}, {high:g}]): thin ≤ {low:g} px, medium "
            f"{low:g}–{high:g} px, thick > {high:g} px wide, measured along the ground-truth centre line (width = "
            "2 × distance to the background − 1).",
            f"NSD: the share of both masks' boundary pixels within {self.nsd_tolerance_px:g} px of the other mask's "
            "boundary (analysis.nsd_tolerance_px).",
            "HD95 and ASSD are in pixels of the annotated frame; Betti errors count components (β0) and loops (β1); "
            "areas are in pixels.",
        ]
        if self.summary_frame["ci95_low"].notna().any():
            notes.append(f"95 % CIs are BCa bootstraps ({self.summary['bootstrap']['n_resamples']} resamples) of "
                         "whole patients: frames of one patient are not independent.")
        return notes

    def _repr_html_(self) -> str:
        parts = [self.flags_html(), self.headline_html(), self.counts_html(),
                 table_html(self.summary_display(), index=True, caption="Every metric per frame"),
                 hr.notes(self.reading_notes(), title="How to read the table"), self.pooled_html()]
        if self.summary["units"]["n_patients"] < self.min_patients:
            parts.append(table_html(self.patient_values_display(), index=True,
                                  caption="Per-patient values (instead of intervals): mean per frame of each patient"))
        return hr.join(*parts)

    def patient_values(self) -> pd.DataFrame:
        """Per-patient means of every summary metric, one column per patient and one row per metric: shown only
        below the minimum number of patients, so the columns are few, while ~20 metric columns overflowed a page."""
        return pseudonym.frame(patient_values(self.table, list(self.summary_frame.index)), self.names).T

    def patient_values_display(self) -> pd.DataFrame:
        """:meth:`patient_values` with metric headings and formatted numbers (frame counts as integers)."""
        values = self.patient_values()
        shown = pd.DataFrame({column: [str(int(v)) if name == "frames" else hr.number(v)
                                       for name, v in values[column].items()] for column in values.columns},
                             index=["frames scored" if m == "frames" else self.heading(str(m), "mean")
                                    for m in values.index])
        shown.columns.name = "patient"
        return shown

    # -- the other sections, one per notebook cell --
    def ground_truth_section(self) -> Any:
        """What reading the annotations found (rescaled, clipped, missing ...); empty lists left out."""
        info = self.gt.report.as_dict()
        info.pop("warnings")
        rows = []
        for key, value in info.items():
            if isinstance(value, (list, dict, tuple)) and not value:
                continue
            if key == "source" and value:
                value = Path(str(value)).name  # the file's name: a path of the user's machine means nothing here
            rows.append((key.replace("_", " "), ", ".join(map(str, value)) if isinstance(value, (list, tuple))
                         else str(value)))
        return _section(hr.table(rows))

    def ground_truth_report(self) -> pd.DataFrame:
        """What reading the annotations found (rescaled, clipped, missing ...), as a two-column table."""
        info = self.gt.report.as_dict()
        info.pop("warnings")
        return pd.DataFrame({"value": [str(v) for v in info.values()]}, index=list(info.keys()))

    def per_patient(self) -> pd.DataFrame:
        """One row per patient, worst Dice first."""
        return pseudonym.frame(group_table(self.table, ["patient"]), self.names)

    def per_sequence(self) -> pd.DataFrame:
        """One row per (patient, sequence), worst Dice first."""
        return pseudonym.frame(group_table(self.table, ["patient", "sequence"]), self.names)

    def _group_display(self, frame: pd.DataFrame) -> pd.DataFrame:
        columns = {"frames": "frames", "scored": "scored", "no_seg": "no_seg", "error": "error",
                   "hd95 (median)": self.heading("hd95", "median"), "hd95 inf": "HD95 = inf (frames)"}
        columns.update({m: self.heading(m, "mean") for m in GROUP_METRICS})
        return hr.numbers(frame).rename(columns=columns)

    def per_patient_section(self) -> Any:
        """:meth:`per_patient` as the report shows it (headings with statistic and unit, 3 decimals for ratios)."""
        return _section(table_html(self._group_display(self.per_patient()), index=True),
                        hr.muted("Means and medians are over each patient's scored frames with a finite value; "
                                 "no_seg / error count frames by their inference status (scored as empty masks)."))

    def per_sequence_section(self) -> Any:
        """:meth:`per_sequence` as the report shows it."""
        return _section(table_html(self._group_display(self.per_sequence()), index=True))

    def histograms(self) -> Figure:
        """Metric histograms (NaN / inf counted under each panel)."""
        return histograms(self.table, labels={m: self.heading(m) for m in HISTOGRAM_METRICS})

    def histograms_section(self) -> Any:
        """The saved histogram figure with what it shows."""
        n = int(self.table["has_gt"].sum())
        return _section(_figure_html(self.figures.get("histograms"),
                                     f"Per-frame values over the {n} scored frames; bins chosen from the data "
                                     "(numpy's 'auto' rule, at most one bin per value)."))

    def threshold_sweep_figure(self) -> Figure | None:
        """Dice / clDice vs threshold, or None when the store has no probability maps."""
        return None if self.sweep is None else sweep_figure(self.sweep, self.threshold, self.threshold_cv)

    def threshold_table(self) -> pd.DataFrame | None:
        """The cross-validated threshold per held-out patient, with the recommendation and the in-sample optimum."""
        choice = self.threshold_cv
        if choice is None:
            return None
        dice = self.heading("dice", "mean per frame")
        rows = [
            {"what": "recommended (leave-one-patient-out, median of folds)", "threshold": choice.recommended,
             dice: choice.out_of_fold, "scored on": "held-out patients (out-of-fold)"},
            {"what": "in-sample best (optimistic: chosen on the frames it is scored on)",
             "threshold": choice.in_sample_best, dice: choice.in_sample_score, "scored on": "all frames"},
            {"what": "used for the metrics above", "threshold": self.threshold,
             dice: self.summary_frame.loc["dice", "mean (macro)"], "scored on": "all frames"},
        ]
        return pd.DataFrame(rows).set_index("what")

    def sweep_display(self) -> pd.DataFrame | None:
        """The sweep table as the report shows it: clDice only where it was computed (blank elsewhere)."""
        if self.sweep is None:
            return None
        sweep = self.sweep
        n_cl = int(sweep["cldice_samples"].iloc[0])
        shown = pd.DataFrame({
            "threshold": [f"{t:.2f}" for t in sweep["threshold"]],
            self.heading("dice", "mean per frame"): sweep["dice"].map(hr.number),
            self.heading("dice", "pooled pixels"): sweep["dice (pooled)"].map(hr.number),
            self.heading("precision", "pooled pixels"): sweep["precision (pooled)"].map(hr.number),
            self.heading("recall", "pooled pixels"): sweep["recall (pooled)"].map(hr.number),
        })
        if n_cl:
            shown[self.heading("cldice", f"mean over {n_cl} frames")] = [
                "" if pd.isna(v) else hr.number(v) for v in sweep["cldice"]]
        return shown

    def threshold_section(self) -> Any:
        """Cross-validated threshold, the sweep figure and the sweep table; one line when there is no sweep."""
        if self.sweep is None:
            return _section(hr.muted("No probability maps in this store: no threshold sweep."))
        table = self.threshold_table()
        n_cl = int(self.sweep["cldice_samples"].iloc[0])
        explain = (f"clDice is computed at {', '.join(f'{t:g}' for t in CLDICE_SWEEP_THRESHOLDS)} only and on "
                   f"{n_cl} of {int(self.sweep['n_samples'].iloc[0])} frames spread over the patients (skeletons "
                   "are slow): the thresholds between have no clDice." if n_cl else
                   "No clDice sweep: no frame had a probability map.")
        return _section(
            table_html(hr.numbers(table), index=True) if table is not None else "",
            _figure_html(self.figures.get("threshold_sweep"),
                         "Scores against the threshold applied to the probability maps (in-sample)."),
            table_html(self.sweep_display(), caption=f"Sweep over {int(self.sweep['n_samples'].iloc[0])} frames"),
            hr.muted(explain))

    def calibration_table(self) -> pd.DataFrame | None:
        """Reliability bins of the pooled probability maps; ECE, Brier and AP are in ``summary["calibration"]``."""
        return None if self.calibration is None else self.calibration.bins

    def calibration_section(self) -> Any:
        """ECE, Brier and AP of the pooled probability maps, the figure and the reliability bins."""
        if self.calibration is None:
            return _section(hr.muted("No probability maps in this store: no calibration."))
        c = self.summary["calibration"]
        line = (f"Pooled over {c['n_pixels']:,} pixels of {int(self.table['has_gt'].sum())} scored frames: "
                f"expected calibration error {hr.number(c['ece'])} (ECE, ↓ better) · "
                f"{self.heading('brier')} {hr.number(c['brier'])} · "
                f"{self.heading('average_precision')} {hr.number(c['average_precision'])}.")
        bins = self.calibration.bins
        shown = pd.DataFrame({
            "probability bin": [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(bins["bin_low"], bins["bin_high"],
                                                                        strict=True)],
            "pixels": [f"{int(n):,}" for n in bins["n_pixels"]],
            "mean predicted probability": bins["mean_probability"].map(hr.number),
            "fraction of vessel pixels": bins["vessel_fraction"].map(hr.number),
        })
        return _section(f"<p>{hr.escape(line)}</p>",
                        _figure_html(self.figures.get("calibration"),
                                     "Reliability: a calibrated model lies on the diagonal. Right: pixel "
                                     "precision against recall over all thresholds."),
                        table_html(shown, caption="Reliability bins"))

    def fragment_sizes(self) -> pd.DataFrame:
        """Spurious (no GT overlap) predicted components by size, over all scored frames."""
        info = self.summary["fragments"]
        return pd.DataFrame({"spurious components": info["size_histogram"]})

    def fragments_section(self) -> Any:
        """Spurious components by size, with the total, the frames they are on and the largest one's frame."""
        f = self.summary["fragments"]
        sizes = self.fragment_sizes().rename_axis("component area (pixels)").reset_index()
        if f["largest_spurious_sample"]:
            where = (f"; the largest has {f['largest_spurious_px']} pixels "
                     f"({viz.shown_id(f['largest_spurious_sample'], self.names)})")
        else:
            where = ""
        line = (f"{f['spurious_components']} spurious components on {f['frames_with_spurious']} of {f['frames']} "
                f"scored frames{where}.")
        return _section(f"<p>{hr.escape(line)}</p>", table_html(sizes))

    def temporal_section(self) -> Any:
        """Frame-to-frame consistency per sequence: the figure and the table (patients pseudonymised)."""
        if self.temporal is None:
            return _section(hr.muted("No sequence has two scored frames: no temporal consistency."))
        table = pseudonym.frame(self.temporal, self.names).sort_index().rename(columns={
            "frames": "frames", "pred_iou": "prediction (mean IoU)", "gt_iou": "ground truth (mean IoU)",
            "pred - gt": "prediction − ground truth"})
        return _section(_figure_html(self.figures.get("temporal"),
                                     "Mean IoU (ratio) of each frame with the next stored frame of its sequence. "
                                     "No better direction: a prediction should be about as steady as the ground "
                                     "truth; much less steady flickers, much steadier may miss real motion."),
                        table_html(hr.numbers(table), index=True))

    # -- samples --
    def ranked(self, metric: str = "dice", worst: bool = True) -> pd.DataFrame:
        """Scored samples sorted by ``metric`` (worst first by default), NaN last."""
        higher_better = SUMMARY_METRICS.get(metric, True)
        ascending = higher_better if worst else not higher_better
        scored = self.table[self.table["has_gt"]]
        return scored.sort_values(metric, ascending=ascending, na_position="last", kind="stable")

    def spread(self, metric: str = "dice", worst: bool = True, k: int | None = None) -> pd.DataFrame:
        """The worst (or best) ``k`` samples spread over sequences and patients (:func:`spread_ranked`)."""
        return spread_ranked(self.ranked(metric, worst=worst), k or self.gallery_k)

    def sample_images(self, sample_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame, GT, prediction as scored) for one sample."""
        from vesselnb.store import PredictionStore

        row = self.table.set_index("sample_id").loc[sample_id]
        store = PredictionStore(RunFolder(self.run_dir).predictions_dir)
        gt = self.gt.mask(sample_id)
        pred, _ = _prediction_mask(store, sample_id, store.record(sample_id), gt.shape, self.threshold)
        try:
            frame = viz.load_frame(row["image"])
        except OSError:
            frame = np.zeros((*gt.shape, 3), dtype=np.uint8)
        return frame, gt, pred

    def gallery(self, worst: bool = True, metric: str = "dice", k: int | None = None) -> Figure:
        """The worst (or best) k samples by ``metric``, one per sequence first and patients in turn
        (:meth:`spread`): original / GT / prediction / TP-FP-FN each."""
        chosen = self.spread(metric, worst=worst, k=k)
        rows = []
        for _, row in chosen.iterrows():
            frame, gt, pred = self.sample_images(row["sample_id"])
            rows.append((frame, gt, pred, viz.sample_title(row, self.names)))
        label = vm.metric_info(metric).label
        return viz.gallery(rows, title=f"{'worst' if worst else 'best'} {len(rows)} by {label}: "
                                       "one frame per sequence first, patients in turn")

    def gallery_section(self, worst: bool = True) -> Any:
        """The saved worst (or best) gallery with how its frames were picked."""
        which = "worst" if worst else "best"
        chosen = self.spread(worst=worst)
        patients = chosen["patient"].nunique() if len(chosen) else 0
        sequences = len(chosen.groupby(["patient", "sequence"])) if len(chosen) else 0
        caption = (f"The {len(chosen)} {which} frames by Dice, spread out: the {which} frame of each sequence "
                   "before any second frame of one, and patients in turn, because neighbouring frames of a "
                   f"sequence are near-duplicates ({len(chosen)} frames from {sequences} sequences of {patients} "
                   "patients). Colours: ground truth red, prediction green; errors TP white, FP magenta "
                   "(predicted, not in the ground truth), FN cyan (missed).")
        return _section(_figure_html(self.figures.get(f"{which}_k"), caption))

    def show_figure(self, name: str) -> None:
        """Display a figure saved under ``analysis/figures`` (rendered once by the stage, not again here)."""
        from IPython.display import HTML, Image, display

        path = self.figures.get(name)
        if path is None or not Path(path).is_file():
            display(HTML(f"<i>No figure '{html.escape(name)}' for this run.</i>"))
            return
        display(Image(filename=str(path)))

    def browser(self) -> Any:
        """Interactive sample browser (ipywidgets) in JupyterLab; static figures under papermill."""
        from vesselnb.widgets import SampleBrowser

        return SampleBrowser(self)


# --- the stage ----------------------------------------------------------------------------------------------------


def headline(table: pd.DataFrame) -> dict[str, float]:
    """The index page's numbers: macro Dice / clDice / IoU / NSD, median HD95, Sa2VA's cIoU and gIoU (what each one
    is, for every place that prints it: :data:`vesselnb.headline.HEADLINE`)."""
    scored = table[table["has_gt"]]

    def finite_mean(metric: str) -> float:
        values = scored[metric][np.isfinite(scored[metric])]
        return float(values.mean()) if len(values) else math.nan

    intersections = scored["tp"].to_numpy(dtype=float)
    unions = (scored["tp"] + scored["fp"] + scored["fn"]).to_numpy(dtype=float)
    return {
        "dice": finite_mean("dice"),
        "cldice": finite_mean("cldice"),
        "iou": finite_mean("iou"),
        "hd95": float(scored["hd95"].median()) if scored["hd95"].notna().any() else math.nan,
        "nsd": finite_mean("nsd"),
        "ciou": vm.cumulative_iou(intersections, unions),
        "giou": vm.mean_iou_sa2va(intersections, unions),
    }


def analyze_stage(params: RunParams, run_dir: str | Path, workers: int = 0,
                  names: Pseudonyms | None = None) -> AnalysisReport:
    """Score a run's prediction store against the ground truth; write ``analysis/`` and return the report.

    ``names`` (``pseudonym.for_run(run_dir, params)``) replaces patients in the galleries and tables; None shows them.

    Writes ``analysis/metrics.parquet``, ``analysis/summary.json`` and ``analysis/figures/*.png``.
    """
    from vesselnb.store import PredictionStore

    run_dir = Path(run_dir)
    data, settings = params.data, params.analysis
    if data.annotations is None:
        raise DataError(f"{params.source_file}: 'data.annotations' is required for the error analysis "
                        "(the ground-truth file or folder)")
    if data.images is None:
        raise DataError(f"{params.source_file}: 'data.images' is required for the error analysis")
    try:
        store = PredictionStore(RunFolder(run_dir).predictions_dir)
    except StoreError as exc:
        raise StageError(f"{exc} (stage 03 reads the predictions of stage 02)") from None
    samples = list_samples(data.images, data.image_glob, data.name_regex or DEFAULT_NAME_REGEX, data.limit)
    # With data.limit, annotations of the frames left out are expected, not "frames that do not exist".
    all_frames = None
    if data.limit:
        all_frames = {s.sample_id for s in list_samples(data.images, data.image_glob, data.name_regex or
                                                         DEFAULT_NAME_REGEX)}
    gt = load_ground_truth(data.annotations, samples, data.annotation_format, polygon_fill=data.polygon_fill,
                           frames_in_folder=all_frames)
    scoring = ScoringSettings(
        store_path=str(store.path), threshold=settings.threshold, nsd_tolerance_px=settings.nsd_tolerance_px,
        width_bins_px=(float(settings.width_bins_px[0]), float(settings.width_bins_px[1])),
        pixel_spacing_mm=data.pixel_spacing_mm, name_regex=data.name_regex or DEFAULT_NAME_REGEX,
        sweep=store.has_probability_maps,
        cldice_sweep_ids=frozenset(_spread(store.sample_ids(), CLDICE_SWEEP_MAX_SAMPLES)),
    )
    rows = score_store(store, gt, scoring, workers=workers)
    table = metrics_table(rows, data.pixel_spacing_mm)
    sweep = threshold_sweep(rows)
    predictions_hash = store.predictions_hash()
    others = other_run_hashes(run_dir, settings.compare_to)
    flags = sanity_flags(table, settings, predictions_hash, others, gt.report.warnings)
    not_predicted = sorted(set(gt.sample_ids()) - set(table["sample_id"]))
    if not_predicted:
        flags.append(Flag("warning", "frames_not_predicted",
                          f"{len(not_predicted)} annotated frame(s) have no prediction in the store (inference "
                          f"unfinished or limited?); first: {not_predicted[0]}"))
    if settings.primary_metric not in SUMMARY_METRICS:
        raise ParamsError(f"{params.source_file}: 'analysis.primary_metric' is {settings.primary_metric!r}; "
                          f"choose one of {', '.join(SUMMARY_METRICS)}")
    metrics = summary_metrics(table)
    found = intervals(table, metrics, n_boot=settings.bootstrap_samples, min_patients=settings.min_patients)
    frame = summary_table(table, metrics=metrics, found=found)
    choice = threshold_choice(rows)
    calibration = pooled_calibration(rows)
    scored = table[table["has_gt"]]
    units = stats.count_units(scored["patient"], scored["sequence"])
    status_counts = {status: int((table["status"] == status).sum()) for status in ("ok", "no_seg", "error")}
    summary = {
        "run_name": params.run_name,
        "n_samples": len(table),
        "n_scored": int(table["has_gt"].sum()),
        "status_counts": status_counts,
        "headline": headline(table),
        "ci95": {m: [i.low, i.high] if i.shown else None for m, i in found.items()},
        "intervals": {m: i.as_dict() for m, i in found.items()},
        "units": units.as_dict(),
        "min_patients": settings.min_patients,
        "bootstrap": {"n_resamples": settings.bootstrap_samples, "method": "BCa, patients resampled (scipy)",
                      "level": stats.LEVEL},
        "micro": {m: value for m, value in frame["micro (pooled)"].items() if math.isfinite(value)},
        "nan_counts": {m: int(frame.loc[m, "n_nan"]) for m in frame.index},
        "inf_counts": {m: int(frame.loc[m, "n_inf"]) for m in frame.index},
        "flags": [flag.as_dict() for flag in flags],
        "predictions_hash": predictions_hash,
        "threshold": settings.threshold,
        "best_threshold": None if choice is None else choice.recommended,
        "threshold_cv": None if choice is None else choice.as_dict(),
        "in_sample_best_threshold (optimistic)": None if sweep is None else float(
            sweep.loc[sweep["dice"].idxmax(), "threshold"]),
        "fragments": fragment_summary(table, rows),
        "calibration": None if calibration is None else {
            "ece": calibration.ece, "brier": calibration.brier, "average_precision": calibration.average_precision,
            "n_pixels": calibration.n_pixels, "bins": calibration.bins.to_dict(orient="records")},
        "ground_truth": gt.report.as_dict(),
        "frames_without_prediction": len(not_predicted),
        "scoring": scoring_record(params, store, scored),
        "metric_settings": {"nsd_tolerance_px": scoring.nsd_tolerance_px, "width_bins_px": list(scoring.width_bins_px)},
    }
    report = AnalysisReport(params.run_name, run_dir, table, summary, flags, frame, sweep, gt,
                            settings.threshold, settings.gallery_k, threshold_cv=choice, calibration=calibration,
                            min_patients=settings.min_patients, names=names,
                            nsd_tolerance_px=scoring.nsd_tolerance_px, width_bins_px=scoring.width_bins_px)
    report.temporal = temporal_consistency(rows)
    if report.temporal is not None:
        summary["temporal_consistency"] = {"pred_iou": float(report.temporal["pred_iou"].mean()),
                                           "gt_iou": float(report.temporal["gt_iou"].mean()),
                                           "sequences": len(report.temporal)}
    _write_outputs(report, sweep_frames(rows))
    return report


def _content_hash(path: Path | None) -> str | None:
    """Digest of a file, or of every file under a folder (names and bytes); None when it cannot be read."""
    if path is None:
        return None
    path = Path(path)
    try:
        if path.is_file():
            return file_digest(path)
        digest = new_file_digest()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            name = str(item.relative_to(path)).encode("utf-8")
            digest.update(name + b"\0" + file_digest(item, 1 << 20).encode("ascii"))
        return digest.hexdigest()[:16]
    except OSError:
        return None


def _ids_hash(ids: Sequence[str]) -> str:
    digest = new_file_digest()
    for sample_id in sorted(ids):
        digest.update(sample_id.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def scoring_record(params: RunParams, store: Any, scored: pd.DataFrame) -> dict[str, Any]:
    """How this run was scored, so stage 04 can refuse to compare runs scored differently.

    Annotations by content hash (a moved file is the same annotations; an edited one is not), the threshold, the
    prompt the model saw, the polygon fill, the set of scored frames, and the image preprocessing (inference mode,
    the frames' names and sizes on disk, the HF folder's image-processor settings).
    """
    data, meta = params.data, store.meta
    images = sorted(str(i) for i in scored["image"] if i)
    sizes = []
    for image in images:
        try:
            sizes.append(f"{Path(image).name}:{Path(image).stat().st_size}")
        except OSError:
            sizes.append(f"{Path(image).name}:?")
    hf_dir = Path(meta["model_dir"]) if meta.get("model_dir") else None
    processor = [hf_dir / n for n in ("preprocessor_config.json", "processor_config.json")] if hf_dir else []
    return {
        "annotations": str(data.annotations),
        "annotations_hash": _content_hash(data.annotations),
        "annotation_format": data.annotation_format,
        "polygon_fill": data.polygon_fill,
        "threshold": params.analysis.threshold,
        "prompt": meta.get("prompt", params.inference.prompt),
        "frames_hash": _ids_hash(list(scored["sample_id"])),
        "n_frames": len(scored),
        "preprocessing": {
            "mode": meta.get("mode", params.inference.mode),
            "images_hash": _ids_hash(sizes),
            "image_processor_hash": next((_content_hash(p) for p in processor if p.is_file()), None),
        },
    }


def _spread(ids: list[str], limit: int) -> list[str]:
    """At most ``limit`` ids evenly spread over the sorted list (a deterministic subsample across patients)."""
    if len(ids) <= limit:
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, limit)]


def _write_outputs(report: AnalysisReport, sweep_counts: pd.DataFrame) -> None:
    folder = RunFolder(report.run_dir)
    figures_dir = folder.figures_dir
    figures_dir.mkdir(parents=True, exist_ok=True)
    report.table.to_parquet(folder.metrics_path, index=False)
    if len(sweep_counts):
        sweep_counts.to_parquet(folder.sweep_path, index=False)
    else:
        folder.sweep_path.unlink(missing_ok=True)  # a rerun without probability maps must not keep an old sweep
    folder.write_summary(strict_json(report.summary))
    pieces: dict[str, Any] = {"histograms": report.histograms}
    if report.sweep is not None:
        pieces["threshold_sweep"] = report.threshold_sweep_figure
    if report.calibration is not None:
        pieces["calibration"] = lambda: calibration_figure(report.calibration)
    if report.temporal is not None:
        pieces["temporal"] = lambda: temporal_figure(report.temporal, report.names)
    if report.table["has_gt"].any():
        pieces["worst_k"] = lambda: report.gallery(worst=True)
        pieces["best_k"] = lambda: report.gallery(worst=False)
    for name, build in pieces.items():
        fig = build()
        report.figures[name] = viz.save_figure(fig, figures_dir / f"{name}.png")
        viz.close(fig)
