"""Comparing runs: paired statistics on metrics tables, then whole run folders built by the real stages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _compare_fixtures import build_run, configured_copy, copy_hf_folder, nudged_copy

from vesselnb import viz
from vesselnb.compare import NEAR_ZERO_REL_CHANGE, CompareSettings, compare_stage, paired_comparison
from vesselnb.compare import figures as cfig
from vesselnb.compare.runs import unique_labels
from vesselnb.demo import DemoSettings, ensure_demo_assets
from vesselnb.errors import StageError, VesselnbError
from vesselnb.htmlrepr import number
from vesselnb.jsonable import strict_json
from vesselnb.metrics import metric_info

SUBSET = 6  # frames in the subset run (the small test demo has 12)
FAST = CompareSettings(n_boot=300)


def _metrics_table(seed: int, n_patients: int = 12, frames: int = 6, shift: float = 0.0) -> pd.DataFrame:
    """A metrics table in the analysis/metrics.parquet layout; ``shift`` moves Dice/clDice up and HD95 down."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        patient_shift = rng.normal(0, 0.02)  # each patient gains a little more or less
        for f in range(frames):
            dice = float(np.clip(0.55 + 0.01 * p + rng.normal(0, 0.04) + shift + (patient_shift if shift else 0), 0, 1))
            rows.append(
                {
                    "sample_id": f"P{p}_{p:04d}__s{f % 2}_frame_{f:06d}",
                    "patient": f"P{p}",
                    "sequence": f"s{f % 2}",
                    "status": "ok",
                    "has_gt": True,
                    "dice": dice,
                    "cldice": float(np.clip(dice - 0.05 + rng.normal(0, 0.02), 0, 1)),
                    "hd95": float(max(0.0, 20 - 40 * shift + rng.normal(0, 2))),
                }
            )
    return pd.DataFrame(rows)


def test_better_run_wins_with_the_expected_sign() -> None:
    worse = _metrics_table(seed=1)
    better = _metrics_table(seed=2, shift=0.15)
    forward = paired_comparison(worse, better, "short", "long", FAST)
    backward = paired_comparison(better, worse, "long", "short", FAST)
    assert forward.better == "long" and backward.better == "long"
    row = forward.stats.loc["dice"]
    assert row["delta"] > 0.1 and row["ci_low"] > 0 and row["p_holm"] < 0.01 and row["direction"] == "better"
    assert row["frames_better"] > row["frames_worse"] and row["patients_better"] == 12
    # HD95: lower is better, so B's gains come with a negative Δ.
    hd = forward.stats.loc["hd95"]
    assert hd["delta"] < 0 and hd["frames_better"] > hd["frames_worse"] and hd["direction"] == "better"
    assert backward.stats.loc["dice", "delta"] == pytest.approx(-row["delta"])
    assert backward.stats.loc["dice", "frames_worse"] == row["frames_better"]
    assert forward.verdict.startswith("long is better than short on Dice (mean Δ +")
    assert "no metric significantly worse" in forward.verdict
    assert forward.verdict.endswith("— on 12 patients, 72 frames")  # what the verdict rests on, also on the index
    assert "12 patients · 24 sequences · 72 frames" in forward.details[0]
    assert list(forward.stats.index) == ["dice", "cldice", "hd95"]  # every metric both tables hold, report order


def test_the_verdict_names_every_metric_that_got_worse() -> None:
    worse = _metrics_table(seed=1)
    better = _metrics_table(seed=2, shift=0.15)
    rng = np.random.default_rng(3)
    worse["betti0_error"] = rng.poisson(5, len(worse)).astype(float)
    better["betti0_error"] = worse["betti0_error"] + 6 + rng.poisson(1, len(worse))
    pair = paired_comparison(worse, better, "A", "B", FAST)
    assert pair.better == "B" and list(pair.worse.index) == ["betti0_error"]
    assert pair.verdict.startswith("B is better than A on Dice (mean Δ +")
    assert "; B is worse on Betti-0 error (mean Δ +" in pair.verdict and " components, worse on " in pair.verdict
    assert f"{len(worse)}/{len(worse)} frames" in pair.verdict
    assert any(line.startswith("Betti-0 error (components, ↓ better): mean Δ +") and "B worse" in line
               for line in pair.details)
    assert pair.regressions == ["betti0_error"] and pair.focus_metrics() == ["dice", "betti0_error"]
    primary_cldice = paired_comparison(worse, better, "A", "B", CompareSettings(n_boot=300, primary_metric="hd95"))
    assert "on HD95 (mean Δ " in primary_cldice.verdict and " px, B − A)" in primary_cldice.verdict
    assert "Betti-0 error" in primary_cldice.verdict


