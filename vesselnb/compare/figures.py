"""The comparison's figures: per-sample scatter, where the runs disagree most, metrics along a series of runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vesselnb import viz
from vesselnb.compare.paired import PairedComparison, signed
from vesselnb.compare.runs import RunInputs
from vesselnb.data import list_samples, load_ground_truth
from vesselnb.errors import VesselnbError
from vesselnb.htmlrepr import number
from vesselnb.masks import resize_mask
from vesselnb.metrics import metric_info
from vesselnb.params import DEFAULT_NAME_REGEX

if TYPE_CHECKING:
    from vesselnb.pseudonym import Pseudonyms


def largest_delta_ids(pair: PairedComparison, k: int) -> list[str]:
    """Samples with the largest |Δ| of the primary metric, spread out: the largest of each patient first, then of
    each further sequence, then the rest (consecutive frames of one sequence look alike and teach nothing new).

    Only non-zero Δ: identical samples show nothing.
    """
    column = f"{pair.settings.primary_metric}_delta"
    if column not in pair.per_sample.columns:
        return []
    deltas = pair.per_sample[["sample_id", "patient", "sequence", column]].dropna(subset=[column])
    deltas = deltas[deltas[column] != 0]
    ranked = deltas.assign(size=deltas[column].abs()).sort_values(["size", "sample_id"], ascending=[False, True])
    chosen: list[str] = []
    for keys in (["patient"], ["patient", "sequence"], ["sample_id"]):
        for sample_id in ranked.drop_duplicates(keys)["sample_id"]:
            if len(chosen) < k and sample_id not in chosen:
                chosen.append(sample_id)
    return sorted(chosen, key=list(ranked["sample_id"]).index)


def save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write the figure under ``figures/`` and release it (reports can hold many pairs)."""
    viz.save_figure(fig, path, dpi=dpi)
    viz.close(fig)
    return path


SCATTER_COLUMNS = 3  # panels per row: six in one row shrank to unreadable fonts at a page's width
MAX_PATIENT_COLOURS = 20  # distinct colours in the scatter's legend (tab20)


def scatter_figure(pair: PairedComparison, metrics: list[str], names: Pseudonyms | None = None) -> Figure:
    """Per-frame A against B for each metric: points off the dashed diagonal are where the runs differ.

    Axis labels carry the metric's unit and the run; each title its direction and the paired test's result.
    ``names`` labels the legend by pseudonym (None: by patient name).
    """
    columns = min(SCATTER_COLUMNS, len(metrics))
    rows = -(-len(metrics) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    patients = {str(p) if names is None else names.patient(str(p)): p for p in pair.per_sample["patient"].unique()}
    for axis, metric in zip(axes, metrics, strict=False):
        info = metric_info(metric)
        x = pair.per_sample[f"{metric}_a"].to_numpy(dtype=float)
        y = pair.per_sample[f"{metric}_b"].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        for label, colour in zip(sorted(patients), patient_colours(len(patients)), strict=True):
            # by pseudonym, so the legend order does not hint at the names' order
            mask = ok & (pair.per_sample["patient"] == patients[label]).to_numpy()
            axis.scatter(x[mask], y[mask], s=18, alpha=0.8, color=colour, label=label)
        if ok.any():
            low, high = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
            axis.plot([low, high], [low, high], color="grey", lw=1, ls="--")
        axis.set_xlabel(f"A: {pair.a}", fontsize=9)
        axis.set_ylabel(f"B: {pair.b}", fontsize=9)
        axis.set_title(f"{info.heading('per frame')}\n{_test_result(pair, metric)}", fontsize=9)
    for axis in axes[len(metrics):]:
        axis.set_visible(False)
    if len(patients) <= MAX_PATIENT_COLOURS and axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, title="patient", title_fontsize=7, ncols=1 if len(patients) <= 10 else 2)
    return fig


def patient_colours(n_patients: int) -> list[Any]:
    """One distinct colour per patient (matplotlib's tab20, dark shades first) while a legend can tell them apart;
    beyond that one colour for all, so no colour ever stands for two patients."""
    if n_patients > MAX_PATIENT_COLOURS:
        return ["#1f77b4"] * n_patients
    palette = list(colormaps["tab20"].colors)
    return (palette[0::2] + palette[1::2])[:n_patients]


def _test_result(pair: PairedComparison, metric: str) -> str:
    """``B significantly better`` / ``worse`` / ``no significant difference`` (Holm, patient CI)."""
    direction = pair.stats.loc[metric, "direction"]
    return f"{pair.b} significantly {direction}" if direction in ("better", "worse") else "no significant difference"


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


# Colours of the A-vs-B panel: none of them is used in the same figure with another meaning (white / magenta /
# cyan are TP / FP / FN against ground truth, red the ground truth, green a prediction shown without ground truth).
BOTH_RGB = (255, 230, 0)  # yellow: predicted by both runs
ONLY_A_RGB = (40, 110, 255)  # blue: predicted by A only
ONLY_B_RGB = (255, 120, 0)  # orange: predicted by B only


