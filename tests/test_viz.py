"""Figures and the sample browser: colours, panel layout, the store quick-look, static fallback and widgets."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _analysis_fixtures import make_dataset, run_params, thin_branch_mask, write_store
from matplotlib.backends.backend_agg import FigureCanvasAgg

from vesselnb import viz
from vesselnb.analysis import analyze_stage
from vesselnb.store import PredictionStore
from vesselnb.widgets import SampleBrowser, widget_frontend_available


def test_error_overlay_colours_tp_fp_fn() -> None:
    image = np.full((4, 4), 100, dtype=np.uint8)
    gt = np.zeros((4, 4), dtype=bool)
    pred = np.zeros_like(gt)
    gt[0, 0] = pred[0, 0] = True  # TP
    pred[1, 1] = True  # FP
    gt[2, 2] = True  # FN
    rgb = viz.error_overlay(image, gt, pred)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == viz.TP_RGB
    assert tuple(rgb[1, 1]) == viz.FP_RGB
    assert tuple(rgb[2, 2]) == viz.FN_RGB
    assert tuple(rgb[3, 3]) == (50, 50, 50)  # background dimmed so colours stand out


def test_four_panel_layout_and_titles() -> None:
    image = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    gt = np.zeros((32, 32), dtype=bool)
    gt[10:20, 10:12] = True
    fig = viz.four_panel(image, gt, gt, "sample x")
    assert [ax.get_title() for ax in fig.axes][:1] == ["original"] and len(fig.axes) == 4
    assert len(viz.four_panel(image, gt, gt, with_errors=True).axes) == 5
    assert fig._suptitle.get_text() == "sample x"


def test_prediction_panels_and_show_close_figures(tmp_path: Path, capsys) -> None:
    gts = make_dataset(tmp_path, size=48, frames=1)
    store = write_store(tmp_path / "run", tmp_path / "images", gts)
    ids = sorted(gts)[:3]
    fig = viz.prediction_panels(PredictionStore(store.path), ids)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titled) == 3 and all("ok" in title for title in titled)
    pyplot_fig = plt.figure()
    viz.show(pyplot_fig)
    assert not plt.get_fignums()  # closed after display
    assert "Image" in capsys.readouterr().out  # outside IPython, display() prints the object's repr


def test_gallery_thumbnails_keep_thin_vessels() -> None:
    mask = np.zeros((512, 512), dtype=bool)
    mask[100:400, 255] = True  # one-pixel vessel
    _, gt_small, _ = viz._thumbnail(np.zeros((512, 512), np.uint8), mask, mask, 128)
    assert gt_small.shape == (128, 128) and gt_small[30:95, 63].all()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("browser")
    gts = make_dataset(root, size=48, frames=1)
    predictions = {k: v & ~thin_branch_mask(48, i) for i, (k, v) in enumerate(sorted(gts.items()))}
    probabilities = {k: np.where(v, 200, 10).astype(np.uint8) for k, v in predictions.items()}
    write_store(root / "runs" / "b", root / "images", predictions, probabilities=probabilities)
    return analyze_stage(run_params(root), root / "runs" / "b")


def test_browser_falls_back_to_static_without_a_frontend(report, monkeypatch, capsys) -> None:
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("VESSELNB_WIDGETS", raising=False)
    assert not widget_frontend_available()
    browser = SampleBrowser(report)
    table = browser.static_table("dice")
    assert list(table["dice"]) == sorted(table["dice"])  # worst first
    browser._ipython_display_()
    assert "HTML object" in capsys.readouterr().out  # outside IPython, display() prints each object's repr
    page = browser.static_html()
    assert "no interactive widget frontend" in page and page.count("data:image/png;base64,") == 1
    # patient, sequence and frame in columns of their own: every frame number of the table is in the page, uncut
    assert {"patient", "sequence", "frame"} <= set(table.columns)
    for _, row in table.iterrows():
        assert f"<td style=\"white-space:nowrap\">{row['frame']}</td>" in page
    assert "…" not in page and "Dice (↑ better)" in page and "HD95 (px, ↓ better)" in page
    monkeypatch.setenv("VESSELNB_WIDGETS", "1")
    assert widget_frontend_available()


def _pixel_boxes(fig, texts):
    """Where each text lands in the rendered figure (pixels), after a real Agg draw."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return [t.get_window_extent(canvas.get_renderer()) for t in texts]


def test_static_grid_titles_name_the_frame_fit_their_cell_and_come_with_a_legend(report) -> None:
    browser = SampleBrowser(report)
    ids = list(report.spread("dice", worst=True, k=3)["sample_id"])
    fig = browser.static_grid(ids)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 3
    frames = report.table.set_index("sample_id").loc[ids, "frame"]
    for ax, frame in zip(axes, frames, strict=True):
        assert f"frame {int(frame)}" in ax.get_title()
    titles = _pixel_boxes(fig, [ax.title for ax in axes])
    cells = [ax.get_window_extent() for ax in axes]
    for title, cell in zip(titles, cells, strict=True):
        assert title.width <= cell.width + 2, "a title wider than its thumbnail runs into its neighbour"
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(label.startswith("FP") for label in labels) and any(label.startswith("FN") for label in labels)


def test_gallery_keeps_one_meaning_per_colour_with_a_legend() -> None:
    image = np.full((40, 40), 120, dtype=np.uint8)
    gt = np.zeros((40, 40), dtype=bool)
    gt[5:35, 18:22] = True
    pred = np.roll(gt, 3, axis=1)
    fig = viz.gallery([(image, gt, pred, "sample a"), (image, gt, gt, "sample b")], title="worst 2")
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 8 and not any("overlay" in t for t in titles)  # 4 panels a row; no second FN/FP colour
    (legend,) = fig.legends
    colours = {t.get_text(): tuple(round(c * 255) for c in h.get_facecolor()[:3])
               for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}
    assert colours == {"ground truth": viz.GT_RGB, "prediction": viz.PRED_RGB, "TP: both": viz.TP_RGB,
                       "FP: predicted, not in GT": viz.FP_RGB, "FN: in GT, missed": viz.FN_RGB}
    assert len(set(colours.values())) == len(colours)
    # the errors panel draws exactly the legend's colours where it says
    errors = fig.axes[3].get_images()[0].get_array()
    assert tuple(errors[20, 23]) == viz.FP_RGB and tuple(errors[20, 18]) == viz.FN_RGB


def test_browser_widgets_step_sort_and_threshold(report) -> None:
    browser = SampleBrowser(report)
    ui = browser.widget()
    header, index, toggles, caption, image = ui.children
    first_caption, first_png = caption.value, bytes(image.value)
    assert first_png.startswith(b"\x89PNG")
    index.value = 1
    assert caption.value != first_caption
    sort_by, order = header.children
    order.value = "best first"
    index.value = 0
    best = report.ranked("dice", worst=False).iloc[0]["sample_id"]
    assert best in caption.value
    threshold = toggles.children[-1]
    assert not threshold.disabled
    before = bytes(image.value)
    threshold.value = 0.95  # above every stored probability: the prediction disappears
    assert bytes(image.value) != before