def test_too_few_patients_give_no_interval_and_no_winner() -> None:
    worse = _metrics_table(seed=1, n_patients=3)
    better = _metrics_table(seed=2, n_patients=3, shift=0.15)
    pair = paired_comparison(worse, better, "A", "B", FAST)
    row = pair.stats.loc["dice"]
    assert math.isnan(row["ci_low"]) and row["ci_withheld"] == "only 3 patients (a CI needs at least 10)"
    assert row["p"] == pytest.approx(0.25)  # Wilcoxon on 3 patient means: 3 of 3 positive, the smallest p possible
    assert pair.better is None and pair.verdict.startswith("No significant difference on Dice")
    assert any("only 3 patients" in line for line in pair.details) and len(pair.per_patient()) == 3
    assert ", no CI (only 3 patients (a CI needs at least 10)), Holm p = " in pair.details[0]  # said once, plainly


def test_a_run_against_itself_has_zero_delta_and_no_winner() -> None:
    table = _metrics_table(seed=3)
    same = paired_comparison(table, table.copy(), "a", "a#2", FAST)
    for metric in same.stats.index:
        row = same.stats.loc[metric]
        assert row["delta"] == 0 and row["p"] == 1.0
        assert row["frames_tied"] == len(table) and row["frames_better"] == 0 and row["frames_worse"] == 0
    assert same.better is None and same.n_left_out == 0 and same.status_changes.empty


def test_only_the_intersection_is_compared_and_the_rest_is_counted() -> None:
    a = _metrics_table(seed=4)
    b = _metrics_table(seed=5, shift=0.1)
    a = a.iloc[3:]  # three samples only in b
    b = b.drop(index=[10, 11])  # two samples only in a
    pair = paired_comparison(a, b, "a", "b", FAST)
    assert pair.n_common == len(set(a["sample_id"]) & set(b["sample_id"])) == 72 - 5
    assert pair.n_left_out == 5 and len(pair.only_b) == 3 and len(pair.only_a) == 2
    assert set(pair.per_sample["sample_id"]) == set(a["sample_id"]) & set(b["sample_id"])


def test_nonfinite_pairs_are_left_out_of_a_metric_and_status_changes_listed() -> None:
    a = _metrics_table(seed=6)
    b = a.copy()
    b.loc[0, ["status", "dice", "hd95"]] = ["no_seg", 0.0, math.inf]
    b.loc[1, ["status", "cldice"]] = ["error", math.nan]
    pair = paired_comparison(a, b, "a", "b", FAST)
    assert pair.stats.loc["hd95", "n_frames"] == len(a) - 1 and pair.stats.loc["cldice", "n_frames"] == len(a) - 1
    assert pair.stats.loc["dice", "frames_worse"] == 1  # the no_seg sample lost its Dice
    changes = pair.status_changes.set_index("sample_id")
    assert changes.loc[a.loc[0, "sample_id"], "status_b"] == "no_seg"
    assert changes.loc[a.loc[1, "sample_id"], "status_b"] == "error"
    assert len(changes) == 2
    per_patient = pair.per_patient()
    assert per_patient.loc["P0", "frames"] == 6 and per_patient.loc["P0", "dice_delta"] < 0
    assert pair.per_sequence().index.nlevels == 2


def test_ci_of_the_mean_delta_resamples_patients_not_frames() -> None:
    # Twelve patients: six gained 0.2 Dice on every frame, six nothing. Whole-patient resampling sees that the mean
    # gain is uncertain; a bootstrap of 600 frames as if independent would give a CI of width ~0.016.
    a = pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(600)], "patient": [f"p{i // 50}" for i in range(600)],
                      "status": "ok", "dice": 0.5, "cldice": 0.5, "hd95": 10.0})
    b = a.copy()
    b.loc[300:, "dice"] = 0.7
    row = paired_comparison(a, b, "a", "b", CompareSettings(n_boot=2000)).stats.loc["dice"]
    assert row["ci_low"] < 0.06 and row["ci_high"] > 0.14
    assert row["delta"] == pytest.approx(0.1)
    one_patient = paired_comparison(a.assign(patient="p"), b.assign(patient="p"), "a", "b", FAST).stats.loc["dice"]
    assert math.isnan(one_patient["ci_low"]) and "only 1 patients" in one_patient["ci_withheld"]


