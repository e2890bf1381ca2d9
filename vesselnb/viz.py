"""Figures users already know (the 4-panel original / GT / prediction / overlay) plus the TP/FP/FN overlay.

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot's global state, so a long report
never accumulates open figures; :func:`show` displays one as an embedded PNG (small, backend-independent, works
under papermill) and closes it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from vesselnb.errors import DataError
from vesselnb.fonts import configure_matplotlib_fonts, displayable
from vesselnb.frames import open_frame_rgb
from vesselnb.htmlrepr import number
from vesselnb.masks import resize_mask

if TYPE_CHECKING:  # pseudonym imports the data stack; viz only calls the object it is given
    from vesselnb.pseudonym import Pseudonyms

configure_matplotlib_fonts()  # patient names in CJK and other scripts: a covering font, else U+XXXX, never tofu

# Colours of the error overlay: true positives white, false positives magenta, false negatives cyan.
TP_RGB = (255, 255, 255)
FP_RGB = (255, 0, 255)
FN_RGB = (0, 255, 255)
GT_RGB = (255, 0, 0)
PRED_RGB = (0, 200, 0)


def load_frame(path: str | Path) -> np.ndarray:
    """A frame as RGB uint8, decoded as the model saw it (angiograms are grey; RGB keeps colour overlays simple)."""
    return np.asarray(open_frame_rgb(path))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        array = array[..., :3]
    if array.dtype != np.uint8:
        top = float(array.max()) if array.size else 1.0
        array = (array * (255.0 / top if top > 1.0 else 255.0)).clip(0, 255).astype(np.uint8)
    return array


def _fit_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask at the frame's size (:func:`vesselnb.masks.resize_mask`), or all-False when absent."""
    return np.zeros(shape, dtype=bool) if mask is None else resize_mask(mask, shape)


def tint(image: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], alpha: float = 0.55) -> np.ndarray:
    """The frame with ``mask`` blended in colour ``rgb`` (the users' "GT in red / prediction in green")."""
    base = _as_rgb(image).astype(np.float32)
    mask = _fit_mask(mask, base.shape[:2])
    base[mask] = (1.0 - alpha) * base[mask] + alpha * np.asarray(rgb, dtype=np.float32)
    return base.astype(np.uint8)


def error_overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """RGB uint8: the dimmed frame with TP white, FP magenta, FN cyan, so misses and false alarms stand out."""
    base = (_as_rgb(image).astype(np.float32) * 0.5).astype(np.uint8)
    shape = base.shape[:2]
    gt = _fit_mask(gt, shape)
    pred = _fit_mask(pred, shape)
    base[gt & pred] = TP_RGB
    base[pred & ~gt] = FP_RGB
    base[gt & ~pred] = FN_RGB
    return base


