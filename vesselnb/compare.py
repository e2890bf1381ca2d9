"""Comparing runs of checkpoints: is the later one really better — and is it even a different model?

Users convert ``iter_3672``, then ``iter_12192``, and ask which is better. Twice in practice the "two" checkpoints
turned out to be the same weights (a seed-style accident), so identity comes first: weight fingerprints, the
per-component weight difference (from the converter's :func:`vesselnb.convert.diff_weights`) and the prediction
hashes are checked before any metric is shown, and a red banner says when two runs are the same model.

The metric comparison is *paired*: only samples both runs scored count, the per-sample differences
Δ = B − A are tested with the Wilcoxon signed-rank test, and the CI of the mean Δ is a bootstrap that resamples
whole patients (frames of one patient are correlated, so resampling frames would give CIs that are too narrow).

Inputs are the files earlier stages wrote into each run folder (see docs/contracts.md); nothing is recomputed
except the weight diff. :func:`compare_stage` writes ``comparison.json`` and ``figures/*.png`` into ``out_dir``.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from vesselnb import viz
from vesselnb.errors import StageError, StoreError, VesselnbError
from vesselnb.fingerprint import weights_fingerprint
from vesselnb.params import DEFAULT_NAME_REGEX
from vesselnb.store import PredictionStore

# metric -> higher is better. Paired tests run on these columns of analysis/metrics.parquet.
PAIRED_METRICS: dict[str, bool] = {"dice": True, "cldice": True, "hd95": False}
PRIMARY_METRIC = "dice"  # decides "better" and the largest-Δ panels
# |Δ| at or below this counts as a tie in wins/ties/losses (Dice 0.001 is below any meaningful change; HD95 in px).
TIE_TOLERANCE: dict[str, float] = {"dice": 1e-3, "cldice": 1e-3, "hd95": 0.5}
# Largest relative change over all components below this: the checkpoints are practically the same weights.
# bf16 keeps ~3 significant digits, so real training steps move weights by far more than 1e-4.
NEAR_ZERO_REL_CHANGE = 1e-4
ALPHA = 0.05
WILCOXON_ZERO_METHOD = "pratt"  # zero Δ are ranked and then dropped (Pratt 1959); all-zero Δ -> p = 1, stated
IDENTITY_KEYS = ("identical_weights", "identical_predictions", "near_zero_weight_delta")


# --- reading run folders ---------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What the comparison needs from one run folder, read once."""

    label: str  # unique within one comparison (a run compared with itself gets "name#2")
    name: str  # the run's own name (manifest params.run_name, else summary run_name, else folder name)
    run_dir: Path
    manifest: dict[str, Any]
    conversion: dict[str, Any]
    summary: dict[str, Any]
    metrics: pd.DataFrame
    hf_dir: Path | None
    fingerprint: str | None
    fingerprint_source: str
    iteration: int | None
    checkpoint: str | None
    predictions_hash: str | None
    store: Any  # vesselnb.store.PredictionStore

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params") or {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VesselnbError(f"{path}: cannot read this JSON file ({exc}); rerun the stage that writes it") from None


def _run_command_hint(run_dir: Path, manifest: dict[str, Any]) -> str:
    source = manifest.get("params_file") or (manifest.get("params") or {}).get("source_file")
    return f"run `vesselnb run {source or f'params/{run_dir.name}.yaml'}` first"