def test_labels_and_json_helpers() -> None:
    assert unique_labels(["demo", "demo", "x", "demo"]) == ["demo", "demo#2", "x", "demo#3"]
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
    return "Same model?" in html_text and html_text.index("Same model?") < html_text.index("Every metric")


@pytest.mark.slow
def test_demo_checkpoints_two_patients_are_too_few_for_a_verdict(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["short"], demo_runs["long"]], tmp_path / "cmp")
    pair = report.pairs[0]
    summaries = [json.loads((demo_runs[n] / "analysis" / "summary.json").read_text()) for n in ("short", "long")]
    assert summaries[1]["headline"]["dice"] > summaries[0]["headline"]["dice"]  # the demo's design, seen by stage 03
    row = pair.stats.loc["dice"]
    assert row["delta"] > 0 and row["frames_better"] > row["frames_worse"] and row["patients_better"] == 2
    # the small test demo has 2 patients: no interval, no significance, and the report says why
    assert pair.better is None and row["ci_withheld"].startswith("only 2 patients")
    assert pair.verdict.startswith("No significant difference on Dice") and pair.too_few_patients
    assert {"betti0_error", "spurious_components", "recall_thin", "nsd"} <= set(pair.stats.index)
    assert "average_precision" not in pair.stats.index  # these runs keep no probability maps
    assert pair.n_common == len(pair.per_sample) and pair.n_left_out == 0
    assert not report.identity_alert and report.comparable
    weights = pair.weights
    assert weights is not None and (weights["rel_norm"] > 0).any() and "llm" in weights.index
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written["runs"] == ["short", "long"] and written["headline"]["better"] is None
    assert written["pairs"][0]["delta_mean"]["dice"] == pytest.approx(row["delta"])
    assert written["pairs"][0]["ci95"]["dice"] is None and written["comparable"] is True
    thresholds = pair.thresholds  # the common threshold only: no probability maps, no cross-validated threshold
    assert thresholds is not None and len(thresholds) == 1 and "no probability maps" in pair.thresholds_note
    for relative in written["figures"].values():
        assert (tmp_path / "cmp" / relative).stat().st_size > 1000
    page = report._repr_html_()
    assert "Same model?" not in page and "data:image/png;base64," in page and "only 2 patients" in page
    # the runs' own intervals are stage 03's, read, not recomputed
    assert "no CI: only 2 patients" in report.runs_table().loc["short", "Dice 95% CI (bootstrap over patients)"]


@pytest.mark.slow
def test_a_run_compared_with_itself_shows_zero_delta_and_the_banner(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["long"], demo_runs["long"]], tmp_path / "self")
    pair = report.pairs[0]
    assert (pair.a, pair.b) == ("long", "long#2")
    assert (pair.stats["delta"].fillna(0) == 0).all() and pair.better is None
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
def test_runs_over_different_sample_sets_compare_the_intersection_and_flag_it(demo_runs, tmp_path) -> None:
    report = compare_stage([demo_runs["short"], demo_runs["long_twin"]], tmp_path / "subset")
    pair = report.pairs[0]
    n_all = len(pd.read_parquet(demo_runs["short"] / "analysis" / "metrics.parquet"))
    assert pair.n_common == SUBSET and pair.n_left_out == n_all - SUBSET and len(pair.only_a) == n_all - SUBSET
    assert set(pair.per_sample["sample_id"]) == set(
        pd.read_parquet(demo_runs["long_twin"] / "analysis" / "metrics.parquet")["sample_id"]
    )
    assert int(pair.stats.loc["dice", "n_frames"]) <= SUBSET
    assert f"{n_all - SUBSET} samples not in both runs were left out" in report._repr_html_()
    assert report.to_json()["pairs"][0]["n_left_out"] == n_all - SUBSET
    # half the frames shared: below the default minimum fraction (0.9), so red banner and a failing stage
    assert [p.code for p in report.problems] == ["few_shared_frames"] and not report.comparable
    assert "Not comparable" in report._repr_html_() and report.headline["text"].startswith("NOT COMPARABLE")
    with pytest.raises(StageError, match="share 6 scored frames, 50%"):
        report.raise_if_incomparable()
    relaxed = compare_stage([demo_runs["short"], demo_runs["long_twin"]], tmp_path / "relaxed",
                            min_shared_fraction=0.4)
    assert relaxed.comparable


