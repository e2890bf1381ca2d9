"""Fonts for figures: patient names in any script render as text, never as empty boxes ("tofu").

Why: matplotlib's default DejaVu Sans has no CJK glyphs, so a patient named 张伟 became two boxes in every figure and
a glyph warning per box in the report. :func:`configure_matplotlib_fonts` puts fonts that cover CJK (Noto Sans CJK,
Source Han Sans, WenQuanYi, ... whichever are installed) behind DejaVu Sans in matplotlib's fallback list, so Latin
text looks as before and other scripts use the next font that has the glyph (matplotlib >= 3.6 falls back per glyph).

Without any such font, :func:`displayable` spells each character no configured font covers as ``U+5F20``: readable,
searchable and honest, instead of a box. To add a font: install one (Debian/Ubuntu ``apt install fonts-noto-cjk``,
conda ``conda install -c conda-forge font-ttf-noto-cjk``) or point ``$VESSELNB_FONT`` at a ``.ttf``/``.otf``/``.ttc``
file (several separated by ``os.pathsep``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib import font_manager, rcParams
from matplotlib.ft2font import FT2Font

FONT_ENV = "VESSELNB_FONT"
BASE_FAMILY = "DejaVu Sans"  # matplotlib's own default: Latin, Greek, Cyrillic
# Families with broad CJK coverage, most complete first (simplified Chinese names are the users' common case).
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans CJK HK",
    "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "Noto Sans SC", "Noto Sans JP", "AR PL UMing CN", "Microsoft YaHei", "SimHei",
    "PingFang SC", "Hiragino Sans GB", "Arial Unicode MS",
)


def _user_fonts() -> list[str]:
    """Register the font files named in ``$VESSELNB_FONT``; return their family names."""
    families = []
    for entry in filter(None, os.environ.get(FONT_ENV, "").split(os.pathsep)):
        path = Path(entry).expanduser()
        if not path.is_file():
            continue
        font_manager.fontManager.addfont(str(path))
        families.append(font_manager.FontProperties(fname=str(path)).get_name())
    return families


@functools.lru_cache(maxsize=1)
def configure_matplotlib_fonts() -> tuple[str, ...]:
    """Make matplotlib fall back from DejaVu Sans to installed fonts covering CJK; returns the family list set.

    Idempotent (cached); called when :mod:`vesselnb.viz` is imported, before any figure is drawn.
    """
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    fallbacks = [*_user_fonts(), *(name for name in CJK_FAMILIES if name in installed)]
    families = (BASE_FAMILY, *dict.fromkeys(f for f in fallbacks if f != BASE_FAMILY))
    rest = [name for name in rcParams["font.sans-serif"] if name not in families]
    rcParams["font.sans-serif"] = [*families, *rest]
    # Per-glyph fallback runs over the families named in font.family; a generic "sans-serif" resolves to one font.
    rcParams["font.family"] = list(families) if len(families) > 1 else ["sans-serif"]
    return families


@functools.lru_cache(maxsize=8)
def _covered(families: tuple[str, ...]) -> frozenset[int]:
    """Code points some font of ``families`` has a glyph for."""
    covered: set[int] = set()
    for family in families:
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False) \
            if family in {e.name for e in font_manager.fontManager.ttflist} else None
        if path:
            covered |= set(FT2Font(path).get_charmap())
    return frozenset(covered)


def displayable(text: str, families: Sequence[str] | None = None) -> str:
    """``text`` with every character that no font of ``families`` (default: the configured ones) can draw
    written as ``U+XXXX``, so a figure never shows an empty box; unchanged when the fonts cover it all."""
    covered = _covered(tuple(families) if families is not None else configure_matplotlib_fonts())
    if all(ord(ch) in covered or ch.isspace() for ch in text):
        return text
    return "".join(ch if ord(ch) in covered or ch.isspace() else f"U+{ord(ch):04X}" for ch in text)
