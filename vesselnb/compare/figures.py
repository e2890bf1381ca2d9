"""The comparison's figures: per-sample scatter, where the runs disagree most, metrics along a series of runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vesselnb import viz
from vesselnb.compare.paired import PairedComparison
from vesselnb.compare.runs import RunInputs
from vesselnb.data import list_samples, load_ground_truth
from vesselnb.errors import VesselnbError
from vesselnb.metrics import HIGHER_IS_BETTER
from vesselnb.params import DEFAULT_NAME_REGEX

if TYPE_CHECKING:
    from vesselnb.pseudonym import Pseudonyms


def largest_delta_ids(pair: PairedComparison, k: int) -> list[str]:
    """Samples with the largest |Δ| of the primary metric (non-zero only: identical samples show nothing)."""
    column = f"{pair.settings.primary_metric}_delta"
    if column not in pair.per_sample.columns:
        return []
    deltas = pair.per_sample[["sample_id", column]].dropna()
    deltas = deltas[deltas[column] != 0]
    order = deltas[column].abs().sort_values(ascending=False).index[:k]
    return list(deltas.loc[order, "sample_id"])


def save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write the figure under ``figures/`` and release it (reports can hold many pairs)."""
    viz.save_figure(fig, path, dpi=dpi)
    viz.close(fig)
    return path


def scatter_figure(pair: PairedComparison, metrics: list[str], names: Pseudonyms | None = None) -> Figure:
    """Per-sample A against B for each metric: points off the diagonal are where the runs differ.

    ``names`` labels the legend by pseudonym (None: by patient name).
    """
    fig = Figure(figsize=(4.2 * len(metrics), 4.0), layout="constrained")
    for axis, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        x = pair.per_sample[f"{metric}_a"].to_numpy(dtype=float)
        y = pair.per_sample[f"{metric}_b"].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        patients = {str(p) if names is None else names.patient(str(p)): p for p in pair.per_sample["patient"].unique()}
        for label in sorted(patients):  # by pseudonym, so the legend order does not hint at the names' order
            mask = ok & (pair.per_sample["patient"] == patients[label]).to_numpy()
            axis.scatter(x[mask], y[mask], s=18, alpha=0.8, label=label)
        if ok.any():
            low, high = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
            axis.plot([low, high], [low, high], color="grey", lw=1, ls="--")
        axis.set_xlabel(f"{metric} — {pair.a}")
        axis.set_ylabel(f"{metric} — {pair.b}")
        row = pair.stats.loc[metric]
        axis.set_title(f"{metric} ({row['better_when']} is better; {row['direction']})", fontsize=9)
    if len(pair.per_sample["patient"].unique()) <= 12 and fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize=7, title="patient", title_fontsize=7)
    return fig


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def ground_truth_reader(run: RunInputs, sample_ids: list[str]) -> tuple[Any, str]:
    """``(sample_id -> bool mask | None, note)`` from the run's recorded params, via the analysis stage's GT reader.

    Only the panels need ground truth; when it cannot be found the panels show predictions alone and say why.
    """
    data = run.params.data if run.params is not None else None
    if data is None or data.annotations is None or data.images is None:
        return None, f"{run.folder.manifest_path}: no data paths recorded, so the panels show no ground truth"
    try:
        samples = list_samples(data.images, data.image_glob, data.name_regex or DEFAULT_NAME_REGEX, data.limit)
        wanted = set(sample_ids)
        # quiet: stage 03 already reported this dataset's annotation problems; the panels only need the masks
        truth = load_ground_truth(data.annotations, [s for s in samples if s.sample_id in wanted],
                                  data.annotation_format, polygon_fill=data.polygon_fill, quiet=True)
    except VesselnbError as exc:
        return None, f"ground truth not shown in the panels: {exc}"
    return (lambda sample_id: truth.mask(sample_id) if sample_id in truth else None), ""


def disagreement_figure(
    pair: PairedComparison, run_a: RunInputs, run_b: RunInputs, sample_ids: list[str], ground_truth: Any,
    names: Pseudonyms | None = None,
) -> Figure:
    """For each sample: GT, A and B as error overlays against GT, and A-vs-B (white both, cyan only A, magenta only B).

    ``names`` pseudonymises the sample ids in the titles (None: shown as they are).

    The A-vs-B panel is ``viz.error_overlay`` with A in the place of ground truth, so its colours read as above.
    """
    primary = pair.settings.primary_metric
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
        shown = _short(viz.shown_id(sample_id, names))
        title_a = f"{run_a.label}: {primary} {line[f'{primary}_a']:.3f}"
        title_b = f"{run_b.label}: {primary} {line[f'{primary}_b']:.3f}"
        if gt is not None:
            panels = [
                (viz.tint(image, gt, viz.GT_RGB), f"{shown}\nground truth"),
                (viz.error_overlay(image, gt, mask_a), title_a),
                (viz.error_overlay(image, gt, mask_b), title_b),
            ]
        else:
            panels = [
                (image, f"{shown}\n(ground truth not available)"),
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


def series_figure(series: pd.DataFrame, metrics: list[str]) -> Figure:
    """Mean metrics against training iteration (run order when a run has none), patient-bootstrap CIs as bars."""
    by_iteration = bool(series["iteration"].notna().all())
    x_column = "iteration" if by_iteration else "position"
    metrics = [m for m in metrics if m in series.columns]
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
        axis.set_title(f"mean {metric} ({'higher' if HIGHER_IS_BETTER.get(metric, True) else 'lower'} is better)",
                       fontsize=9)
    return fig
