"""Helpers for the runner/report tests: small real notebooks and params files.

The stand-in notebooks follow the notebook contract (first code cell tagged ``parameters``) and write the stage files
the manifest gathers, so the runner, HTML rendering, manifest and index can be tested with real papermill kernels
independently of the real stages. The end-to-end test runs the real notebooks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import yaml

REPO = Path(__file__).resolve().parent.parent

_STAGE_CODE = {
    "01_convert.ipynb": """
import json, pathlib
from vesselnb.params import load_params
params = load_params(params_path, check_paths=False)
run = pathlib.Path(run_dir); run.mkdir(parents=True, exist_ok=True)
(run / "conversion.json").write_text(json.dumps({"fingerprint": "0123456789abcdef",
    "source": {"path": "/ckpt/iter_7.pth", "bytes": 1234}, "warnings": [], "dtype": "bf16"}))
print("converted", params.run_name)
""",
    "02_inference.ipynb": """
import json, pathlib
run = pathlib.Path(run_dir); (run / "predictions" / "records").mkdir(parents=True, exist_ok=True)
(run / "predictions" / "store.json").write_text(json.dumps({"format": 1, "fingerprint": "0123456789abcdef"}))
for i in range(3):
    (run / "predictions" / "records" / f"s{i}.json").write_text(json.dumps({"sample_id": f"s{i}", "status": "ok"}))
""",
    "03_error_analysis.ipynb": """
import json, pathlib
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
run = pathlib.Path(run_dir); (run / "analysis").mkdir(parents=True, exist_ok=True)
table = pd.DataFrame({"metric": ["dice", "cldice"], "value": [0.81, 0.77]})
(run / "analysis" / "summary.json").write_text(json.dumps({"run_name": run.name, "n_samples": 3, "n_scored": 3,
    "status_counts": {"ok": 2, "no_seg": 1, "error": 0},
    "headline": {"dice": 0.8123, "cldice": 0.7711, "hd95": 4.5, "ciou": 0.69},
    "flags": [{"level": "warning", "code": "no_seg_rate", "message": "1 of 3 frames without [SEG]"}]}))
display(table.style.set_caption("Metrics table"))
fig, ax = plt.subplots(figsize=(3, 2)); ax.plot([0, 1], [0, 1]); ax.set_title("stand-in figure")
display(fig); plt.close(fig)
""",
    "04_compare_checkpoints.ipynb": """
import json, pathlib
out = pathlib.Path(out_dir); out.mkdir(parents=True, exist_ok=True)
names = [pathlib.Path(d).name for d in run_dirs]
headline = {"text": "b is better on dice", "metric": "dice", "delta_mean": 0.05, "ci95": [0.01, 0.09], "p_holm": 0.01,
            "n_patients": 12, "n_common": 40, "n_left_out": 0, "identity_alert": False, "comparable": True}
(out / "comparison.json").write_text(json.dumps({"runs": names, "headline": headline}))
print("compared", names)
""",
}


def write_stub_notebooks(folder: Path, fail: str | None = None) -> Path:
    """Write the four stand-in notebooks into ``folder``; ``fail`` names a notebook whose second cell raises."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in _STAGE_CODE.items():
        if name.startswith("04"):
            defaults = 'run_dirs = ["../outputs/demo", "../outputs/demo_long"]\nout_dir = "../outputs/compare"'
        else:
            defaults = 'params_path = "../params/demo.yaml"\nrun_dir = "../outputs/demo"'
        cells = [nbformat.v4.new_markdown_cell(f"# {name}"), nbformat.v4.new_code_cell(defaults)]
        cells[1].metadata["tags"] = ["parameters"]
        if name == fail:
            cells.append(nbformat.v4.new_code_cell("raise ValueError('deliberate failure for the test')"))
        cells.append(nbformat.v4.new_code_cell(code.strip()))
        notebook = nbformat.v4.new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, str(folder / name))
    return folder


