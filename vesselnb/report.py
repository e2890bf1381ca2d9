"""What a run leaves behind for people: HTML reports, ``manifest.json`` and ``outputs/index.html``.

Reports are single self-contained HTML files (images inline, no CDN scripts) so one can be attached to a review and
opened offline. The manifest is the machine-readable record of a run (params, versions, git revision, per-stage
status and timing, fingerprint, headline metrics); the index is rebuilt from manifests alone, so it can always be
regenerated with ``vesselnb index``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vesselnb.params import RunParams
from vesselnb.stages import RUN_STAGES, now_iso

TEMPLATES = Path(__file__).resolve().parent / "templates"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Packages whose versions decide what a run computed; looked up without importing them (torch takes seconds).
_VERSIONED = ("vesselnb", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy", "scipy",
              "scikit-image", "monai", "pandas", "matplotlib", "papermill", "nbconvert", "ipykernel")
_EXTERNAL_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>", re.IGNORECASE)
# tqdm's bar: "label:  42%|████▏     | 5/12 [00:01<00:02,  3.1it/s]"
_PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d*")
_EXTERNAL_LINK = re.compile(r"<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE)


# --- HTML reports -----------------------------------------------------------------------------------------------

def render_html(executed: Path, html_path: Path, header: dict[str, Any], show_code: bool = False) -> Path:
    """Render an executed notebook to one self-contained HTML file with a vesselnb header.

    Code cells are hidden by default (``show_code`` keeps them): the reader wants tables and figures; the notebook
    beside it has the code. Output images are already base64 in the notebook; ``embed_images`` also inlines images
    that markdown cells reference by path.
    """
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(str(executed), as_version=4)
    _drop_progress_bars(notebook)
    exporter = HTMLExporter(
        template_name="lab",
        template_file="vesselnb_report.html",
        extra_template_paths=[str(TEMPLATES)],
        exclude_input=not show_code,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    resources = {
        "metadata": {"name": f"{header.get('run', '')} · {executed.stem}", "path": str(executed.parent)},
        "vesselnb": {"run": "", "stage": executed.stem, "status": "", "fingerprint": None, "date": "",
                     "iteration": None, "error": None, **header},
    }
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    body = _EXTERNAL_LINK.sub("", _EXTERNAL_SCRIPT.sub("", body))  # belt and braces: nothing loads from the web
    _write_text_atomic(html_path, body)
    return html_path


def _drop_progress_bars(notebook: Any) -> None:
    """Remove tqdm progress lines from stderr outputs (the .ipynb keeps them): noise in a static report.

    Warnings and tracebacks on stderr stay; a stream left empty is removed.
    """
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = re.split(r"[\r\n]+", output.get("text", ""))
                text = "\n".join(line for line in lines if line.strip() and not _PROGRESS_LINE.search(line))
                if not text:
                    continue
                output["text"] = text + "\n"
            kept.append(output)
        cell["outputs"] = kept


# --- manifests ----------------------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or unreadable (a stage that never got that far)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def package_versions(names: Iterable[str] = _VERSIONED) -> dict[str, str | None]:
    """Installed versions (None when absent), plus Python's; without importing the packages."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(folder: Path | None = None) -> dict[str, Any] | None:
    """``{"revision", "dirty"}`` of the vesselnb checkout, or None outside a git checkout (an installed wheel)."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": revision, "dirty": bool(status.strip())}


def gather_stage_files(run_dir: Path) -> dict[str, Any]:
    """The manifest fields the stages' own files provide (conversion.json, store.json, summary.json)."""
    gathered: dict[str, Any] = {}
    conversion = read_json(run_dir / "conversion.json")
    store = read_json(run_dir / "predictions" / "store.json")
    summary = read_json(run_dir / "analysis" / "summary.json")
    if isinstance(conversion, dict):
        gathered["weights_fingerprint"] = conversion.get("fingerprint")
        gathered["source_checkpoint"] = conversion.get("source")
        gathered["conversion"] = {k: conversion.get(k) for k in ("dtype", "output_dir", "output_bytes", "coverage")}
        gathered["conversion"]["n_warnings"] = len(conversion.get("warnings") or [])
    if isinstance(store, dict):
        records = run_dir / "predictions" / "records"
        gathered["predictions"] = {**store, "n_records": len(list(records.glob("*.json"))) if records.is_dir() else 0}
        gathered.setdefault("weights_fingerprint", store.get("fingerprint"))
    if isinstance(summary, dict):
        gathered["summary"] = summary
        gathered["headline"] = summary.get("headline")
    return gathered


