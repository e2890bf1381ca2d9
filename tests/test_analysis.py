"""Stage 03 on real prediction stores written through PredictionStore: tables, summaries, flags, files, notebook."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from _analysis_fixtures import make_dataset, run_params, thin_branch_mask, write_store
from matplotlib.backends.backend_agg import FigureCanvasAgg

from vesselnb import headline as hl
from vesselnb.analysis import analyze_stage, histogram_bins, histograms, spread_ranked, sweep_figure
from vesselnb.errors import StageError

CONTRACT_COLUMNS = [
    "sample_id", "patient", "sequence", "frame", "status", "gt_area", "pred_area", "dice", "iou", "precision",
    "recall", "specificity", "cldice", "betti0_error", "betti1_error", "hd95", "assd", "nsd", "recall_thin",
    "recall_medium", "recall_thick",
]
SUMMARY_KEYS = {"run_name", "n_samples", "n_scored", "status_counts", "headline", "ci95", "nan_counts", "inf_counts",
                "flags", "predictions_hash"}
SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("analysis")
    return root, make_dataset(root, size=SIZE)


def _thin_missed(gts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {sample_id: gt & ~thin_branch_mask(SIZE, index) for index, (sample_id, gt) in enumerate(sorted(gts.items()))}


def _codes(report) -> set[str]:
    return {flag.code for flag in report.flags}


def test_store_holding_the_ground_truth_raises_the_sanity_flags(dataset) -> None:
    root, gts = dataset
    run_dir = root / "runs_gt" / "gt_as_pred"
    write_store(run_dir, root / "images", gts)
    report = analyze_stage(run_params(root), run_dir)
    assert {"predictions_equal_gt", "suspicious_perfect_dice"} <= _codes(report)
    html = report._repr_html_()
    assert html.index("predictions_equal_gt") < html.index("<table")  # the banner comes first
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["headline"]["dice"] == 1.0 and summary["headline"]["ciou"] == 1.0
    assert {flag["code"] for flag in summary["flags"]} >= {"predictions_equal_gt"}


def test_missed_thin_branches_show_in_width_recall_and_the_files(dataset) -> None:
    root, gts = dataset
    run_dir = root / "runs_thin" / "thin_missed"
    ids = sorted(gts)
    statuses = {ids[0]: "no_seg", ids[1]: "error"}
    write_store(run_dir, root / "images", _thin_missed(gts), status=lambda sample_id: statuses.get(sample_id, "ok"))
    report = analyze_stage(run_params(root, max_error_rate=0.01, max_no_seg_rate=0.01), run_dir)
    table = pd.read_parquet(run_dir / "analysis" / "metrics.parquet")
    assert list(table.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert {"has_gt", "tp", "fp", "fn", "tn"} <= set(table.columns)
    assert len(table) == len(gts)  # no_seg and error samples are kept and scored as empty masks
    assert table.set_index("sample_id").loc[ids[0], "dice"] == 0.0
    assert math.isinf(table.set_index("sample_id").loc[ids[1], "hd95"])
    ok = table[table["status"] == "ok"]
    assert ok["recall_thin"].mean() < ok["recall_thick"].mean() - 0.2
    assert ok["dice"].mean() > 0.85
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["status_counts"] == {"ok": len(gts) - 2, "no_seg": 1, "error": 1}
    assert summary["inf_counts"]["hd95"] == 2 and summary["nan_counts"]["precision"] == 2
    assert {"error_rate", "no_seg_rate"} <= _codes(report)
    assert "predictions_equal_gt" not in _codes(report)
    frame = report.summary_table()
    # three patients: below the minimum, so no interval, the reason, the counts and the per-patient values instead
    assert math.isnan(frame.loc["dice", "ci95_low"]) and "only 3 patients" in frame.loc["dice", "no CI because"]
    assert (frame.loc["dice", "patients"], frame.loc["dice", "sequences"]) == (3, 6)
    assert summary["ci95"]["dice"] is None and summary["intervals"]["dice"]["n_patients"] == 3
    values = report.patient_values()  # one column per patient, one row per metric
    assert "No confidence intervals" in report._repr_html_() and values.shape[1] == 3 and "dice" in values.index
    assert summary["fragments"]["frames"] == summary["n_scored"]
    assert {"worst_k", "best_k", "histograms"} <= {p.stem for p in (run_dir / "analysis" / "figures").glob("*.png")}
    assert list(report.per_patient().index) and report.per_sequence().index.nlevels == 2
    worst = report.ranked("dice").iloc[0]["sample_id"]
    assert worst in (ids[0], ids[1])


def test_frames_without_annotation_are_listed_not_scored(dataset, tmp_path: Path) -> None:
    root, gts = dataset
    copy = tmp_path / "data"
    shutil.copytree(root / "images", copy / "images")
    shutil.copytree(root / "masks", copy / "masks")
    dropped = sorted(gts)[2]
    (copy / "masks" / f"{dropped}_mask.png").unlink()
    not_predicted = sorted(gts)[3]
    run_dir = tmp_path / "runs" / "missing_gt"
    write_store(run_dir, copy / "images", {k: v for k, v in gts.items() if k != not_predicted})
    report = analyze_stage(run_params(copy), run_dir)
    row = report.table.set_index("sample_id").loc[dropped]
    assert not row["has_gt"] and math.isnan(row["dice"])
    assert report.summary["n_scored"] == len(gts) - 2
    assert {"frames_without_gt", "frames_not_predicted"} <= _codes(report)
    assert report.summary["frames_without_prediction"] == 1


def test_identical_predictions_of_two_runs_are_flagged(dataset) -> None:
    root, gts = dataset
    predictions = _thin_missed(gts)
    first, second = root / "runs_same" / "iter_3672", root / "runs_same" / "iter_12192"
    write_store(first, root / "images", predictions, fingerprint="aaaaaaaaaaaaaaaa")
    write_store(second, root / "images", predictions, fingerprint="bbbbbbbbbbbbbbbb")
    analyze_stage(run_params(root, run_name="iter_3672"), first)
    report = analyze_stage(run_params(root, run_name="iter_12192"), second)
    assert "same_predictions_as_other_run" in _codes(report)
    assert any("iter_3672" in flag.message for flag in report.flags)


def test_threshold_sweep_finds_the_threshold_that_recovers_thin_vessels(dataset) -> None:
    root, gts = dataset
    run_dir = root / "runs_prob" / "with_probabilities"
    thin = {sample_id: thin_branch_mask(SIZE, index) for index, sample_id in enumerate(sorted(gts))}
    probabilities = {}
    for sample_id, gt in gts.items():
        probability = np.full(gt.shape, 20, dtype=np.uint8)
        probability[gt] = 230
        probability[thin[sample_id]] = 90  # thin vessels are faint: only a low threshold keeps them
        probabilities[sample_id] = probability
    predictions = {sample_id: probabilities[sample_id] > 127 for sample_id in gts}
    write_store(run_dir, root / "images", predictions, probabilities=probabilities)
    report = analyze_stage(run_params(root), run_dir)
    sweep = report.sweep
    assert sweep is not None
    best = sweep.loc[sweep["dice"].idxmax(), "threshold"]
    assert 20 / 255 < best < 90 / 255
    assert report.summary["in_sample_best_threshold (optimistic)"] == best
    cv = report.summary["threshold_cv"]
    assert 20 / 255 < cv["recommended"] < 90 / 255 and len(cv["folds"]) == 3  # one fold per held-out patient
    assert report.summary["best_threshold"] == cv["recommended"]
    assert report.summary["calibration"]["average_precision"] > 0.9
    assert {"threshold_sweep", "calibration", "temporal"} <= {
        p.stem for p in (run_dir / "analysis" / "figures").glob("*.png")}
    sweep_counts = pd.read_parquet(run_dir / "analysis" / "threshold_sweep.parquet")
    assert len(sweep_counts) == len(gts) * len(sweep)
    temporal = report.temporal  # 3 patients x 2 sequences, each with consecutive frames
    assert len(temporal) == 6 and temporal[["gt_iou", "pred_iou"]].stack().between(0, 1).all()
    assert report.summary["temporal_consistency"]["sequences"] == 6
    assert sweep["cldice"].notna().sum() >= 5
    assert (root / "runs_prob" / "with_probabilities" / "analysis" / "figures" / "threshold_sweep.png").is_file()
    # the sweep as shown: no NaN cell; clDice blank exactly where it was not computed, and one line says why
    shown = report.sweep_display()
    assert not shown.isin(["n/a", "nan", "NaN"]).any().any()
    cldice_column = next(c for c in shown.columns if c.startswith("clDice"))
    assert [cell == "" for cell in shown[cldice_column]] == list(sweep["cldice"].isna())
    assert "the thresholds between have no clDice" in report.threshold_section().data
    calibration = report.calibration_section().data
    assert "ECE, ↓ better" in calibration and not re.findall(r"<td[^>]*>-?\d*\.\d{4,}</td>", calibration)
    # the legend sits below the axes: no curve can be drawn over its labels
    fig = sweep_figure(sweep, report.threshold, report.threshold_cv)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    (axes,), (legend,) = fig.axes, fig.legends
    assert axes.get_legend() is None
    assert legend.get_window_extent(canvas.get_renderer()).y1 <= axes.get_window_extent().y0
    lower = analyze_stage(run_params(root, threshold=0.2), run_dir)
    assert lower.summary["headline"]["dice"] == 1.0  # re-binarised at 0.2 the faint vessels are back


def test_missing_store_is_a_stage_error(dataset, tmp_path: Path) -> None:
    root, _ = dataset
    with pytest.raises(StageError, match="predictions"):
        analyze_stage(run_params(root), tmp_path / "no_run")


@pytest.mark.slow
def test_notebook_runs_under_papermill_with_static_fallback(dataset, tmp_path: Path) -> None:
    root, gts = dataset
    run_dir = tmp_path / "runs" / "nb"
    write_store(run_dir, root / "images", _thin_missed(gts))
    params = tmp_path / "params.yaml"
    (tmp_path / "config.json").write_text("{}")  # load_params checks that hf_model is an HF folder
    params.write_text(
        f"run_name: nb\nhf_model: {tmp_path}\ndata:\n  images: {root / 'images'}\n  annotations: {root / 'masks'}\n"
        "  annotation_format: mask_png\nanalysis:\n  bootstrap_samples: 100\n  gallery_k: 2\n"
    )
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "03_error_analysis.ipynb"
    out = tmp_path / "out.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "papermill", str(notebook), str(out), "-p", "params_path", str(params),
         "-p", "run_dir", str(run_dir), "--cwd", str(notebook.parent)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    executed = json.loads(out.read_text())
    outputs = [o for cell in executed["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("Sanity checks passed" in "".join(h) or "WARNING" in "".join(h) for h in html)
    assert any("no interactive widget frontend" in "".join(h) for h in html)
    # figures are inlined in the sections' HTML (the report file stands alone): histograms, 2 galleries, browser
    assert sum("".join(h).count("data:image/png;base64,") for h in html) >= 4
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert (run_dir / "analysis" / "summary.json").is_file()


@pytest.mark.slow
def test_demo_model_end_to_end_inference_then_analysis(demo_assets, demo_model_dir, tmp_path: Path) -> None:
    """The real chain on the demo: the demo model's predictions (stage 02) scored against the demo annotations."""
    from vesselnb.infer import infer_stage
    from vesselnb.params import AnalysisParams, DataParams, InferenceParams, RunParams

    params = RunParams(
        run_name="demo_e2e", hf_model=demo_model_dir,
        data=DataParams(images=demo_assets.images_dir, annotations=demo_assets.annotations, annotation_format="sa2va"),
        inference=InferenceParams(device="cpu"), analysis=AnalysisParams(bootstrap_samples=200, gallery_k=2),
    )
    params.data.polygon_fill = "even_odd"  # the demo draws holes as inner polygons (read when the schema has it)
    run_dir = tmp_path / "demo_e2e"
    infer_stage(params, run_dir)
    report = analyze_stage(params, run_dir)
    n_frames = len(list(demo_assets.images_dir.glob("*.jpg")))
    assert len(report.table) == report.summary["n_scored"] == n_frames
    assert report.sweep is not None  # the demo model gives probability maps
    assert not [flag for flag in report.flags if flag.level == "error"], report.flags
    assert 0.0 < report.summary["headline"]["dice"] < 1.0
    assert np.isfinite(report.table["cldice"]).all()


