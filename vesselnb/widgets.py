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

from vesselnb import viz
from vesselnb.run_folder import RunFolder
from vesselnb.store import PredictionStore

BROWSER_COLUMNS = ["sample_id", "status", "dice", "cldice", "hd95", "nsd", "recall_thin", "betti0_error"]


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
        """The worst ``static_rows`` samples by ``metric`` (what a reader of the HTML report can still browse)."""
        table = self._worst(metric)
        table["sample_id"] = [viz.shown_id(sample_id, self.names) for sample_id in table["sample_id"]]
        return table

    def show_static(self) -> None:
        """Display the static fallback: a note, the sorted table and a few samples' overlays."""
        from IPython.display import HTML, display

        display(HTML("<p><i>Sample browser: no interactive widget frontend here (e.g. papermill / HTML report); "
                     "showing the worst samples statically. Open the notebook in JupyterLab to browse.</i></p>"))
        display(self.static_table())
        ids = list(self._worst("dice")["sample_id"].head(self.static_samples))
        if ids:
            viz.show(self.static_grid(ids))

    def static_grid(self, ids: list[str]) -> Figure:
        """The overlays of ``ids`` in a grid, titled by (pseudonymised) sample id."""
        pictures = [self.render(sample_id) for sample_id in ids]
        titles = [viz.shown_id(sample_id, self.names) for sample_id in ids]
        return viz.image_grid(pictures, titles, columns=min(3, len(ids)), cell_inches=3.0)

    # -- widgets --
    def widget(self) -> Any:
        """The ipywidgets UI (VBox)."""
        import ipywidgets as w

        numeric = [c for c in BROWSER_COLUMNS[2:] if c in self.table.columns]
        sort_by = w.Dropdown(options=numeric, value="dice", description="sort by")
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

            caption.value = f"<code>{html.escape(viz.sample_title(row, self.names))}</code>"

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
