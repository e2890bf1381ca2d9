"""Comparing runs: paired statistics on metrics tables, then whole run folders built by the real stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _compare_fixtures import build_run, configured_copy, copy_hf_folder, nudged_copy

from vesselnb.analysis import strict_json
from vesselnb.compare import (
    NEAR_ZERO_REL_CHANGE,
    PAIRED_METRICS,
    _find_iteration,
    _unique_labels,
    compare_stage,
    paired_comparison,
    wilcoxon_p,
)
from vesselnb.errors import StageError, VesselnbError

SUBSET = 6  # frames in the subset run (the small test demo has 12)


def _metrics_table(seed: int, n_patients: int = 4, frames: int = 6, shift: float = 0.0) -> pd.DataFrame:
    """A metrics table in the analysis/metrics.parquet layout; ``shift`` moves Dice/clDice up and HD95 down."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for f in range(frames):
            dice = float(np.clip(0.55 + 0.05 * p + rng.normal(0, 0.04) + shift, 0, 1))
            rows.append(
                {
                    "sample_id": f"P{p}_{p:04d}__s_frame_{f:06d}",
                    "patient": f"P{p}",
                    "status": "ok",
                    "dice": dice,
                    "cldice": float(np.clip(dice - 0.05 + rng.normal(0, 0.02), 0, 1)),
                    "hd95": float(max(0.0, 20 - 40 * shift + rng.normal(0, 2))),
                }
            )
    return pd.DataFrame(rows)


def test_better_run_wins_with_the_expected_sign() -> None:
    worse = _metrics_table(seed=1)
    better = _metrics_table(seed=2, shift=0.15)
    forward = paired_comparison(worse, better, "short", "long", n_boot=500)
    backward = paired_comparison(better, worse, "long", "short", n_boot=500)
    assert forward.better == "long" and backward.better == "long"
    row = forward.stats.loc["dice"]
    assert row["delta_mean"] > 0.1 and row["ci95_lo"] > 0 and row["wilcoxon_p"] < 0.01
    assert row["wins"] > row["losses"]
    # HD95: lower is better, so B's wins come with a negative Δ.
    hd = forward.stats.loc["hd95"]
    assert hd["delta_mean"] < 0 and hd["wins"] > hd["losses"]
    assert backward.stats.loc["dice", "delta_mean"] == pytest.approx(-row["delta_mean"])
    assert backward.stats.loc["dice", "losses"] == row["wins"]
    assert "long is better than short" in forward.verdict


def test_a_run_against_itself_has_zero_delta_and_no_winner() -> None:
    table = _metrics_table(seed=3)
    same = paired_comparison(table, table.copy(), "a", "a#2", n_boot=200)
    for metric in PAIRED_METRICS:
        row = same.stats.loc[metric]
        assert row["delta_mean"] == 0 and row["wilcoxon_p"] == 1.0
        assert row["ties"] == len(table) and row["wins"] == 0 and row["losses"] == 0
    assert same.better is None and same.n_left_out == 0 and same.status_changes.empty


def test_only_the_intersection_is_compared_and_the_rest_is_counted() -> None:
    a = _metrics_table(seed=4)
    b = _metrics_table(seed=5, shift=0.1)
    a = a.iloc[3:]  # three samples only in b
    b = b.drop(index=[10, 11])  # two samples only in a
    pair = paired_comparison(a, b, "a", "b", n_boot=200)
    assert pair.n_common == len(set(a["sample_id"]) & set(b["sample_id"])) == 24 - 5
    assert pair.n_left_out == 5 and len(pair.only_b) == 3 and len(pair.only_a) == 2
    assert set(pair.per_sample["sample_id"]) == set(a["sample_id"]) & set(b["sample_id"])


