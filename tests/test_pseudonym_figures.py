"""Names drawn into figure pixels: with pseudonyms, no patient name or id reaches a title, caption or legend.

The HTML scrubber (vesselnb.report) cannot read pixels, so the figure code must draw pseudonyms itself. Each test
builds a real small run (frames named like the users' ``Chen_Fang_0000103366__...``), takes the pseudonyms the
notebooks take (``pseudonym.for_run``), draws the figure and reads every matplotlib Text object it holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _analysis_fixtures import PATIENTS, make_dataset, run_params, thin_branch_mask, write_store
from matplotlib.figure import Figure
from matplotlib.text import Text

from vesselnb import htmlrepr as hr
from vesselnb import pseudonym, viz
from vesselnb.analysis import analyze_stage, temporal_figure
from vesselnb.compare import compare_stage
from vesselnb.compare import figures as cfig
from vesselnb.errors import DataError
from vesselnb.run_folder import RunFolder
from vesselnb.runner import COMPARE_STAGE, default_notebooks_dir, execute_stage
from vesselnb.store import PredictionStore
from vesselnb.widgets import SampleBrowser


def figure_texts(fig: Figure) -> list[str]:
    """Every non-empty string the figure draws: suptitle, fig.texts, axes titles, labels, ticks, legends."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def assert_pseudonymised(texts: list[str], names: pseudonym.Pseudonyms) -> None:
    joined = "\n".join(texts)
    assert names.leaks(joined) == [], joined
    for patient in PATIENTS:
        name, patient_id = patient.rsplit("_", 1)
        assert name not in joined and patient_id not in joined


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two scored runs on one dataset (b misses the thin branches), each with its manifest, and their pseudonyms."""
    root = tmp_path_factory.mktemp("pseudofig")
    gts = make_dataset(root, size=48, frames=2)  # two frames per sequence: a temporal-consistency figure too
    outputs = root / "outputs"
    runs = {}
    for name, predictions in (("a", gts), ("b", {k: v & ~thin_branch_mask(48, i)
                                                 for i, (k, v) in enumerate(sorted(gts.items()))})):
        params = run_params(root, run_name=name)
        run_dir = outputs / name
        write_store(run_dir, root / "images", predictions,
                    probabilities={k: np.where(v, 200, 10).astype(np.uint8) for k, v in predictions.items()})
        names = pseudonym.for_run(run_dir, params)
        report = analyze_stage(params, run_dir, workers=1, names=names)
        RunFolder(run_dir).write_manifest(params)
        runs[name] = {"dir": run_dir, "params": params, "names": names, "report": report}
    return {"root": root, "ids": sorted(gts), "outputs": outputs, **runs}


def test_names_are_pseudonymised_by_default_and_shared_by_sibling_runs(run) -> None:
    a, b = run["a"]["names"], run["b"]["names"]
    assert a is not None and set(a.mapping) == set(PATIENTS)
    assert a.mapping == b.mapping  # the same patient reads the same in every run of the outputs folder


def test_prediction_panels_titles_show_pseudonyms_not_names(run) -> None:
    names, ids = run["a"]["names"], run["ids"][:4]
    store = PredictionStore(run["a"]["dir"] / "predictions")
    fig = viz.prediction_panels(store, ids, names=names)
    shown = titles(fig)
    assert len(shown) == 4
    assert_pseudonymised(figure_texts(fig), names)
    for sample_id, title in zip(ids, shown, strict=True):
        whole = title.replace("\n", "")  # a long id is wrapped over lines, never cut
        assert whole.startswith(names.sample_id(sample_id)) and names.patient(sample_id.split("__")[0]) in title
    named = titles(viz.prediction_panels(store, ids))  # names shown: the control that this test can fail
    assert named != shown and not any(t.startswith(pseudonym.PREFIX) for t in named)


def test_gallery_and_tables_of_stage_03_use_pseudonyms(run) -> None:
    report, names = run["a"]["report"], run["a"]["names"]
    for worst in (True, False):
        fig = report.gallery(worst=worst)
        texts = figure_texts(fig)
        assert_pseudonymised(texts, names)
        assert sum(text.startswith(pseudonym.PREFIX) for text in (t.get_text() for t in fig.texts)) == 2
        assert_pseudonymised([report.gallery_section(worst=worst).data], names)
    for section in (report.per_patient_section(), report.per_sequence_section(), report.temporal_section(),
                    report.fragments_section(), report.ground_truth_section()):
        assert_pseudonymised([section.data], names)
    assert_pseudonymised([report._repr_html_()], names)
    assert set(report.per_patient().index) == set(names.mapping.values())
    assert {p for p, _ in report.per_sequence().index} == set(names.mapping.values())
    assert set(report.patient_values().columns) == set(names.mapping.values())  # one column per patient


def test_temporal_figure_labels_sequences_by_pseudonym(run) -> None:
    report, names = run["a"]["report"], run["a"]["names"]
    assert report.temporal is not None
    fig = temporal_figure(report.temporal, names)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == len(report.temporal) and all(t.startswith(pseudonym.PREFIX) for t in ticks)
    assert_pseudonymised(figure_texts(fig), names)
    assert names.leaks("\n".join(figure_texts(temporal_figure(report.temporal))))  # the control: names shown


def test_sample_browser_titles_caption_and_table_use_pseudonyms(run) -> None:
    report, names = run["a"]["report"], run["a"]["names"]
    browser = SampleBrowser(report)
    table = browser.static_table()
    assert_pseudonymised([str(v) for v in table["sample_id"]] + [str(v) for v in table["patient"]], names)
    assert_pseudonymised([browser.static_html()], names)
    ids = [row["sample_id"] for _, row in report.ranked("dice").head(2).iterrows()]
    fig = browser.static_grid(ids)
    rows = report.table.set_index("sample_id").loc[ids]
    # two lines: pseudonym · sequence, then the frame number (a cut id used to lose it)
    assert titles(fig) == [f"{names.patient(r.patient)} · {r.sequence}\nframe {r.frame} · Dice {hr.number(r.dice)}"
                           for r in rows.itertuples()]
    assert_pseudonymised(figure_texts(fig), names)
    header, index, toggles, caption, image = browser.widget().children
    for position in range(3):
        index.value = position
        assert caption.value.startswith(f"<code>{pseudonym.PREFIX}")
        assert_pseudonymised([caption.value], names)


def test_comparison_scatter_legend_panels_and_tables_use_pseudonyms(run, tmp_path: Path) -> None:
    out = run["outputs"] / "cmp"
    names = pseudonym.for_comparison(out, [run["a"]["dir"], run["b"]["dir"]])
    assert names.mapping == run["a"]["names"].mapping  # numbered as the runs number them
    report = compare_stage([run["a"]["dir"], run["b"]["dir"]], out, names=names)
    pair = report.pairs[0]
    scatter = cfig.scatter_figure(pair, ["dice", "recall_thin"], names)
    legend = scatter.axes[0].get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert sorted(labels) == sorted(names.mapping.values())
    assert_pseudonymised(figure_texts(scatter), names)
    named = cfig.scatter_figure(pair, ["dice"])  # the control: names shown without pseudonyms
    assert sorted(t.get_text() for t in named.axes[0].get_legend().get_texts()) == sorted(PATIENTS)
    ids = cfig.largest_delta_ids(pair, 2)
    ground_truth, _ = cfig.ground_truth_reader(report.runs[0], ids)
    panels = cfig.disagreement_figure(pair, report.runs[0], report.runs[1], ids, ground_truth, names)
    first_column = [ax.get_title() for ax in panels.axes[::4]]
    assert [t.split("\n")[0] for t in first_column] == [names.sample_id(s) for s in ids]
    assert_pseudonymised(figure_texts(panels), names)
    tables = report.per_patient().html + report.per_sequence().html + report.status_changes().html
    assert_pseudonymised([tables], names)
    assert all(p in tables for p in names.mapping.values())
    assert (out / "figures" / "a_vs_b_scatter.png").is_file()


def test_shown_id_follows_the_mapping_whatever_the_name_regex_and_refuses_unknown_patients() -> None:
    names = pseudonym.Pseudonyms({"Chen_Fang_0000103366": "P01", "caseA": "P02"})
    assert viz.shown_id("Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034", names) == \
        "P01__1-4_1_04B2D3CF_frame_000034"
    assert viz.shown_id("caseA-run2-f007", names) == "P02-run2-f007"  # a run's own regex made "caseA" the patient
    assert viz.shown_id("caseA-run2-f007", None) == "caseA-run2-f007"
    with pytest.raises(DataError, match="has no pseudonym"):
        viz.shown_id("Stranger_Joe_0000999999__1-1_1_00000000_frame_000001", names)


def test_notebook_04_draws_pseudonyms_when_the_runs_saved_a_mapping(run) -> None:
    out_dir = run["outputs"] / "cmp_notebook"
    parameters = {"run_dirs": [str(run["a"]["dir"]), str(run["b"]["dir"])], "out_dir": str(out_dir)}
    outcome = execute_stage(COMPARE_STAGE, parameters, out_dir, default_notebooks_dir(), header={}, progress=False)
    assert outcome.status == "ok", outcome.error
    assert pseudonym.saved(out_dir).mapping == run["a"]["names"].mapping  # the notebook took the runs' numbering
    executed = (out_dir / "04_compare_checkpoints.ipynb").read_text(encoding="utf-8")
    assert "P01" in executed and "names=names" in executed
