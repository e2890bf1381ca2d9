"""An ipywidgets sample browser for JupyterLab, with a static fallback where no widget frontend exists.

Papermill (and nbconvert) execute notebooks without a widget frontend: a live widget would render as nothing in
the HTML report. The browser therefore shows itself as widgets only in an interactive Jupyter session (the server
sets ``JPY_SESSION_NAME`` for its kernels; ``VESSELNB_WIDGETS=1`` / ``0`` forces either way) and otherwise as a
static table of the samples plus a few rendered samples, so the report still holds the information.
"""

from __future__ import annotations

import html
import io
import os
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image as PILImage

from vesselnb import htmlrepr as hr
from vesselnb import viz
from vesselnb.run_folder import RunFolder
from vesselnb.store import PredictionStore

METRIC_COLUMNS = ["dice", "cldice", "hd95", "nsd", "recall_thin", "betti0_error"]
BROWSER_COLUMNS = ["sample_id", "patient", "sequence", "frame", "status", *METRIC_COLUMNS]


LEGEND_ERRORS = "colours: TP white (both), FP magenta (predicted, not in GT), FN cyan (in GT, missed)"
LEGEND_TINTS = "colours: ground truth red, prediction green, both olive"


def widget_frontend_available() -> bool:
    """True in an interactive Jupyter session that can render ipywidgets; False under papermill / plain Python."""
    forced = os.environ.get("VESSELNB_WIDGETS")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    return bool(os.environ.get("JPY_SESSION_NAME"))


