"""Run A against run B on the frames both scored: every per-frame metric, tested by patient, Holm-corrected.

Δ = B − A throughout. For each metric the interval is a patient-cluster bootstrap of the mean Δ and the test a paired
test on per-patient mean Δ (:mod:`vesselnb.stats`); p-values are Holm-adjusted over all metrics compared. The verdict
names the declared primary metric (``analysis.primary_metric``) and, as prominently, every metric that got
significantly worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vesselnb import htmlrepr as hr
from vesselnb import stats
from vesselnb.compare.runs import Problem, RunInputs
from vesselnb.metrics import HIGHER_IS_BETTER, WIDTH_BIN_NAMES, metric_info
from vesselnb.params import AnalysisParams

# |Δ| at or below this counts as a tie in the frame/patient counts (Dice 0.001 is below any meaningful change).
DISTANCE_METRICS = ("hd95", "assd", "hd95_mm", "assd_mm")
COUNT_METRICS = ("betti0_error", "betti1_error", "spurious_components", "largest_spurious_px", "spurious_area_px")


# Per-patient and per-sequence tables show this many metrics at most: a page's width.
FOCUS_LIMIT = 5


def tie_tolerance(metric: str) -> float:
    """Ratios: 0.001; distances: 0.5 px; counts and areas: 0 (integers)."""
    if metric in DISTANCE_METRICS:
        return 0.5
    if metric in COUNT_METRICS:
        return 0.0
    return 1e-3


@dataclass(frozen=True)
class CompareSettings:
    """How a comparison tests (read from the first run's ``analysis`` params unless given)."""

    primary_metric: str = "dice"
    alpha: float = stats.ALPHA
    min_patients: int = stats.MIN_PATIENTS
    test: stats.PairedTest = "wilcoxon"
    n_boot: int = 1000
    seed: int = 0
    min_shared_fraction: float = 0.9

    @classmethod
    def from_analysis(cls, analysis: AnalysisParams, **overrides: Any) -> CompareSettings:
        """From a run's ``analysis`` params; ``overrides`` that are not None win."""
        values = {"primary_metric": analysis.primary_metric, "min_patients": analysis.min_patients,
                  "test": analysis.paired_test, "n_boot": analysis.bootstrap_samples,
                  "min_shared_fraction": analysis.min_shared_fraction}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class PairedComparison:
    """Run A against run B on the samples both scored; "better"/"worse" are always from B's point of view."""

    a: str
    b: str
    n_common: int
    n_unscored: int  # common samples without ground truth in either run
    only_a: list[str]
    only_b: list[str]
    per_sample: pd.DataFrame  # sample_id, patient, sequence, status_a/b, <metric>_a, <metric>_b, <metric>_delta
    stats: pd.DataFrame  # stats.paired_table: one row per metric
    counts: stats.Counts
    status_changes: pd.DataFrame
    better: str | None
    verdict: str  # one line: who is better on the primary metric, and what got worse
    details: list[str]  # the primary metric's numbers, then one line per significantly worse / better metric
    settings: CompareSettings
    thresholds: pd.DataFrame | None = None
    thresholds_note: str = ""
    weights: pd.DataFrame | None = None  # per-component weight delta (from diff_weights)
    weights_note: str = ""
    panels_note: str = ""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def n_left_out(self) -> int:
        return len(self.only_a) + len(self.only_b)

    @property
    def worse(self) -> pd.DataFrame:
        """Metrics significantly worse for B (after Holm)."""
        return self.stats[self.stats["direction"] == "worse"]

    @property
    def regressions(self) -> list[str]:
        """Metrics significantly worse for the winner of the primary metric (for B when there is none)."""
        loser_direction = "better" if self.better == self.a else "worse"
        return [m for m in self.stats.index if self.stats.loc[m, "direction"] == loser_direction
                and m != self.settings.primary_metric]

    @property
    def too_few_patients(self) -> bool:
        return self.counts.n_patients < self.settings.min_patients

    def per_patient(self, metrics: list[str] | None = None) -> pd.DataFrame:
        """Per-patient mean of A, B and Δ for the primary metric and the ones the verdict warns about."""
        return _grouped(self.per_sample, ["patient"], metrics or self.focus_metrics())

    def per_sequence(self, metrics: list[str] | None = None) -> pd.DataFrame:
        """Per-(patient, sequence) mean Δ of the primary metric and the ones the verdict warns about."""
        return _grouped(self.per_sample, ["patient", "sequence"], metrics or self.focus_metrics(), deltas_only=True)

    def focus_metrics(self, limit: int = FOCUS_LIMIT) -> list[str]:
        """The primary metric and the metrics the verdict warns about (:func:`focus_metrics`), at most ``limit``."""
        return focus_metrics(self.stats, self.settings.primary_metric)[:limit]

    def key_metrics(self) -> list[str]:
        """The focus metrics, then every other significant one, in report order (the scatter's panels)."""
        significant = [m for m in self.stats.index if self.stats.loc[m, "significant"]]
        return list(dict.fromkeys([*focus_metrics(self.stats, self.settings.primary_metric), *significant]))

    def width_bins(self) -> pd.DataFrame:
        """The paired rows of recall by vessel width (thin, medium, thick)."""
        names = [f"recall_{name}" for name in WIDTH_BIN_NAMES if f"recall_{name}" in self.stats.index]
        return self.stats.loc[names]


def _grouped(joined: pd.DataFrame, by: list[str], metrics: list[str], deltas_only: bool = False) -> pd.DataFrame:
    aggregations: dict[str, tuple[str, str]] = {"frames": ("sample_id", "count")}
    for metric in metrics:
        if f"{metric}_delta" not in joined.columns:
            continue
        if not deltas_only:
            aggregations[f"{metric}_a"] = (f"{metric}_a", "mean")
            aggregations[f"{metric}_b"] = (f"{metric}_b", "mean")
        aggregations[f"{metric}_delta"] = (f"{metric}_delta", "mean")
    return joined.groupby(by, sort=True).agg(**aggregations)


def compared_metrics(metrics_a: pd.DataFrame, metrics_b: pd.DataFrame) -> dict[str, bool]:
    """Every per-frame metric both tables hold with at least one finite value (metric -> higher is better)."""
    found = {}
    for metric, higher in HIGHER_IS_BETTER.items():
        if metric in metrics_a.columns and metric in metrics_b.columns:
            finite_a = np.isfinite(metrics_a[metric].to_numpy(dtype=float)).any()
            finite_b = np.isfinite(metrics_b[metric].to_numpy(dtype=float)).any()
            if finite_a and finite_b:
                found[metric] = higher
    return found


def paired_comparison(
    metrics_a: pd.DataFrame,
    metrics_b: pd.DataFrame,
    a: str = "A",
    b: str = "B",
    settings: CompareSettings | None = None,
    metrics: dict[str, bool] | None = None,
) -> PairedComparison:
    """Paired statistics of two metrics tables (``analysis/metrics.parquet`` layout), joined on ``sample_id``.

    Samples present in only one table are left out and listed; samples without ground truth (``has_gt`` false in
    either run) are not scored and counted in ``n_unscored``. Per metric, pairs where either value is not finite
    (NaN: undefined, e.g. empty GT and empty prediction; inf: HD95 of an empty mask) are left out of that metric's
    test; the status table shows those failures instead. ``no_seg``/``error`` samples are scored as the empty masks
    they are (a missed frame is a miss), as stage 03 does.
    """
    settings = settings or CompareSettings()
    metrics = metrics or compared_metrics(metrics_a, metrics_b)
    left = metrics_a.reset_index(drop=True).drop_duplicates("sample_id", keep="last").copy()
    right = metrics_b.reset_index(drop=True).drop_duplicates("sample_id", keep="last").copy()
    ids_a, ids_b = set(left["sample_id"]), set(right["sample_id"])
    for table in (left, right):
        if "has_gt" not in table.columns:
            table["has_gt"] = True
        if "sequence" not in table.columns:
            table["sequence"] = ""
    columns = ["sample_id", "patient", "sequence", "status", "has_gt", *metrics]
    joined = left[columns].merge(right[columns].drop(columns=["patient", "sequence"]), on="sample_id",
                                 suffixes=("_a", "_b"))
    joined = joined.sort_values("sample_id").reset_index(drop=True)
    scored = (joined["has_gt_a"].astype(bool) & joined["has_gt_b"].astype(bool)).to_numpy()
    results = []
    for metric, higher_is_better in metrics.items():
        values_a = np.where(scored, joined[f"{metric}_a"].to_numpy(dtype=float), np.nan)
        values_b = np.where(scored, joined[f"{metric}_b"].to_numpy(dtype=float), np.nan)
        result = stats.paired_metric(
            metric, values_a, values_b, joined["patient"].to_numpy(), joined["sequence"].to_numpy(),
            higher_is_better=higher_is_better, tolerance=tie_tolerance(metric), test=settings.test,
            n_resamples=settings.n_boot, seed=settings.seed, min_patients=settings.min_patients,
        )
        with np.errstate(invalid="ignore"):
            delta = values_b - values_a
        joined[f"{metric}_delta"] = np.where(np.isfinite(delta), delta, np.nan)
        results.append(result)
    table = stats.paired_table(results, settings.alpha)
    counts = stats.count_units(joined["patient"][scored], joined["sequence"][scored])
    better, verdict, details = make_verdict(table, a, b, settings, counts)
    return PairedComparison(
        a=a, b=b, n_common=len(joined), n_unscored=int((~scored).sum()),
        only_a=sorted(ids_a - ids_b), only_b=sorted(ids_b - ids_a), per_sample=joined, stats=table, counts=counts,
        status_changes=_status_changes(joined), better=better, verdict=verdict, details=details, settings=settings,
    )


def signed(value: float) -> str:
    """A difference with its sign (``+0.190``, ``-26.96``), in :func:`htmlrepr.number`'s digits."""
    text = hr.number(value)
    return f"+{text}" if isinstance(value, (int, float)) and value > 0 and math.isfinite(value) else text


def with_unit(value: float, metric: str, sign: bool = True) -> str:
    """``+4.917 components``: a value of ``metric`` with its unit (ratios have none)."""
    unit = metric_info(metric).unit
    text = signed(value) if sign else hr.number(value)
    return f"{text} {unit}" if unit else text


def p_text(value: float) -> str:
    """A p-value for a reader: three decimals, ``< 0.001`` below that, ``n/a`` when there is none."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return "< 0.001" if value < 1e-3 else f"{value:.3f}"


def interval_text(row: pd.Series, metric: str = "") -> str:
    """``[+0.174, +0.213]`` (with the metric's unit when given), or why there is no interval."""
    if row["ci_withheld"]:
        return f"no CI ({row['ci_withheld']})"
    if not (math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])):
        return "no CI"
    unit = f" {metric_info(metric).unit}" if metric and metric_info(metric).unit else ""
    return f"[{signed(row['ci_low'])}, {signed(row['ci_high'])}]{unit}"