def agreement_overlay(image: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
    """RGB uint8: the dimmed frame with pixels both runs predicted yellow, only A's blue, only B's orange."""
    empty = np.zeros(np.asarray(image).shape[:2], dtype=bool)
    base = viz.error_overlay(image, empty, empty)  # the dimmed frame error overlays are drawn on
    shape = base.shape[:2]
    a, b = resize_mask(mask_a, shape), resize_mask(mask_b, shape)
    base[a & b] = BOTH_RGB
    base[a & ~b] = ONLY_A_RGB
    base[b & ~a] = ONLY_B_RGB
    return base


def overlay_legend(a: str, b: str, with_ground_truth: bool) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, meaning) of every colour the disagreement figure draws: one meaning per colour."""
    against = [(viz.GT_RGB, "ground truth (first column)"), (viz.TP_RGB, "true positive (vessel found)"),
               (viz.FP_RGB, "false positive (predicted, not vessel)"), (viz.FN_RGB, "false negative (vessel missed)")]
    alone = [(viz.PRED_RGB, "prediction (no ground truth to score it)")]
    return [*(against if with_ground_truth else alone), (BOTH_RGB, "predicted by both (last column)"),
            (ONLY_A_RGB, f"predicted by {a} (A) only"), (ONLY_B_RGB, f"predicted by {b} (B) only")]


def disagreement_figure(
    pair: PairedComparison, run_a: RunInputs, run_b: RunInputs, sample_ids: list[str], ground_truth: Any,
    names: Pseudonyms | None = None,
) -> Figure:
    """For each sample: GT, A and B as error overlays against GT, and A against B, with a legend of every colour.

    ``names`` pseudonymises the sample ids in the titles (None: shown as they are). Each colour has one meaning in
    the whole figure (:func:`overlay_legend`): the A-vs-B column uses its own colours, not the error overlay's.
    """
    primary = pair.settings.primary_metric
    label = metric_info(primary).label
    fig = Figure(figsize=(13, 3.6 * len(sample_ids) + 1.0), layout="constrained")
    axes = fig.subplots(len(sample_ids), 4, squeeze=False)
    records_a = {r["sample_id"]: r for r in run_a.store.records()}
    any_truth = False
    for row, sample_id in zip(axes, sample_ids, strict=True):
        mask_a, mask_b = run_a.store.mask(sample_id), run_b.store.mask(sample_id)
        try:
            image = viz.load_frame(records_a[sample_id]["image"])
        except (KeyError, OSError):  # frame moved since inference: masks on black, still comparable
            image = np.zeros((*mask_a.shape, 3), dtype=np.uint8)
        gt = ground_truth(sample_id) if ground_truth is not None else None
        line = pair.per_sample.set_index("sample_id").loc[sample_id]
        shown = _short(viz.shown_id(sample_id, names))
        title_a = f"A {run_a.label}: {label} {_value(line[f'{primary}_a'], primary)}"
        title_b = f"B {run_b.label}: {label} {_value(line[f'{primary}_b'], primary)}"
        if gt is not None:
            any_truth = True
            panels = [
                (viz.tint(image, gt, viz.GT_RGB), f"{shown}\nground truth"),
                (viz.error_overlay(image, gt, mask_a), f"{title_a}\nagainst ground truth"),
                (viz.error_overlay(image, gt, mask_b), f"{title_b}\nagainst ground truth"),
            ]
        else:
            panels = [
                (image, f"{shown}\n(ground truth not available)"),
                (viz.tint(image, mask_a, viz.PRED_RGB), title_a),
                (viz.tint(image, mask_b, viz.PRED_RGB), title_b),
            ]
        delta = f"Δ {label} (B − A) {_value(line[f'{primary}_delta'], primary, sign=True)}"
        panels.append((agreement_overlay(image, mask_a, mask_b), f"A against B\n{delta}"))
        for axis, (picture, title) in zip(row, panels, strict=True):
            axis.imshow(picture)
            axis.set_title(title, fontsize=10)
            axis.axis("off")
    handles = [Patch(facecolor=np.asarray(rgb) / 255.0, edgecolor="#555555", label=text)
               for rgb, text in overlay_legend(run_a.label, run_b.label, any_truth)]
    fig.legend(handles=handles, loc="outside upper center", ncols=4, fontsize=10, frameon=False)
    return fig


def _value(value: float, metric: str, sign: bool = False) -> str:
    unit = metric_info(metric).unit
    text = signed(value) if sign else number(value)
    return f"{text} {unit}" if unit else text


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
        info = metric_info(metric)
        axis.set_ylabel(f"{info.label}{f' ({info.unit})' if info.unit else ''}, mean over frames", fontsize=9)
        axis.set_title(f"{info.heading('mean over frames')}\nbars: 95% CI, bootstrap over patients", fontsize=9)
    return fig
