"""What :func:`vesselnb.compare.compare_stage` returns: one method per report section, and ``comparison.json``.

Notebook 04 shows the sections in headed cells (banner and verdict first); ``display(report)`` shows them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vesselnb import htmlrepr as hr
from vesselnb import pseudonym
from vesselnb.compare.paired import PairedComparison
from vesselnb.compare.runs import IDENTITY_KEYS, NEAR_ZERO_REL_CHANGE, Problem, RunInputs
from vesselnb.errors import StageError
from vesselnb.jsonable import strict_json
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


def _pair_heading(pair: PairedComparison, extra: str = "") -> str:
    return hr.heading(f"{pair.a} → {pair.b}{extra}")


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
                                   lines=self.identity_notes))
        else:
            parts.append(hr.notes(self.identity_notes))
        return Section(hr.join(*parts))

    def verdict(self) -> Section:
        """Per pair: the primary metric's verdict and, as prominently, every metric that got significantly worse."""
        parts = []
        for pair in self.pairs:
            level = "error" if not pair.worse.empty else ("ok" if pair.better else "info")
            parts.append(_pair_heading(pair))
            parts.append(hr.banner(pair.verdict, level=level, items=pair.details))
            parts.append(hr.muted(f"Primary metric: {pair.settings.primary_metric} (analysis.primary_metric). "
                                  + self._method_text(pair)))
        return Section(hr.join(*parts))

    @staticmethod
    def _method_text(pair: PairedComparison) -> str:
        s = pair.settings
        return (f"Δ = B − A on {pair.counts.text()}; {s.test} test on per-patient mean Δ, Holm-corrected over "
                f"{len(pair.stats)} metrics, α = {s.alpha}; 95% CI of the mean Δ: bootstrap resampling patients "
                f"({s.n_boot} resamples), withheld below {s.min_patients} patients; significant = Holm p < α and "
                "CI excluding 0.")

    def runs_table(self) -> pd.DataFrame:
        """Fingerprints and stage 03's headline numbers side by side, with its CI of Dice (computed once, there)."""
        rows = []
        for run in self.runs:
            headline = run.summary.get("headline") or {}
            counts = run.summary.get("status_counts") or {}
            interval = (run.summary.get("intervals") or {}).get("dice") or {}
            units = run.summary.get("units") or {}
            rows.append({
                "run": run.label,
                "iteration": run.iteration,
                "checkpoint": Path(run.checkpoint).name if run.checkpoint else None,  # full path: comparison.json
                "weights fingerprint": run.fingerprint,
                "fingerprint from": run.fingerprint_source,
                "predictions hash": (run.predictions_hash or "")[:16],
                "samples": len(run.metrics),
                "ok / no_seg / error": " / ".join(str(counts.get(s, 0)) for s in ("ok", "no_seg", "error")),
                "dice": headline.get("dice"),
                "dice 95% CI (stage 03)": _interval_cell(interval),
                "patients / sequences / frames": (f"{units.get('n_patients')} / {units.get('n_sequences')} / "
                                                  f"{units.get('n_frames')}" if units else "—"),
                "cv threshold": (run.summary.get("threshold_cv") or {}).get("recommended"),
                "cldice": headline.get("cldice"),
                "hd95 (median)": headline.get("hd95"),
                "run folder": run.run_dir.name,
            })
        return pd.DataFrame(rows).set_index("run")

    def runs_section(self) -> Section:
        """Shown one column per run: fifteen fields side by side overflowed a 1280 px page."""
        return Section(_table(self.runs_table().T))

    def metrics(self) -> Section:
        """Every compared metric: direction, means, Δ, patient CI, raw and Holm p, patients and frames each way."""
        parts = []
        for pair in self.pairs:
            view = pair.stats.rename(columns={"mean_a": f"mean {pair.a}", "mean_b": f"mean {pair.b}"})
            parts.append(_pair_heading(pair, f" (Δ = {pair.b} − {pair.a}; better/worse for {pair.b})"))
            if pair.too_few_patients:
                parts.append(hr.banner(f"Only {pair.counts.n_patients} patients (minimum "
                                       f"{pair.settings.min_patients}): no intervals; see the per-patient Δ",
                                       level="warning"))
            compact = _metrics_view(view, pair.a, pair.b)
            styled = compact.style.format("{:.4g}", na_rep="—", subset=compact.select_dtypes("number").columns).apply(
                _highlight_direction, axis=1)
            parts.append(hr.table(styled))
            if "scatter" in pair.figures:
                parts.append(_img_html(pair.figures["scatter"]))
        return Section("".join(parts))

    def thresholds(self) -> Section:
        """ΔDice at the common threshold and at each run's cross-validated threshold."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            if pair.thresholds is not None:
                parts.append(_table(pair.thresholds))
            if pair.thresholds_note:
                parts.append(hr.muted(pair.thresholds_note))
        return Section("".join(parts))

    def _named(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with its patient and sample-id columns pseudonymised (unchanged when names are shown)."""
        return pseudonym.frame(table, self.names)

    def per_patient(self) -> Section:
        """Per-patient means and Δ (what to read instead of intervals when there are few patients)."""
        return Section(hr.join(*(_pair_heading(p) + _table(self._named(p.per_patient())) for p in self.pairs)))

    def per_sequence(self) -> Section:
        """Mean Δ per (patient, sequence) of the primary metric and every significant one."""
        return Section(hr.join(*(_pair_heading(p) + _table(self._named(p.per_sequence())) for p in self.pairs)))

    def width_bins(self) -> Section:
        """Δ recall by vessel width (thin, medium, thick)."""
        columns = ["mean_a", "mean_b", "delta", "ci_low", "ci_high", "p_holm", "direction", "n_patients"]
        return Section(hr.join(*(_pair_heading(p) + _table(p.width_bins()[columns]) for p in self.pairs)))

    def status_changes(self) -> Section:
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            parts.append(hr.muted("None: every common sample has the same status in both runs.")
                         if pair.status_changes.empty else _table(self._named(pair.status_changes), index=False))
        return Section("".join(parts))

    def weights(self) -> Section:
        """Per-component weight delta (the converter's diff) and notes."""
        parts = []
        for pair in self.pairs:
            parts.append(_pair_heading(pair))
            if pair.weights is not None:
                parts.append(hr.table(pair.weights, index=True, float_format="{:.3g}"))
            if pair.weights_note:
                parts.append(hr.muted(pair.weights_note))
        return Section("".join(parts))

    def disagreements(self) -> Section:
        """The samples with the largest |Δ| of the primary metric, as overlays."""
        parts = []
        for pair in self.pairs:
            if "panels" not in pair.figures:
                continue
            parts.append(_pair_heading(pair, f": largest |Δ{pair.settings.primary_metric}|")
                         + _img_html(pair.figures["panels"]))
            if pair.panels_note:
                parts.append(hr.muted(pair.panels_note))
        return Section(hr.join(*parts) if parts else hr.muted("No sample differs between the runs."))

    def series_section(self) -> Section:
        """Metrics against training iteration, with stage 03's intervals (more than two runs only)."""
        if self.series is None:
            return Section(hr.muted("Two runs: no series."))
        return Section(_table(self.series, index=False) + _img_html(self.figures["series"]))

    def _repr_html_(self) -> str:
        title = hr.heading(f"Checkpoint comparison: {' vs '.join(r.label for r in self.runs)}", level=2)
        sections = [("", self.banner()), ("Verdict", self.verdict()), ("Runs", self.runs_section()),
                    ("Every metric, paired by patient", self.metrics()),
                    ("Thresholds: common and cross-validated", self.thresholds()),
                    ("Per patient", self.per_patient()), ("Per sequence", self.per_sequence()),
                    ("Recall by vessel width", self.width_bins()), ("Status differences", self.status_changes()),
                    ("Weight delta per component", self.weights()), ("Where they disagree most", self.disagreements())]
        if self.series is not None:
            sections.append(("Metrics vs training iteration", self.series_section()))
        body = [(hr.heading(heading, level=3) if heading else "") + section.html for heading, section in sections]
        return hr.join(title, *body, hr.muted(f"Written to {self.out_dir} in {self.seconds:.1f} s."))

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