@pytest.mark.parametrize("workers", [1, 2])
def test_each_gt_mask_is_read_once_per_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    # Scoring (in this process or in worker processes) fills the stage's GT cache; the figures after it (gallery,
    # browser) get the same masks without reading or rasterising the annotations again.
    import vesselnb.data as data

    root = tmp_path / "data"
    gts = make_dataset(root)
    run_dir = tmp_path / "run"
    write_store(run_dir, root / "images", {k: np.roll(v, 1, axis=1) for k, v in gts.items()})
    report = analyze_stage(run_params(root), run_dir, workers=workers)
    reads: list[str] = []
    real_read = data._read_mask_png
    monkeypatch.setattr(data, "_read_mask_png", lambda path, *args: reads.append(path) or real_read(path, *args))
    for sample_id, expected in gts.items():
        first = report.gt.mask(sample_id)
        np.testing.assert_array_equal(first, expected)
        first[:] = False  # callers may modify what they get; the cache must not change with it
        np.testing.assert_array_equal(report.gt.mask(sample_id), expected)
    report.gallery(worst=True)
    assert reads == []


STATISTICS = (hl.MEAN, hl.MEDIAN, hl.POOLED)


def test_report_names_each_numbers_statistic_and_unit_and_explains_every_gap(dataset) -> None:
    root, gts = dataset
    run_dir = root / "runs_read" / "read"
    ids = sorted(gts)
    statuses = {ids[0]: "no_seg", ids[1]: "error"}  # empty predictions: NaN precision, infinite HD95
    write_store(run_dir, root / "images", _thin_missed(gts), status=lambda sample_id: statuses.get(sample_id, "ok"))
    report = analyze_stage(run_params(root, width_bins_px=[1.5, 4.0], nsd_tolerance_px=3.0), run_dir)
    page = report._repr_html_()
    # the headline: every number names its statistic and direction; HD95 its unit and that it is a median
    rows = dict(report.headline_rows())
    assert all(any(stat in label for stat in STATISTICS) and "better" in label for label in rows), rows
    hd95 = next(label for label in rows if label.startswith("HD95"))
    assert "px" in hd95 and hl.MEDIAN in hd95
    assert "hd95 71" not in page.lower() and not re.search(r"\bhd95 \d", page)  # no bare "hd95 71.1986"
    # gIoU equals the mean IoU here (no empty ground truth): shown once, with what it is
    assert report.summary["headline"]["giou"] == pytest.approx(report.summary["headline"]["iou"])
    assert sum("gIoU" in label for label in rows) == 1 and "empty prediction scoring 1" in page
    # the summary table: no bare NaN; a metric without finite values says why in its own row
    shown = report.summary_display()
    assert "micro (pooled)" not in shown.columns and not shown.isin(["NaN", "nan"]).any().any()
    for _, row in shown.iterrows():
        if "n/a" in set(row):
            assert row["left out (NaN · inf)"] != "0", row
    precision = shown.loc["Precision (↑ better)"]
    assert precision["left out (NaN · inf)"] == "2 NaN"  # no_seg and error frames: precision of an empty prediction
    hd95_row = shown.loc["HD95 (px, ↓ better)"]
    assert "2 inf" in hd95_row["left out (NaN · inf)"]
    # pooled values only where they exist, and a line naming the metrics that have none
    pooled = report.pooled_html()
    assert set(report.summary["micro"]) == {"dice", "iou", "precision", "recall", "specificity"}
    assert "NaN" not in pooled and "n/a" not in pooled and "HD95" in pooled and "no pooled value" in pooled
    # this run's width-bin limits and NSD tolerance are stated where the metrics are
    assert "Recall, thin vessels ≤ 1.5 px wide" in page and "Recall, thick vessels &gt; 4 px wide" in page
    assert "NSD at 3 px" in page and "analysis.width_bins_px = [1.5, 4]" in page
    assert report.summary["metric_settings"] == {"nsd_tolerance_px": 3.0, "width_bins_px": [1.5, 4.0]}
    # tables: at most 3 decimals for ratios (no pandas six-decimal cells), here and in the per-patient sections
    for html in (page, report.per_patient_section().data, report.per_sequence_section().data,
                 report.temporal_section().data):
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
        assert cells and not [c for c in cells if re.fullmatch(r"-?\d*\.\d{4,}", c.strip())], html[:300]
        assert not re.search(r"<td[^>]*>\s*(NaN|nan)\s*</td>", html)
    assert "No probability maps" in report.calibration_section().data


