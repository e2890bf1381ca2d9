"""What a run leaves behind for people: HTML reports, ``manifest.json`` and ``outputs/index.html``.

Reports are single self-contained HTML files (images inline, no CDN scripts) so one can be attached to a review and
opened offline. The manifest is the machine-readable record of a run (params, versions, git revision, per-stage
status and timing, fingerprint, headline metrics); the index is rebuilt from manifests alone, so it can always be
regenerated with ``vesselnb index``.
"""

from __future__ import annotations

import html as html_text
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2

from vesselnb.errors import VesselnbError
from vesselnb.htmlrepr import number
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
from vesselnb.stages import COMPARE_STAGE, RUN_STAGES

if TYPE_CHECKING:  # pseudonym imports the data stack (skimage), which `vesselnb --help` must not pay for
    from vesselnb.pseudonym import Pseudonyms

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Layout names the index page links to or mentions (spelled in run_folder only).
# The index row fields that are free text and may hold a patient's name (a flag message, a description).
_FREE_TEXT = ("description", "checkpoint", "last_good", "flags")
_INDEX_METRICS = ("dice", "cldice", "hd95", "ciou")
_LAYOUT = {"manifest": MANIFEST_FILE, "comparison": COMPARISON_FILE, "summary": f"{ANALYSIS_DIR}/{SUMMARY_FILE}"}
_EXTERNAL_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>", re.IGNORECASE)
# tqdm's bar: "label:  42%|████▏     | 5/12 [00:01<00:02,  3.1it/s]"
_PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d*")
_EXTERNAL_LINK = re.compile(r"<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE)
# The header's navigation sits between these markers so a later stage or comparison can refresh its links in place.
NAV_START, NAV_END = "<!--vnb-nav-->", "<!--/vnb-nav-->"
_NAV = re.compile(re.escape(NAV_START) + ".*?" + re.escape(NAV_END), re.DOTALL)
# Notebook output types that carry text a reader sees (images are pixels: the figure code must pseudonymise them).
_TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "text/latex")


# --- HTML reports -----------------------------------------------------------------------------------------------

def render_html(executed: Path, html_path: Path, header: dict[str, Any], show_code: bool = False,
                pseudonyms: Pseudonyms | None = None) -> Path:
    """Render an executed notebook to one self-contained HTML file with a vesselnb header.

    Code cells are hidden by default (``show_code`` keeps them): the reader wants tables and figures; the notebook
    beside it has the code. Output images are already base64 in the notebook; ``embed_images`` also inlines images
    that markdown cells reference by path. With ``pseudonyms`` every text a reader sees (markdown, tables, printed
    lines, errors, the header) names patients by pseudonym; the executed ``.ipynb`` beside it keeps the names.
    ``header["pseudonymize"]`` says what the header states about names.
    """
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(str(executed), as_version=4)
    _drop_progress_bars(notebook)
    fields = {"run": "", "stage": executed.stem, "status": "", "fingerprint": None, "date": "",
              "iteration": None, "error": None, "pseudonymize": pseudonyms is not None, **header}
    if pseudonyms is not None:
        _pseudonymise_notebook(notebook, pseudonyms)
        fields = _scrub(fields, pseudonyms)
    fields["names"] = names_line(fields["pseudonymize"], pseudonyms, fields["run"])
    fields["nav"] = navigation_html(html_path.parent, html_path.stem)
    exporter = HTMLExporter(
        template_name="lab",
        template_file="vesselnb_report.html",
        extra_template_paths=[str(TEMPLATES)],
        exclude_input=not show_code,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
        embed_images=True,
    )
    resources = {"metadata": {"name": f"{fields['run']} · {executed.stem}", "path": str(executed.parent)},
                 "vesselnb": fields}
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    body = _EXTERNAL_LINK.sub("", _EXTERNAL_SCRIPT.sub("", body))  # belt and braces: nothing loads from the web
    atomic_write_text(html_path, body)
    return html_path


def names_line(pseudonymize: bool, pseudonyms: Pseudonyms | None, run: str) -> str:
    """What a report header says about patient names (one line, never the mapping itself)."""
    if not pseudonymize:
        return "shown: this report names patients (report.pseudonymize: false); do not attach it to a review"
    count = f"{len(pseudonyms)} patients as P01..." if pseudonyms is not None and len(pseudonyms) else "patients"
    return f"hidden: {count}; the mapping is outputs/{run}/pseudonyms.csv, not in this file"