def four_panel(
    image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None, title: str = "", *, with_errors: bool = False
) -> Figure:
    """Original / GT in red / prediction in green / overlay (both), the figure users drew before.

    With ``with_errors`` a fifth panel shows :func:`error_overlay`.
    """
    rgb = _as_rgb(image)
    shape = rgb.shape[:2]
    gt_mask = _fit_mask(gt, shape)
    pred_mask = _fit_mask(pred, shape)
    both = tint(tint(rgb, gt_mask, GT_RGB, 0.5), pred_mask, PRED_RGB, 0.5)
    panels = [
        ("original", rgb),
        ("ground truth" if gt is not None else "ground truth (none)", tint(rgb, gt_mask, GT_RGB)),
        ("prediction", tint(rgb, pred_mask, PRED_RGB)),
        ("overlay (GT red, pred green)", both),
    ]
    if with_errors:
        panels.append(("TP white / FP magenta / FN cyan", error_overlay(rgb, gt_mask, pred_mask)))
    fig = Figure(figsize=(2.6 * len(panels), 2.9), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (label, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(displayable(title), fontsize=9)
    return fig


def image_grid(
    pictures: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4, cell_inches: float = 2.4
) -> Figure:
    """Pictures in a grid with small titles (galleries); an empty list gives a figure saying so."""
    n = max(len(pictures), 1)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(cell_inches * columns, (cell_inches + 0.35) * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    if not pictures:
        axes[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    for ax, picture, title in zip(axes, pictures, titles, strict=False):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(displayable(title), fontsize=7)
    return fig


def shown_id(sample_id: str, names: Pseudonyms | None) -> str:
    """The sample id a figure may draw: pseudonymised when ``names`` is given (pixels are never scrubbed later).

    The patient labels of the mapping are replaced wherever they stand, so a run's own ``data.name_regex`` needs
    no plumbing here; an id naming no known patient goes through ``names.sample_id``, which says which is missing.
    """
    if names is None:
        return sample_id
    shown = names.text(sample_id)
    return shown if shown != sample_id else names.sample_id(sample_id)


def prediction_panels(store: Any, sample_ids: Iterable[str], columns: int = 4,
                      names: Pseudonyms | None = None) -> Figure:
    """Frames with their predicted mask in green (no ground truth): notebook 02's quick look at a store.

    ``store`` is a :class:`vesselnb.store.PredictionStore`; each record's ``image`` path is read for the frame.
    ``names`` (see :func:`vesselnb.pseudonym.for_run`) replaces patients in the titles; None shows them.
    """
    records = {record["sample_id"]: record for record in store.records()}
    pictures, titles = [], []
    for sample_id in sample_ids:
        record = records.get(sample_id)
        if record is None:
            continue
        mask = store.mask(sample_id)
        try:
            frame = load_frame(record["image"])
        except (OSError, DataError):  # an undecodable or blank frame: its record says why; show a grey tile
            frame = None
        if frame is None or mask.size == 0 or frame.shape[:2] != mask.shape:
            pictures.append(np.full((64, 64, 3), 128, dtype=np.uint8))
            titles.append(f"{wrap_id(shown_id(sample_id, names))}\n{record.get('status', '?')}: frame not shown")
            continue
        pictures.append(tint(frame, mask, PRED_RGB))
        titles.append(f"{wrap_id(shown_id(sample_id, names))}\n{record.get('status', '?')}, mask {int(mask.sum())} px")
    fig = image_grid(pictures, titles, columns=columns)
    for ax in fig.axes:  # ids are what a reader looks for here: larger than the gallery default
        ax.title.set_fontsize(9)
    return fig


def sample_title(row: Any, names: Pseudonyms | None = None) -> str:
    """One line naming a sample and its per-frame metrics, units included (gallery rows, the browser's caption).

    It starts with the sample id (pseudonymised when ``names`` is given), so a reader can find the frame.
    """
    def fmt(key: str) -> str:
        value = row[key] if key in row else None
        return number(value)

    return (f"{shown_id(row['sample_id'], names)} [{row['status']}] · Dice {fmt('dice')} · clDice {fmt('cldice')} · "
            f"HD95 {fmt('hd95')} px · NSD {fmt('nsd')} · thin-vessel recall {fmt('recall_thin')}")


def error_legend_handles() -> list[Patch]:
    """Legend entries for the colours of :func:`tint` and :func:`error_overlay`: one meaning per colour."""
    def patch(rgb: tuple[int, int, int], label: str) -> Patch:
        return Patch(facecolor=tuple(c / 255 for c in rgb), edgecolor="#555555", linewidth=0.5, label=label)

    return [patch(GT_RGB, "ground truth"), patch(PRED_RGB, "prediction"), patch(TP_RGB, "TP: both"),
            patch(FP_RGB, "FP: predicted, not in GT"), patch(FN_RGB, "FN: in GT, missed")]


def wrap_id(text: str, width: int = 28) -> str:
    """A sample id on as many lines as it needs, never cut: a new line after the patient (``__``), then breaks after
    underscores, so patient, sequence and frame all stay readable in a small panel title."""
    lines: list[str] = []
    for part in re.split(r"(?<=__)(?=[^_])", text):
        start = len(lines)
        for piece in re.findall(r"[^_]*_+|[^_]+$", part):
            if len(lines) > start and len(lines[-1]) + len(piece) <= width:
                lines[-1] += piece
            else:
                lines.append(piece)
    return "\n".join(lines) or text


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure; the dpi bounds the size of reports that embed it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure as PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def show(fig: Figure, dpi: int = 80) -> None:
    """Display a figure as an embedded PNG, then close it so long runs do not hold every figure in memory."""
    from IPython.display import Image as IPImage
    from IPython.display import display

    display(IPImage(data=figure_png(fig, dpi=dpi), format="png"))
    close(fig)


def close(fig: Figure) -> None:
    """Release a figure (pyplot-managed or not)."""
    import matplotlib.pyplot as plt

    plt.close(fig)
    fig.clear()


def gallery(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], title: str = "",
            thumbnail: int = 256) -> Figure:
    """One line per sample: original / GT in red / prediction in green / errors (TP white, FP magenta, FN cyan),
    the sample's metrics above it and one colour legend for the figure.

    No "GT + prediction" overlay column: its red-only and green-only pixels are the FN and FP of the errors column in
    other colours, and a colour keeps one meaning per figure. Frames are downsampled to ``thumbnail`` pixels so a
    report of many galleries stays small.
    """
    n = max(len(rows), 1)
    row_inches, head_inches, width = 2.75, 0.75, 11.0
    height = row_inches * n + head_inches
    fig = Figure(figsize=(width, height))  # axes placed by hand: a layout engine costs seconds on 30 images
    if title:
        fig.text(0.5, 1 - 0.1 / height, displayable(title), ha="center", va="top", fontsize=10)
    if not rows:
        fig.text(0.5, 0.5, "no scored samples", ha="center", va="center")
        return fig
    fig.legend(handles=error_legend_handles(), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / height),
               ncols=5, fontsize=7.5, frameon=False, handlelength=1.2)
    labels = ("original", "ground truth (red)", "prediction (green)", "errors: TP white, FP magenta, FN cyan")
    columns = len(labels)
    cell_h = 2.2 / height
    cell_w = min(1.0 / columns, cell_h * height / width)  # square cells
    left = (1.0 - columns * cell_w) / 2
    for index, (image, gt, pred, caption) in enumerate(rows):
        rgb, gt_small, pred_small = _thumbnail(image, gt, pred, thumbnail)
        pictures = (rgb, tint(rgb, gt_small, GT_RGB), tint(rgb, pred_small, PRED_RGB),
                    error_overlay(rgb, gt_small, pred_small))
        top = 1 - (head_inches + index * row_inches) / height
        fig.text(left, top - 0.06 / height, displayable(caption), ha="left", va="top", fontsize=7.5)
        for column, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
            ax = fig.add_axes((left + column * cell_w + 0.004, top - (0.45 / height) - cell_h, cell_w - 0.008, cell_h))
            ax.set_axis_off()
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(label, fontsize=7, pad=2)
    return fig


def _thumbnail(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame and masks shrunk to at most ``size`` px (masks by nearest neighbour so thin vessels stay visible)."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    gt_mask, pred_mask = _fit_mask(gt, (height, width)), _fit_mask(pred, (height, width))
    scale = size / max(height, width)
    if scale >= 1.0:
        return rgb, gt_mask, pred_mask
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0]), Image.BILINEAR))
    return small, _shrink_mask(gt_mask, shape), _shrink_mask(pred_mask, shape)


def _shrink_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Downsample keeping any pixel that touches the mask (max pooling), so one-pixel vessels do not vanish."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BOX)
    return np.asarray(resized) > 0
