"""Pure statistics shared by the error analysis (stage 03) and the comparison (stage 04).

The data are nested: patient → sequence → frame. Frames of one sequence are near-duplicates and sequences of one
patient are correlated, so **the patient is the unit of inference** here:

- intervals are cluster bootstraps that resample whole patients (``scipy.stats.bootstrap`` over per-patient sums and
  counts, ``paired=True``: the statistic is the per-frame mean, re-weighted by the resampled patients);
- paired tests run on per-patient mean differences (``scipy.stats.wilcoxon``, or a sign-flip
  ``scipy.stats.permutation_test``), never on frames as if they were independent;
- p-values of several metrics are corrected together (Holm, ``statsmodels.stats.multitest.multipletests``);
- below :data:`MIN_PATIENTS` patients no interval is given: the reason is returned instead (and reports show the
  per-patient values);
- a threshold recommended to the user is chosen by leave-one-patient-out cross-validation and comes with the score of
  the held-out patients (:func:`cv_threshold`); the in-sample optimum is returned too, labelled optimistic.

Everything is a function of arrays or DataFrames (torchmetrics' functional style): no I/O, no state, seeds explicit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

MIN_PATIENTS = 10  # below this many patients no interval is shown (percentiles of 3 patient means are not a CI)
LEVEL = 0.95
ALPHA = 0.05
EXACT_PERMUTATION_LIMIT = 16  # up to 2**16 sign flips are enumerated exactly; more are sampled
PairedTest = Literal["wilcoxon", "permutation"]


# --- counts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """How many patients, sequences and frames a number rests on (shown beside every interval)."""

    n_patients: int
    n_sequences: int
    n_frames: int

    def text(self) -> str:
        """``12 patients · 24 sequences · 96 frames``."""
        return f"{self.n_patients} patients · {self.n_sequences} sequences · {self.n_frames} frames"

    def as_dict(self) -> dict[str, int]:
        return {"n_patients": self.n_patients, "n_sequences": self.n_sequences, "n_frames": self.n_frames}


def count_units(patients: Sequence[Any], sequences: Sequence[Any] | None = None) -> Counts:
    """Distinct patients, distinct (patient, sequence) pairs and frames; sequences default to one per patient."""
    patients = list(patients)
    pairs = set(zip(patients, sequences, strict=True)) if sequences is not None else set(patients)
    return Counts(len(set(patients)), len(pairs), len(patients))


# --- intervals ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A per-frame mean with its patient-cluster bootstrap interval, or the reason there is none."""

    estimate: float
    low: float
    high: float
    counts: Counts
    level: float = LEVEL
    withheld: str = ""  # why no interval is given ("" when low/high are meaningful)

    @property
    def shown(self) -> bool:
        return not self.withheld and math.isfinite(self.low) and math.isfinite(self.high)

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval is shown and lies entirely on one side of ``value``."""
        return self.shown and (self.low > value or self.high < value)

    def text(self, digits: int = 4) -> str:
        """``0.6123 [0.58, 0.64] (12 patients · 24 sequences · 96 frames)`` or the estimate and why no CI."""
        if not self.shown:
            return f"{self.estimate:.{digits}f} (no CI: {self.withheld or 'not computable'}; {self.counts.text()})"
        return (f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({self.level:.0%} CI by patient; {self.counts.text()})")

    def as_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low if self.shown else None,
                "high": self.high if self.shown else None, "level": self.level, "withheld": self.withheld,
                **self.counts.as_dict()}


def patient_sums(values: Sequence[float], patients: Sequence[Any]) -> pd.DataFrame:
    """Per patient: sum and count of the finite values (non-finite ones are left out; callers count them)."""
    array = np.asarray(values, dtype=float)
    finite = np.isfinite(array)
    frame = pd.DataFrame({"v": array[finite], "p": np.asarray(patients, dtype=object)[finite]})
    return frame.groupby("p", sort=True)["v"].agg(["sum", "count", "mean"])


def _ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def patient_bootstrap_ci(
    values: Sequence[float],
    patients: Sequence[Any],
    sequences: Sequence[Any] | None = None,
    *,
    n_resamples: int = 1000,
    level: float = LEVEL,
    seed: int = 0,
    min_patients: int = MIN_PATIENTS,
    method: Literal["BCa", "percentile", "basic"] = "BCa",
) -> Interval:
    """Mean over frames with a bootstrap CI that resamples whole patients (cluster bootstrap).

    ``scipy.stats.bootstrap`` resamples patients (per-patient sums and counts, ``paired=True``) and recomputes the
    per-frame mean Σ sums / Σ counts, so a patient with more frames weighs more, as in the point estimate; with
    equal frames per patient this is the bootstrap of the patient means. Non-finite values are left out.
    Below ``min_patients`` patients the interval is withheld with the reason.

    >>> interval = patient_bootstrap_ci([0.5, 0.6, 0.7, 0.8], ["a", "a", "b", "b"])
    >>> interval.shown, interval.withheld
    (False, 'only 2 patients (a CI needs at least 10)')
    """
    array = np.asarray(values, dtype=float)
    finite = np.isfinite(array)
    patient_array = np.asarray(patients, dtype=object)
    sequence_array = None if sequences is None else np.asarray(sequences, dtype=object)[finite]
    counts = count_units(patient_array[finite], sequence_array)
    if not finite.any():
        return Interval(math.nan, math.nan, math.nan, counts, level, "no finite values")
    estimate = float(array[finite].mean())
    if counts.n_patients < min_patients:
        return Interval(estimate, math.nan, math.nan, counts, level,
                        f"only {counts.n_patients} patients (a CI needs at least {min_patients})")
    if n_resamples <= 0:
        return Interval(estimate, math.nan, math.nan, counts, level, "bootstrap disabled (0 resamples)")
    grouped = patient_sums(array, patient_array)
    means = grouped["mean"].to_numpy()
    if np.allclose(means, means[0]):
        return Interval(estimate, float(means[0]), float(means[0]), counts, level)
    low, high = _scipy_bootstrap(grouped["sum"].to_numpy(), grouped["count"].to_numpy(dtype=float),
                                 n_resamples, level, seed, method)
    return Interval(estimate, low, high, counts, level)


def _scipy_bootstrap(sums: np.ndarray, counts: np.ndarray, n_resamples: int, level: float, seed: int,
                     method: str) -> tuple[float, float]:
    def run(how: str) -> tuple[float, float]:
        with np.errstate(invalid="ignore", divide="ignore"):
            result = scipy_stats.bootstrap((sums, counts), _ratio_of_sums, paired=True, vectorized=True,
                                           n_resamples=n_resamples, confidence_level=level, method=how,
                                           rng=np.random.default_rng(seed))
        return float(result.confidence_interval.low), float(result.confidence_interval.high)

    low, high = run(method)
    if not (math.isfinite(low) and math.isfinite(high)) and method != "percentile":
        low, high = run("percentile")  # BCa is undefined for degenerate jackknife values
    return low, high


# --- paired tests -------------------------------------------------------------------------------------------------


def paired_patient_p(patient_deltas: Sequence[float], test: PairedTest = "wilcoxon") -> tuple[float, str]:
    """Two-sided p-value that the per-patient mean differences are centred on zero, and a note.

    ``wilcoxon``: signed-rank test (exact for small samples without ties); ``permutation``: sign-flip permutation
    test of the mean difference (exact up to 2**16 flips). All-zero differences carry no evidence: p = 1.
    """
    deltas = np.asarray(patient_deltas, dtype=float)
    deltas = deltas[np.isfinite(deltas)]
    if deltas.size == 0:
        return math.nan, "no patient with a finite difference"
    non_zero = int(np.count_nonzero(deltas))
    if non_zero == 0:
        return 1.0, f"all {deltas.size} patient differences are zero: p set to 1"
    if test == "wilcoxon":
        if non_zero < 2:
            return 1.0, "only one patient with a non-zero difference: p set to 1"
        result = scipy_stats.wilcoxon(deltas, zero_method="pratt", alternative="two-sided")
        note = f"{deltas.size - non_zero} zero patient differences (Pratt)" if non_zero < deltas.size else ""
        return float(result.pvalue), note
    exact = deltas.size <= EXACT_PERMUTATION_LIMIT
    result = scipy_stats.permutation_test(
        (deltas,), np.mean, permutation_type="samples", alternative="two-sided", vectorized=True,
        n_resamples=np.inf if exact else 9999, rng=np.random.default_rng(0),
    )
    return float(result.pvalue), "" if exact else "9999 random sign flips"


def holm(p_values: Mapping[str, float], alpha: float = ALPHA) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error over all given metrics); NaN stays NaN and is not counted."""
    keys = [k for k, p in p_values.items() if p is not None and math.isfinite(p)]
    adjusted = {k: math.nan for k in p_values}
    if keys:
        _, corrected, _, _ = multipletests([p_values[k] for k in keys], alpha=alpha, method="holm")
        adjusted.update({k: float(v) for k, v in zip(keys, corrected, strict=True)})
    return adjusted


