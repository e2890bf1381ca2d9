"""Stage 04: compare two or more finished runs and write ``comparison.json`` and ``figures/`` into ``out_dir``.

Inputs are the files earlier stages wrote into each run folder (see docs/contracts.md); nothing is re-scored: the
per-frame metrics, the threshold sweep counts and each run's intervals come from stage 03, only the weight diff is
computed here. Runs are compared in the given order (Δ = later − earlier).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from vesselnb.compare import figures as fig
from vesselnb.compare.paired import (
    CompareSettings,
    PairedComparison,
    add_store_errors,
    paired_comparison,
    threshold_comparison,
)
from vesselnb.compare.report import ComparisonReport
from vesselnb.compare.runs import (
    IDENTITY_KEYS,
    NEAR_ZERO_REL_CHANGE,
    RunInputs,
    comparability,
    frame_set_note,
    load_run,
    masks_identical,
    max_rel_change,
    unique_labels,
    weight_delta,
)
from vesselnb.errors import VesselnbError
from vesselnb.metrics import HIGHER_IS_BETTER
from vesselnb.pseudonym import Pseudonyms
from vesselnb.run_folder import FIGURES_DIR, RunFolder

SCATTER_MAX_METRICS = 6


def pairs_to_compare(n_runs: int) -> list[tuple[int, int]]:
    """Two runs: the pair. A series: each checkpoint against the next, plus first against last."""
    pairs = [(i, i + 1) for i in range(n_runs - 1)]
    if n_runs > 2:
        pairs.append((0, n_runs - 1))
    return pairs


def series_table(runs: list[RunInputs], metrics: list[str]) -> pd.DataFrame:
    """Per run: stage 03's mean and interval of each metric, read from its summary.json (computed once, there)."""
    rows = []
    for position, run in enumerate(runs):
        intervals = run.summary.get("intervals") or {}
        row: dict[str, Any] = {"run": run.label, "iteration": run.iteration, "position": position}
        for metric in metrics:
            interval = intervals.get(metric) or {}
            row[metric] = interval.get("estimate", math.nan)
            row[f"{metric}_lo"] = interval.get("low") if interval.get("low") is not None else math.nan
            row[f"{metric}_hi"] = interval.get("high") if interval.get("high") is not None else math.nan
        row["n_patients"] = (run.summary.get("units") or {}).get("n_patients")
        row["n_scored"] = int(run.metrics["has_gt"].astype(bool).sum())
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("iteration" if table["iteration"].notna().all() else "position").reset_index(drop=True)


def compare_stage(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    n_panels: int = 4,
    settings: CompareSettings | None = None,
    min_shared_fraction: float | None = None,
    primary_metric: str | None = None,
    names: Pseudonyms | None = None,
) -> ComparisonReport:
    """Compare two or more finished runs and write ``comparison.json`` and ``figures/`` into ``out_dir``.

    Identity (fingerprints, predictions) is checked for every pair, comparability (shared frames, scoring settings),
    the weight delta and paired statistics for consecutive pairs (and first vs last in a series). Settings default
    to the first run's ``analysis`` params. Problems are reported in the banner; call
    :meth:`ComparisonReport.raise_if_incomparable` to fail (notebook 04 does, after showing the report).
    ``names`` (``pseudonym.for_comparison``) replaces patients in the figures and tables; None shows them.
    """
    started = time.perf_counter()
    if len(run_dirs) < 2:
        raise VesselnbError(f"compare needs at least two run folders, got {len(run_dirs)}: {list(map(str, run_dirs))}")
    out = Path(out_dir).resolve()
    figures_dir = out / FIGURES_DIR  # any --out name, so not RunFolder.figures_dir (which keys on compare_)
    loaded = [load_run(d) for d in tqdm(run_dirs, desc="reading runs", leave=False)]
    for run, label in zip(loaded, unique_labels([r.name for r in loaded]), strict=True):
        run.label = label
    settings = settings or CompareSettings.from_analysis(loaded[0].analysis_params,
                                                         min_shared_fraction=min_shared_fraction,
                                                         primary_metric=primary_metric)
    if settings.primary_metric not in HIGHER_IS_BETTER:
        raise VesselnbError(f"primary metric {settings.primary_metric!r} is not a per-frame metric; choose one of "
                            f"{', '.join(HIGHER_IS_BETTER)} (analysis.primary_metric)")

    identity: dict[str, list] = {key: [] for key in IDENTITY_KEYS}
    notes: list[str] = []
    for run_a, run_b in itertools.combinations(loaded, 2):
        if run_a.fingerprint and run_a.fingerprint == run_b.fingerprint:
            identity["identical_weights"].append([run_a.label, run_b.label])
        if run_a.predictions_hash and run_a.predictions_hash == run_b.predictions_hash:
            identity["identical_predictions"].append([run_a.label, run_b.label])

    pairs: list[PairedComparison] = []
    problems = []
    figures: dict[str, Path] = {}
    for i, j in tqdm(pairs_to_compare(len(loaded)), desc="comparing pairs", leave=False):
        run_a, run_b = loaded[i], loaded[j]
        pair = paired_comparison(run_a.metrics, run_b.metrics, run_a.label, run_b.label, settings)
        pair.problems = comparability(run_a, run_b, settings.min_shared_fraction)
        problems.extend(pair.problems)
        if note := frame_set_note(run_a, run_b):
            notes.append(note)
        key = f"{run_a.label}_vs_{run_b.label}"
        _identity(pair, run_a, run_b, identity)
        add_store_errors(pair.status_changes, run_a, run_b)
        pair.thresholds, pair.thresholds_note = threshold_comparison(pair, run_a, run_b)
        _pair_figures(pair, run_a, run_b, figures_dir, n_panels, names)
        figures.update({f"{key}_{name}": path for name, path in pair.figures.items()})
        pairs.append(pair)
        if pair.n_left_out:
            notes.append(f"{key}: {pair.n_left_out} samples not in both runs were left out")

    series = None
    if len(loaded) > 2:
        metrics = list(dict.fromkeys([settings.primary_metric, "dice", "cldice", "hd95", "betti0_error"]))
        series = series_table(loaded, metrics)
        figures["series"] = fig.save(fig.series_figure(series, metrics), figures_dir / "series.png")
        if any(run.iteration is None for run in loaded):
            notes.append("some runs have no iteration (params 'iteration' or iter_N in the checkpoint name): "
                         "the curve uses the order of the runs instead")

    report = ComparisonReport(runs=loaded, identity=identity, identity_notes=notes, problems=problems, pairs=pairs,
                              series=series, headline={}, out_dir=out, figures=figures, seconds=0.0,
                              names=names)
    report.headline = headline(pairs[-1] if len(loaded) > 2 else pairs[0], report.identity_alert, report.comparable)
    report.seconds = time.perf_counter() - started
    RunFolder(out).create().write_comparison(report.to_json())
    return report


