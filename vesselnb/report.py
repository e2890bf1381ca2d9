"""What a run leaves behind for people: HTML reports, ``manifest.json`` and ``outputs/index.html``.

Reports are single self-contained HTML files (images inline, no CDN scripts) so one can be attached to a review and
opened offline. The manifest is the machine-readable record of a run (params, versions, git revision, per-stage
status and timing, fingerprint, headline metrics); the index is rebuilt from manifests alone, so it can always be
regenerated with ``vesselnb index``.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import jinja2

from vesselnb.errors import VesselnbError
from vesselnb.run_folder import (
    ANALYSIS_DIR,
    COMPARISON_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    RunFolder,
    atomic_write_text,
    now_iso,
    output_folders,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Layout names the index page links to or mentions (spelled in run_folder only).
_LAYOUT = {"manifest": MANIFEST_FILE, "comparison": COMPARISON_FILE, "summary": f"{ANALYSIS_DIR}/{SUMMARY_FILE}"}
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
    atomic_write_text(html_path, body)
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


# --- outputs/index.html -------------------------------------------------------------------------------------------

def write_index(outputs_dir: Path) -> Path:
    """Rebuild ``outputs_dir/index.html`` from every run and comparison manifest found there.

    The manifests are trusted (each stage end copies its files' headline fields in); a folder whose manifest cannot
    be read is left out with a warning, so one broken folder never hides the others.
    """
    outputs = Path(outputs_dir).resolve()
    run_folders, comparison_folders = output_folders(outputs)
    runs, comparisons = [], []
    for folder in run_folders + comparison_folders:
        try:
            manifest = folder.manifest() or {}
            if manifest.get("kind") == "comparison" or folder.is_comparison:
                comparisons.append(_comparison_row(folder, manifest))
            else:
                runs.append(_run_row(folder, manifest))
        except VesselnbError as exc:
            print(f"vesselnb: warning: {exc}; not listed in the index", file=sys.stderr)
    runs.sort(key=lambda r: (r["iteration"] is None, r["iteration"] or 0, r["name"]))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("index_page.html").render(
        runs=runs, comparisons=comparisons, run_names={r["name"] for r in runs}, generated=now_iso(),
        outputs_dir=str(outputs), layout=_LAYOUT,
    )
    return atomic_write_text(outputs / INDEX_FILE, page)


def _run_row(folder: RunFolder, manifest: dict[str, Any]) -> dict[str, Any]:
    # Metrics are current only when the latest attempt succeeded throughout; after a failed or interrupted rerun the
    # files on disk are an earlier run's, so they are shown as "last good" with their date, never as this run's.
    current = manifest.get("status") == "ok"
    summary = (manifest.get("summary") or {}) if current else {}
    headline = summary.get("headline") or {}
    counts = summary.get("status_counts") or {}
    params = manifest.get("params") or {}
    attempted = (params.get("checkpoint") or {}).get("path") or params.get("hf_model") or ""
    checkpoint = ((manifest.get("source_checkpoint") or {}).get("path") if current else None) or attempted
    last_good = manifest.get("last_good") if not current and isinstance(manifest.get("last_good"), dict) else None
    stages = []
    for entry in (manifest.get("stages") or {}).values():
        html = entry.get("html")
        stages.append({
            "status": entry.get("status", "not_run"),
            "stem": Path(entry.get("notebook") or "?").stem,
            "html": html if html and (folder.path / html).is_file() else None,
            "seconds": entry.get("seconds"),
        })
    return {
        "name": folder.name,
        "description": manifest.get("description") or "",
        "checkpoint": Path(checkpoint).name if checkpoint else "",
        "iteration": manifest.get("iteration"),
        "fingerprint": manifest.get("weights_fingerprint"),
        "stages": stages,
        "metrics": {k: _fmt(headline.get(k)) for k in ("dice", "cldice", "hd95", "ciou")},
        "n_samples": summary.get("n_samples", ""),
        "n_error": counts.get("error", ""),
        "n_no_seg": counts.get("no_seg", ""),
        "flags": [f for f in summary.get("flags") or [] if isinstance(f, dict)],
        "updated": manifest.get("updated") or "",
        "last_good": _last_good_line(last_good),
    }


def _last_good_line(last_good: dict[str, Any] | None) -> str:
    """``last good 2026-12-03T12:00:00+00:00: Dice 0.712 (iter_50.pth)`` — or "" when there never was one."""
    if not last_good:
        return ""
    headline = last_good.get("headline") or {}
    metrics = ", ".join(f"{name} {_fmt(headline.get(key))}" for key, name in
                        (("dice", "Dice"), ("cldice", "clDice"), ("hd95", "HD95")) if headline.get(key) is not None)
    checkpoint = Path(str(last_good.get("checkpoint"))).name if last_good.get("checkpoint") else ""
    return f"last good {last_good.get('at') or '?'}: {metrics or 'no metrics'}" + (
        f" ({checkpoint})" if checkpoint else "")


def _comparison_row(folder: RunFolder, manifest: dict[str, Any]) -> dict[str, Any]:
    comparison = folder.comparison() or {}
    runs = comparison.get("runs") or manifest.get("runs") or []
    runs = [r if isinstance(r, str) else str((r or {}).get("run_name") or (r or {}).get("name") or r) for r in runs]
    stage = next(iter((manifest.get("stages") or {}).values()), {})
    html = stage.get("html")
    return {
        "name": folder.name,
        "status": manifest.get("status", "incomplete"),
        "runs": runs,
        "headline": _headline_lines(comparison.get("headline")),
        "html": html if html and (folder.path / html).is_file() else None,
        "has_json": folder.comparison_path.is_file(),
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
