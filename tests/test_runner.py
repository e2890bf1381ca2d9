"""The runner, reports, manifest and index with real papermill kernels on small stand-in notebooks.

These run in seconds and do not depend on the real stages; ``test_spine_e2e.py`` runs the real four notebooks.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from _spine_fixtures import (
    REPO,
    assert_renders_in_chromium,
    chromium_binary,
    load_json,
    page_refs,
    table_texts,
    unresolved_refs,
    write_params,
    write_stub_notebooks,
)

from vesselnb import headline
from vesselnb.errors import VesselnbError
from vesselnb.report import write_index
from vesselnb.runner import RUN_STAGES, Stage, compare_runs, execute_stage, run_params

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def stub_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished stand-in runs (a, b) and their comparison, plus a decoy demo-assets folder."""
    root = tmp_path_factory.mktemp("spine")
    notebooks = write_stub_notebooks(root / "notebooks")
    outputs = root / "outputs"
    (outputs / "_demo_assets").mkdir(parents=True)
    (outputs / "_demo_assets" / "manifest.json").write_text('{"kind": "run", "run_name": "_demo_assets"}')
    for name, iteration in (("a", 7), ("b", 9)):
        params = write_params(root / "params" / f"{name}.yaml", name, iteration=iteration)
        result = run_params(params, outputs_dir=outputs, notebooks_dir=notebooks, progress=False)
        assert result.ok, result.failure_line()
    result = compare_runs([root / "params" / "a.yaml", outputs / "b"], outputs_dir=outputs, notebooks_dir=notebooks,
                          progress=False)
    assert result.ok, result.failure_line()
    return outputs