def test_nonfinite_pairs_are_left_out_of_a_metric_and_status_changes_listed() -> None:
    a = _metrics_table(seed=6)
    b = a.copy()
    b.loc[0, ["status", "dice", "hd95"]] = ["no_seg", 0.0, math.inf]
    b.loc[1, ["status", "cldice"]] = ["error", math.nan]
    pair = paired_comparison(a, b, "a", "b", n_boot=200)
    assert pair.stats.loc["hd95", "n_nonfinite"] == 1 and pair.stats.loc["hd95", "n_pairs"] == len(a) - 1
    assert pair.stats.loc["cldice", "n_nonfinite"] == 1
    assert pair.stats.loc["dice", "losses"] == 1  # the no_seg sample lost its Dice
    changes = pair.status_changes.set_index("sample_id")
    assert changes.loc[a.loc[0, "sample_id"], "status_b"] == "no_seg"
    assert changes.loc[a.loc[1, "sample_id"], "status_b"] == "error"
    assert len(changes) == 2
    per_patient = pair.per_patient.set_index("patient")
    assert per_patient.loc["P0", "n"] == 6 and per_patient.loc["P0", "dice_delta"] < 0


def test_ci_of_the_mean_delta_resamples_patients_not_frames() -> None:
    # Two patients: one gained 0.2 Dice on every frame, the other nothing. Only whole-patient resampling sees that
    # the mean gain could be anywhere from 0 to 0.2; a frame bootstrap of 100 frames would give a CI near 0.1.
    a = pd.DataFrame(
        {
            "sample_id": [f"s{i:03d}" for i in range(100)],
            "patient": ["p0"] * 50 + ["p1"] * 50,
            "status": "ok",
            "dice": 0.5,
            "cldice": 0.5,
            "hd95": 10.0,
        }
    )
    b = a.copy()
    b.loc[50:, "dice"] = 0.7
    row = paired_comparison(a, b, "a", "b", n_boot=2000).stats.loc["dice"]
    assert row["ci95_lo"] == pytest.approx(0.0) and row["ci95_hi"] == pytest.approx(0.2)
    assert row["delta_mean"] == pytest.approx(0.1)
    one_patient = paired_comparison(a.assign(patient="p"), b.assign(patient="p"), n_boot=200).stats.loc["dice"]
    assert math.isnan(one_patient["ci95_lo"]) and math.isnan(one_patient["ci95_hi"])


def test_wilcoxon_handles_zeros_explicitly() -> None:
    assert wilcoxon_p(np.zeros(7))[0] == 1.0
    assert wilcoxon_p(np.array([0.0, 0.0, 0.3]))[0] == 1.0
    p_value, note = wilcoxon_p(np.array([0.0, 0.1, 0.2, 0.3, 0.25, 0.15, 0.12, 0.4]))
    assert p_value < 0.05 and "Pratt" in note
    assert math.isnan(wilcoxon_p(np.array([math.nan]))[0])


def test_labels_iterations_and_json_helpers() -> None:
    assert _unique_labels(["demo", "demo", "x", "demo"]) == ["demo", "demo#2", "x", "demo#3"]
    manifest = {"params": {"checkpoint": {"path": "/w/work_dirs/iter_12192.pth"}}}
    assert _find_iteration(manifest, {}, "run")[0] == 12192
    assert _find_iteration({"params": {"iteration": 7, "checkpoint": {}}}, {}, "iter_3")[0] == 7
    assert _find_iteration({}, {}, "ckpt_iter_3672")[0] == 3672
    assert _find_iteration({}, {}, "final")[0] is None
    text = json.dumps(
        strict_json({"x": math.nan, "y": np.float32(0.5), "z": [np.int64(3), math.inf]}, inf_as="null"),
        allow_nan=False,
    )
    assert json.loads(text) == {"x": None, "y": 0.5, "z": [3, None]}


# --- whole run folders, built by the real inference and analysis stages on the demo checkpoints ------------------


@pytest.fixture(scope="session")
def demo_runs(demo_assets, tmp_path_factory) -> dict[str, Path]:
    """Three finished runs: the two demo checkpoints, and the better one again under another name and HF folder,
    on a subset of the frames (identical weights, different names, different sample sets)."""
    outputs = tmp_path_factory.mktemp("compare_outputs")
    hf = demo_assets.reference_hf
    twin_hf = copy_hf_folder(hf["long"], outputs / "hf_copies" / "renamed_model")
    short_iter, long_iter = (int(demo_assets.checkpoints[k].stem.split("_")[-1]) for k in ("short", "long"))
    return {
        "short": build_run(outputs, "short", hf["short"], demo_assets, iteration=short_iter),
        "long": build_run(outputs, "long", hf["long"], demo_assets, iteration=long_iter),
        "long_twin": build_run(outputs, "long_twin", twin_hf, demo_assets, iteration=long_iter, limit=SUBSET),
    }