def _find_hf_dir(run_dir: Path, manifest: dict[str, Any], conversion: dict[str, Any], store_meta: dict) -> Path | None:
    """The HF folder the run used: where conversion wrote it, the params' ``hf_model``, the store's, or the default."""
    params = manifest.get("params") or {}
    candidates = [
        conversion.get("output_dir"),
        manifest.get("output_dir"),
        params.get("hf_model"),
        (params.get("checkpoint") or {}).get("hf_output"),
        store_meta.get("model_dir"),
        run_dir / "hf_model",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


_ITER_PATTERN = re.compile(r"iter_(\d+)")


def _find_iteration(manifest: dict[str, Any], conversion: dict[str, Any], name: str) -> tuple[int | None, str | None]:
    """Training iteration: params ``iteration``, else ``iter_N`` in the checkpoint path, else in the run name."""
    params = manifest.get("params") or {}
    checkpoint = (
        (manifest.get("source_checkpoint") or {}).get("path")
        or (params.get("checkpoint") or {}).get("path")
        or (conversion.get("source") or {}).get("path")
    )
    if params.get("iteration") is not None:
        return int(params["iteration"]), checkpoint
    for text in (checkpoint, params.get("hf_model"), name):
        match = _ITER_PATTERN.search(str(text or ""))
        if match:
            return int(match.group(1)), checkpoint
    return None, checkpoint


def load_run(run_dir: str | Path, label: str | None = None) -> RunInputs:
    """Read one run folder's manifest, conversion record, summary, metrics table and prediction store.

    The metrics table, summary and store are required (errors name the missing file and the command that writes
    it); manifest.json and conversion.json are optional (a run on an existing HF folder has no conversion.json).
    """
    folder = Path(run_dir).resolve()
    if not folder.is_dir():
        raise VesselnbError(f"{folder}: run folder not found; run `vesselnb run params/<run>.yaml` to create it")
    manifest = _read_json(folder / "manifest.json") if (folder / "manifest.json").is_file() else {}
    conversion = _read_json(folder / "conversion.json") if (folder / "conversion.json").is_file() else {}
    hint = _run_command_hint(folder, manifest)
    metrics_path = folder / "analysis" / "metrics.parquet"
    summary_path = folder / "analysis" / "summary.json"
    for needed in (metrics_path, summary_path):
        if not needed.is_file():
            raise StageError(f"{needed}: missing; the error-analysis stage (03) writes it — {hint}")
    store_dir = folder / "predictions"
    if not (store_dir / "store.json").is_file():
        raise StoreError(f"{store_dir}: no prediction store; the inference stage (02) writes it — {hint}")
    summary = _read_json(summary_path)
    try:
        metrics = pd.read_parquet(metrics_path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise StageError(f"{metrics_path}: cannot read ({exc}); rerun stage 03 — {hint}") from None
    missing = {"sample_id", "patient", "status", *PAIRED_METRICS} - set(metrics.columns)
    if missing:
        raise StageError(f"{metrics_path}: columns {sorted(missing)} missing; rerun stage 03 — {hint}")
    store = PredictionStore(store_dir)
    store_meta = _read_json(store_dir / "store.json")
    name = str((manifest.get("params") or {}).get("run_name") or summary.get("run_name") or folder.name)
    hf_dir = _find_hf_dir(folder, manifest, conversion, store_meta)
    fingerprint, source = _find_fingerprint(manifest, conversion, store_meta, hf_dir)
    iteration, checkpoint = _find_iteration(manifest, conversion, name)
    return RunInputs(
        label=label or name,
        name=name,
        run_dir=folder,
        manifest=manifest,
        conversion=conversion,
        summary=summary,
        metrics=metrics.drop_duplicates("sample_id", keep="last").set_index("sample_id", drop=False),
        hf_dir=hf_dir,
        fingerprint=fingerprint,
        fingerprint_source=source,
        iteration=iteration,
        checkpoint=checkpoint,
        predictions_hash=summary.get("predictions_hash") or store.predictions_hash(),
        store=store,
    )


def _find_fingerprint(
    manifest: dict[str, Any], conversion: dict[str, Any], store_meta: dict[str, Any], hf_dir: Path | None
) -> tuple[str | None, str]:
    """The recorded weights fingerprint (cheap), else one computed from the HF folder."""
    for value, source in (
        (conversion.get("fingerprint"), "conversion.json"),
        (manifest.get("weights_fingerprint"), "manifest.json"),
        (store_meta.get("fingerprint"), "predictions/store.json"),
    ):
        if value:
            return str(value), source
    if hf_dir is not None:
        return weights_fingerprint(hf_dir), f"computed from {hf_dir}"
    return None, "unknown (no record, HF folder not found)"


def _unique_labels(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


# --- paired statistics (pure, on DataFrames) -------------------------------------------------------------------


def wilcoxon_p(deltas: np.ndarray) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, with a note on how zeros were handled.

    All-zero differences carry no evidence of a difference: p = 1 by definition here (scipy would fail).
    """
    values = np.asarray(deltas, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, "no finite pairs"
    n_zero = int(np.sum(values == 0))
    if n_zero == values.size:
        return 1.0, f"all {values.size} differences are zero: p set to 1"
    note = f"{n_zero} zero differences ranked then dropped (Pratt)" if n_zero else ""
    if values.size - n_zero < 2:
        return 1.0, f"only {values.size - n_zero} non-zero difference: p set to 1"
    from scipy.stats import wilcoxon

    result = wilcoxon(values, zero_method=WILCOXON_ZERO_METHOD, alternative="two-sided")
    return float(result.pvalue), note


@dataclass
class PairedComparison:
    """Run A against run B on the samples both scored. Δ = B − A throughout; "wins" are samples where B is better."""

    a: str
    b: str
    n_common: int
    n_unscored: int  # common samples without ground truth in either run
    only_a: list[str]
    only_b: list[str]
    per_sample: pd.DataFrame  # sample_id, patient, status_a/b, <metric>_a, <metric>_b, <metric>_delta
    stats: pd.DataFrame  # one row per metric
    per_patient: pd.DataFrame
    status_changes: pd.DataFrame
    better: str | None
    verdict: str
    weights: pd.DataFrame | None = None  # per-component weight delta (from diff_weights)
    weights_note: str = ""
    panels_note: str = ""
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def n_left_out(self) -> int:
        return len(self.only_a) + len(self.only_b)


def paired_comparison(
    metrics_a: pd.DataFrame,
    metrics_b: pd.DataFrame,
    a: str = "A",
    b: str = "B",
    metrics: dict[str, bool] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Paired statistics of two metrics tables (``analysis/metrics.parquet`` layout), joined on ``sample_id``.

    Samples present in only one table are left out and listed; samples without ground truth (``has_gt`` false in
    either run) are not scored and counted in ``n_unscored``. Per metric, pairs where either value is not finite
    (NaN: undefined, e.g. empty GT and empty prediction; inf: HD95 of an empty mask) are left out of that metric's
    test and counted in ``n_nonfinite``; the status table shows those failures instead. ``no_seg``/``error``
    samples are scored as the empty masks they are (a missed frame is a miss), as stage 03 does.
    """
    from vesselnb import analysis  # its scientific imports are paid only when comparing, not by `vesselnb --help`

    metrics = metrics or PAIRED_METRICS
    left = metrics_a.reset_index(drop=True).drop_duplicates("sample_id", keep="last")
    right = metrics_b.reset_index(drop=True).drop_duplicates("sample_id", keep="last")
    ids_a, ids_b = set(left["sample_id"]), set(right["sample_id"])
    for table in (left, right):
        if "has_gt" not in table.columns:
            table["has_gt"] = True
    columns = ["sample_id", "patient", "status", "has_gt", *metrics]
    joined = left[columns].merge(right[columns].drop(columns="patient"), on="sample_id", suffixes=("_a", "_b"))
    joined = joined.sort_values("sample_id").reset_index(drop=True)
    scored = (joined["has_gt_a"].astype(bool) & joined["has_gt_b"].astype(bool)).to_numpy()
    rows = []
    for metric, higher_better in metrics.items():
        values_a = joined[f"{metric}_a"].to_numpy(dtype=float)
        values_b = joined[f"{metric}_b"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            delta = values_b - values_a
        finite = np.isfinite(values_a) & np.isfinite(values_b) & scored
        delta = np.where(finite, delta, np.nan)
        joined[f"{metric}_delta"] = delta
        gain = delta[finite] if higher_better else -delta[finite]  # > 0: B better
        tolerance = TIE_TOLERANCE.get(metric, 0.0)
        p_value, note = wilcoxon_p(delta[finite])
        lo, hi = analysis.patient_bootstrap_ci(
            pd.Series(delta[finite]), pd.Series(joined["patient"].to_numpy()[finite]), n_boot=n_boot, seed=seed
        )
        rows.append(
            {
                "metric": metric,
                "better_when": "higher" if higher_better else "lower",
                "n_pairs": int(finite.sum()),
                "n_nonfinite": int((~finite & scored).sum()),
                f"mean_{a}": float(np.mean(values_a[finite])) if finite.any() else math.nan,
                f"mean_{b}": float(np.mean(values_b[finite])) if finite.any() else math.nan,
                "delta_mean": float(np.mean(delta[finite])) if finite.any() else math.nan,
                "delta_median": float(np.median(delta[finite])) if finite.any() else math.nan,
                "ci95_lo": lo,
                "ci95_hi": hi,
                "wilcoxon_p": p_value,
                "wins": int(np.sum(gain > tolerance)),
                "ties": int(np.sum(np.abs(gain) <= tolerance)),
                "losses": int(np.sum(gain < -tolerance)),
                "note": note,
            }
        )
    table = pd.DataFrame(rows).set_index("metric")
    better, verdict = _verdict(table, a, b)
    return PairedComparison(
        a=a,
        b=b,
        n_common=len(joined),
        n_unscored=int((~scored).sum()),
        only_a=sorted(ids_a - ids_b),
        only_b=sorted(ids_b - ids_a),
        per_sample=joined,
        stats=table,
        per_patient=_per_patient(joined, metrics),
        status_changes=_status_changes(joined),
        better=better,
        verdict=verdict,
    )


def _verdict(table: pd.DataFrame, a: str, b: str) -> tuple[str | None, str]:
    """B is better (or worse) only when the primary metric's Wilcoxon p < ALPHA *and* the patient CI excludes 0."""
    if PRIMARY_METRIC not in table.index:
        return None, f"{PRIMARY_METRIC} not compared"
    row = table.loc[PRIMARY_METRIC]
    higher_better = row["better_when"] == "higher"
    mean, lo, hi, p_value = row["delta_mean"], row["ci95_lo"], row["ci95_hi"], row["wilcoxon_p"]
    text = (
        f"Δ{PRIMARY_METRIC} ({b} − {a}) = {mean:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] by patient, "
        f"Wilcoxon p = {p_value:.3g}"
    )
    if not np.isfinite(mean):
        return None, f"no finite {PRIMARY_METRIC} pairs"
    significant = np.isfinite(p_value) and p_value < ALPHA and np.isfinite(lo) and (lo > 0 or hi < 0)
    if not significant:
        return None, f"no significant difference: {text}"
    b_better = (mean > 0) == higher_better
    winner, loser = (b, a) if b_better else (a, b)
    return winner, f"{winner} is better than {loser}: {text}"


def _per_patient(joined: pd.DataFrame, metrics: dict[str, bool]) -> pd.DataFrame:
    aggregations: dict[str, tuple[str, str]] = {"n": ("sample_id", "count")}
    for metric in metrics:
        aggregations[f"{metric}_a"] = (f"{metric}_a", "mean")
        aggregations[f"{metric}_b"] = (f"{metric}_b", "mean")
        aggregations[f"{metric}_delta"] = (f"{metric}_delta", "mean")
    return joined.groupby("patient").agg(**aggregations).reset_index()


def _status_changes(joined: pd.DataFrame) -> pd.DataFrame:
    changed = joined[joined["status_a"] != joined["status_b"]]
    return changed[["sample_id", "patient", "status_a", "status_b"]].reset_index(drop=True)


def _add_store_errors(changes: pd.DataFrame, run_a: RunInputs, run_b: RunInputs) -> None:
    """The stores' error messages next to each status change, so a reviewer sees why a sample failed."""
    for column, run in (("error_a", run_a), ("error_b", run_b)):
        changes[column] = [run.store.record(sample_id).get("error") or "" for sample_id in changes["sample_id"]]


# --- identity ----------------------------------------------------------------------------------------------------


def _weight_delta(run_a: RunInputs, run_b: RunInputs) -> tuple[pd.DataFrame | None, bool | None, str]:
    """Per-component weight delta from the converter's :func:`diff_weights`; (table, identical, note).

    The table has the diff's per-component columns (``n_tensors``, ``n_identical``, ``max_abs``, ``rel_norm`` =
    ‖B − A‖ / ‖A‖ over the component). Without both HF folders only the fingerprints can speak.
    """
    if run_a.hf_dir is None or run_b.hf_dir is None:
        missing = run_a.label if run_a.hf_dir is None else run_b.label
        return None, None, f"HF folder of {missing} not found: weight delta not computed (fingerprints only)"
    if run_a.hf_dir.resolve() == run_b.hf_dir.resolve():
        return None, True, f"both runs used the same HF folder {run_a.hf_dir}"
    from vesselnb.convert import diff_weights  # torch: imported only when weights are compared

    diff = diff_weights(run_a.hf_dir, run_b.hf_dir)
    table = diff.component_table.set_index("component")
    notes = []
    if diff.only_in_a or diff.only_in_b:
        notes.append(
            f"{len(diff.only_in_a)} tensors only in {run_a.label}, {len(diff.only_in_b)} only in {run_b.label}"
        )
    if diff.shape_mismatch:
        notes.append(f"{len(diff.shape_mismatch)} tensors differ in shape, e.g. {diff.shape_mismatch[0]}")
    return table, diff.identical, "; ".join(notes)


def _max_rel_change(table: pd.DataFrame | None, note: str) -> float | None:
    """Largest per-component relative change; None when there is no table or the key sets differ."""
    if table is None or table.empty or note:
        return None
    return float(np.nanmax(table["rel_norm"].to_numpy(dtype=float)))


def _masks_identical(run_a: RunInputs, run_b: RunInputs, sample_ids: list[str]) -> bool:
    """Compare predicted masks sample by sample (used only when hashes cannot decide, e.g. different sample sets)."""
    for sample_id in tqdm(sample_ids, desc=f"masks {run_a.label} vs {run_b.label}", leave=False):
        if not np.array_equal(run_a.store.mask(sample_id), run_b.store.mask(sample_id)):
            return False
    return True


# --- figures -----------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write the figure under ``figures/`` and release it (reports can hold many pairs)."""
    viz.save_figure(fig, path, dpi=dpi)
    viz.close(fig)
    return path


def _scatter_figure(pair: PairedComparison) -> Figure:
    """Per-sample A against B for each metric: points off the diagonal are where the runs differ."""
    metrics = list(pair.stats.index)
    fig = Figure(figsize=(4.2 * len(metrics), 4.0), layout="constrained")
    for axis, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        x = pair.per_sample[f"{metric}_a"].to_numpy(dtype=float)
        y = pair.per_sample[f"{metric}_b"].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        for patient in sorted(pair.per_sample["patient"].unique()):
            mask = ok & (pair.per_sample["patient"] == patient).to_numpy()
            axis.scatter(x[mask], y[mask], s=18, alpha=0.8, label=str(patient))
        if ok.any():
            low, high = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
            axis.plot([low, high], [low, high], color="grey", lw=1, ls="--")
        axis.set_xlabel(f"{metric} — {pair.a}")
        axis.set_ylabel(f"{metric} — {pair.b}")
        axis.set_title(f"{metric} ({pair.stats.loc[metric, 'better_when']} is better)")
    if len(pair.per_sample["patient"].unique()) <= 12:
        fig.axes[0].legend(fontsize=7, title="patient", title_fontsize=7)
    return fig


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _ground_truth_reader(run: RunInputs, sample_ids: list[str]) -> tuple[Any, str]:
    """``(sample_id -> bool mask | None, note)`` from the run's recorded params, via the analysis stage's GT reader.

    Only the panels need ground truth; when it cannot be found the panels show predictions alone and say why.
    """
    from vesselnb.data import list_samples, load_ground_truth

    data = run.params.get("data") or {}
    if not data.get("annotations") or not data.get("images"):
        return None, f"{run.run_dir / 'manifest.json'}: no data paths recorded, so the panels show no ground truth"
    data_log = logging.getLogger("vesselnb.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # stage 03 already reported this dataset's annotation warnings
    try:
        samples = list_samples(
            data["images"],
            data.get("image_glob") or "*.jpg",
            data.get("name_regex") or DEFAULT_NAME_REGEX,
            data.get("limit"),
        )
        truth = load_ground_truth(
            data["annotations"],
            [s for s in samples if s.sample_id in set(sample_ids)],
            data.get("annotation_format") or "auto",
            data.get("polygon_fill") or "union",
        )
    except VesselnbError as exc:
        return None, f"ground truth not shown in the panels: {exc}"
    finally:
        data_log.setLevel(level)
    return (lambda sample_id: truth.mask(sample_id) if sample_id in truth else None), ""


def _disagreement_figure(
    pair: PairedComparison, run_a: RunInputs, run_b: RunInputs, sample_ids: list[str], ground_truth: Any
) -> Figure:
    """For each sample: GT, A and B as error overlays against GT, and A-vs-B (white both, cyan only A, magenta only B).

    The A-vs-B panel is ``viz.error_overlay`` with A in the place of ground truth, so its colours read as above.
    """
    fig = Figure(figsize=(13, 3.4 * len(sample_ids)), layout="constrained")
    axes = fig.subplots(len(sample_ids), 4, squeeze=False)
    records_a = {r["sample_id"]: r for r in run_a.store.records()}
    for row, sample_id in zip(axes, sample_ids, strict=True):
        mask_a, mask_b = run_a.store.mask(sample_id), run_b.store.mask(sample_id)
        try:
            image = viz.load_frame(records_a[sample_id]["image"])
        except (KeyError, OSError):  # frame moved since inference: masks on black, still comparable
            image = np.zeros((*mask_a.shape, 3), dtype=np.uint8)
        gt = ground_truth(sample_id) if ground_truth is not None else None
        line = pair.per_sample.set_index("sample_id").loc[sample_id]
        title_a = f"{run_a.label}: {PRIMARY_METRIC} {line[f'{PRIMARY_METRIC}_a']:.3f}"
        title_b = f"{run_b.label}: {PRIMARY_METRIC} {line[f'{PRIMARY_METRIC}_b']:.3f}"
        if gt is not None:
            panels = [
                (viz.tint(image, gt, viz.GT_RGB), f"{_short(sample_id)}\nground truth"),
                (viz.error_overlay(image, gt, mask_a), title_a),
                (viz.error_overlay(image, gt, mask_b), title_b),
            ]
        else:
            panels = [
                (image, f"{_short(sample_id)}\n(ground truth not available)"),
                (viz.tint(image, mask_a, viz.PRED_RGB), title_a),
                (viz.tint(image, mask_b, viz.PRED_RGB), title_b),
            ]
        panels.append((viz.error_overlay(image, mask_a, mask_b), f"{run_a.label} vs {run_b.label}"))
        for axis, (picture, title) in zip(row, panels, strict=True):
            axis.imshow(picture)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    fig.suptitle(
        "overlays vs GT: white TP, magenta FP, cyan FN — last column: white both, cyan only "
        f"{run_a.label}, magenta only {run_b.label}",
        fontsize=9,
    )
    return fig


def _series_figure(series: pd.DataFrame) -> Figure:
    """Mean metrics against training iteration (run order when a run has none), patient-bootstrap CIs as bars."""
    by_iteration = bool(series["iteration"].notna().all())
    x_column = "iteration" if by_iteration else "position"
    metrics = [m for m in PAIRED_METRICS if m in series.columns]
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    for axis, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        data = series.dropna(subset=[metric]).sort_values(x_column)
        lower = (data[metric] - data[f"{metric}_lo"]).clip(lower=0).fillna(0)
        upper = (data[f"{metric}_hi"] - data[metric]).clip(lower=0).fillna(0)
        axis.errorbar(data[x_column], data[metric], yerr=[lower, upper], marker="o", capsize=3)
        for _, point in data.iterrows():
            axis.annotate(
                point["run"], (point[x_column], point[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set_xlabel("training iteration" if by_iteration else "run order (some runs have no iteration)")
        axis.set_title(f"mean {metric} ({'higher' if PAIRED_METRICS[metric] else 'lower'} is better)")
    return fig


# --- the report --------------------------------------------------------------------------------------------------


@dataclass
class ComparisonReport:
    """Everything :func:`compare_stage` found; displays as HTML with the identity banner first."""

    runs: list[RunInputs]
    identity: dict[str, list]
    identity_notes: list[str]
    pairs: list[PairedComparison]
    series: pd.DataFrame | None
    headline: dict[str, Any]
    out_dir: Path
    figures: dict[str, Path]
    seconds: float

    def __repr__(self) -> str:
        """One line for plain-text outputs; the full report is the HTML."""
        return f"ComparisonReport({' vs '.join(r.label for r in self.runs)}: {self.headline.get('text', '')})"

    @property
    def identity_alert(self) -> bool:
        return any(self.identity[key] for key in IDENTITY_KEYS)

    def runs_table(self) -> pd.DataFrame:
        """Fingerprints and headline numbers side by side."""
        rows = []
        for run in self.runs:
            headline = run.summary.get("headline") or {}
            counts = run.summary.get("status_counts") or {}
            rows.append(
                {
                    "run": run.label,
                    "iteration": run.iteration,
                    "checkpoint": run.checkpoint,
                    "weights fingerprint": run.fingerprint,
                    "fingerprint from": run.fingerprint_source,
                    "predictions hash": (run.predictions_hash or "")[:16],
                    "samples": len(run.metrics),
                    "ok / no_seg / error": " / ".join(str(counts.get(s, 0)) for s in ("ok", "no_seg", "error")),
                    # stage 03's headline: macro means, HD95 as the median (robust to failed frames)
                    "dice": headline.get("dice"),
                    "cldice": headline.get("cldice"),
                    "hd95 (median)": headline.get("hd95"),
                    "run folder": str(run.run_dir),
                }
            )
        return pd.DataFrame(rows).set_index("run")

    def to_json(self) -> dict[str, Any]:
        """The ``comparison.json`` document (format in docs/contracts.md)."""
        pairs = []
        for pair in self.pairs:
            pairs.append(
                {
                    "a": pair.a,
                    "b": pair.b,
                    "n_common": pair.n_common,
                    "n_left_out": pair.n_left_out,
                    "only_a": pair.only_a,
                    "only_b": pair.only_b,
                    "delta_mean": pair.stats["delta_mean"].to_dict(),
                    "ci95": {m: [r["ci95_lo"], r["ci95_hi"]] for m, r in pair.stats.iterrows()},
                    "wilcoxon_p": pair.stats["wilcoxon_p"].to_dict(),
                    "wins": pair.stats["wins"].to_dict(),
                    "ties": pair.stats["ties"].to_dict(),
                    "losses": pair.stats["losses"].to_dict(),
                    "better": pair.better,
                    "verdict": pair.verdict,
                    "status_changes": pair.status_changes.to_dict(orient="records"),
                    "weight_delta": None if pair.weights is None else pair.weights.reset_index().to_dict("records"),
                    "weight_note": pair.weights_note,
                }
            )
        document = {
            "format": 1,
            "runs": [run.name for run in self.runs],
            "labels": [run.label for run in self.runs],
            "run_dirs": [str(run.run_dir) for run in self.runs],
            "fingerprints": {run.label: run.fingerprint for run in self.runs},
            "predictions_hashes": {run.label: run.predictions_hash for run in self.runs},
            "iterations": {run.label: run.iteration for run in self.runs},
            "identity": self.identity,
            "identity_notes": self.identity_notes,
            "pairs": pairs,
            "headline": self.headline,
            "figures": {key: str(path.relative_to(self.out_dir)) for key, path in self.figures.items()},
            "settings": {
                "metrics": PAIRED_METRICS,
                "primary_metric": PRIMARY_METRIC,
                "alpha": ALPHA,
                "tie_tolerance": TIE_TOLERANCE,
                "near_zero_rel_change": NEAR_ZERO_REL_CHANGE,
                "wilcoxon_zero_method": WILCOXON_ZERO_METHOD,
                "delta": "b - a; wins/ties/losses count samples where b is better/equal/worse",
            },
            "seconds": round(self.seconds, 2),
        }
        from vesselnb.analysis import strict_json

        return strict_json(document, inf_as="null")

    def _repr_html_(self) -> str:
        parts = [f"<h2>Checkpoint comparison: {html.escape(' vs '.join(r.label for r in self.runs))}</h2>"]
        parts.append(self._banner_html())
        parts.append("<h3>Runs</h3>" + self.runs_table().to_html(na_rep="—", float_format=_fmt))
        for pair in self.pairs:
            parts.append(_pair_html(pair))
        if self.series is not None:
            parts.append("<h3>Metrics vs training iteration</h3>")
            parts.append(self.series.to_html(index=False, na_rep="—", float_format=_fmt))
            parts.append(_img_html(self.figures["series"]))
        parts.append(
            f"<p style='color:#666'>Δ = B − A. Wilcoxon signed-rank (two-sided, zero differences: "
            f"{WILCOXON_ZERO_METHOD}); 95% CI: bootstrap of the mean Δ resampling patients. Ties: |Δ| ≤ "
            f"{TIE_TOLERANCE}. Written to {html.escape(str(self.out_dir))} in {self.seconds:.1f} s.</p>"
        )
        return "\n".join(parts)

    def _banner_html(self) -> str:
        e = html.escape
        messages = [
            f"{e(a)} and {e(b)} have <b>identical weights</b> — they are the same model."
            for a, b in self.identity["identical_weights"]
        ]
        messages += [
            f"{e(a)} and {e(b)} made <b>identical predictions</b> on every common sample."
            for a, b in self.identity["identical_predictions"]
        ]
        messages += [
            f"{e(a)} and {e(b)} differ by a <b>near-zero weight delta</b> (largest relative change {rel:.2e})."
            for a, b, rel in self.identity["near_zero_weight_delta"]
        ]
        if messages:
            body = "<br>".join(messages)
            return (
                "<div style='background:#c62828;color:white;padding:12px;font-size:15px;border-radius:4px'>"
                f"<b>⚠ Same model?</b><br>{body}<br>Metric differences below are not evidence of a better "
                "checkpoint.</div>"
            )
        notes = "".join(f"<br>{html.escape(n)}" for n in self.identity_notes)
        return (
            "<div style='background:#2e7d32;color:white;padding:8px;border-radius:4px'>Distinct weights and "
            f"predictions for every pair.{notes}</div>"
        )


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _img_html(path: Path) -> str:
    """Figures inline (base64) so the HTML report can be attached on its own."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{encoded}' style='max-width:100%'>"


def _pair_html(pair: PairedComparison) -> str:
    colour = "#2e7d32" if pair.better else "#555"
    parts = [
        f"<h3>{html.escape(pair.a)} → {html.escape(pair.b)}</h3>",
        f"<p style='color:{colour};font-weight:bold'>{html.escape(pair.verdict)}</p>",
        f"<p>{pair.n_common} samples in common; {pair.n_left_out} left out "
        f"({len(pair.only_a)} only in {html.escape(pair.a)}, {len(pair.only_b)} only in {html.escape(pair.b)}).</p>",
    ]
    if pair.weights is not None:
        parts.append("<h4>Weight delta per component</h4>" + pair.weights.to_html(float_format=lambda v: f"{v:.3g}"))
    if pair.weights_note:
        parts.append(f"<p><i>{html.escape(pair.weights_note)}</i></p>")
    parts.append(
        f"<h4>Paired metrics (Δ = {html.escape(pair.b)} − {html.escape(pair.a)}; wins = samples where "
        f"{html.escape(pair.b)} is better)</h4>"
    )
    parts.append(pair.stats.to_html(na_rep="—", float_format=_fmt))
    if "scatter" in pair.figures:
        parts.append(_img_html(pair.figures["scatter"]))
    parts.append("<h4>Per-patient Δ</h4>" + pair.per_patient.to_html(index=False, na_rep="—", float_format=_fmt))
    parts.append("<h4>Status differences</h4>")
    if pair.status_changes.empty:
        parts.append("<p>None: every common sample has the same status in both runs.</p>")
    else:
        parts.append(pair.status_changes.to_html(index=False))
    if "panels" in pair.figures:
        parts.append(f"<h4>Where they disagree most (largest |Δ{PRIMARY_METRIC}|)</h4>")
        parts.append(_img_html(pair.figures["panels"]))
        if pair.panels_note:
            parts.append(f"<p><i>{html.escape(pair.panels_note)}</i></p>")
    return "\n".join(parts)


# --- the stage ---------------------------------------------------------------------------------------------------


def _pairs_to_compare(n_runs: int) -> list[tuple[int, int]]:
    """Two runs: the pair. A series: each checkpoint against the next, plus first against last."""
    pairs = [(i, i + 1) for i in range(n_runs - 1)]
    if n_runs > 2:
        pairs.append((0, n_runs - 1))
    return pairs


def _series_table(runs: list[RunInputs], n_boot: int, seed: int) -> pd.DataFrame:
    """Per run: mean of each paired metric over its scored samples with a patient-bootstrap CI (as stage 03)."""
    from vesselnb import analysis

    rows = []
    for position, run in enumerate(runs):
        table = run.metrics
        if "has_gt" in table.columns:
            table = table[table["has_gt"].astype(bool)]
        row: dict[str, Any] = {"run": run.label, "iteration": run.iteration, "position": position}
        for metric in PAIRED_METRICS:
            values = table[metric].astype(float)
            finite = np.isfinite(values)
            row[metric] = float(values[finite].mean()) if finite.any() else math.nan
            low, high = analysis.patient_bootstrap_ci(values, table["patient"], n_boot=n_boot, seed=seed)
            row[f"{metric}_lo"], row[f"{metric}_hi"] = low, high
        row["n_scored"] = len(table)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("iteration" if table["iteration"].notna().all() else "position").reset_index(drop=True)


def compare_stage(
    run_dirs: list[str | Path], out_dir: str | Path, n_panels: int = 4, n_boot: int = 2000, seed: int = 0
) -> ComparisonReport:
    """Compare two or more finished runs and write ``comparison.json`` and ``figures/`` into ``out_dir``.

    Runs are compared in the given order (Δ = later − earlier); identity (fingerprints, predictions) is checked
    for every pair, the weight delta and paired statistics for consecutive pairs (and first vs last in a series).
    """
    started = time.perf_counter()
    if len(run_dirs) < 2:
        raise VesselnbError(f"compare needs at least two run folders, got {len(run_dirs)}: {list(map(str, run_dirs))}")
    out = Path(out_dir).resolve()
    figures_dir = out / "figures"
    loaded = [load_run(d) for d in tqdm(run_dirs, desc="reading runs", leave=False)]
    for run, label in zip(loaded, _unique_labels([r.name for r in loaded]), strict=True):
        run.label = label

    identity: dict[str, list] = {key: [] for key in IDENTITY_KEYS}
    notes: list[str] = []
    for run_a, run_b in itertools.combinations(loaded, 2):
        if run_a.fingerprint and run_a.fingerprint == run_b.fingerprint:
            identity["identical_weights"].append([run_a.label, run_b.label])
        if run_a.predictions_hash and run_a.predictions_hash == run_b.predictions_hash:
            identity["identical_predictions"].append([run_a.label, run_b.label])

    pairs: list[PairedComparison] = []
    figures: dict[str, Path] = {}
    for i, j in tqdm(_pairs_to_compare(len(loaded)), desc="comparing pairs", leave=False):
        run_a, run_b = loaded[i], loaded[j]
        pair = paired_comparison(run_a.metrics, run_b.metrics, run_a.label, run_b.label, n_boot=n_boot, seed=seed)
        key = f"{run_a.label}_vs_{run_b.label}"
        pair.weights, identical, pair.weights_note = _weight_delta(run_a, run_b)
        _add_store_errors(pair.status_changes, run_a, run_b)
        labels = [run_a.label, run_b.label]
        if identical and labels not in identity["identical_weights"]:
            identity["identical_weights"].append(labels)
        rel = _max_rel_change(pair.weights, pair.weights_note)
        if not identical and rel is not None and rel < NEAR_ZERO_REL_CHANGE:
            identity["near_zero_weight_delta"].append([run_a.label, run_b.label, rel])
        if labels not in identity["identical_predictions"] and pair.n_left_out and pair.n_common:
            all_zero = all((pair.per_sample[f"{m}_delta"].fillna(0) == 0).all() for m in pair.stats.index)
            common_ids = list(pair.per_sample["sample_id"])
            if all_zero and pair.status_changes.empty and _masks_identical(run_a, run_b, common_ids):
                identity["identical_predictions"].append(labels)
        pair.figures["scatter"] = _save(_scatter_figure(pair), figures_dir / f"{key}_scatter.png")
        panel_ids = _largest_delta_ids(pair, n_panels)
        if panel_ids:
            ground_truth, gt_note = _ground_truth_reader(run_a, panel_ids)
            figure = _disagreement_figure(pair, run_a, run_b, panel_ids, ground_truth)
            # 75 dpi keeps each frame near its native size and the attachable HTML report small
            pair.figures["panels"] = _save(figure, figures_dir / f"{key}_panels.png", dpi=75)
            pair.panels_note = gt_note
        figures.update({f"{key}_{name}": path for name, path in pair.figures.items()})
        pairs.append(pair)
        if pair.n_left_out:
            notes.append(f"{key}: {pair.n_left_out} samples not in both runs were left out")

    series = None
    if len(loaded) > 2:
        series = _series_table(loaded, n_boot=n_boot, seed=seed)
        figures["series"] = _save(_series_figure(series), figures_dir / "series.png")
        if any(run.iteration is None for run in loaded):
            notes.append(
                "some runs have no iteration (params 'iteration' or iter_N in the checkpoint name): "
                "the curve uses the order of the runs instead"
            )

    headline_pair = pairs[-1] if len(loaded) > 2 else pairs[0]
    report = ComparisonReport(
        runs=loaded,
        identity=identity,
        identity_notes=notes,
        pairs=pairs,
        series=series,
        headline={},
        out_dir=out,
        figures=figures,
        seconds=0.0,
    )
    report.headline = _headline(headline_pair, report.identity_alert)
    report.seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    return report


def _largest_delta_ids(pair: PairedComparison, k: int) -> list[str]:
    """Samples with the largest |Δ| of the primary metric (non-zero only: identical samples show nothing)."""
    column = f"{PRIMARY_METRIC}_delta"
    deltas = pair.per_sample[["sample_id", column]].dropna()
    deltas = deltas[deltas[column] != 0]
    order = deltas[column].abs().sort_values(ascending=False).index[:k]
    return list(deltas.loc[order, "sample_id"])


def _headline(pair: PairedComparison, identity_alert: bool) -> dict[str, Any]:
    """The one line the index page shows for this comparison."""
    row = pair.stats.loc[PRIMARY_METRIC]
    return {
        "text": ("SAME MODEL? " if identity_alert else "") + pair.verdict,
        "a": pair.a,
        "b": pair.b,
        "metric": PRIMARY_METRIC,
        "delta_mean": row["delta_mean"],
        "ci95": [row["ci95_lo"], row["ci95_hi"]],
        "wilcoxon_p": row["wilcoxon_p"],
        "n_common": pair.n_common,
        "n_left_out": pair.n_left_out,
        "better": pair.better,
        "identity_alert": identity_alert,
    }