def write_params(path: Path, run_name: str, **extra: object) -> Path:
    """A minimal valid params file (an HF folder with a config.json and an image folder with one frame beside it)."""
    (path.parent / "hf").mkdir(parents=True, exist_ok=True)
    (path.parent / "hf" / "config.json").write_text("{}", encoding="utf-8")
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    (path.parent / "images" / "a_1__s_frame_000001.jpg").touch()
    content = {"run_name": run_name, "hf_model": "hf", "data": {"images": "images"}, **extra}
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def copy_demo_params(dest_params: Path, limit: int | None = None) -> list[Path]:
    """Copy the real params/demo*.yaml into ``dest_params`` (keeping ``../outputs/_demo_assets``), with ``limit``."""
    dest_params.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in ("demo.yaml", "demo_long.yaml"):
        data = yaml.safe_load((REPO / "params" / name).read_text(encoding="utf-8"))
        if limit is not None:
            data.setdefault("data", {})["limit"] = limit
        target = dest_params / name
        target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        copies.append(target)
    return copies


# The end-to-end demo: the real params files limited to this many frames (12 of the demo's 24, both patients).
DEMO_FRAMES = 12


def vesselnb_cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """The installed command as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "vesselnb.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def build_demo_outputs(root: Path, n_frames: int = DEMO_FRAMES) -> Path:
    """`vesselnb demo` with the real params files (limited to ``n_frames``) into ``root/outputs``; returns it."""
    copy_demo_params(root / "params", limit=n_frames)
    outputs = root / "outputs"
    done = vesselnb_cli("demo", "--outputs", str(outputs), "--params", str(root / "params"), "--no-progress")
    assert done.returncode == 0, f"vesselnb demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return outputs


def chromium_binary() -> str | None:
    """Debian's ``chromium`` (or another name it goes by), or None when no browser is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(url: str, png: Path, profile: Path, size: str = "1280,2000") -> subprocess.CompletedProcess:
    """Headless Chromium screenshot of ``url`` with networking side-channels off (offline, no first-run UI)."""
    browser = chromium_binary()
    assert browser is not None
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def dump_dom(url: str, profile: Path) -> str:
    """The DOM after scripts ran, as Chromium sees it."""
    browser = chromium_binary()
    assert browser is not None
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class _Refs(HTMLParser):
    """Collects every src/href of a page (img, script, link, a, iframe ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)


def unresolved_refs(page: Path, outputs_root: Path) -> list[str]:
    """References in ``page`` that do not resolve offline inside ``outputs_root``.

    Allowed: ``data:`` URIs, in-page anchors, and relative paths to files that exist under ``outputs_root``.
    """
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    root = outputs_root.resolve()
    bad = []
    for ref in parser.refs:
        if ref.startswith(("data:", "#")):
            continue
        parsed = urlparse(ref)
        if parsed.scheme or parsed.netloc:
            bad.append(ref)  # http(s), file:, protocol-relative: not self-contained
            continue
        target = (page.parent / unquote(parsed.path)).resolve()
        if not target.is_relative_to(root) or not target.exists():
            bad.append(ref)
    return bad


def page_refs(page: Path) -> list[str]:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.refs


def table_texts(page: Path) -> list[str]:
    """The text of each <table> in the page, lower-cased (to find the metrics table in a report)."""

    class Tables(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.depth = 0
            self.tables: list[list[str]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "table":
                self.depth += 1
                self.tables.append([])

        def handle_endtag(self, tag: str) -> None:
            if tag == "table" and self.depth:
                self.depth -= 1

        def handle_data(self, data: str) -> None:
            if self.depth and self.tables:
                self.tables[-1].append(data)

    parser = Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    return [" ".join(parts).lower() for parts in parser.tables]


def assert_renders_in_chromium(page: Path, artifact: Path, profile: Path) -> None:
    """Screenshot ``page`` headless; the PNG must be a real picture, not a blank page."""
    import numpy as np
    from PIL import Image

    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.unlink(missing_ok=True)
    done = screenshot(page.resolve().as_uri(), artifact, profile)
    assert artifact.is_file(), f"chromium wrote no screenshot: {done.stderr[-2000:]}"
    assert artifact.stat().st_size > 10_000, "screenshot suspiciously small"
    pixels = np.asarray(Image.open(artifact).convert("L"), dtype=np.float32)
    assert pixels.std() > 5.0, "screenshot is (nearly) one colour: the page did not render"