def _banner_first(html_text: str) -> bool:
    """The red identity banner is shown before any metric table."""
    return "Same model?" in html_text and html_text.index("Same model?") < html_text.index("Paired metrics")


@pytest.mark.slow
def test_demo_checkpoints_the_longer_training_wins(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["short"], demo_runs["long"]], tmp_path / "cmp")
    pair = report.pairs[0]
    summaries = [json.loads((demo_runs[n] / "analysis" / "summary.json").read_text()) for n in ("short", "long")]
    assert summaries[1]["headline"]["dice"] > summaries[0]["headline"]["dice"]  # the demo's design, seen by stage 03
    assert pair.better == "long" and pair.stats.loc["dice", "delta_mean"] > 0
    assert pair.stats.loc["dice", "wins"] > pair.stats.loc["dice", "losses"]
    assert pair.n_common == len(pair.per_sample) and pair.n_left_out == 0
    assert not report.identity_alert
    weights = pair.weights
    assert weights is not None and (weights["rel_norm"] > 0).any() and "llm" in weights.index
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written["runs"] == ["short", "long"] and written["headline"]["better"] == "long"
    assert written["pairs"][0]["delta_mean"]["dice"] == pytest.approx(pair.stats.loc["dice", "delta_mean"])
    for relative in written["figures"].values():
        assert (tmp_path / "cmp" / relative).stat().st_size > 1000
    page = report._repr_html_()
    assert "Same model?" not in page and "data:image/png;base64," in page


@pytest.mark.slow
def test_a_run_compared_with_itself_shows_zero_delta_and_the_banner(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["long"], demo_runs["long"]], tmp_path / "self")
    pair = report.pairs[0]
    assert (pair.a, pair.b) == ("long", "long#2")
    assert (pair.stats["delta_mean"].fillna(0) == 0).all() and pair.better is None
    assert report.identity["identical_weights"] == [["long", "long#2"]]
    assert report.identity["identical_predictions"] == [["long", "long#2"]]
    assert _banner_first(report._repr_html_())
    assert report.headline["identity_alert"] is True


@pytest.mark.slow
def test_identical_weights_under_another_name_trigger_the_banner(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["long"], demo_runs["long_twin"]], tmp_path / "twin")
    assert report.runs[0].hf_dir != report.runs[1].hf_dir  # two folders, two names ...
    assert report.runs[0].fingerprint == report.runs[1].fingerprint  # ... one model
    assert ["long", "long_twin"] in report.identity["identical_weights"]
    weights = report.pairs[0].weights
    assert weights is not None and (weights["rel_norm"] == 0).all()  # the converter's diff agrees
    # the twin scored fewer frames, so its predictions hash differs: the masks of the common frames decide
    assert report.runs[0].predictions_hash != report.runs[1].predictions_hash
    assert ["long", "long_twin"] in report.identity["identical_predictions"]
    assert _banner_first(report._repr_html_())


@pytest.mark.slow
def test_runs_over_different_sample_sets_compare_the_intersection(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["short"], demo_runs["long_twin"]], tmp_path / "subset")
    pair = report.pairs[0]
    n_all = len(pd.read_parquet(demo_runs["short"] / "analysis" / "metrics.parquet"))
    assert pair.n_common == SUBSET and pair.n_left_out == n_all - SUBSET and len(pair.only_a) == n_all - SUBSET
    assert set(pair.per_sample["sample_id"]) == set(
        pd.read_parquet(demo_runs["long_twin"] / "analysis" / "metrics.parquet")["sample_id"]
    )
    assert int(pair.stats.loc["dice", "n_pairs"]) <= SUBSET
    assert f"{n_all - SUBSET} left out" in report._repr_html_()
    assert report.to_json()["pairs"][0]["n_left_out"] == n_all - SUBSET