def _metric_line(row: pd.Series, metric: str, a: str, b: str) -> str:
    """``Betti-0 error (components, ↓ better): mean Δ +4.917 components (B − A), 95% CI ..., B worse on ...``."""
    b_worse = row["direction"] == "worse"
    frames, patients = (row["frames_worse"], row["patients_worse"]) if b_worse else (
        row["frames_better"], row["patients_better"])
    who = f"{b} worse" if b_worse else f"{b} better"
    n_frames = int(row["frames_better"] + row["frames_worse"] + row["frames_tied"])
    interval = interval_text(row, metric)
    interval = interval if interval.startswith("no CI") else f"95% CI {interval} (bootstrap over patients)"
    return (f"{metric_info(metric).heading()}: mean Δ {with_unit(row['delta'], metric)} ({b} − {a}), "
            f"{interval}, Holm p {_p_clause(row['p_holm'])}; "
            f"{who} on {int(frames)}/{n_frames} frames and {int(patients)}/{int(row['n_patients'])} patients")


def _p_clause(value: float) -> str:
    text = p_text(value)
    return text if text.startswith("<") else f"= {text}"


def focus_metrics(table: pd.DataFrame, primary: str) -> list[str]:
    """The primary metric, then the metrics a verdict warns about: significantly worse for the primary's winner
    (for B when there is none), then, without a winner, those significantly better for B."""
    significant = table[table["significant"]]
    row = table.loc[primary] if primary in table.index else None
    winner_is_a = row is not None and bool(row["significant"]) and row["direction"] == "worse"
    worse_side = "better" if winner_is_a else "worse"
    worse = [m for m in significant.index if significant.loc[m, "direction"] == worse_side and m != primary]
    named = [primary, *worse]
    if row is None or not row["significant"]:
        named += [m for m in significant.index if significant.loc[m, "direction"] == "better" and m != primary]
    return named