@dataclass(frozen=True)
class PairedMetric:
    """One metric of B against A on paired frames: Δ = B − A, its patient interval and the patient-level test."""

    metric: str
    higher_is_better: bool
    mean_a: float
    mean_b: float
    delta: Interval  # per-frame mean Δ with a patient-cluster CI
    p_value: float  # paired test on per-patient mean Δ
    patients_better: int  # patients whose mean Δ favours B (beyond ``tolerance``)
    patients_worse: int
    frames_better: int
    frames_worse: int
    frames_tied: int
    note: str = ""

    @property
    def n_pairs(self) -> int:
        return self.delta.counts.n_frames


def paired_metric(
    metric: str,
    values_a: Sequence[float],
    values_b: Sequence[float],
    patients: Sequence[Any],
    sequences: Sequence[Any] | None = None,
    *,
    higher_is_better: bool = True,
    tolerance: float = 0.0,
    test: PairedTest = "wilcoxon",
    n_resamples: int = 1000,
    seed: int = 0,
    min_patients: int = MIN_PATIENTS,
    level: float = LEVEL,
) -> PairedMetric:
    """Paired comparison of one metric; pairs where either value is not finite are left out."""
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    finite = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        delta = np.where(finite, b - a, np.nan)
    patient_array = np.asarray(patients, dtype=object)
    interval = patient_bootstrap_ci(delta, patient_array, sequences, n_resamples=n_resamples, seed=seed,
                                    min_patients=min_patients, level=level)
    per_patient = patient_sums(delta, patient_array)["mean"].to_numpy()
    p_value, note = paired_patient_p(per_patient, test)
    sign = 1.0 if higher_is_better else -1.0
    gain, patient_gain = sign * delta[finite], sign * per_patient
    return PairedMetric(
        metric=metric,
        higher_is_better=higher_is_better,
        mean_a=float(a[finite].mean()) if finite.any() else math.nan,
        mean_b=float(b[finite].mean()) if finite.any() else math.nan,
        delta=interval,
        p_value=p_value,
        patients_better=int(np.sum(patient_gain > tolerance)),
        patients_worse=int(np.sum(patient_gain < -tolerance)),
        frames_better=int(np.sum(gain > tolerance)),
        frames_worse=int(np.sum(gain < -tolerance)),
        frames_tied=int(np.sum(np.abs(gain) <= tolerance)),
        note=note,
    )