class SampleBrowser:
    """Step through the scored samples sorted by any metric; toggle overlays; threshold slider with probabilities.

    ``report`` is a :class:`vesselnb.analysis.AnalysisReport`; its ``names`` (pseudonyms, or None to show names)
    replace patients in the captions, titles and the static table.
    """

    def __init__(self, report: Any, static_rows: int = 25, static_samples: int = 3) -> None:
        self.report = report
        self.static_rows = static_rows
        self.static_samples = static_samples
        self.table = report.table[report.table["has_gt"]].reset_index(drop=True)
        self.names = report.names

    # -- rendering one sample --
    def render(self, sample_id: str, show_gt: bool = True, show_pred: bool = True, errors: bool = True,
               threshold: float | None = None) -> np.ndarray:
        """The picture the browser shows for one sample (RGB uint8)."""
        frame, gt, pred = self.report.sample_images(sample_id)
        if threshold is not None:
            probability = PredictionStore(RunFolder(self.report.run_dir).predictions_dir).probability(sample_id)
            if probability is not None and probability.shape == gt.shape:
                pred = probability > threshold * 255.0
        if errors:
            return viz.error_overlay(frame, gt if show_gt else np.zeros_like(gt), pred if show_pred else
                                     np.zeros_like(pred))
        picture = frame
        if show_gt:
            picture = viz.tint(picture, gt, viz.GT_RGB, 0.5)
        if show_pred:
            picture = viz.tint(picture, pred, viz.PRED_RGB, 0.5)
        return picture

    # -- static fallback --
    def _worst(self, metric: str) -> pd.DataFrame:
        columns = [c for c in BROWSER_COLUMNS if c in self.table.columns]
        return self.report.ranked(metric, worst=True)[columns].head(self.static_rows).reset_index(drop=True)

    def static_table(self, metric: str = "dice") -> pd.DataFrame:
        """The worst ``static_rows`` samples by ``metric`` (what a reader of the HTML report can still browse).

        Patient, sequence and frame have columns of their own, so no frame number is lost to a cut id.
        """
        table = self._worst(metric)
        table["sample_id"] = [viz.shown_id(sample_id, self.names) for sample_id in table["sample_id"]]
        if self.names is not None:
            table["patient"] = [self.names.patient(p) for p in table["patient"]]
        return table

    def static_display(self, metric: str = "dice") -> pd.DataFrame:
        """:meth:`static_table` as the report shows it: metric headings with unit and direction, numbers formatted."""
        table = hr.numbers(self.static_table(metric).drop(columns=["sample_id"]), METRIC_COLUMNS)
        return table.rename(columns={c: self.report.heading(c) for c in METRIC_COLUMNS})

    def static_html(self) -> str:
        """The static fallback as HTML: a note, the sorted table and a few samples spread over sequences."""
        ids = list(self.report.spread("dice", worst=True, k=self.static_samples)["sample_id"])
        parts = [hr.muted("Sample browser: no interactive widget frontend here (e.g. papermill / HTML report); "
                          f"showing the {self.static_rows} worst frames by Dice statically. Open the notebook in "
                          "JupyterLab to browse."),
                 self.report.table_html(self.static_display())]
        if ids:
            fig = self.static_grid(ids)
            parts.append(hr.figure(fig, caption=f"The worst frame of {len(ids)} different sequences (patients in "
                                                "turn), errors coloured as in the legend."))
            viz.close(fig)
        return hr.join(*parts)

    def show_static(self) -> None:
        """Display the static fallback (:meth:`static_html`)."""
        from IPython.display import HTML, display

        display(HTML(self.static_html()))

    def static_grid(self, ids: list[str]) -> Figure:
        """The error overlays of ``ids`` in a grid with a colour legend, titled on two lines by (pseudonymised)
        patient · sequence and frame · Dice, so titles stay inside their cell."""
        rows = self.table.set_index("sample_id")
        pictures, titles = [], []
        for sample_id in ids:
            row = rows.loc[sample_id]
            patient = row["patient"] if self.names is None else self.names.patient(row["patient"])
            pictures.append(self.render(sample_id))
            titles.append(f"{patient} · {row['sequence']}\nframe {int(row['frame'])} · Dice {hr.number(row['dice'])}")
        fig = viz.image_grid(pictures, titles, columns=min(3, len(ids)), cell_inches=3.0)
        fig.legend(handles=viz.error_legend_handles()[2:], loc="outside lower center", ncols=3, fontsize=7.5,
                   frameon=False)
        return fig

    # -- widgets --
    def widget(self) -> Any:
        """The ipywidgets UI (VBox)."""
        import ipywidgets as w

        numeric = [(self.report.heading(c), c) for c in METRIC_COLUMNS if c in self.table.columns]
        sort_by = w.Dropdown(options=numeric, value="dice", description="sort by",
                             layout=w.Layout(width="auto"))
        order = w.ToggleButtons(options=["worst first", "best first"], value="worst first")
        index = w.IntSlider(min=0, max=max(len(self.table) - 1, 0), value=0, description="sample",
                            continuous_update=False)
        show_gt = w.Checkbox(value=True, description="GT")
        show_pred = w.Checkbox(value=True, description="prediction")
        errors = w.Checkbox(value=True, description="TP/FP/FN colours")
        has_probability = bool(self.table.get("has_probability", pd.Series(dtype=bool)).fillna(False).any())
        threshold = w.FloatSlider(min=0.05, max=0.95, step=0.05, value=self.report.threshold,
                                  description="threshold", continuous_update=False, disabled=not has_probability)
        image = w.Image(format="png")
        caption = w.HTML()

        def ordered() -> pd.DataFrame:
            return self.report.ranked(sort_by.value, worst=order.value == "worst first").reset_index(drop=True)

        def refresh(*_: Any) -> None:
            rows = ordered()
            if rows.empty:
                caption.value = "no scored samples"
                return
            row = rows.iloc[min(index.value, len(rows) - 1)]
            t = threshold.value if has_probability and not np.isclose(threshold.value, self.report.threshold) else None
            picture = self.render(row["sample_id"], show_gt.value, show_pred.value, errors.value, t)

            buffer = io.BytesIO()
            PILImage.fromarray(picture).save(buffer, format="png")
            image.value = buffer.getvalue()

            colours = (LEGEND_ERRORS if errors.value else LEGEND_TINTS)
            caption.value = (f"<code>{html.escape(viz.sample_title(row, self.names))}</code>"
                             f"<div style='font-size:12px;color:#555'>{html.escape(colours)}</div>")

        for control in (sort_by, order, index, show_gt, show_pred, errors, threshold):
            control.observe(refresh, names="value")
        refresh()
        return w.VBox([w.HBox([sort_by, order]), index, w.HBox([show_gt, show_pred, errors, threshold]),
                       caption, image])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if widget_frontend_available():
            display(self.widget())
        else:
            self.show_static()