def make_verdict(table: pd.DataFrame, a: str, b: str, settings: CompareSettings,
                 counts: stats.Counts) -> tuple[str | None, str, list[str]]:
    """(winner or None, one-line verdict, detail lines).

    The winner is decided by the primary metric alone (Holm p < alpha and a patient CI excluding 0); the line then
    names every metric on which the winner is significantly worse, as prominently as the primary metric, and ends
    with the patients and frames it rests on (the index shows this line alone).
    """
    primary = settings.primary_metric
    rests_on = f" — on {counts.n_patients} patients, {counts.n_frames} frames"
    name = metric_info(primary).label
    if primary not in table.index or not math.isfinite(table.loc[primary, "delta"]):
        return None, f"{name} could not be compared (no finite pairs)", []
    row = table.loc[primary]
    details = [_metric_line(row, primary, a, b) + f" ({counts.text()})"]
    if counts.n_patients < settings.min_patients:
        details.append(f"only {counts.n_patients} patients (fewer than {settings.min_patients}): no intervals; "
                       "see the per-patient Δ")
    significant = table[table["significant"]]
    b_worse = [m for m in significant.index if significant.loc[m, "direction"] == "worse" and m != primary]
    b_better = [m for m in significant.index if significant.loc[m, "direction"] == "better" and m != primary]
    if not row["significant"]:
        text = f"No significant difference on {name} between {a} and {b}"
        if b_worse:
            text += f"; {b} is significantly worse on " + ", ".join(_short_effect(table, m, True) for m in b_worse)
        if b_better:
            text += f"; {b} is significantly better on " + ", ".join(_labels(b_better))
        return None, text + rests_on, details + [_metric_line(table.loc[m], m, a, b) for m in b_worse + b_better]
    winner, loser = (b, a) if row["direction"] == "better" else (a, b)
    winner_worse = b_worse if winner == b else b_better
    winner_better = b_better if winner == b else b_worse
    text = f"{winner} is better than {loser} on {name} (mean Δ {with_unit(row['delta'], primary)}, {b} − {a})"
    if winner_worse:
        text += f"; {winner} is worse on " + ", ".join(_short_effect(table, m, winner == b) for m in winner_worse)
    else:
        text += "; no metric significantly worse"
    lines = [_metric_line(table.loc[m], m, a, b) for m in winner_worse]
    if winner_better:
        lines.append(f"{winner} also significantly better on: {', '.join(_labels(winner_better))}")
    return winner, text + rests_on, details + lines


