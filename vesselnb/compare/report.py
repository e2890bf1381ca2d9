"""What :func:`vesselnb.compare.compare_stage` returns: one method per report section, and ``comparison.json``.

Notebook 04 shows the sections in headed cells (banner and verdict first); ``display(report)`` shows them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vesselnb import htmlrepr as hr
from vesselnb import pseudonym
from vesselnb.compare.figures import MAX_PATIENT_COLOURS
from vesselnb.compare.paired import PairedComparison, interval_text, p_text, signed
from vesselnb.compare.runs import IDENTITY_KEYS, NEAR_ZERO_REL_CHANGE, Problem, RunInputs
from vesselnb.errors import StageError
from vesselnb.jsonable import strict_json
from vesselnb.metrics import metric_info
from vesselnb.pseudonym import Pseudonyms


@dataclass(frozen=True)
class Section:
    """A piece of HTML that notebooks display as it is (``display(report.verdict())``)."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html


def _table(frame: pd.DataFrame, index: bool = True) -> str:
    return hr.table(frame, index=index)


def _img_html(path: Path) -> str:
    """Figures inline (base64) so the HTML report can be attached on its own."""
    return hr.figure(Path(path).read_bytes())


# The paired tests of analysis.paired_test (stats.PairedTest), named for the method line.
TEST_NAMES = {"wilcoxon": "Wilcoxon signed-rank test", "permutation": "sign-flip permutation test"}


def _pair_heading(pair: PairedComparison, extra: str = "") -> str:
    return hr.heading(f"A = {pair.a} → B = {pair.b}{extra}")


