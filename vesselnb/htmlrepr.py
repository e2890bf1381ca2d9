"""One small HTML vocabulary for the result objects' ``_repr_html_``: banner, table, figure (and heading, notes).

Why: every stage returns an object the notebook displays, and the reports are read side by side; five hand-built
implementations had three different reds and their own paddings. Here there is one colour per level and one style
per block. Styles are inline (no ``<style>`` element): JupyterLab, nbconvert's HTML and sanitising viewers all keep
them. Nothing heavy is imported: tables take anything with ``to_html`` (a pandas DataFrame or Styler) or plain rows,
figures anything with ``savefig`` (a matplotlib Figure) or PNG bytes.

API (for every ``_repr_html_``)::

    from vesselnb import htmlrepr as hr
    hr.banner("Conversion OK", level="ok", lines=["fingerprint ..."], items=["a warning"])  # level: LEVELS
    hr.banner("IDENTICAL WEIGHTS", level="error", strong=True)   # filled: the one alert that must not be missed
    hr.heading("Coverage")                                       # a section title (h4)
    hr.table(frame, float_format="{:.3e}")                       # DataFrame / Styler / mapping / (key, value) rows
    hr.figure(fig, caption="...")                                # embedded PNG, never a file path
    hr.notes(["a note", ...])                                    # a bullet list (empty string when no notes)
    hr.join(part, part, ...)                                     # the parts, in one wrapper block
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# One colour set: (text / border colour, background tint) per level.
COLOURS: dict[str, tuple[str, str]] = {
    "ok": ("#1b5e20", "#e8f5e9"),
    "warning": ("#8a5300", "#fff4e5"),
    "error": ("#b00020", "#fdecea"),
    "info": ("#37474f", "#eceff1"),
}
LEVELS = tuple(COLOURS)
MUTED = "#666666"
FONT = "font-family:inherit;font-size:13px;line-height:1.4"
_TABLE_STYLE = "border-collapse:collapse;margin:4px 0 10px 0"


def escape(value: Any) -> str:
    """Text made safe for HTML (quotes included)."""
    return html.escape(str(value), quote=True)


def colour(level: str) -> str:
    """The text/border colour of ``level`` (``ok``, ``warning``, ``error``, ``info``)."""
    return _colours(level)[0]


def _colours(level: str) -> tuple[str, str]:
    if level not in COLOURS:
        raise ValueError(f"unknown banner level {level!r}; use one of {LEVELS}")
    return COLOURS[level]


def banner(title: str, *, level: str = "info", lines: Iterable[str] = (), items: Iterable[str] = (),
           strong: bool = False) -> str:
    """A coloured block: a bold title, optional plain lines under it and a bullet list (warnings, notes).

    ``strong`` fills the block with the level's colour (white text): for the one alert a reader must not miss.
    Everything given is text and is escaped.
    """
    fg, bg = _colours(level)
    if strong:
        box = f"background:{fg};color:#ffffff;padding:10px 12px;border-radius:4px;margin:6px 0;{FONT}"
        head = f"<div style='font-weight:bold;font-size:15px'>{escape(title)}</div>"
    else:
        box = f"border-left:6px solid {fg};background:{bg};padding:6px 10px;margin:6px 0;{FONT}"
        head = f"<div style='color:{fg};font-weight:bold;font-size:14px'>{escape(title)}</div>"
    body = "".join(f"<div>{escape(line)}</div>" for line in lines)
    bullets = "".join(f"<li>{escape(item)}</li>" for item in items)
    return f"<div class='vesselnb-banner vesselnb-{level}' style='{box}'>{head}{body}" + (
        f"<ul style='margin:4px 0 0 0'>{bullets}</ul>" if bullets else "") + "</div>"


def heading(text: str, level: int = 4) -> str:
    """A section title inside a result (``h4`` by default: below the notebook's own markdown headings)."""
    return f"<h{level} style='margin:10px 0 4px 0'>{escape(text)}</h{level}>"


def size(n_bytes: float) -> str:
    """A byte count in the largest decimal unit that keeps it ≥ 1 (``340.2 kB``, ``16.9 GB``): never ``0.000 GB``."""
    value = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def number(value: Any, digits: int = 3) -> str:
    """A metric value for a table cell: ``digits`` decimals for a ratio in [-1, 1], else 4 significant digits;
    NaN reads ``n/a`` and inf ``inf`` (both are counted elsewhere, never hidden)."""
    if value is None:
        return "n/a"
    value = float(value)
    if value != value:
        return "n/a"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if abs(value) <= 1:
        return f"{value:.{digits}f}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def numbers(frame: Any, columns: Iterable[str] | None = None) -> Any:
    """A copy of a pandas ``frame`` with ``columns`` (default: every float column; absent ones skipped) written as
    :func:`number` writes them: what a report table shows instead of pandas' six decimals.

    >>> import pandas as pd
    >>> numbers(pd.DataFrame({"dice": [0.81234, float("nan")], "hd95": [12.3456, 3.0], "n": [1, 2]})).values.tolist()
    [['0.812', '12.35', 1], ['n/a', '3', 2]]
    """
    out = frame.copy()
    floats = frame.select_dtypes("float").columns
    for column in floats if columns is None else [c for c in columns if c in frame.columns]:
        out[column] = out[column].map(number).astype(object)
    return out


def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return escape(float_format.format(value))
    return escape(value)


def table(data: Any, *, caption: str | None = None, float_format: str = "{:.4g}", index: bool = False,
          max_rows: int | None = None) -> str:
    """A table: a pandas DataFrame (or Styler, kept as styled), a mapping (key | value) or (key, value) rows.

    ``float_format`` is a ``str.format`` pattern for floats; NaN shows as ``NaN``.
    """
    head = heading(caption) if caption else ""
    if hasattr(data, "to_html") and hasattr(data, "columns"):  # DataFrame
        frame = data.head(max_rows) if max_rows is not None else data
        body = frame.to_html(index=index, float_format=lambda v: float_format.format(v), na_rep="NaN",
                             border=0, classes="vesselnb-table")
        styled = body.replace("<table", f'<table style="{_TABLE_STYLE}"', 1)
        return f"<div style='{FONT}'>{head}{styled}</div>"
    if hasattr(data, "to_html"):  # Styler: its own formatting
        return f"<div style='{FONT}'>{head}{data.to_html()}</div>"
    rows: Sequence[tuple[Any, Any]] = list(data.items()) if isinstance(data, Mapping) else list(data)
    if max_rows is not None:
        rows = rows[:max_rows]
    cells = "".join(
        f"<tr><th style='text-align:left;padding:1px 12px 1px 0;vertical-align:top'>{escape(key)}</th>"
        f"<td style='text-align:left;padding:1px 0'>{_cell(value, float_format)}</td></tr>"
        for key, value in rows
    )
    return f"<div style='{FONT}'>{head}<table class='vesselnb-table' style='{_TABLE_STYLE}'>{cells}</table></div>"


def figure(fig: Any, *, caption: str | None = None, dpi: int = 110) -> str:
    """A figure embedded as a base64 PNG (a matplotlib Figure, or PNG bytes), so a report never links a file."""
    if hasattr(fig, "savefig"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        png = buffer.getvalue()
    elif isinstance(fig, (bytes, bytearray)):
        png = bytes(fig)
    else:
        raise TypeError(f"figure() takes a matplotlib Figure or PNG bytes, got {type(fig).__name__}")
    encoded = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption style='color:{MUTED}'>{escape(caption)}</figcaption>" if caption else ""
    return (f"<figure style='margin:6px 0;{FONT}'><img src='data:image/png;base64,{encoded}' "
            f"style='max-width:100%'>{cap}</figure>")


def notes(items: Iterable[str], *, title: str | None = None) -> str:
    """A bullet list of notes (escaped), or an empty string when there are none."""
    bullets = "".join(f"<li>{escape(item)}</li>" for item in items)
    if not bullets:
        return ""
    head = f"<div style='color:{MUTED};font-weight:bold'>{escape(title)}</div>" if title else ""
    return f"<div style='{FONT}'>{head}<ul style='margin:2px 0 8px 0'>{bullets}</ul></div>"


def muted(text: str) -> str:
    """A grey explanatory paragraph (how to read a table, what a symbol means)."""
    return f"<p style='color:{MUTED};margin:2px 0 6px 0;{FONT}'>{escape(text)}</p>"


def join(*parts: str) -> str:
    """The parts in one block: what ``_repr_html_`` returns."""
    return "<div class='vesselnb'>" + "".join(p for p in parts if p) + "</div>"
