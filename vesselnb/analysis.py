"""Stage 03: the error analysis of one run's prediction store against the ground truth.

The per-sample metrics table (``analysis/metrics.parquet``) keeps every sample the store holds: ``no_seg`` and
``error`` samples are scored as the empty masks they are (a missed frame is a miss), frames without annotation are
listed but not scored. Summaries show per-frame means (macro) with 95 % bootstrap CIs resampled **by patient**
(frames of one patient are not independent), pooled-pixel values (micro), and NaN / inf counts next to each mean.
Sanity flags catch results that are too good or too bad to be true before anyone reads the numbers.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from vesselnb import metrics as vm
from vesselnb import viz
from vesselnb.data import GroundTruth, list_samples, load_ground_truth, parse_sample_name
from vesselnb.errors import DataError, StageError, StoreError
from vesselnb.masks import resize_mask
from vesselnb.params import DEFAULT_NAME_REGEX, AnalysisParams, RunParams

# Metric -> higher is better; the order of the summary table.
SUMMARY_METRICS: dict[str, bool] = {
    "dice": True,
    "iou": True,
    "cldice": True,
    "precision": True,
    "recall": True,
    "specificity": True,
    "nsd": True,
    "recall_thin": True,
    "recall_medium": True,
    "recall_thick": True,
    "hd95": False,
    "assd": False,
    "betti0_error": False,
    "betti1_error": False,
}
TABLE_COLUMNS = [
    "sample_id", "patient", "sequence", "frame", "status", "gt_area", "pred_area",
    "dice", "iou", "precision", "recall", "specificity", "cldice", "betti0_error", "betti1_error",
    "hd95", "assd", "nsd", "recall_thin", "recall_medium", "recall_thick",
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


def _init_worker(settings: ScoringSettings, gt: GroundTruth) -> None:
    from vesselnb.store import PredictionStore

    _WORKER.update(settings=settings, gt=gt, store=PredictionStore(settings.store_path))


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


def _score_sample(sample_id: str) -> dict[str, Any]:
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
        return row
    gt = gt_source.mask(sample_id)
    pred, probability = _prediction_mask(store, sample_id, record, gt.shape, settings.threshold)
    row.update(vm.sample_metrics(gt, pred, nsd_tolerance_px=settings.nsd_tolerance_px,
                                 width_bins_px=settings.width_bins_px, pixel_spacing_mm=settings.pixel_spacing_mm))
    if settings.sweep and probability is not None:
        row["_sweep"] = _sweep_counts(gt, probability)
        if sample_id in settings.cldice_sweep_ids:
            gt_skeleton = vm.skeleton(gt)
            values = []
            for t in CLDICE_SWEEP_THRESHOLDS:
                binary = probability > t * 255.0
                values.append(vm.cldice_from_skeletons(gt, binary, gt_skeleton, vm.skeleton(binary))[0])
            row["_cldice_sweep"] = np.array(values)
    return row


def _score_chunk(sample_ids: list[str]) -> list[dict[str, Any]]:
    return [_score_sample(sample_id) for sample_id in sample_ids]


def score_store(store: Any, gt: GroundTruth, settings: ScoringSettings, workers: int = 0) -> list[dict[str, Any]]:
    """Score every sample of the store; ``workers`` processes (0 = up to 2 on a large store, 1 = in process)."""
    ids = store.sample_ids()
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1) if len(ids) >= 64 else 1
    chunks = [ids[i : i + 16] for i in range(0, len(ids), 16)]
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
                                 initializer=_init_worker, initargs=(settings, gt)) as pool:
            for chunk_rows in pool.map(_score_chunk, chunks):
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


def patient_bootstrap_ci(
    values: pd.Series, patients: pd.Series, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the per-frame mean, resampling whole patients with replacement (cluster bootstrap).

    Non-finite values are left out (they are counted separately); NaN when fewer than two patients remain.
    """
    finite = np.isfinite(values.to_numpy(dtype=float))
    if finite.sum() == 0:
        return (math.nan, math.nan)
    frame = pd.DataFrame({"v": values.to_numpy(dtype=float)[finite], "p": patients.to_numpy()[finite]})
    grouped = frame.groupby("p")["v"].agg(["sum", "count"])
    if len(grouped) < 2 or n_boot <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    n = len(grouped)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    means = (weights @ grouped["sum"].to_numpy()) / (weights @ grouped["count"].to_numpy())
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return (float(low), float(high))