def paired_table(results: Sequence[PairedMetric], alpha: float = ALPHA) -> pd.DataFrame:
    """One row per metric with Holm-adjusted p-values over all of them and the direction of a significant Δ.

    ``significant`` needs the Holm p below ``alpha`` *and* a shown patient CI that excludes 0; ``direction`` is
    ``better`` / ``worse`` (for B) when significant, else ``—``.
    """
    adjusted = holm({r.metric: r.p_value for r in results}, alpha)
    rows = []
    for r in results:
        significant = bool(math.isfinite(adjusted[r.metric]) and adjusted[r.metric] < alpha and r.delta.excludes(0))
        b_better = (r.delta.estimate > 0) == r.higher_is_better
        rows.append({
            "metric": r.metric,
            "better_when": "higher" if r.higher_is_better else "lower",
            "mean_a": r.mean_a,
            "mean_b": r.mean_b,
            "delta": r.delta.estimate,
            "ci_low": r.delta.low if r.delta.shown else math.nan,
            "ci_high": r.delta.high if r.delta.shown else math.nan,
            "p": r.p_value,
            "p_holm": adjusted[r.metric],
            "significant": significant,
            "direction": ("better" if b_better else "worse") if significant else "—",
            "patients_better": r.patients_better,
            "patients_worse": r.patients_worse,
            "frames_better": r.frames_better,
            "frames_worse": r.frames_worse,
            "frames_tied": r.frames_tied,
            **r.delta.counts.as_dict(),
            "ci_withheld": r.delta.withheld,
            "note": r.note,
        })
    return pd.DataFrame(rows).set_index("metric")