def _copy_run(run_dir: Path, target: Path, edit_summary=None, rename_frames: bool = False) -> Path:
    """A copy of a finished run folder with its summary or frame names edited (how another scoring would look)."""
    shutil.copytree(run_dir, target)
    summary_path = target / "analysis" / "summary.json"
    if edit_summary is not None:
        summary = json.loads(summary_path.read_text())
        edit_summary(summary)
        summary_path.write_text(json.dumps(summary))
    if rename_frames:
        metrics = pd.read_parquet(target / "analysis" / "metrics.parquet")
        metrics["sample_id"] = "other_" + metrics["sample_id"]
        metrics.to_parquet(target / "analysis" / "metrics.parquet", index=False)
    return target


@pytest.mark.slow
def test_runs_without_shared_frames_are_refused(demo_runs, tmp_path) -> None:
    other = _copy_run(demo_runs["long"], tmp_path / "disjoint", rename_frames=True)
    report = compare_stage([demo_runs["short"], other], tmp_path / "cmp")
    assert [p.code for p in report.problems] == ["no_shared_frames"] and report.pairs[0].n_common == 0
    assert "share no scored frame" in report.banner().html
    with pytest.raises(StageError, match="share no scored frame"):
        report.raise_if_incomparable()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["comparable"] is False


@pytest.mark.slow
def test_runs_scored_differently_are_flagged(demo_runs, tmp_path) -> None:
    def rescored(summary: dict) -> None:
        summary["scoring"]["threshold"] = 0.4
        summary["scoring"]["annotations_hash"] = "0" * 32
        summary["scoring"]["prompt"] = "<image>Segment the vessels."

    other = _copy_run(demo_runs["long"], tmp_path / "rescored", edit_summary=rescored)
    report = compare_stage([demo_runs["short"], other], tmp_path / "cmp")
    (problem,) = report.problems
    assert problem.code == "scored_differently"
    for what in ("annotations (content hash)", "threshold: 0.5 vs 0.4", "prompt"):
        assert what in problem.message
    with pytest.raises(StageError, match="scored differently"):
        report.raise_if_incomparable()
    same = compare_stage([demo_runs["short"], demo_runs["long"]], tmp_path / "same")
    assert same.comparable  # the two real runs record the same annotations, threshold, prompt, preprocessing


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
    assert report.pairs[0].stats.loc["dice", "frames_worse"] == SUBSET  # an empty mask loses every frame
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
    assert "Compare checkpoints" in page and "Every metric" in page and "Verdict" in page
    assert json.loads((out_dir / "comparison.json").read_text())["runs"] == ["short", "long"]


# --- the demo's design at a size where patient-level statistics can speak -----------------------------------------