@dataclass
class ComparisonReport:
    """Everything :func:`compare_stage` found; displays as HTML with the identity and comparability banner first."""

    runs: list[RunInputs]
    identity: dict[str, list]
    identity_notes: list[str]
    problems: list[Problem]
    pairs: list[PairedComparison]
    series: pd.DataFrame | None
    headline: dict[str, Any]
    out_dir: Path
    figures: dict[str, Path]
    seconds: float
    names: Pseudonyms | None = None  # patient pseudonyms for the tables (the figures got them at the stage)

    def __repr__(self) -> str:
        """One line for plain-text outputs; the full report is the HTML."""
        return f"ComparisonReport({' vs '.join(r.label for r in self.runs)}: {self.headline.get('text', '')})"

    @property
    def identity_alert(self) -> bool:
        return any(self.identity[key] for key in IDENTITY_KEYS)

    @property
    def comparable(self) -> bool:
        """False when runs share too few frames or were scored differently (the stage then fails after the report)."""
        return not self.problems

    def raise_if_incomparable(self) -> None:
        """Raise :class:`StageError` naming every problem (``vesselnb compare`` exits non-zero; the report stays)."""
        if self.problems:
            raise StageError("comparison not meaningful: " + " | ".join(p.message for p in self.problems))

    # --- sections -----------------------------------------------------------------------------------------------
    def banner(self) -> Section:
        """Red when two runs are the same model or cannot be compared (too few shared frames, other scoring)."""
        messages = [f"{a} and {b} have identical weights: they are the same model."
                    for a, b in self.identity["identical_weights"]]
        messages += [f"{a} and {b} made identical predictions on every common sample."
                     for a, b in self.identity["identical_predictions"]]
        messages += [f"{a} and {b} differ by a near-zero weight delta (largest relative change {rel:.2e}, below "
                     f"{NEAR_ZERO_REL_CHANGE:g})." for a, b, rel in self.identity["near_zero_weight_delta"]]
        parts = []
        if messages:
            parts.append(hr.banner("⚠ Same model?", level="error", strong=True, lines=[
                *messages, "Metric differences below are not evidence of a better checkpoint."]))
        if self.problems:
            parts.append(hr.banner("⚠ Not comparable as they are", level="error", strong=True, lines=[
                *(p.message for p in self.problems), "The numbers below are shown for diagnosis only; this stage "
                "fails."]))
        if not parts:
            parts.append(hr.banner("Distinct weights and predictions, scored alike, for every pair", level="ok",
                                   lines=[*self._fingerprint_lines(), *self.identity_notes]))
        else:
            parts.append(hr.notes(self.identity_notes))
        return Section(hr.join(*parts))

    def _fingerprint_lines(self) -> list[str]:
        return [f"{run.label}: weights fingerprint {run.fingerprint or 'not recorded'}, predictions hash "
                f"{(run.predictions_hash or 'not recorded')[:16]}" for run in self.runs]

    def verdict(self) -> Section:
        """Per pair: the primary metric's verdict, every metric significantly worse for the winner as prominently,
        and the patients and frames it rests on."""
        parts = []
        for pair in self.pairs:
            # a result with regressions is orange (read the list); red stays for "same model" and "not comparable"
            level = "warning" if pair.regressions else ("ok" if pair.better else "info")
            parts.append(_pair_heading(pair))
            parts.append(hr.banner(pair.verdict, level=level, items=pair.details))
            parts.append(hr.muted(self._method_text(pair)))
        return Section(hr.join(*parts))

    @staticmethod
    def _method_text(pair: PairedComparison) -> str:
        s = pair.settings
        test = TEST_NAMES.get(s.test, s.test)
        return (f"Primary metric: {metric_info(s.primary_metric).heading()} (analysis.primary_metric). "
                f"Δ = B − A per frame, averaged over the {pair.counts.text()} both runs scored; p: {test} on the "
                f"per-patient mean Δ, Holm-adjusted over {len(pair.stats)} metrics, α = {s.alpha}; 95% CI of the "
                f"mean Δ: bootstrap resampling whole patients ({s.n_boot} resamples), withheld below "
                f"{s.min_patients} patients; significant = Holm p < α and a CI excluding 0.")

    def runs_table(self) -> pd.DataFrame:
        """Fingerprints and stage 03's headline numbers side by side, with its CI of Dice (computed once, there).

        Folders are named relative to the outputs folder (the full paths are in comparison.json).
        """
        rows = []
        root = self.out_dir.parent
        for run in self.runs:
            headline = run.summary.get("headline") or {}
            counts = run.summary.get("status_counts") or {}
            interval = (run.summary.get("intervals") or {}).get("dice") or {}
            units = run.summary.get("units") or {}
            threshold = (run.summary.get("threshold_cv") or {}).get("recommended")
            rows.append({
                "run": run.label,
                "run folder": _relative(run.run_dir, root) + "/",
                "training iteration": run.iteration,
                "checkpoint": Path(run.checkpoint).name if run.checkpoint else "—",
                "weights fingerprint": run.fingerprint or "—",
                "fingerprint from": _relative_text(run.fingerprint_source, root),
                "predictions hash": (run.predictions_hash or "")[:16] or "—",
                "frames ok / no [SEG] token / error": " / ".join(str(counts.get(s, 0))
                                                                  for s in ("ok", "no_seg", "error")),
                "scored: patients / sequences / frames": (f"{units.get('n_patients')} / {units.get('n_sequences')} / "
                                                          f"{units.get('n_frames')}" if units else "—"),
                metric_info("dice").heading("mean over frames"): hr.number(headline.get("dice")),
                f"{metric_info('dice').label} 95% CI (bootstrap over patients)": _interval_cell(interval),
                metric_info("cldice").heading("mean over frames"): hr.number(headline.get("cldice")),
                metric_info("hd95").heading("median over frames"): hr.number(headline.get("hd95")),
                "threshold chosen by cross-validation over patients": "—" if threshold is None else f"{threshold:g}",
            })
        return pd.DataFrame(rows).set_index("run")

    def runs_section(self) -> Section:
        """One column per run: fifteen fields side by side overflowed a 1280 px page."""
        return Section(hr.muted("Each run's own stage 03 numbers, over all the frames it scored (the paired tables "
                                "below use only the frames both runs scored).") + _table(self.runs_table().T))

    def metrics(self) -> Section:
        """Every compared metric but the width bins (their own section): means, Δ, patient CI, Holm p, counts."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            if pair.too_few_patients:
                parts.append(hr.banner(f"Only {pair.counts.n_patients} patients (minimum "
                                       f"{pair.settings.min_patients}): no intervals; see the per-patient Δ",
                                       level="warning"))
            widths = list(pair.width_bins().index)
            rows = pair.stats.drop(index=widths)
            parts.append(hr.muted(
                f"One row per metric (unit and better direction in its name). Means over the frames both runs "
                f"scored where the metric is finite; Δ = B − A; CI and p as in the verdict (p Holm-adjusted over "
                f"all {len(pair.stats)} metrics, recall by vessel width included, shown below). Green row: B "
                f"significantly better; red: significantly worse. A frame or patient is tied when |Δ| ≤ 0.001 "
                f"(ratios), 0.5 px (distances) or 0 (counts and areas)."))
            parts.append(hr.table(_styled(_paired_view(rows))))
            parts.append(hr.muted(self._glossary(pair, list(rows.index))))
            if "scatter" in pair.figures:
                coloured = ", coloured by patient" if pair.counts.n_patients <= MAX_PATIENT_COLOURS else ""
                parts.append(hr.figure(pair.figures["scatter"].read_bytes(), caption=(
                    f"One point per frame{coloured}; dashed line: A = B. Above the line B's value is higher, which "
                    "is better for ↑ metrics and worse for ↓ metrics.")))
        return Section("".join(parts))

    def _glossary(self, pair: PairedComparison, metrics: list[str]) -> str:
        """What the abbreviated metric names stand for (a reviewer should not need the docs for "NSD")."""
        by_label = {run.label: run for run in self.runs}
        tolerance = by_label[pair.a].analysis_params.nsd_tolerance_px
        entries = []
        for metric in metrics:
            if metric in ABBREVIATED:
                info = metric_info(metric)
                extra = f" ({tolerance:g} px, analysis.nsd_tolerance_px)" if metric == "nsd" else ""
                entries.append(f"{info.label}: {info.description}{extra}")
        return ("Abbreviations (P: prediction, G: ground truth) — " + "; ".join(entries) + ".") if entries else ""

    def thresholds(self) -> Section:
        """ΔDice at the common threshold and at each run's cross-validated threshold."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair, f": {metric_info('dice').heading()}"))
            if pair.thresholds is not None:
                parts.append(_table(_thresholds_view(pair.thresholds)))
            if pair.thresholds_note:
                parts.append(hr.muted(pair.thresholds_note))
        return Section("".join(parts))

    def _named(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with its patient and sample-id columns pseudonymised (unchanged when names are shown)."""
        return pseudonym.frame(table, self.names)

    def per_patient(self) -> Section:
        """Per-patient means and Δ (what to read instead of intervals when there are few patients)."""
        return self._grouped("patient")

    def per_sequence(self) -> Section:
        """Mean Δ per (patient, sequence) of the primary metric and the ones the verdict warns about."""
        return self._grouped("sequence")

    def _grouped(self, level: str) -> Section:
        """Each pair's ``per_<level>()`` table (pseudonymised, focus metrics only) under its heading and note."""
        parts = []
        for pair in self.pairs:
            table = getattr(pair, f"per_{level}")()
            parts += [_pair_heading(pair), hr.muted(_grouped_note(pair, level)),
                      _table(_grouped_view(self._named(table).sort_index(), pair), index=True)]
        return Section(hr.join(*parts))

    def width_bins(self) -> Section:
        """Recall by vessel width (thin, medium, thick), with the width limits each bin stands for."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            parts.append(hr.muted(self._width_note(pair)))
            view = _paired_view(pair.width_bins())
            view.index = [self._width_label(pair, name) for name in pair.width_bins().index]
            view.index.name = metric_info("recall").heading()
            parts.append(hr.table(_styled(view)))
        return Section(hr.join(*parts))

    def _width_limits(self, pair: PairedComparison) -> tuple[list[float], str]:
        by_label = {run.label: run for run in self.runs}
        bins = [list(by_label[label].analysis_params.width_bins_px) for label in (pair.a, pair.b)]
        note = "" if bins[0] == bins[1] else (f" The runs used other width limits ({pair.a} {bins[0]} px, {pair.b} "
                                              f"{bins[1]} px): the bins are not the same vessels.")
        return bins[0], note

    def _width_label(self, pair: PairedComparison, metric: str) -> str:
        (low, high), _ = self._width_limits(pair)
        bin_name = metric.removeprefix("recall_")
        limits = {"thin": f"≤ {low:g} px", "medium": f"{low:g}–{high:g} px", "thick": f"> {high:g} px"}
        return f"{bin_name} vessels (width {limits.get(bin_name, '?')})"

    def _width_note(self, pair: PairedComparison) -> str:
        _, note = self._width_limits(pair)
        return ("Recall of the ground truth's centre line, split by the vessel's width there (analysis.width_bins_px); "
                "Dice hides missed thin vessels, these do not. Columns as in the table of every metric." + note)

    def status_changes(self) -> Section:
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            if pair.status_changes.empty:
                parts.append(hr.muted("None: every common frame has the same status in both runs."))
                continue
            parts.append(hr.muted("Frames whose inference status differs (ok, no_seg: the model answered without a "
                                  "[SEG] token, error), with the store's error message."))
            view = self._named(pair.status_changes).rename(columns={
                "sample_id": "frame", "status_a": f"status A ({pair.a})", "status_b": f"status B ({pair.b})",
                "error_a": f"error A ({pair.a})", "error_b": f"error B ({pair.b})"})
            parts.append(_table(view, index=False))
        return Section("".join(parts))

    def weights(self) -> Section:
        """Per-component weight delta (the converter's diff) and notes."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            if pair.weights is not None:
                parts.append(hr.muted("Per model component (the converter's grouping of tensor names): how many "
                                      "tensors training changed between the checkpoints, and by how much. A relative "
                                      "change of 0 means the component is bit-identical."))
                parts.append(hr.table(_weights_view(pair.weights), index=True))
            if pair.weights_note:
                parts.append(hr.muted(_relative_text(pair.weights_note, self.out_dir.parent)))
        return Section("".join(parts))

    def disagreements(self) -> Section:
        """The samples with the largest |Δ| of the primary metric (one per patient first), as overlays."""
        parts = []
        for pair in self.pairs:
            if "panels" not in pair.figures:
                continue
            label = metric_info(pair.settings.primary_metric).label
            parts.append(_pair_heading(pair, f": largest |Δ {label}| per frame, one frame per patient first")
                         + hr.figure(pair.figures["panels"].read_bytes(), caption=(
                             "Columns: ground truth; A and B against the ground truth; A against B. The legend "
                             "above the panels gives every colour's one meaning.")))
            if pair.panels_note:
                parts.append(hr.muted(_relative_text(pair.panels_note, self.out_dir.parent)))
        return Section(hr.join(*parts) if parts else hr.muted("No frame differs between the runs."))

    def series_section(self) -> Section:
        """Metrics against training iteration, with stage 03's intervals (more than two runs only)."""
        if self.series is None:
            return Section(hr.muted("Two runs: no series (three or more runs give one)."))
        return Section(_table(_series_view(self.series), index=False) + _img_html(self.figures["series"]))

    def files(self) -> Section:
        """What this comparison wrote, relative to the outputs folder (full paths are in comparison.json)."""
        root = self.out_dir.parent
        rows = [("comparison.json", "every number of this report, the settings and the full paths of the runs")]
        rows += [(_relative(path, self.out_dir), "figure (also embedded above)") for path in self.figures.values()]
        folder = _relative(self.out_dir, root)
        table = pd.DataFrame([{"file": f"{folder}/{name}", "what": what} for name, what in rows])
        return Section(_table(table, index=False) + hr.muted(
            f"Compared {len(self.runs)} runs in {self.seconds:.1f} s; paths are relative to the outputs folder."))

    def _repr_html_(self) -> str:
        title = hr.heading(f"Checkpoint comparison: {' vs '.join(r.label for r in self.runs)}", level=2)
        sections = [("", self.banner()), ("Verdict", self.verdict()), ("Runs", self.runs_section()),
                    ("Every metric, paired by patient", self.metrics()),
                    ("Recall by vessel width", self.width_bins()),
                    ("Thresholds: common and cross-validated", self.thresholds()),
                    ("Per patient", self.per_patient()), ("Per sequence", self.per_sequence()),
                    ("Status differences", self.status_changes()),
                    ("Weight delta per component", self.weights()), ("Where they disagree most", self.disagreements())]
        if self.series is not None:
            sections.append(("Metrics vs training iteration", self.series_section()))
        sections.append(("Files", self.files()))
        body = [(hr.heading(heading, level=3) if heading else "") + section.html for heading, section in sections]
        return hr.join(title, *body)

    # --- comparison.json ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The ``comparison.json`` document (format in docs/contracts.md)."""
        pairs = []
        for pair in self.pairs:
            table = pair.stats
            pairs.append({
                "a": pair.a,
                "b": pair.b,
                "n_common": pair.n_common,
                "n_left_out": pair.n_left_out,
                "only_a": pair.only_a,
                "only_b": pair.only_b,
                "units": pair.counts.as_dict(),
                "metrics": table.reset_index().to_dict(orient="records"),
                "delta_mean": table["delta"].to_dict(),
                "ci95": {m: None if r["ci_withheld"] else [r["ci_low"], r["ci_high"]] for m, r in table.iterrows()},
                "p": table["p"].to_dict(),
                "p_holm": table["p_holm"].to_dict(),
                "significantly_worse": list(pair.worse.index),
                "better": pair.better,
                "verdict": pair.verdict,
                "verdict_details": pair.details,
                "thresholds": None if pair.thresholds is None else pair.thresholds.reset_index().to_dict("records"),
                "status_changes": pair.status_changes.to_dict(orient="records"),
                "weight_delta": None if pair.weights is None else pair.weights.reset_index().to_dict("records"),
                "weight_note": pair.weights_note,
                "problems": [p.as_dict() for p in pair.problems],
            })
        settings = self.pairs[0].settings if self.pairs else None
        document = {
            "format": 2,
            "runs": [run.name for run in self.runs],
            "labels": [run.label for run in self.runs],
            "run_dirs": [str(run.run_dir) for run in self.runs],
            "fingerprints": {run.label: run.fingerprint for run in self.runs},
            "predictions_hashes": {run.label: run.predictions_hash for run in self.runs},
            "iterations": {run.label: run.iteration for run in self.runs},
            "identity": self.identity,
            "identity_notes": self.identity_notes,
            "comparable": self.comparable,
            "problems": [p.as_dict() for p in self.problems],
            "pairs": pairs,
            "headline": self.headline,
            "figures": {key: str(path.relative_to(self.out_dir)) for key, path in self.figures.items()},
            "settings": None if settings is None else {
                **settings.__dict__,
                "near_zero_rel_change": NEAR_ZERO_REL_CHANGE,
                "delta": "b - a; better/worse are for b; tests on per-patient mean differences, Holm over metrics",
            },
            "seconds": round(self.seconds, 2),
        }
        return strict_json(document, inf_as="null")


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else its last two parts (never an absolute path in a report)."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return "…/" + "/".join(Path(path).parts[-2:])


def _relative_text(text: str, root: Path) -> str:
    """``text`` with every absolute path under ``root`` written relative to it (and other absolute paths shortened)."""
    def shorten(match: re.Match[str]) -> str:
        return _relative(Path(match.group(0)), root)

    return re.sub(r"(?<![\w.])/[^\s,;:()'\"]+", shorten, text)


def _interval_cell(interval: dict[str, Any]) -> str:
    if not interval:
        return "—"
    if interval.get("low") is None:
        return f"no CI: {interval.get('withheld') or 'not computable'}"
    return f"[{hr.number(interval['low'])}, {hr.number(interval['high'])}]"


SIGNIFICANCE = "significant?"
# Metrics whose label is an abbreviation: the paired table explains them under it.
ABBREVIATED = ("iou", "cldice", "nsd", "hd95", "assd", "betti0_error", "betti1_error", "brier", "hd95_mm", "assd_mm")


def _paired_view(rows: pd.DataFrame) -> pd.DataFrame:
    """The paired table as a reviewer reads it in a page's width: every value formatted with its unit in the row
    name, the CI as one cell, counts as "better / worse of n" (one column per number is in comparison.json)."""
    def significance(direction: str) -> str:
        return {"better": "B better", "worse": "B worse"}.get(direction, "no")

    view = pd.DataFrame({
        "A, mean": [hr.number(v) for v in rows["mean_a"]],
        "B, mean": [hr.number(v) for v in rows["mean_b"]],
        "Δ = B − A, mean": [signed(v) for v in rows["delta"]],
        "95% CI of Δ": [interval_text(row) for _, row in rows.iterrows()],
        "p, Holm-adjusted": [p_text(v) for v in rows["p_holm"]],
        SIGNIFICANCE: [significance(d) for d in rows["direction"]],
        "patients: B better / worse (of n)": [f"{int(x)} / {int(y)} (of {int(n)})" for x, y, n in
                                              zip(rows["patients_better"], rows["patients_worse"],
                                                  rows["n_patients"], strict=True)],
        "frames: B better / worse / tied": [f"{int(x)} / {int(y)} / {int(z)}" for x, y, z in
                                            zip(rows["frames_better"], rows["frames_worse"], rows["frames_tied"],
                                                strict=True)],
    }, index=[metric_info(m).heading() for m in rows.index])
    view.index.name = "metric (unit, better)"
    return view


def _styled(view: pd.DataFrame) -> Any:
    """Rows coloured by the significance column (green B better, red B worse), every text escaped."""
    def colour(row: pd.Series) -> list[str]:
        style = {"B worse": "background:#fdd;font-weight:bold", "B better": "background:#dfd"}.get(
            row[SIGNIFICANCE], "")
        return [style] * len(row)

    styler = view.style.format(escape="html").format_index(escape="html", axis=0)
    return styler.format_index(escape="html", axis=1).apply(colour, axis=1)


def _thresholds_view(table: pd.DataFrame) -> pd.DataFrame:
    """Dice at the common and the cross-validated thresholds, formatted, with what each number is."""
    view = pd.DataFrame({
        "A, mean Dice": [hr.number(v) for v in table["dice_a"]],
        "B, mean Dice": [hr.number(v) for v in table["dice_b"]],
        "Δ = B − A, mean": [signed(v) for v in table["delta"]],
        "95% CI of Δ": ["—" if pd.isna(lo) else f"[{signed(lo)}, {signed(hi)}]"
                        for lo, hi in zip(table["ci_low"], table["ci_high"], strict=True)],
        "p (not Holm-adjusted)": [p_text(v) for v in table["p"]],
        "patients / frames": [f"{int(p)} / {int(f)}" for p, f in zip(table["n_patients"], table["n_frames"],
                                                                     strict=True)],
    }, index=table.index)
    view.index.name = "threshold"
    return view


def _grouped_note(pair: PairedComparison, unit: str) -> str:
    names = ", ".join(metric_info(m).label for m in pair.focus_metrics())
    what = ("A's and B's mean and their Δ for the primary metric" if unit == "patient"
            else "mean Δ (B − A)")
    return (f"Per {unit}: {what}, over that {unit}'s frames, for {names} (the primary metric and those the "
            "verdict warns about; every metric's numbers are in comparison.json).")


def _grouped_view(table: pd.DataFrame, pair: PairedComparison) -> pd.DataFrame:
    """Per-patient / per-sequence means with one column group per metric (its unit and direction in the header)."""
    columns: dict[tuple[str, str], list[str]] = {("", "frames"): [str(int(v)) for v in table["frames"]]}
    for metric in pair.focus_metrics():
        heading = metric_info(metric).heading("mean")
        for suffix, label in (("a", f"A {pair.a}"), ("b", f"B {pair.b}"), ("delta", "Δ = B − A")):
            column = f"{metric}_{suffix}"
            if column in table.columns:
                values = table[column]
                columns[(heading, label)] = [signed(v) for v in values] if suffix == "delta" else \
                    [hr.number(v) for v in values]
    view = pd.DataFrame(columns, index=table.index)
    view.columns = pd.MultiIndex.from_tuples(view.columns)
    return view


def _weights_view(table: pd.DataFrame) -> pd.DataFrame:
    view = pd.DataFrame({
        "tensors": table["n_tensors"].astype(int),
        "unchanged tensors": table["n_identical"].astype(int),
        "largest |B − A| of one weight": [f"{v:.3g}" for v in table["max_abs"]],
        "relative change ‖B − A‖ / ‖A‖": [f"{v:.3g}" for v in table["rel_norm"]],
    }, index=table.index)
    view.index.name = "component"
    return view


def _series_view(series: pd.DataFrame) -> pd.DataFrame:
    """The series table with each metric as "mean [CI]" under a heading with its unit and direction."""
    view = pd.DataFrame({"run": series["run"], "training iteration": series["iteration"],
                         "patients": series["n_patients"], "frames scored": series["n_scored"]})
    for metric in [c for c in series.columns if f"{c}_lo" in series.columns]:
        view[f"{metric_info(metric).heading('mean over frames')} [95% CI]"] = [
            hr.number(v) + ("" if pd.isna(lo) else f" [{hr.number(lo)}, {hr.number(hi)}]")
            for v, lo, hi in zip(series[metric], series[f"{metric}_lo"], series[f"{metric}_hi"], strict=True)]
    return view