def summary_table(table: pd.DataFrame, n_boot: int = 1000, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per metric: macro mean with patient-bootstrap CI, median, micro (pooled pixels), n, NaN and inf."""
    scored = table[table["has_gt"]]
    metrics = list(metrics or [m for m in SUMMARY_METRICS if m in table.columns])
    metrics += [m for m in ("hd95_mm", "assd_mm") if m in table.columns and m not in metrics]
    sums = scored[["tp", "fp", "fn", "tn"]].sum()
    pooled = vm.pooled_metrics(sums["tp"], sums["fp"], sums["fn"], sums["tn"])
    rows = []
    for metric in metrics:
        values = scored[metric].astype(float)
        finite = values[np.isfinite(values)]
        low, high = patient_bootstrap_ci(values, scored["patient"], n_boot=n_boot)
        rows.append({
            "metric": metric,
            "mean (macro)": float(finite.mean()) if len(finite) else math.nan,
            "ci95_low": low,
            "ci95_high": high,
            "median": float(values.dropna().median()) if values.notna().any() else math.nan,
            "micro (pooled)": pooled.get(metric, math.nan),
            "n_finite": int(len(finite)),
            "n_nan": int(values.isna().sum()),
            "n_inf": int(np.isinf(values).sum()),
        })
    return pd.DataFrame(rows).set_index("metric")


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
        for metric in ("dice", "cldice", "nsd", "recall_thin", "betti0_error"):
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
    """``predictions_hash`` of sibling run folders and of ``analysis.compare_to``, read from their summary.json."""
    run_dir = Path(run_dir).resolve()
    candidates = set(compare_to)
    if run_dir.parent.is_dir():
        candidates |= {p for p in run_dir.parent.iterdir() if p.is_dir()}
    hashes = {}
    for folder in sorted(Path(c).resolve() for c in candidates):
        if folder == run_dir:
            continue
        path = folder / "analysis" / "summary.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("predictions_hash")
        except (OSError, ValueError):
            continue
        if value:
            hashes[folder.name] = str(value)
    return hashes


# --- figures ------------------------------------------------------------------------------------------------------


def histograms(table: pd.DataFrame, metrics: Sequence[str] = ("dice", "cldice", "nsd", "hd95", "recall_thin",
                                                               "betti0_error")) -> Figure:
    """Distribution of per-frame metrics; NaN / inf counts in each title (they cannot be binned)."""
    scored = table[table["has_gt"]]
    fig = Figure(figsize=(3.0 * 3, 2.4 * math.ceil(len(metrics) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(metrics) / 3), 3)).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        values = scored[metric].astype(float)
        finite = values[np.isfinite(values)]
        ax.hist(finite, bins=30, color="#4477aa")
        ax.set_title(f"{metric}  (NaN {int(values.isna().sum())}, inf {int(np.isinf(values).sum())})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    return fig


def sweep_figure(sweep: pd.DataFrame, current: float) -> Figure:
    """Dice / clDice vs threshold with the best threshold marked (and the one used)."""
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(sweep["threshold"], sweep["dice"], "o-", label="Dice (mean per frame)")
    ax.plot(sweep["threshold"], sweep["dice (pooled)"], "--", label="Dice (pooled)")
    if sweep["cldice"].notna().any():
        valid = sweep[sweep["cldice"].notna()]
        ax.plot(valid["threshold"], valid["cldice"], "s-",
                label=f"clDice (mean, {int(sweep['cldice_samples'].iloc[0])} frames)")
    best = sweep.loc[sweep["dice"].idxmax()]
    ax.axvline(best["threshold"], color="green", lw=1)
    ax.annotate(f"best {best['threshold']:.2f}: Dice {best['dice']:.4f}", (best["threshold"], best["dice"]),
                textcoords="offset points", xytext=(5, -15), fontsize=8, color="green")
    ax.axvline(current, color="grey", lw=1, ls=":", label=f"used {current:.2f}")
    ax.set_xlabel("threshold on probability")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    ax.set_title(f"threshold sweep over {int(sweep['n_samples'].iloc[0])} frames", fontsize=9)
    return fig


# --- the report object --------------------------------------------------------------------------------------------


@dataclass
class AnalysisReport:
    """What stage 03 returns: tables, figures and flags; ``display(report)`` shows the banner and headline."""

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

    @property
    def analysis_dir(self) -> Path:
        """``<run_dir>/analysis``."""
        return self.run_dir / "analysis"

    # -- display pieces --
    def flags_html(self) -> str:
        """The sanity banner: red for errors, amber for warnings, green when nothing was found."""
        if not self.flags:
            return ('<div style="padding:8px;border-left:6px solid #2a2;background:#efe">'
                    "<b>Sanity checks passed</b>: no flags.</div>")
        items = []
        for flag in sorted(self.flags, key=lambda f: f.level != "error"):
            colour, background = ("#c00", "#fee") if flag.level == "error" else ("#c80", "#ffe")
            items.append(f'<div style="padding:6px;margin:2px 0;border-left:6px solid {colour};'
                         f'background:{background}"><b>{flag.level.upper()}</b> <code>{html.escape(flag.code)}'
                         f"</code>: {html.escape(flag.message)}</div>")
        return "".join(items)

    def headline_html(self) -> str:
        """Counts and headline numbers, as the index page shows them."""
        s = self.summary
        counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())
        head = " · ".join(f"{k} {v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                          for k, v in s["headline"].items())
        return (f"<p><b>{html.escape(self.run_name)}</b>: {s['n_samples']} samples ({counts}), "
                f"{s['n_scored']} scored.<br>{html.escape(head)}</p>")

    def _repr_html_(self) -> str:
        return (self.flags_html() + self.headline_html()
                + self.summary_frame.to_html(float_format=lambda v: f"{v:.4f}", na_rep="NaN"))

    def summary_table(self) -> pd.DataFrame:
        """Macro (with patient-bootstrap CI) and micro values, with NaN / inf counts."""
        return self.summary_frame

    def per_patient(self) -> pd.DataFrame:
        """One row per patient, worst Dice first."""
        return group_table(self.table, ["patient"])

    def per_sequence(self) -> pd.DataFrame:
        """One row per (patient, sequence), worst Dice first."""
        return group_table(self.table, ["patient", "sequence"])

    def ground_truth_report(self) -> pd.DataFrame:
        """What reading the annotations found (rescaled, clipped, missing ...), as a two-column table."""
        info = self.gt.report.as_dict()
        info.pop("warnings")
        return pd.DataFrame({"value": [str(v) for v in info.values()]}, index=list(info.keys()))

    def histograms(self) -> Figure:
        """Metric histograms (NaN / inf counted in the titles)."""
        return histograms(self.table)

    def threshold_sweep_figure(self) -> Figure | None:
        """Dice / clDice vs threshold, or None when the store has no probability maps."""
        return None if self.sweep is None else sweep_figure(self.sweep, self.threshold)

    def ranked(self, metric: str = "dice", worst: bool = True) -> pd.DataFrame:
        """Scored samples sorted by ``metric`` (worst first by default), NaN last."""
        higher_better = SUMMARY_METRICS.get(metric, True)
        ascending = higher_better if worst else not higher_better
        scored = self.table[self.table["has_gt"]]
        return scored.sort_values(metric, ascending=ascending, na_position="last")

    def sample_images(self, sample_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame, GT, prediction as scored) for one sample."""
        from vesselnb.store import PredictionStore

        row = self.table.set_index("sample_id").loc[sample_id]
        store = PredictionStore(self.run_dir / "predictions")
        gt = self.gt.mask(sample_id)
        pred, _ = _prediction_mask(store, sample_id, store.record(sample_id), gt.shape, self.threshold)
        try:
            frame = viz.load_frame(row["image"])
        except OSError:
            frame = np.zeros((*gt.shape, 3), dtype=np.uint8)
        return frame, gt, pred

    def gallery(self, worst: bool = True, metric: str = "dice", k: int | None = None) -> Figure:
        """The worst (or best) k samples by ``metric``: original / GT / prediction / overlay / TP-FP-FN each."""
        chosen = self.ranked(metric, worst=worst).head(k or self.gallery_k)
        rows = []
        for _, row in chosen.iterrows():
            frame, gt, pred = self.sample_images(row["sample_id"])
            rows.append((frame, gt, pred, viz.sample_title(row)))
        return viz.gallery(rows, title=f"{'worst' if worst else 'best'} {len(rows)} by {metric}")

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
    """The index page's numbers: macro Dice / clDice / IoU / NSD, median HD95, Sa2VA's cIoU and gIoU."""
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


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def analyze_stage(params: RunParams, run_dir: str | Path, workers: int = 0) -> AnalysisReport:
    """Score a run's prediction store against the ground truth; write ``analysis/`` and return the report.

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
        store = PredictionStore(run_dir / "predictions")
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
    frame = summary_table(table, n_boot=settings.bootstrap_samples)
    status_counts = {status: int((table["status"] == status).sum()) for status in ("ok", "no_seg", "error")}
    summary = {
        "run_name": params.run_name,
        "n_samples": len(table),
        "n_scored": int(table["has_gt"].sum()),
        "status_counts": status_counts,
        "headline": headline(table),
        "ci95": {m: [frame.loc[m, "ci95_low"], frame.loc[m, "ci95_high"]] for m in frame.index},
        "micro": {m: value for m, value in frame["micro (pooled)"].items() if math.isfinite(value)},
        "nan_counts": {m: int(frame.loc[m, "n_nan"]) for m in frame.index},
        "inf_counts": {m: int(frame.loc[m, "n_inf"]) for m in frame.index},
        "flags": [flag.as_dict() for flag in flags],
        "predictions_hash": predictions_hash,
        "threshold": settings.threshold,
        "best_threshold": None if sweep is None else float(sweep.loc[sweep["dice"].idxmax(), "threshold"]),
        "ground_truth": gt.report.as_dict(),
        "frames_without_prediction": len(not_predicted),
    }
    report = AnalysisReport(params.run_name, run_dir, table, summary, flags, frame, sweep, gt,
                            settings.threshold, settings.gallery_k)
    _write_outputs(report)
    return report


def _spread(ids: list[str], limit: int) -> list[str]:
    """At most ``limit`` ids evenly spread over the sorted list (a deterministic subsample across patients)."""
    if len(ids) <= limit:
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, limit)]


def _write_outputs(report: AnalysisReport) -> None:
    out = report.analysis_dir
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    report.table.to_parquet(out / "metrics.parquet", index=False)
    payload = strict_json(report.summary)
    temporary = out / ".summary.json.tmp"
    temporary.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, out / "summary.json")
    pieces: dict[str, Any] = {"histograms": report.histograms}
    if report.sweep is not None:
        pieces["threshold_sweep"] = report.threshold_sweep_figure
    if report.table["has_gt"].any():
        pieces["worst_k"] = lambda: report.gallery(worst=True)
        pieces["best_k"] = lambda: report.gallery(worst=False)
    for name, build in pieces.items():
        fig = build()
        report.figures[name] = viz.save_figure(fig, figures_dir / f"{name}.png")
        viz.close(fig)


def strict_json(value: Any, inf_as: str = "string") -> Any:
    """Plain, strict-JSON values: NaN -> null, numpy scalars -> Python, paths -> str, and ±inf -> "inf"/"-inf"
    (``inf_as="string"``, summary.json: an infinite HD95 is information) or null (``inf_as="null"``)."""
    if isinstance(value, dict):
        return {str(k): strict_json(v, inf_as) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, inf_as) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        if inf_as == "null" and math.isinf(number):
            return None
        return _json_number(number)
    if isinstance(value, Path):
        return str(value)
    return value