def _scrub(value: Any, pseudonyms: Pseudonyms) -> Any:
    """``value`` (str, or dicts/lists of them) with patient labels, names and ids replaced."""
    if isinstance(value, str):
        return pseudonyms.text(value)
    if isinstance(value, dict):
        return {k: _scrub(v, pseudonyms) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, pseudonyms) for v in value]
    return value


def _pseudonymise_notebook(notebook: Any, pseudonyms: Pseudonyms) -> None:
    """Replace patients in every text output, markdown cell, error and (shown only with show_code) source.

    A safety net under the notebooks' own pseudonymisation: a table or line printed with a name still reads P01
    in the HTML. It cannot reach names drawn into images; those need the figure code (see pseudonym.for_run).
    """
    for cell in notebook.cells:
        cell["source"] = pseudonyms.text(cell.get("source", ""))
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = pseudonyms.text(output["text"])
            for mime in _TEXT_MIMES:
                if mime in output.get("data", {}):
                    output["data"][mime] = _scrub(output["data"][mime], pseudonyms)
            for key in ("ename", "evalue"):
                if key in output:
                    output[key] = pseudonyms.text(output[key])
            if "traceback" in output:
                output["traceback"] = [pseudonyms.text(line) for line in output["traceback"]]


# --- links between a run's reports and its comparisons --------------------------------------------------------------

def _link(href: str, text: str) -> str:
    return f'<a href="{html_text.escape(href)}">{html_text.escape(text)}</a>'


def _comparisons_of(outputs: Path, run: str) -> list[RunFolder]:
    """Comparison folders of ``outputs`` whose manifest lists ``run`` and whose report exists."""
    found = []
    for folder in output_folders(outputs)[1]:
        try:
            manifest = folder.manifest() or {}
        except VesselnbError:
            continue
        if run in (manifest.get("runs") or []) and (folder.path / f"{COMPARE_STAGE.stem}.html").is_file():
            found.append(folder)
    return found


def navigation_html(folder: Path, stem: str) -> str:
    """The header's links for report ``stem`` in ``folder``: index, neighbouring stages, comparisons or runs.

    Only reports that exist are linked (a skipped stage has none), so every link resolves; :func:`refresh_navigation`
    adds the ones written later. Wrapped in :data:`NAV_START`/:data:`NAV_END`.
    """
    folder = Path(folder)
    anchor = ("cmp-" if stem == COMPARE_STAGE.stem else "run-") + folder.name
    rows = [("all runs", _link(f"../{INDEX_FILE}#{anchor}", f"outputs/{INDEX_FILE}"))]
    if stem == COMPARE_STAGE.stem:
        manifest = RunFolder(folder).manifest() if RunFolder(folder).manifest_path.is_file() else None
        runs = (manifest or {}).get("runs") or []
        if not runs:
            runs = [n for n in folder.name.removeprefix("compare_").split("_vs_") if n]
        last = RUN_STAGES[-1].stem
        parts = [_link(f"../{r}/{last}.html", f"{r} · {last}") if (folder.parent / r / f"{last}.html").is_file()
                 else html_text.escape(r) for r in runs]
        rows.append(("runs compared", " &middot; ".join(parts)))
    else:
        parts = []
        for stage in RUN_STAGES:
            if stage.stem == stem:
                parts.append(f"<b>{html_text.escape(stage.stem)}</b>")
            elif (folder / f"{stage.stem}.html").is_file():
                parts.append(_link(f"{stage.stem}.html", stage.stem))
            else:
                parts.append(f'<span class="vnb-missing">{html_text.escape(stage.stem)} (no report)</span>')
        rows.append(("stages", " &rarr; ".join(parts)))
        if stem == RUN_STAGES[-1].stem:
            comparisons = _comparisons_of(folder.parent, folder.name)
            rows.append(("comparisons", " &middot; ".join(
                _link(f"../{c.name}/{COMPARE_STAGE.stem}.html", c.name) for c in comparisons) or "none yet"))
    body = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
    return f'{NAV_START}<table class="vnb-nav">{body}</table>{NAV_END}'