def test_run_writes_executed_notebooks_reports_and_manifest(stub_outputs: Path) -> None:
    run = stub_outputs / "a"
    manifest = load_json(run / "manifest.json")
    assert manifest["kind"] == "run" and manifest["status"] == "ok" and manifest["run_name"] == "a"
    assert [manifest["stages"][s.key]["status"] for s in RUN_STAGES] == ["ok", "ok", "ok"]
    for stage in RUN_STAGES:
        entry = manifest["stages"][stage.key]
        assert entry["seconds"] > 0 and entry["started"] <= entry["finished"]
        executed = nbformat.read(str(run / entry["executed"]), as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and str(run) in injected[0].source  # the runner passed absolute paths
        assert (run / entry["html"]).is_file()
    # Gathered from the stages' own files, as the contract lists them.
    assert manifest["weights_fingerprint"] == "0123456789abcdef"
    assert manifest["source_checkpoint"] == {"path": "/ckpt/iter_7.pth", "bytes": 1234}
    assert manifest["predictions"]["n_records"] == 3
    assert manifest["headline"]["dice"] == pytest.approx(0.8123)
    assert manifest["params"]["iteration"] == 7 and manifest["params"]["hf_model"].endswith("hf")
    versions = manifest["versions"]
    assert versions["torch"].startswith("2.") and versions["papermill"] and versions["vesselnb"]
    assert manifest["git"] is None or len(manifest["git"]["revision"]) == 40


def test_report_html_is_self_contained_with_header_and_no_code(stub_outputs: Path) -> None:
    page = stub_outputs / "a" / "03_error_analysis.html"
    text = page.read_text(encoding="utf-8")
    assert "vesselnb &middot; a &middot; 03_error_analysis" in text or "vesselnb · a · 03_error_analysis" in text
    assert "0123456789abcdef" in text  # fingerprint in the header
    assert any("dice" in t and "cldice" in t for t in table_texts(page)), "metrics table missing"
    refs = page_refs(page)
    assert any(r.startswith("data:image/png;base64,") for r in refs), "figure not embedded"
    assert unresolved_refs(page, stub_outputs) == []
    assert "load_params(params_path" not in text  # code cells hidden by default


def test_index_lists_runs_comparison_and_not_demo_assets(stub_outputs: Path) -> None:
    index = stub_outputs / "index.html"
    text = index.read_text(encoding="utf-8")
    refs = page_refs(index)
    for run in ("a", "b"):
        assert f'id="run-{run}"' in text
        for stage in RUN_STAGES:
            assert f"{run}/{stage.stem}.html" in refs
    assert "compare_a_vs_b/04_compare_checkpoints.html" in refs
    assert "compare_a_vs_b/comparison.json" in refs
    assert "b is better on dice" in text  # the comparison's verdict, then its primary metric in a sentence
    assert "Δ = B − A (mean per frame) +0.050, 95 % CI [+0.010, +0.090] resampling 12 patients" in text
    assert "Holm p 0.010" in text and "40 shared frames" in text
    assert "identity_alert" not in text and "comparable:" not in text  # no key: value dump
    assert "0.8123" in text and "iter_7.pth" in text and "no_seg_rate" in text
    assert "_demo_assets" not in text
    assert unresolved_refs(index, stub_outputs) == []
    comparison = load_json(stub_outputs / "compare_a_vs_b" / "manifest.json")
    assert comparison["kind"] == "comparison" and comparison["runs"] == ["a", "b"] and comparison["status"] == "ok"


def test_failing_stage_writes_error_report_and_exits_nonzero(tmp_path: Path) -> None:
    notebooks = write_stub_notebooks(tmp_path / "notebooks", fail="02_inference.ipynb")
    params = write_params(tmp_path / "params" / "c.yaml", "c")
    outputs = tmp_path / "outputs"
    done = subprocess.run(
        [sys.executable, "-m", "vesselnb.cli", "run", str(params), "--outputs", str(outputs),
         "--notebooks", str(notebooks), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "stage 'infer'" in last and "ValueError: deliberate failure for the test" in last
    assert "02_inference.html" in last
    run = outputs / "c"
    manifest = load_json(run / "manifest.json")
    assert manifest["status"] == "failed"
    assert manifest["stages"]["convert"]["status"] == "ok"
    assert manifest["stages"]["infer"]["status"] == "failed"
    assert manifest["stages"]["infer"]["error"]["ename"] == "ValueError"
    assert manifest["stages"]["analyze"]["status"] == "skipped"
    assert not (run / "03_error_analysis.ipynb").exists()
    report = (run / "02_inference.html").read_text(encoding="utf-8")
    assert "deliberate failure for the test" in report and "This stage failed" in report
    executed = nbformat.read(str(run / "02_inference.ipynb"), as_version=4)
    assert any(o.get("output_type") == "error" for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    index = (outputs / "index.html").read_text(encoding="utf-8")
    assert 'class="failed"' in index and "c/02_inference.html" in index


def test_stage_subset_keeps_earlier_entries(tmp_path: Path) -> None:
    notebooks = write_stub_notebooks(tmp_path / "notebooks")
    params = write_params(tmp_path / "params" / "d.yaml", "d")
    outputs = tmp_path / "outputs"
    first = run_params(params, outputs_dir=outputs, notebooks_dir=notebooks, progress=False, stages=["convert"])
    assert first.ok and [s.key for s in first.stages] == ["convert"]
    before = load_json(outputs / "d" / "manifest.json")
    assert before["stages"]["infer"]["status"] == "not_run" and before["status"] == "incomplete"
    run_params(params, outputs_dir=outputs, notebooks_dir=notebooks, progress=False, stages=["analyze", "infer"])
    after = load_json(outputs / "d" / "manifest.json")
    assert after["stages"]["convert"] == before["stages"]["convert"]
    assert after["stages"]["infer"]["status"] == "ok" and after["stages"]["analyze"]["status"] == "ok"
    assert after["status"] == "ok" and after["created"] == before["created"]
    with pytest.raises(VesselnbError, match="unknown stage 'inference'"):
        run_params(params, outputs_dir=outputs, notebooks_dir=notebooks, progress=False, stages=["inference"])


def test_kernel_runs_the_runners_interpreter_in_its_own_process(tmp_path: Path) -> None:
    import os

    probe = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('out = ""'),
        nbformat.v4.new_code_cell("import json, os, sys, pathlib\n"
                                  "from ipykernel import get_connection_info\n"
                                  "transport = json.loads(get_connection_info())['transport']\n"
                                  "pathlib.Path(out).write_text(f'{sys.executable}\\n{os.getpid()}\\n{transport}')"),
    ])
    probe.cells[0].metadata["tags"] = ["parameters"]
    (tmp_path / "nb").mkdir()
    nbformat.write(probe, str(tmp_path / "nb" / "probe.ipynb"))
    out = tmp_path / "probe.txt"
    outcome = execute_stage(Stage("probe", "probe.ipynb"), {"out": str(out)}, tmp_path / "run", tmp_path / "nb",
                            header={"run": "probe"}, progress=False)
    assert outcome.status == "ok", outcome.error
    executable, pid, transport = out.read_text().splitlines()
    assert executable == sys.executable
    assert int(pid) != os.getpid()
    if os.name == "posix":
        assert transport == "ipc"  # Unix sockets in a private folder: no TCP ports to clash over


def test_compare_refuses_unfinished_runs(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params" / "e.yaml", "e")
    with pytest.raises(VesselnbError, match=r"no finished run here .*vesselnb run"):
        compare_runs([params, params], outputs_dir=tmp_path / "outputs")
    with pytest.raises(VesselnbError, match="at least two"):
        compare_runs([params], outputs_dir=tmp_path / "outputs")


def test_index_metric_headings_name_statistic_unit_and_direction(stub_outputs: Path) -> None:
    """The index's metric columns say what each number is: the headline's HD95 is a median, cIoU pooled pixels."""
    text = (stub_outputs / "index.html").read_text(encoding="utf-8")
    headers = [html.unescape(h) for h in re.findall(r'<th data-type="num" class="metric"[^>]*>([^<]*)</th>', text)]
    assert headers == [headline.heading(key) for key in ("dice", "cldice", "hd95", "ciou")]
    assert all("better" in h and ("per frame" in h or "pooled" in h) for h in headers), headers
    assert "px" in headers[2] and "median per frame" in headers[2] and "pooled pixels" in headers[3]
    assert "HD95 (px)</th>" not in text
    # a cell shows htmlrepr.number's 3 decimals for a ratio; its data-sort keeps the full value for sorting
    assert re.search(r'data-sort="0\.8123"[^>]*>0\.812</td>', text), "Dice cell of run a"
    line = headline.text("hd95", 61.234)
    assert line == "HD95 61.23 px (median per frame)"


def test_index_survives_odd_manifests(tmp_path: Path) -> None:
    """A half-written or foreign manifest must not break the page listing every other run."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    (tmp_path / "compare_x_vs_y").mkdir()
    (tmp_path / "compare_x_vs_y" / "manifest.json").write_text(json.dumps({"kind": "comparison", "status": "failed"}))
    (tmp_path / "compare_x_vs_y" / "comparison.json").write_text(json.dumps({"runs": ["x", "y"], "headline": [1, 2]}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"kind": "run", "stages": {"convert": {}}}))
    text = write_index(tmp_path).read_text(encoding="utf-8")
    assert 'id="run-old"' in text and 'id="cmp-compare_x_vs_y"' in text and "broken" not in text


@pytest.mark.skipif(chromium_binary() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_stub_pages_render_in_chromium(stub_outputs: Path, tmp_path: Path) -> None:
    assert_renders_in_chromium(stub_outputs / "index.html", ARTIFACTS / "stub_index.png", tmp_path / "profile")
    assert_renders_in_chromium(stub_outputs / "a" / "03_error_analysis.html", ARTIFACTS / "stub_report.png",
                               tmp_path / "profile")