def _labels(metrics: list[str]) -> list[str]:
    return [metric_info(m).label for m in metrics]


def _short_effect(table: pd.DataFrame, metric: str, b_is_worse: bool) -> str:
    """``Betti-0 error (mean Δ +4.917 components, worse on 84/96 frames)`` for the run that got worse (Δ = B − A)."""
    row = table.loc[metric]
    frames = row["frames_worse"] if b_is_worse else row["frames_better"]
    n_frames = int(row["frames_better"] + row["frames_worse"] + row["frames_tied"])
    return (f"{metric_info(metric).label} (mean Δ {with_unit(row['delta'], metric)}, worse on "
            f"{int(frames)}/{n_frames} frames)")


def _status_changes(joined: pd.DataFrame) -> pd.DataFrame:
    changed = joined[joined["status_a"] != joined["status_b"]]
    return changed[["sample_id", "patient", "status_a", "status_b"]].reset_index(drop=True)


def add_store_errors(changes: pd.DataFrame, run_a: RunInputs, run_b: RunInputs) -> None:
    """The stores' error messages next to each status change, so a reviewer sees why a sample failed."""
    for column, run in (("error_a", run_a), ("error_b", run_b)):
        changes[column] = [run.store.record(sample_id).get("error") or "" for sample_id in changes["sample_id"]]