def update_run_manifest(run_dir: Path, params: RunParams, outcomes: list[Any]) -> dict[str, Any]:
    """Merge stage outcomes into ``run_dir/manifest.json`` and refresh everything gathered from stage files.

    Stages not in ``outcomes`` keep their earlier entry, so ``--stages analyze`` does not forget the conversion.
    """

    path = run_dir / MANIFEST
    old = read_json(path) or {}
    stages = {s.key: {"key": s.key, "notebook": s.notebook, "status": "not_run"} for s in RUN_STAGES}
    stages.update(old.get("stages") or {})
    for outcome in outcomes:
        stages[outcome.key] = outcome.to_dict()
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "run",
        "run_name": params.run_name,
        "description": params.description,
        "iteration": params.iteration,
        "params_file": str(params.source_file) if params.source_file else None,
        "params": params.to_dict(),
        "run_dir": str(run_dir),
        "created": old.get("created") or now_iso(),
        "updated": now_iso(),
        "status": _overall_status(stages.values()),
        "stages": stages,
        "versions": package_versions(),
        "git": git_revision(),
        "host": {"platform": platform.platform(), "python": sys.executable},
        **gather_stage_files(run_dir),
    }
    _write_text_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def update_compare_manifest(out_dir: Path, run_dirs: list[Path], outcome: Any) -> dict[str, Any]:
    """``manifest.json`` of a comparison folder: which runs, the stage outcome, versions."""

    path = out_dir / MANIFEST
    old = read_json(path) or {}
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "comparison",
        "name": out_dir.name,
        "runs": [d.name for d in run_dirs],
        "run_dirs": [str(d) for d in run_dirs],
        "created": old.get("created") or now_iso(),
        "updated": now_iso(),
        "status": _overall_status([outcome.to_dict()]),
        "stages": {outcome.key: outcome.to_dict()},
        "versions": package_versions(),
        "git": git_revision(),
    }
    _write_text_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _overall_status(stages: Iterable[dict[str, Any]]) -> str:
    statuses = [s.get("status") for s in stages]
    if "failed" in statuses:
        return "failed"
    if "running" in statuses:
        return "running"
    return "ok" if statuses and all(s == "ok" for s in statuses) else "incomplete"


# --- outputs/index.html -------------------------------------------------------------------------------------------

def write_index(outputs_dir: Path) -> Path:
    """Rebuild ``outputs_dir/index.html`` from every run and comparison manifest found there."""
    import jinja2


    outputs = Path(outputs_dir).resolve()
    runs, comparisons = [], []
    for manifest_path in sorted(outputs.glob(f"*/{MANIFEST}")):
        folder = manifest_path.parent
        if folder.name.startswith(("_", ".")):  # demo assets and other private folders are not runs
            continue
        manifest = read_json(manifest_path)
        if not isinstance(manifest, dict):
            continue
        if manifest.get("kind") == "comparison" or folder.name.startswith("compare_"):
            comparisons.append(_comparison_row(folder, manifest))
        else:
            runs.append(_run_row(folder, manifest))
    runs.sort(key=lambda r: (r["iteration"] is None, r["iteration"] or 0, r["name"]))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("index_page.html").render(
        runs=runs, comparisons=comparisons, run_names={r["name"] for r in runs}, generated=now_iso(),
        outputs_dir=str(outputs),
    )
    index = outputs / "index.html"
    _write_text_atomic(index, page)
    return index


def _run_row(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    # The stage files are the truth; the manifest copy may predate a stage rerun done from JupyterLab.
    fresh = {**manifest, **gather_stage_files(folder)}
    summary = fresh.get("summary") or {}
    headline = summary.get("headline") or {}
    counts = summary.get("status_counts") or {}
    params = fresh.get("params") or {}
    checkpoint = (fresh.get("source_checkpoint") or {}).get("path") or (params.get("checkpoint") or {}).get("path") \
        or params.get("hf_model") or ""
    stages = []
    for entry in (fresh.get("stages") or {}).values():
        html = entry.get("html")
        stages.append({
            "status": entry.get("status", "not_run"),
            "stem": Path(entry.get("notebook") or "?").stem,
            "html": html if html and (folder / html).is_file() else None,
            "seconds": entry.get("seconds"),
        })
    return {
        "name": folder.name,
        "description": fresh.get("description") or "",
        "checkpoint": Path(checkpoint).name if checkpoint else "",
        "iteration": fresh.get("iteration"),
        "fingerprint": fresh.get("weights_fingerprint"),
        "stages": stages,
        "metrics": {k: _fmt(headline.get(k)) for k in ("dice", "cldice", "hd95", "ciou")},
        "n_samples": summary.get("n_samples", ""),
        "n_error": counts.get("error", ""),
        "n_no_seg": counts.get("no_seg", ""),
        "flags": [f for f in summary.get("flags") or [] if isinstance(f, dict)],
        "updated": fresh.get("updated") or "",
    }


def _comparison_row(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    comparison = read_json(folder / "comparison.json")
    comparison = comparison if isinstance(comparison, dict) else {}
    runs = comparison.get("runs") or manifest.get("runs") or []
    runs = [r if isinstance(r, str) else str((r or {}).get("run_name") or (r or {}).get("name") or r) for r in runs]
    stage = next(iter((manifest.get("stages") or {}).values()), {})
    html = stage.get("html")
    return {
        "name": folder.name,
        "status": manifest.get("status", "incomplete"),
        "runs": runs,
        "headline": _headline_lines(comparison.get("headline")),
        "html": html if html and (folder / html).is_file() else None,
        "has_json": (folder / "comparison.json").is_file(),
        "updated": manifest.get("updated") or "",
    }


def _headline_lines(headline: Any) -> list[str]:
    """Readable lines from comparison.json's ``headline``, whatever its nesting (the compare stage owns it).

    A ``text`` entry (the verdict) comes first as it is; other entries become ``key: value``.
    """
    if headline is None:
        return []
    if isinstance(headline, dict):
        lines = [str(headline["text"])] if headline.get("text") else []
        details = []
        for key, value in headline.items():
            if key == "text":
                continue
            if isinstance(value, dict):
                inner = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
                details.append(f"{key}: {inner}")
            elif isinstance(value, list):
                details.append(f"{key}: [{', '.join(_fmt(v) for v in value)}]")
            else:
                details.append(f"{key}: {_fmt(value)}")
        return lines + ([" · ".join(details)] if details else [])
    if isinstance(headline, list):
        return [str(item) for item in headline[:14]]
    return [str(headline)]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_text_atomic(path: Path, text: str) -> None:
    """Readers (a browser, a second run's index) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