def refresh_navigation(folder: Path) -> list[Path]:
    """Rewrite the navigation of every stage report in ``folder`` (after later stages or a comparison).

    The caller holds the folder's lock (the runner at the end of a run, ``compare`` per run), so no stage renders
    concurrently. Only the marked block changes; a report without one (from before) is left alone.
    """
    folder = Path(folder)
    changed = []
    for stage in (*RUN_STAGES, COMPARE_STAGE):
        path = folder / f"{stage.stem}.html"
        if not path.is_file():
            continue
        page = path.read_text(encoding="utf-8")
        nav = navigation_html(folder, stage.stem)
        updated = _NAV.sub(lambda _m, nav=nav: nav, page, count=1)
        if updated != page:
            atomic_write_text(path, updated)
            changed.append(path)
    return changed


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
                runs.append(_pseudonymised_row(_run_row(folder, manifest), _index_names(folder, manifest)))
        except VesselnbError as exc:
            print(f"vesselnb: warning: {exc}; not listed in the index", file=sys.stderr)
    runs.sort(key=lambda r: (r["iteration"] is None, r["iteration"] or 0, r["name"]))
    for row in runs:
        row["comparisons"] = [{"name": c["name"], "html": c["html"], "label": " vs ".join(c["runs"]) or c["name"]}
                              for c in comparisons if row["name"] in c["runs"]]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("index_page.html").render(
        runs=runs, comparisons=comparisons, run_names={r["name"] for r in runs}, generated=now_iso(),
        outputs_dir=str(outputs), layout=_LAYOUT, metric_columns=index_metric_columns(),
    )
    return atomic_write_text(outputs / INDEX_FILE, page)


def index_metric_columns() -> list[dict[str, str]]:
    """The index's metric columns: summary.json's headline key and the heading naming its statistic, unit and
    direction (``HD95 (px, median per frame, ↓ better)``)."""
    from vesselnb import headline  # the metric vocabulary imports scipy: not for `vesselnb --help`

    return [{"key": key, "heading": headline.heading(key)} for key in _INDEX_METRICS]


def _run_row(folder: RunFolder, manifest: dict[str, Any]) -> dict[str, Any]:
    # Metrics are current only when the latest attempt succeeded throughout; after a failed or interrupted rerun the
    # files on disk are an earlier run's, so they are shown as "last good" with their date, never as this run's.
    current = manifest.get("status") == "ok"
    summary = (manifest.get("summary") or {}) if current else {}
    last_good = manifest.get("last_good") if not current and isinstance(manifest.get("last_good"), dict) else None
    # the metric cells show the last good values (marked so) rather than nothing: the table stays sortable by them
    headline = summary.get("headline") or ((last_good or {}).get("headline") or {})
    counts = summary.get("status_counts") or {}
    params = manifest.get("params") or {}
    attempted = (params.get("checkpoint") or {}).get("path") or params.get("hf_model") or ""
    checkpoint = ((manifest.get("source_checkpoint") or {}).get("path") if current else None) or attempted
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
        "status": manifest.get("status", "incomplete"),
        "metrics": {k: _metric(headline.get(k)) for k in _INDEX_METRICS},
        "sort": {k: _sort_key(headline.get(k)) for k in _INDEX_METRICS},
        "n_samples": summary.get("n_samples", ""),
        "n_error": counts.get("error", ""),
        "n_no_seg": counts.get("no_seg", ""),
        "flags": [f for f in summary.get("flags") or [] if isinstance(f, dict)],
        "updated": manifest.get("updated") or "",
        "last_good": _last_good_line(last_good),
    }


def _index_names(folder: RunFolder, manifest: dict[str, Any]) -> Pseudonyms | None | Literal[False]:
    """The run's saved pseudonyms; False when its params show names (``report.pseudonymize: false``).

    None (on, but no mapping saved: a run from before, or without frames) still says "hidden" and replaces nothing.
    """
    from vesselnb import pseudonym  # the data stack (skimage): not for `vesselnb --help`

    report = ((manifest.get("params") or {}).get("report") or {})
    if report.get("pseudonymize", True) is False:
        return False
    return pseudonym.saved(folder.path)


def _pseudonymised_row(row: dict[str, Any], names: Pseudonyms | None | Literal[False]) -> dict[str, Any]:
    if names is False:
        return {**row, "names": "shown"}
    if names is None:
        return {**row, "names": "hidden"}
    scrubbed = {key: _scrub(row[key], names) for key in _FREE_TEXT}  # numbers and links stay as they are
    return {**row, **scrubbed, "names": f"hidden ({len(names)} patients)"}


def _metric(value: Any) -> str:
    """A headline number in an index cell (``htmlrepr.number``: 3 decimals for ratios); "" for none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    return number(value)


def _last_good_line(last_good: dict[str, Any] | None) -> str:
    """``last good 2026-12-03T12:00:00+00:00: Dice 0.712 (mean per frame), ... (iter_50.pth)`` — or "" when there
    never was one."""
    from vesselnb import headline as vocabulary  # the metric vocabulary imports scipy: not for `vesselnb --help`

    if not last_good:
        return ""
    headline = last_good.get("headline") or {}
    metrics = ", ".join(vocabulary.text(key, headline[key]) for key in ("dice", "cldice", "hd95")
                        if headline.get(key) is not None)
    checkpoint = Path(str(last_good.get("checkpoint"))).name if last_good.get("checkpoint") else ""
    return f"last good {last_good.get('at') or '?'}: {metrics or 'no metrics'}" + (
        f" ({checkpoint})" if checkpoint else "")


def _sort_key(value: Any) -> str:
    """A cell's ``data-sort``: the full number (the cell shows 4 digits), "" for none (sorted last)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return repr(float(value)) if math.isfinite(value) else ""