def _identity(pair: PairedComparison, run_a: RunInputs, run_b: RunInputs, identity: dict[str, list]) -> None:
    """Weight delta, identical weights / predictions / near-zero delta for one pair (added to ``identity``)."""
    pair.weights, identical, pair.weights_note = weight_delta(run_a, run_b)
    labels = [run_a.label, run_b.label]
    if identical and labels not in identity["identical_weights"]:
        identity["identical_weights"].append(labels)
    rel = max_rel_change(pair.weights, pair.weights_note)
    if not identical and rel is not None and rel < NEAR_ZERO_REL_CHANGE:
        identity["near_zero_weight_delta"].append([run_a.label, run_b.label, rel])
    if labels not in identity["identical_predictions"] and pair.n_left_out and pair.n_common:
        all_zero = all((pair.per_sample[f"{m}_delta"].fillna(0) == 0).all() for m in pair.stats.index)
        common_ids = list(pair.per_sample["sample_id"])
        if all_zero and pair.status_changes.empty and masks_identical(run_a, run_b, common_ids):
            identity["identical_predictions"].append(labels)


def _pair_figures(pair: PairedComparison, run_a: RunInputs, run_b: RunInputs, figures_dir: Path,
                  n_panels: int, names: Pseudonyms | None = None) -> None:
    key = f"{run_a.label}_vs_{run_b.label}"
    shown = pair.key_metrics()[:SCATTER_MAX_METRICS]
    shown = [m for m in shown if m in pair.stats.index]
    if shown:
        pair.figures["scatter"] = fig.save(fig.scatter_figure(pair, shown, names), figures_dir / f"{key}_scatter.png")
    panel_ids = fig.largest_delta_ids(pair, n_panels)
    if panel_ids:
        ground_truth, gt_note = fig.ground_truth_reader(run_a, panel_ids)
        figure = fig.disagreement_figure(pair, run_a, run_b, panel_ids, ground_truth, names)
        # 75 dpi keeps each frame near its native size and the attachable HTML report small
        pair.figures["panels"] = fig.save(figure, figures_dir / f"{key}_panels.png", dpi=75)
        pair.panels_note = gt_note


def headline(pair: PairedComparison, identity_alert: bool, comparable: bool) -> dict[str, Any]:
    """The lines the index page shows for this comparison: the verdict and what got worse."""
    primary = pair.settings.primary_metric
    row = pair.stats.loc[primary] if primary in pair.stats.index else None
    prefix = ("SAME MODEL? " if identity_alert else "") + ("NOT COMPARABLE: " if not comparable else "")
    return {
        "text": prefix + pair.verdict,
        "a": pair.a,
        "b": pair.b,
        "metric": primary,
        "delta_mean": None if row is None else row["delta"],
        "ci95": None if row is None or row["ci_withheld"] else [row["ci_low"], row["ci_high"]],
        "p_holm": None if row is None else row["p_holm"],
        "n_patients": pair.counts.n_patients,
        "n_common": pair.n_common,
        "n_left_out": pair.n_left_out,
        "better": pair.better,
        "significantly_worse": list(pair.worse.index),
        "identity_alert": identity_alert,
        "comparable": comparable,
    }