@pytest.mark.slow
def test_a_series_of_checkpoints_gets_a_curve_and_the_identity_check(demo_runs, tmp_path) -> None:
    runs = [demo_runs["short"], demo_runs["long"], demo_runs["long_twin"]]
    report = compare_stage(runs, tmp_path / "series")
    assert [(p.a, p.b) for p in report.pairs] == [("short", "long"), ("long", "long_twin"), ("short", "long_twin")]
    iterations = [run.iteration for run in report.runs]
    assert iterations[0] < iterations[1] == iterations[2] and list(report.series["iteration"]) == iterations
    assert report.figures["series"].is_file()
    assert report.headline["a"] == "short" and report.headline["b"] == "long_twin"
    assert report.headline["identity_alert"] is True and "Metrics vs training iteration" in report._repr_html_()


@pytest.mark.slow
def test_a_near_zero_weight_delta_triggers_the_banner(demo_assets, demo_runs, tmp_path) -> None:
    nudged_hf = nudged_copy(demo_assets.reference_hf["long"], tmp_path / "nudged_model")
    nudged = build_run(tmp_path, "long_nudged", nudged_hf, demo_assets, limit=SUBSET)
    report = compare_stage([demo_runs["long"], nudged], tmp_path / "nudged")
    assert report.runs[0].fingerprint != report.runs[1].fingerprint and not report.identity["identical_weights"]
    (a, b, largest), *_ = report.identity["near_zero_weight_delta"]
    assert (a, b) == ("long", "long_nudged") and 0 < largest < NEAR_ZERO_REL_CHANGE
    weights = report.pairs[0].weights
    assert weights.loc["llm", "n_identical"] == weights.loc["llm", "n_tensors"] - 1
    assert _banner_first(report._repr_html_()) and "near-zero weight delta" in report._repr_html_()


@pytest.mark.slow
def test_samples_ok_in_one_run_and_no_seg_in_the_other_are_listed(demo_assets, demo_runs, tmp_path) -> None:
    silent_hf = configured_copy(demo_assets.reference_hf["long"], tmp_path / "silent_model", demo_behaviour="no_seg")
    silent = build_run(tmp_path, "long_silent", silent_hf, demo_assets, limit=SUBSET)
    report = compare_stage([demo_runs["long"], silent], tmp_path / "silent")
    changes = report.pairs[0].status_changes
    assert len(changes) == SUBSET and set(changes["status_a"]) == {"ok"} and set(changes["status_b"]) == {"no_seg"}
    assert report.pairs[0].stats.loc["dice", "losses"] == SUBSET  # an empty mask loses every frame
    assert report.to_json()["pairs"][0]["status_changes"][0]["status_b"] == "no_seg"
    assert "Status differences" in report._repr_html_() and "no_seg" in report._repr_html_()


def test_missing_stage_output_names_the_file_and_the_command(tmp_path) -> None:
    run = tmp_path / "half_done"
    (run / "predictions").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"params_file": "/x/params/half_done.yaml"}))
    with pytest.raises(StageError, match=r"metrics\.parquet.*vesselnb run /x/params/half_done\.yaml"):
        compare_stage([run, run], tmp_path / "out")
    with pytest.raises(VesselnbError, match="at least two"):
        compare_stage([run], tmp_path / "out")


@pytest.mark.slow
def test_notebook_04_runs_under_papermill_and_renders_the_report(demo_runs, tmp_path) -> None:
    from vesselnb.runner import COMPARE_STAGE, default_notebooks_dir, execute_stage

    out_dir = tmp_path / "compare_short_vs_long"
    parameters = {"run_dirs": [str(demo_runs["short"]), str(demo_runs["long"])], "out_dir": str(out_dir)}
    outcome = execute_stage(COMPARE_STAGE, parameters, out_dir, default_notebooks_dir(), header={}, progress=False)
    assert outcome.status == "ok", outcome.error
    page = (out_dir / "04_compare_checkpoints.html").read_text(encoding="utf-8")
    assert "Checkpoint comparison" in page and "Paired metrics" in page
    assert json.loads((out_dir / "comparison.json").read_text())["runs"] == ["short", "long"]