def _comparison_row(folder: RunFolder, manifest: dict[str, Any]) -> dict[str, Any]:
    comparison = folder.comparison() or {}
    runs = comparison.get("runs") or manifest.get("runs") or []
    runs = [r if isinstance(r, str) else str((r or {}).get("run_name") or (r or {}).get("name") or r) for r in runs]
    stage = next(iter((manifest.get("stages") or {}).values()), {})
    html = stage.get("html")
    row = {
        "name": folder.name,
        "status": manifest.get("status", "incomplete"),
        "runs": runs,
        "headline": _headline_lines(comparison.get("headline")),
        "html": html if html and (folder.path / html).is_file() else None,
        "has_json": folder.comparison_path.is_file(),
        "updated": manifest.get("updated") or "",
    }
    return _comparison_names(folder, row)


def _comparison_names(folder: RunFolder, row: dict[str, Any]) -> dict[str, Any]:
    """Pseudonymise a comparison row with its own mapping, else (older folders) with each of its runs' mappings."""
    from vesselnb import pseudonym  # the data stack (skimage): not for `vesselnb --help`

    own = pseudonym.saved(folder.path)
    mappings = [own] if own is not None else [
        m for m in (pseudonym.saved(folder.path.parent / r) for r in row["runs"]) if m is not None]
    for names in mappings:
        row = {**row, "headline": _scrub(row["headline"], names)}
    return {**row, "names": "hidden" if mappings else "shown"}


def _headline_lines(headline: Any) -> list[str]:
    """Readable lines from comparison.json's ``headline`` (the compare stage owns it): the verdict as it is, then one
    sentence of the primary metric's Δ, interval, p and counts, then the alerts; never a dump of keys and values.

    Keys this page does not know are left to ``comparison.json`` (linked beside), so a new key never reads as noise.
    """
    if headline is None:
        return []
    if isinstance(headline, list):
        return [str(item) for item in headline[:14]]
    if not isinstance(headline, dict):
        return [str(headline)]
    lines = [str(headline["text"])] if headline.get("text") else []
    detail = _delta_sentence(headline)
    if detail:
        lines.append(detail)
    if headline.get("identity_alert"):
        lines.append("ALERT: the two runs look like the same model (identical weights or predictions)")
    if headline.get("comparable") is False:
        lines.append("NOT COMPARABLE as run: too few shared frames or scored differently (see the report)")
    return lines


def _delta_sentence(headline: dict[str, Any]) -> str:
    """``Dice: Δ = B − A (mean per frame) +0.190, 95 % CI [+0.174, +0.213] resampling 12 patients; Holm p 0.009;
    96 shared frames`` from the keys the compare stage writes (``metric``, ``delta_mean``, ``ci95``, ``p_holm``,
    ``n_patients``, ``n_common``, ``n_left_out``)."""
    from vesselnb.metrics import metric_info  # numpy/pandas: not for `vesselnb --help`

    delta = headline.get("delta_mean")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool):
        return ""
    metric = str(headline.get("metric") or "primary metric")
    parts = [f"{metric_info(metric).heading()}: Δ = B − A (mean per frame) {_signed(delta)}"]
    ci = headline.get("ci95")
    n_patients = headline.get("n_patients")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        parts[0] += f", 95 % CI [{_signed(ci[0])}, {_signed(ci[1])}]"
        if n_patients:
            parts[0] += f" resampling {n_patients} patients"
    elif n_patients:
        parts[0] += f" (no CI: {n_patients} patients)"
    p = headline.get("p_holm")
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        parts.append("Holm p < 0.001" if p < 0.001 else f"Holm p {p:.3f}")
    if headline.get("n_common") is not None:
        left_out = headline.get("n_left_out") or 0
        parts.append(f"{headline['n_common']} shared frames" + (f", {left_out} left out" if left_out else ""))
    return "; ".join(parts)


def _signed(value: float) -> str:
    text = number(value)
    return text if text.startswith(("-", "n/a", "inf")) else f"+{text}"