@pytest.fixture(scope="module")
def twelve_patient_demo(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's own training (50 vs 400 iterations) on 12 patients x 1 sequence x 2 frames: the smallest demo with
    enough patients for intervals and a verdict Holm-corrected over 17 metrics (no probability maps, which would add
    Brier and AP to the family)."""
    root = tmp_path_factory.mktemp("demo12")
    assets = ensure_demo_assets(root / "assets", DemoSettings(n_patients=12, sequences_per_patient=1,
                                                              frames_per_sequence=2))
    outputs = root / "outputs"
    short = build_run(outputs, "short", assets.reference_hf["short"], assets, iteration=50)
    long = build_run(outputs, "long", assets.reference_hf["long"], assets, iteration=400)
    return short, long


@pytest.mark.slow
def test_the_demo_comparison_reports_the_topology_regression(twelve_patient_demo, tmp_path) -> None:
    """The longer-trained demo model wins on Dice and predicts specks: the verdict must say both."""
    report = compare_stage(list(twelve_patient_demo), tmp_path / "cmp")
    pair = report.pairs[0]
    assert report.comparable and pair.counts.n_patients == 12 and not pair.too_few_patients
    assert pair.better == "long" and pair.stats.loc["dice", "ci_low"] > 0
    assert {"betti0_error", "spurious_components"} <= set(pair.worse.index)
    assert pair.verdict.startswith("long is better than short on Dice (mean Δ +")
    assert "Betti-0 error (mean Δ +" in pair.verdict and "Spurious components (mean Δ +" in pair.verdict
    assert pair.verdict.endswith("— on 12 patients, 24 frames")
    assert any(line.startswith("Betti-0 error (components, ↓ better): mean Δ +") for line in pair.details)
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "betti0_error" in written["headline"]["significantly_worse"]
    # stage 03 of each run: intervals shown (12 patients), fragments counted; 04 shows 03's interval, not its own
    summary = json.loads((twelve_patient_demo[1] / "analysis" / "summary.json").read_text())
    assert summary["intervals"]["dice"]["low"] is not None and summary["units"]["n_patients"] == 12
    assert summary["fragments"]["spurious_components"] > 0
    low, high = summary["intervals"]["dice"]["low"], summary["intervals"]["dice"]["high"]
    assert report.runs_table().loc["long", "Dice 95% CI (bootstrap over patients)"] == \
        f"[{number(low)}, {number(high)}]"


# --- the report as a reviewer reads it: statistic, unit and direction everywhere, no raw dict or absolute path ----


def test_disagreement_panels_spread_over_patients_then_sequences() -> None:
    a = _metrics_table(seed=7, n_patients=3, frames=6)
    b = _metrics_table(seed=8, n_patients=3, frames=6, shift=0.1)
    pair = paired_comparison(a, b, "a", "b", FAST)
    by_id = pair.per_sample.set_index("sample_id")
    first = cfig.largest_delta_ids(pair, 3)
    assert sorted(by_id.loc[first, "patient"]) == ["P0", "P1", "P2"]  # one frame per patient first
    six = cfig.largest_delta_ids(pair, 6)
    assert len(set(zip(by_id.loc[six, "patient"], by_id.loc[six, "sequence"], strict=True))) == 6  # then sequences
    deltas = by_id["dice_delta"].abs()
    assert deltas[six[0]] == deltas.max()  # ordered by |Δ|, the largest first
    assert len(cfig.largest_delta_ids(pair, 10)) == 10  # then any frame


def test_scatter_colours_never_stand_for_two_patients() -> None:
    assert len(set(cfig.patient_colours(cfig.MAX_PATIENT_COLOURS))) == cfig.MAX_PATIENT_COLOURS
    assert len(set(cfig.patient_colours(cfig.MAX_PATIENT_COLOURS + 1))) == 1  # too many to tell apart: no meaning


def _overlay_colours(picture: np.ndarray, colours: list[tuple[int, int, int]]) -> set[tuple[int, int, int]]:
    """The given colours that occur in an RGB image."""
    flat = picture.reshape(-1, 3)
    return {c for c in colours if (flat == np.asarray(c, dtype=flat.dtype)).all(axis=1).any()}


@pytest.mark.slow
def test_the_report_states_statistic_unit_and_direction_and_names_no_absolute_path(twelve_patient_demo,
                                                                                   tmp_path) -> None:
    out = twelve_patient_demo[0].parent / f"compare_{tmp_path.name}"  # beside the runs, as `vesselnb compare` puts it
    report = compare_stage(list(twelve_patient_demo), out)
    pair = report.pairs[0]
    page = report._repr_html_()
    # no raw Python dict, no absolute path: files are named relative to the outputs folder; comparison.json keeps all
    assert "{'" not in page and "{&#x27;" not in page and "Written to" not in page
    for path in (out, *(run.run_dir for run in report.runs), *(run.hf_dir for run in report.runs)):
        assert str(path) not in page and str(path.resolve()) not in page
    assert f"{out.name}/comparison.json" in report.files().html
    assert f"{out.name}/figures/short_vs_long_panels.png" in page
    written = json.loads((out / "comparison.json").read_text())
    assert written["run_dirs"] == [str(run.run_dir) for run in report.runs]  # the full paths stay in the JSON
    # the verdict names the primary metric with its direction and says what it rests on
    verdict = report.verdict().html
    assert "Dice (↑ better): mean Δ +" in verdict and "— on 12 patients, 24 frames" in verdict
    assert "Wilcoxon signed-rank test on the per-patient mean Δ" in verdict
    assert "vesselnb-warning" in verdict  # better on Dice, worse on topology: orange, red is kept for "same model"
    # the paired table: every metric with unit and direction, each column with its statistic; widths only below
    table = report.metrics().html
    widths = list(pair.width_bins().index)
    for metric in pair.stats.index:
        assert (metric_info(metric).heading() in table) == (metric not in widths), metric
    for column in ("A, mean", "B, mean", "Δ = B − A, mean", "95% CI of Δ", "p, Holm-adjusted", "(of 12)"):
        assert column in table
    assert "HD95 (px, ↓ better)" in table and "Spurious area (px², ↓ better)" in table
    assert f"HD95: {metric_info('hd95').description}" in table and "(2 px, analysis.nsd_tolerance_px)" in table
    width_html = report.width_bins().html
    assert "thin vessels (width ≤ 2 px)" in width_html and "thick vessels (width &gt; 5 px)" in width_html
    assert "Recall (↑ better)" in width_html
    # per patient: the primary metric and the ones the verdict warns about, each headed with statistic and unit
    per_patient = report.per_patient().html
    assert metric_info("dice").heading("mean") in per_patient
    assert metric_info("betti0_error").heading("mean") in per_patient
    for metric in set(pair.stats.index) - set(pair.focus_metrics()):  # the rest are in comparison.json
        assert metric_info(metric).heading("mean") not in per_patient, metric
    assert report.per_patient().html.count("<tr") <= 2 + 1 + 12  # two header rows, the index names, 12 patients
    runs = report.runs_table()
    assert runs.loc["long", "run folder"] == "long/" and "/" not in runs.loc["long", "checkpoint"]
    assert {"Dice (mean over frames, ↑ better)", "HD95 (px, median over frames, ↓ better)"} <= set(runs.columns)


@pytest.mark.slow
def test_the_figures_keep_one_meaning_per_colour_and_label_unit_and_direction(twelve_patient_demo, tmp_path) -> None:
    report = compare_stage(list(twelve_patient_demo), tmp_path / "cmp")
    pair, run_a, run_b = report.pairs[0], *report.runs
    metrics = pair.key_metrics()[:4]
    scatter = cfig.scatter_figure(pair, metrics)
    shown = [axis for axis in scatter.axes if axis.get_visible()]
    assert len(scatter.axes) % cfig.SCATTER_COLUMNS == 0 and len(shown) == len(metrics)
    for axis, metric in zip(shown, metrics, strict=True):
        assert axis.get_title().startswith(metric_info(metric).heading("per frame"))
        assert axis.get_xlabel() == "A: short" and axis.get_ylabel() == "B: long"
    assert shown[1].get_title().endswith("long significantly worse")  # Betti-0 error: the verdict's regression
    points = [collection.get_facecolor()[0][:3] for collection in shown[0].collections if collection.get_label()]
    assert len(points) == 12 and len({tuple(c) for c in points}) == 12  # one colour per patient, none repeated
    assert len(shown[0].get_legend().get_texts()) == 12

    ids = cfig.largest_delta_ids(pair, 3)
    truth, note = cfig.ground_truth_reader(run_a, ids)
    assert truth is not None and note == ""
    panels = cfig.disagreement_figure(pair, run_a, run_b, ids, truth)
    (legend,) = panels.legends
    entries = [text.get_text() for text in legend.get_texts()]
    colours = [tuple(int(round(255 * c)) for c in patch.get_facecolor()[:3]) for patch in legend.get_patches()]
    expected = cfig.overlay_legend("short", "long", with_ground_truth=True)
    assert list(zip(colours, entries, strict=True)) == [(tuple(rgb), text) for rgb, text in expected]
    assert len(set(colours)) == len(colours)  # one meaning per colour
    against_truth = [viz.TP_RGB, viz.FP_RGB, viz.FN_RGB]
    agreement = [cfig.BOTH_RGB, cfig.ONLY_A_RGB, cfig.ONLY_B_RGB]
    axes = np.asarray(panels.axes).reshape(len(ids), 4)
    for sample_id, row in zip(ids, axes, strict=True):
        for axis in row[1:3]:  # A and B against ground truth: the error colours only
            picture = axis.get_images()[0].get_array()
            assert _overlay_colours(picture, agreement) == set() and _overlay_colours(picture, against_truth)
        picture = np.asarray(row[3].get_images()[0].get_array())  # A against B: its own colours only
        assert _overlay_colours(picture, against_truth) == set()
        mask_a, mask_b = run_a.store.mask(sample_id), run_b.store.mask(sample_id)
        only_b = (picture.reshape(-1, 3) == np.asarray(cfig.ONLY_B_RGB)).all(axis=1).sum()
        assert only_b == int((mask_b & ~mask_a).sum()) > 0  # the frames were chosen for their difference
        assert row[3].get_title().startswith("A against B\nΔ Dice (B − A) ")
    assert len({pair.per_sample.set_index("sample_id").loc[s, "patient"] for s in ids}) == 3