# --- thresholds ---------------------------------------------------------------------------------------------------


def out_of_fold_dice(run: RunInputs) -> tuple[pd.Series | None, str]:
    """Per-frame Dice of ``run`` at its patient's cross-validated threshold (chosen without that patient).

    From stage 03's ``threshold_sweep.parquet`` and the folds in ``summary.json``; (None, why) without them.
    """
    folds = ((run.summary.get("threshold_cv") or {}).get("folds")) or []
    if run.sweep is None or not folds:
        return None, f"{run.label}: no probability maps / threshold sweep (stage 03 with probability maps writes it)"
    chosen = {str(f["patient"]): float(f["threshold"]) for f in folds}
    sweep = run.sweep.copy()
    sweep["fold_threshold"] = sweep["patient"].astype(str).map(chosen)
    at = sweep[np.isclose(sweep["threshold"], sweep["fold_threshold"])]
    dice = stats.dice_from_sweep(at[["tp", "fp", "fn"]].to_numpy())
    return pd.Series(dice, index=at["sample_id"].to_numpy()), ""


def threshold_comparison(pair: PairedComparison, run_a: RunInputs, run_b: RunInputs) -> tuple[pd.DataFrame | None,
                                                                                              str]:
    """ΔDice at the common threshold of the metrics table and at each run's cross-validated threshold."""
    if "dice" not in pair.stats.index:
        return None, "dice not compared"
    common = pair.stats.loc["dice"]
    thr_a, thr_b = run_a.scoring.get("threshold"), run_b.scoring.get("threshold")
    rows = [{"comparison": f"common threshold {thr_a}" if thr_a == thr_b else f"thresholds {thr_a} / {thr_b}",
             **_threshold_row(common)}]
    dice_a, note_a = out_of_fold_dice(run_a)
    dice_b, note_b = out_of_fold_dice(run_b)
    if dice_a is None or dice_b is None:
        return pd.DataFrame(rows).set_index("comparison"), note_a or note_b
    joined = pair.per_sample[["sample_id", "patient", "sequence"]].copy()
    joined["a"] = joined["sample_id"].map(dice_a)
    joined["b"] = joined["sample_id"].map(dice_b)
    settings = pair.settings
    result = stats.paired_metric("dice", joined["a"], joined["b"], joined["patient"], joined["sequence"],
                                 tolerance=tie_tolerance("dice"), test=settings.test, n_resamples=settings.n_boot,
                                 seed=settings.seed, min_patients=settings.min_patients)
    row = stats.paired_table([result], settings.alpha).loc["dice"]
    rec_a = (run_a.summary.get("threshold_cv") or {}).get("recommended")
    rec_b = (run_b.summary.get("threshold_cv") or {}).get("recommended")
    rows.append({"comparison": f"each run's cross-validated threshold ({pair.a} {rec_a}, {pair.b} {rec_b}; "
                               "out-of-fold per patient)", **_threshold_row(row)})
    note = ("Cross-validated: each patient's frames are scored at the threshold chosen on the other patients "
            "(leave-one-patient-out, stage 03); the p-value is not Holm-corrected with the table above.")
    return pd.DataFrame(rows).set_index("comparison"), note


def _threshold_row(row: pd.Series) -> dict[str, Any]:
    return {"dice_a": row["mean_a"], "dice_b": row["mean_b"], "delta": row["delta"], "ci_low": row["ci_low"],
            "ci_high": row["ci_high"], "p": row["p"], "n_patients": row["n_patients"], "n_frames": row["n_frames"]}