def _interval_cell(interval: dict[str, Any]) -> str:
    if not interval:
        return "—"
    if interval.get("low") is None:
        return f"no CI: {interval.get('withheld') or 'not computable'}"
    return f"[{interval['low']:.4f}, {interval['high']:.4f}]"


def _metrics_view(view: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The paired table as a reviewer reads it, in a page's width: the CI as one cell, counts as "better/worse"
    pairs (the full table, one column per number, is in comparison.json)."""
    def interval(row: pd.Series) -> str:
        withheld = row.get("ci_withheld")
        if isinstance(withheld, str) and withheld:
            return "withheld"
        return "—" if pd.isna(row["ci_low"]) else f"[{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]"

    return pd.DataFrame({
        "better when": view["better_when"],
        f"mean {a}": view[f"mean {a}"],
        f"mean {b}": view[f"mean {b}"],
        "Δ": view["delta"],
        "95% CI of Δ (patients)": view.apply(interval, axis=1),
        "p": view["p"],
        "p (Holm)": view["p_holm"],
        "direction": view["direction"],
        f"patients {b} better / worse": [f"{int(x)} / {int(y)}" for x, y in
                                         zip(view["patients_better"], view["patients_worse"], strict=True)],
        "frames better / worse / tied": [f"{int(x)} / {int(y)} / {int(z)}" for x, y, z in
                                         zip(view["frames_better"], view["frames_worse"], view["frames_tied"],
                                             strict=True)],
    }, index=view.index)


def _highlight_direction(row: pd.Series) -> list[str]:
    colour = {"worse": "background:#fdd;font-weight:bold", "better": "background:#dfd"}.get(row.get("direction"), "")
    return [colour] * len(row)
