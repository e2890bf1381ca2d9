"""End to end with the real four notebooks: `vesselnb demo` on a 12-frame demo in a temp folder.

This is the user's path: papermill executes 01-03 for both demo checkpoints and 04 over them, each in its own kernel;
the reports, manifests and index must exist and be self-contained (test_browser_reports opens them in Chromium).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from _spine_fixtures import (
    DEMO_FRAMES,
    REPO,
    load_json,
    page_refs,
    table_texts,
    unresolved_refs,
    vesselnb_cli,
)

from vesselnb.runner import COMPARE_STAGE, KERNEL_NAME, RUN_STAGES

NOTEBOOKS = REPO / "notebooks"
N_FRAMES = DEMO_FRAMES
RUNS = ("demo", "demo_long")


# --- the notebooks as committed -------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [*RUN_STAGES, COMPARE_STAGE], ids=lambda s: s.stem)
def test_committed_notebook_is_clean_and_parameterised(stage) -> None:
    path = NOTEBOOKS / stage.notebook
    assert path.is_file(), f"{path} missing"
    notebook = nbformat.read(str(path), as_version=4)
    # JupyterLab opens a notebook with the kernel it names: the venv's, not whatever `python3` is on the machine.
    assert notebook.metadata["kernelspec"]["name"] == KERNEL_NAME
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "commit notebooks with outputs cleared"
        tree = ast.parse(cell.source)
        defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defined, "notebooks hold calls and display only; logic belongs in vesselnb/"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    names = {t.id for n in ast.parse(first.source).body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}
    expected = {"run_dirs", "out_dir"} if stage is COMPARE_STAGE else {"params_path", "run_dir"}
    assert expected <= names
    defaults = {t.id: ast.literal_eval(n.value) for n in ast.parse(first.source).body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name) and t.id in expected}
    if stage is COMPARE_STAGE:  # the defaults run the demo when opened in JupyterLab from notebooks/
        assert [Path(d).name for d in defaults["run_dirs"]] == list(RUNS)
    else:
        assert defaults["params_path"] == "../params/demo.yaml" and defaults["run_dir"] == "../outputs/demo"


# --- the demo, executed (the session fixture `demo_outputs` in conftest.py; the browser checks: test_browser_reports)

@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_demo_run_has_reports_and_manifest(demo_outputs: Path, run: str) -> None:
    folder = demo_outputs / run
    manifest = load_json(folder / "manifest.json")
    assert manifest["status"] == "ok", manifest["stages"]
    for stage in RUN_STAGES:
        entry = manifest["stages"][stage.key]
        assert entry["status"] == "ok" and entry["seconds"] > 0
        executed = nbformat.read(str(folder / f"{stage.stem}.ipynb"), as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
        page = folder / f"{stage.stem}.html"
        assert unresolved_refs(page, demo_outputs) == [], f"{page} references something outside outputs/"
    assert re.fullmatch(r"[0-9a-f]{16}", manifest["weights_fingerprint"])
    iteration = 50 if run == "demo" else 400
    assert manifest["iteration"] == iteration
    assert manifest["source_checkpoint"]["path"].endswith(f"iter_{iteration}.pth")
    assert manifest["source_checkpoint"]["bytes"] > 0
    assert manifest["predictions"]["n_records"] == N_FRAMES
    assert manifest["predictions"]["fingerprint"] == manifest["weights_fingerprint"]
    assert manifest["summary"]["n_samples"] == N_FRAMES
    assert {"dice", "cldice", "hd95", "ciou"} <= set(manifest["headline"])
    assert manifest["versions"]["transformers"] and manifest["versions"]["torch"]


@pytest.mark.slow
def test_demo_error_analysis_report_shows_metrics_table_and_figures(demo_outputs: Path) -> None:
    page = demo_outputs / "demo" / "03_error_analysis.html"
    assert any("dice" in t and "cldice" in t for t in table_texts(page)), "no metrics table in the report"
    images = [r for r in page_refs(page) if r.startswith("data:image/png;base64,")]
    assert images, "no embedded figure"
    text = page.read_text(encoding="utf-8")
    assert load_json(demo_outputs / "demo" / "manifest.json")["weights_fingerprint"] in text  # header


@pytest.mark.slow
def test_demo_checkpoints_differ(demo_outputs: Path) -> None:
    short, long = (load_json(demo_outputs / r / "manifest.json") for r in RUNS)
    assert short["weights_fingerprint"] != long["weights_fingerprint"]
    assert short["summary"]["predictions_hash"] != long["summary"]["predictions_hash"]


@pytest.mark.slow
def test_demo_comparison_and_index(demo_outputs: Path) -> None:
    compare = demo_outputs / "compare_demo_vs_demo_long"
    assert (compare / "04_compare_checkpoints.ipynb").is_file() and (compare / "04_compare_checkpoints.html").is_file()
    comparison = (compare / "comparison.json").read_text(encoding="utf-8")
    assert "demo_long" in comparison
    assert load_json(compare / "manifest.json")["status"] == "ok"
    index = demo_outputs / "index.html"
    refs = page_refs(index)
    for run in RUNS:
        for stage in RUN_STAGES:
            assert f"{run}/{stage.stem}.html" in refs
    assert "compare_demo_vs_demo_long/04_compare_checkpoints.html" in refs
    assert "_demo_assets" not in index.read_text(encoding="utf-8")
    assert unresolved_refs(index, demo_outputs) == []
    assert unresolved_refs(compare / "04_compare_checkpoints.html", demo_outputs) == []


@pytest.mark.slow
def test_corrupt_checkpoint_fails_stage_one_with_report(demo_outputs: Path, tmp_path: Path) -> None:
    """A real stage failure: notebook 01 on a file that is not a checkpoint."""
    params_dir = demo_outputs.parent / "params"
    data = yaml.safe_load((params_dir / "demo.yaml").read_text(encoding="utf-8"))
    broken = tmp_path / "iter_1.pth"
    broken.write_bytes(b"this is not a torch checkpoint\n" * 10)
    data.update(run_name="broken", iteration=1)
    data["checkpoint"]["path"] = str(broken)
    params = params_dir / "broken.yaml"
    params.write_text(yaml.safe_dump(data), encoding="utf-8")
    done = vesselnb_cli("run", str(params), "--outputs", str(demo_outputs), "--no-progress")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "stage 'convert' of 'broken' failed" in done.stderr.strip().splitlines()[-1]
    manifest = load_json(demo_outputs / "broken" / "manifest.json")
    assert manifest["stages"]["convert"]["status"] == "failed"
    assert manifest["stages"]["infer"]["status"] == "skipped"
    assert manifest["stages"]["analyze"]["status"] == "skipped"
    report = (demo_outputs / "broken" / "01_convert.html").read_text(encoding="utf-8")
    assert "This stage failed" in report and manifest["stages"]["convert"]["error"]["ename"] in report
    assert 'id="run-broken"' in (demo_outputs / "index.html").read_text(encoding="utf-8")
