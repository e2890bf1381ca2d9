"""Notebook 02 executed with papermill on the demo model: params in, store out, banner and panels displayed."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from _infer_fixtures import REPO, copy_frames, copy_model, demo_model_dir, write_params

from vesselnb.store import PredictionStore

NOTEBOOK = REPO / "notebooks" / "02_inference.ipynb"


@pytest.fixture(scope="session")
def demo(demo_assets):
    """The session's demo build (tests/conftest.py)."""
    return demo_assets


def test_notebook_is_a_thin_clean_page() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code[0].metadata.get("tags") == ["parameters"]
    assert 'params_path = "../params/demo.yaml"' in code[0].source and 'run_dir = "../outputs/demo"' in code[0].source
    assert all(cell.get("id") for cell in notebook.cells)
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert sum("infer_stage(" in cell.source for cell in code) == 1


@pytest.mark.slow
def test_notebook_runs_under_papermill_and_shows_the_banner(demo, tmp_path: Path) -> None:
    import papermill

    from vesselnb.runner import ensure_kernel

    frames = copy_frames(demo, tmp_path / "images", n_frames=2)
    silent = copy_model(demo_model_dir(demo), tmp_path / "nb_no_seg_model", demo_behaviour="no_seg")
    params = write_params(tmp_path / "nb.yaml", silent, frames)
    executed = tmp_path / "02_inference.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), parameters={"params_path": str(params), "run_dir": str(tmp_path / "run")},
        kernel_name=ensure_kernel(), cwd=str(NOTEBOOK.parent), progress_bar=False,
    )
    store = PredictionStore(tmp_path / "run" / "predictions")
    assert store.status_counts() == {"ok": 0, "no_seg": 2, "error": 0}
    outputs = [out for cell in nbformat.read(executed, as_version=4).cells if cell.cell_type == "code"
               for out in cell.outputs]
    html = "".join(out.get("data", {}).get("text/html", "") for out in outputs)
    assert "ATTENTION" in html and "#b00020" in html  # the red banner: no sample produced a mask
    assert html.count("vesselnb-banner") == 1  # shown once; the sections below add meaning, not the same counts
    assert "2 of 2 frames have an EMPTY mask" in html and "No frame had a problem" not in html
    for record in store.records():  # every problem frame listed by its full id
        assert f"<td>{record['sample_id']}</td>" in html
    assert any("image/png" in out.get("data", {}) for out in outputs)  # example panels