def test_histogram_bins_come_from_the_data_and_never_outnumber_the_values(dataset) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 24, 500):
        values = rng.normal(0.6, 0.1, n)
        edges = histogram_bins(values)
        assert 1 <= len(edges) - 1 <= n and edges[0] <= values.min() and edges[-1] >= values.max()
    counts = np.array([2, 3, 3, 5, 7, 2, 4, 3, 2, 6], dtype=float)  # Betti errors: one bin per integer
    assert np.array_equal(histogram_bins(counts), np.arange(1.5, 8.0))
    root, gts = dataset
    run_dir = root / "runs_hist" / "hist"
    write_store(run_dir, root / "images", _thin_missed(gts))
    report = analyze_stage(run_params(root), run_dir)
    fig = histograms(report.table)
    n_frames = int(report.table["has_gt"].sum())
    for ax in fig.axes:
        if ax.patches:
            assert len(ax.patches) <= n_frames, ax.get_title()
            assert any(u in ax.get_title() for u in ("better", "px")), ax.get_title()


def test_galleries_spread_over_sequences_then_patients(dataset) -> None:
    # a ranked list where one sequence holds the four worst frames and another patient only follows them
    ranked = pd.DataFrame({"sample_id": list("abcdefgh"),
                           "patient": ["A", "A", "A", "A", "A", "B", "B", "C"],
                           "sequence": ["1", "1", "1", "1", "2", "1", "1", "1"]})
    assert list(spread_ranked(ranked, 4)["sample_id"]) == ["a", "f", "h", "e"]  # A1, B1, C1, then A's 2nd sequence
    assert list(spread_ranked(ranked, 8)["sample_id"]) == ["a", "f", "h", "e", "b", "g", "c", "d"]
    root, gts = dataset
    run_dir = root / "runs_gallery" / "gallery"
    write_store(run_dir, root / "images", _thin_missed(gts))
    report = analyze_stage(run_params(root, gallery_k=6), run_dir)
    worst = report.spread(worst=True)
    n_sequences = len(report.table.groupby(["patient", "sequence"]))
    assert len(worst) == 6 == n_sequences  # 3 patients x 2 sequences: one frame each
    assert len(worst.groupby(["patient", "sequence"])) == len(worst)
    assert worst["patient"].head(3).nunique() == 3  # patients in turn
    assert worst.iloc[0]["sample_id"] == report.ranked("dice").iloc[0]["sample_id"]  # still the worst first
    fig = report.gallery(worst=True)
    captions = [t.get_text() for t in fig.texts if "[ok]" in t.get_text()]
    assert [c.split(" [")[0] for c in captions] == list(worst["sample_id"])
    caption = report.gallery_section(worst=True).data
    assert "6 frames from 6 sequences of 3 patients" in caption and "FN cyan" in caption


def test_notebook_03_only_calls_the_report_and_displays() -> None:
    notebook = nbformat.read(str(Path(__file__).resolve().parents[1] / "notebooks" / "03_error_analysis.ipynb"),
                             as_version=4)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs for cell in notebook.cells if cell.cell_type == "code")  # committed cleared
    for source in code[2:]:  # after the parameters and the set-up cell
        for line in source.splitlines():
            assert re.fullmatch(r"display\(report(\.\w+\([\w=]*\))?\)", line.strip()), line