# --- thresholds ---------------------------------------------------------------------------------------------------


def dice_from_sweep(counts: np.ndarray) -> np.ndarray:
    """Per-frame Dice at each threshold from ``(..., 3)`` TP / FP / FN counts; NaN where the GT is empty."""
    tp, fp, fn = (counts[..., i].astype(float) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold chosen by leave-one-patient-out cross-validation, and the optimistic in-sample optimum."""

    recommended: float  # median of the per-fold choices (each made without the held-out patient)
    out_of_fold: float  # mean over frames of each held-out patient's score at its fold's threshold
    folds: pd.DataFrame  # patient, threshold (chosen without that patient), score (on that patient), n_frames
    in_sample_best: float  # the threshold best on all frames: optimistic, it has seen every patient
    in_sample_score: float
    score_at_recommended: float  # in-sample score at the recommended threshold (also optimistic)
    counts: Counts

    def as_dict(self) -> dict[str, Any]:
        return {"recommended": self.recommended, "out_of_fold_score": self.out_of_fold,
                "in_sample_best (optimistic)": self.in_sample_best,
                "in_sample_score (optimistic)": self.in_sample_score,
                "folds": self.folds.to_dict(orient="records"), **self.counts.as_dict()}


def cv_threshold(
    scores: np.ndarray, patients: Sequence[Any], thresholds: Sequence[float], sequences: Sequence[Any] | None = None
) -> ThresholdChoice | None:
    """Leave-one-patient-out choice of a threshold from per-frame scores ``(frames, thresholds)`` (NaN ignored).

    For each patient, the threshold maximising the mean score of the *other* patients' frames is scored on that
    patient's frames; the out-of-fold score is the mean over all held-out frames. None with fewer than 2 patients.
    """
    scores = np.asarray(scores, dtype=float)
    thresholds = np.asarray(thresholds, dtype=float)
    patient_array = np.asarray(patients, dtype=object)
    unique = sorted(set(patient_array.tolist()), key=str)
    if len(unique) < 2 or scores.size == 0:
        return None
    rows, held_out = [], []
    for patient in unique:
        inside = patient_array == patient
        training = _nanmean_columns(scores[~inside])
        if not np.isfinite(training).any():
            continue
        index = int(np.nanargmax(training))
        held = scores[inside, index]
        held_out.append(held[np.isfinite(held)])
        rows.append({"patient": patient, "threshold": float(thresholds[index]),
                     "score": float(np.nanmean(held)) if np.isfinite(held).any() else math.nan,
                     "n_frames": int(inside.sum())})
    if not rows:
        return None
    folds = pd.DataFrame(rows)
    chosen = float(np.median(folds["threshold"]))
    recommended = float(thresholds[int(np.argmin(np.abs(thresholds - chosen)))])
    everything = _nanmean_columns(scores)
    best = int(np.nanargmax(everything))
    pooled = np.concatenate(held_out) if held_out else np.array([])
    return ThresholdChoice(
        recommended=recommended,
        out_of_fold=float(pooled.mean()) if pooled.size else math.nan,
        folds=folds,
        in_sample_best=float(thresholds[best]),
        in_sample_score=float(everything[best]),
        score_at_recommended=float(everything[int(np.argmin(np.abs(thresholds - recommended)))]),
        counts=count_units(patient_array, sequences),
    )


def _nanmean_columns(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=0)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)
