"""Notebook 03 in JupyterLab itself: served locally, opened with the vesselnb kernel, run, and the widget browser used.

This is `make lab` on the demo: a JupyterLab server over a folder laid out like the checkout (notebooks/, params/,
outputs/ holding a copy of the demo's run), the committed notebook opened unchanged, so its default parameters
(``../params/demo.yaml``, ``../outputs/demo``) are the ones a user gets. Headless Debian Chromium, driven by
Playwright, runs all cells through JupyterLab's own command, then clicks the browser's sort order and types a new
threshold, as a user does; the sample shown must change each time. Screenshots go to ``…/lab`` beside the report
screenshots (see tests/_browser.py).
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from _browser import artifact_dir, chromium, require_browser
from _lab import jupyter_lab
from PIL import Image
from playwright.sync_api import Page

from vesselnb.runner import ensure_kernel

NOTEBOOK = "notebooks/03_error_analysis.ipynb"
KERNEL = "vesselnb"
REPO = Path(__file__).resolve().parent.parent
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CAPTION = ".widget-html-content code"
PICTURE = "img.widget-image"

_NOTEBOOK_PANEL = "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
_READY = """async () => {
  const panel = window.jupyterapp.shell.currentWidget;
  await panel.context.ready; await panel.sessionContext.ready;
  const kernel = panel.sessionContext.session.kernel;
  return {path: panel.context.path, kernel: kernel.name};
}"""
_RUN_ALL = """async () => {
  const ok = await window.jupyterapp.commands.execute('notebook:run-all-cells');
  const panel = window.jupyterapp.shell.currentWidget;
  return {ok: ok, notebook: panel.context.model.toJSON()};
}"""


@pytest.fixture(scope="module")
def lab_root(demo_outputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout-shaped folder: the committed notebook, the demo params, a copy of the demo run (03 rewrites it)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    shutil.copy2(REPO / NOTEBOOK, root / NOTEBOOK)
    (root / "params").mkdir()
    shutil.copy2(demo_outputs.parent / "params" / "demo.yaml", root / "params" / "demo.yaml")
    (root / "outputs").mkdir()
    (root / "outputs" / "_demo_assets").symlink_to(demo_outputs / "_demo_assets", target_is_directory=True)
    shutil.copytree(demo_outputs / "demo", root / "outputs" / "demo")
    return root


_PICTURE_PNG = """async (selector) => {
  const response = await fetch(document.querySelector(selector).src);
  const bytes = new Uint8Array(await response.arrayBuffer());
  let text = ''; for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}"""


def _picture(page: Page) -> np.ndarray:
    """The pixels the widget's image holds (the PNG the kernel sent), independent of layout and scrolling."""
    png = base64.b64decode(page.evaluate(_PICTURE_PNG, PICTURE))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _wait_for_change(page: Page, selector: str, attribute: str, before: str) -> str:
    """The new value of ``selector``'s ``attribute`` once the kernel's answer reached the page (fails after 60 s)."""
    page.wait_for_function(
        "([selector, attribute, before]) => { const el = document.querySelector(selector);"
        " return el && el[attribute] !== before; }", arg=[selector, attribute, before], timeout=60_000)
    return page.eval_on_selector(selector, f"el => el.{attribute}")


@pytest.mark.slow
def test_notebook_03_runs_in_jupyterlab_and_the_browser_responds(lab_root: Path, tmp_path: Path) -> None:
    require_browser()
    assert ensure_kernel(KERNEL) == KERNEL  # `make setup` installs it; this checks it runs this interpreter
    shots = artifact_dir("lab")
    print(f"jupyterlab screenshots: {shots}")
    with jupyter_lab(lab_root, tmp_path / "lab-state") as lab, chromium() as browser:
        session = lab.start_session(NOTEBOOK, KERNEL)
        assert session["kernel"]["name"] == KERNEL
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(lab.lab_url(NOTEBOOK))
        page.wait_for_function(_NOTEBOOK_PANEL + " && window.jupyterapp.shell.currentWidget.sessionContext",
                               timeout=120_000)
        opened = page.evaluate(_READY)
        assert opened == {"path": NOTEBOOK, "kernel": KERNEL}, f"JupyterLab opened {opened} (log: {lab.log})"

        result = page.evaluate(_RUN_ALL)
        page.screenshot(path=str(shots / "03_after_run_all.png"))
        code = [c for c in result["notebook"]["cells"] if c["cell_type"] == "code"]
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"cells raised in JupyterLab: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"
        assert result["ok"] is True
        assert all(c["execution_count"] for c in code), "a cell did not run"
        widget_outputs = [o for c in code for o in c["outputs"] if WIDGET_MIME in o.get("data", {})]
        assert len(widget_outputs) == 1, "the sample browser is not a live widget in JupyterLab (static fallback?)"

        # the widget view is rendered in the page: a caption naming the sample and its picture
        page.wait_for_selector(CAPTION, timeout=60_000)
        browser_box = page.locator(".widget-vbox", has=page.locator(PICTURE)).first
        browser_box.scroll_into_view_if_needed()
        first_caption = page.inner_text(CAPTION)
        first_picture = _picture(page)
        browser_box.screenshot(path=str(shots / "browser_worst_first.png"))

        # the sort order: best first shows another sample
        browser_box.get_by_role("button", name="best first").click()
        best_caption = _wait_for_change(page, CAPTION, "innerText", first_caption)
        page.wait_for_function(f"() => document.querySelector('{PICTURE}').complete", timeout=60_000)
        assert best_caption.split()[0] != first_caption.split()[0], (first_caption, best_caption)
        browser_box.screenshot(path=str(shots / "browser_best_first.png"))

        # the threshold: typed into the slider's readout, the same sample is redrawn from its probability map
        src_before = page.get_attribute(PICTURE, "src")
        picture_before = _picture(page)
        threshold = browser_box.locator(".widget-hslider", has=page.locator("label", has_text="threshold"))
        readout = threshold.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("0.15")
        page.keyboard.press("Enter")
        _wait_for_change(page, PICTURE, "src", src_before)
        page.wait_for_function(f"() => document.querySelector('{PICTURE}').complete", timeout=60_000)
        assert readout.inner_text().strip() == "0.15"
        assert page.inner_text(CAPTION).split()[0] == best_caption.split()[0], "the threshold changed the sample"
        picture_after = _picture(page)
        browser_box.screenshot(path=str(shots / "browser_threshold_0.15.png"))
        assert picture_before.shape == picture_after.shape
        assert np.abs(picture_before - picture_after).max() > 0, "a new threshold drew the same picture"
        assert first_picture.shape != picture_before.shape or np.abs(first_picture - picture_before).max() > 0, \
            "best and worst sample drew the same picture"
