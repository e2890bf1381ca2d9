"""Decoding one angiography frame to the 8-bit RGB picture the model sees, honestly or not at all.

Why a module of its own: X-ray exports are often 16-bit greyscale (PIL modes ``I;16``, ``I``, ``F``) or DICOM
(single-frame, or multi-frame XA cine runs). PIL's ``convert("RGB")`` clips 16-bit values to 255, so such a frame
becomes all white and the model answers with an empty mask that would be recorded as ``ok``. Here every frame with
more than 8 bits is windowed to 8 bit explicitly, and the window used is returned so the store can record it:

* ``windowing="auto"`` (default): a DICOM file's own window (Window Center/Width, the first if several, after its
  Rescale Slope/Intercept), else the frame's own minimum–maximum; 8-bit pictures are taken as they are;
* ``windowing="minmax"``: always minimum–maximum for >8-bit frames (a DICOM file's window ignored).

MONOCHROME1 DICOM (white = low values) is inverted so vessels stay dark, as in MONOCHROME2 exports. A frame that is
constant after loading (all white, all black, a blank export) is refused with the reason, so it becomes an
``error`` record rather than a prediction.

One frame of a multi-frame DICOM file is named ``<file>#frame=<index>`` (:func:`frame_reference`); every function
here accepts such a reference wherever it takes a path.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from vesselnb.errors import DataError

HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
WINDOWINGS = ("auto", "minmax")
_REFERENCE = re.compile(r"^(?P<path>.+)#frame=(?P<index>\d+)$")


@dataclass(frozen=True)
class Frame:
    """A decoded frame and how its pixels were brought to 8 bit (recorded in the store)."""

    image: Image.Image
    windowing: str


def frame_reference(path: str | Path, index: int | None) -> str:
    """``path`` itself, or ``path#frame=index`` for one frame of a multi-frame file."""
    return str(path) if index is None else f"{path}#frame={index}"


def split_reference(reference: str | Path) -> tuple[Path, int | None]:
    """Inverse of :func:`frame_reference` (a path that exists as a file is never split)."""
    text = str(reference)
    match = _REFERENCE.match(text)
    if match is None or Path(text).exists():
        return Path(text), None
    return Path(match["path"]), int(match["index"])


def is_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or any file with the DICOM preamble's ``DICM`` marker at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Min-max window any numeric greyscale array to uint8 (0 at its minimum, 255 at its maximum).

    >>> window_to_uint8(np.array([[1000, 3000], [2000, 3000]], dtype=np.uint16)).tolist()
    [[0, 255], [128, 255]]
    """
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def window_centre_width(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2.1) to uint8: below ``c - 0.5 - (w-1)/2`` black, above
    ``c - 0.5 + (w-1)/2`` white, linear between.

    >>> window_centre_width(np.array([0.0, 40.0, 100.0]), centre=40.5, width=81).tolist()
    [0, 128, 255]
    """
    if width < 1:
        raise ValueError(f"DICOM window width {width} < 1")
    scaled = ((values.astype(np.float64) - (centre - 0.5)) / (width - 1) + 0.5).clip(0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def _first(value: Any) -> float | None:
    """A DICOM numeric value, or the first of a multi-valued one; None when absent."""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _read_dicom(path: str | Path, stop_before_pixels: bool = False) -> Any:
    """``pydicom.dcmread``, with a :class:`DataError` naming the file when it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc}); re-export it or exclude it with "
                        "'data.image_glob'") from None


@functools.lru_cache(maxsize=1)
def _dicom_pixels(path: str, mtime_ns: int, size: int) -> tuple[Any, np.ndarray]:
    """Header and all frames of one DICOM file ((frames, H, W[, 3]) after Rescale Slope/Intercept), cached for the
    next frame of the same cine run (the key includes mtime and size, so a changed file is read again)."""
    dataset = _read_dicom(path)
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for missing codecs / broken data
        raise DataError(f"{path}: DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}); export it "
                        "uncompressed or install the codec pydicom names") from None
    if int(getattr(dataset, "SamplesPerPixel", 1)) == 1:
        pixels = apply_modality_lut(pixels, dataset)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[None]
    return dataset, np.asarray(pixels)


def _dicom_frame(path: Path, index: int | None, windowing: str) -> Frame:
    stat = path.stat()
    dataset, pixels = _dicom_pixels(str(path), stat.st_mtime_ns, stat.st_size)
    position = index or 0
    if not 0 <= position < pixels.shape[0]:
        raise DataError(f"{path}: frame {position} requested but the file has {pixels.shape[0]} frame(s)")
    frame = pixels[position]
    if frame.ndim == 3:  # colour DICOM: pydicom gives RGB
        return Frame(Image.fromarray(frame.astype(np.uint8)), "none (DICOM colour, 8 bit)")
    centre, width = _first(dataset.get("WindowCenter")), _first(dataset.get("WindowWidth"))
    if windowing == "auto" and centre is not None and width is not None and width >= 1:
        grey = window_centre_width(frame, centre, width)
        how = f"DICOM window centre {centre:g} width {width:g}"
    else:
        grey = window_to_uint8(frame)
        how = f"min-max {float(frame.min()):g}..{float(frame.max()):g}"
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
        how += ", MONOCHROME1 inverted"
    return Frame(Image.fromarray(grey).convert("RGB"), how)


def _picture(path: Path) -> Frame:
    with Image.open(path) as image:
        image.load()
        if image.mode in HIGH_BIT_DEPTH_MODES:
            pixels = np.asarray(image)
            how = f"min-max {float(pixels.min()):g}..{float(pixels.max()):g} ({image.mode})"
            return Frame(Image.fromarray(window_to_uint8(pixels)).convert("RGB"), how)
        return Frame(image.convert("RGB"), f"none ({image.mode}, 8 bit)")


def load_frame(reference: str | Path, windowing: str = "auto") -> Frame:
    """Decode one frame (a picture file, a DICOM file, or ``file.dcm#frame=i``) to 8-bit RGB, with its windowing.

    Raises :class:`DataError` naming the file when the picture is constant after loading (nothing to segment).
    """
    if windowing not in WINDOWINGS:
        raise DataError(f"windowing {windowing!r} is not one of {', '.join(WINDOWINGS)} (set 'inference.windowing')")
    path, index = split_reference(reference)
    frame = _dicom_frame(path, index, windowing) if is_dicom(path) else _picture(path)
    extremes = frame.image.getextrema()
    if all(low == high for low, high in extremes):
        values = {low for low, _ in extremes}
        kind = "saturated (all 255)" if values == {255} else "black (all 0)" if values == {0} else "constant"
        raise DataError(f"{reference}: the frame is {kind} after loading ({frame.windowing}); nothing to segment. "
                        "Re-export the frame.")
    return frame


def open_frame_rgb(reference: str | Path, windowing: str = "auto") -> Image.Image:
    """:func:`load_frame`'s picture only (for display, and callers that need no record of the window)."""
    return load_frame(reference, windowing).image


def frame_size(reference: str | Path) -> tuple[int, int]:
    """(height, width) from the header, without decoding pixels; (0, 0) when not even the header can be read."""
    path, _ = split_reference(reference)
    try:
        if is_dicom(path):
            header = _read_dicom(path, stop_before_pixels=True)
            return int(header.Rows), int(header.Columns)
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001 - any reader failure means "size unknown"
        return 0, 0


@dataclass(frozen=True)
class DicomFrames:
    """What the header of one DICOM file says about its frames and whose they are (tags may be empty)."""

    n_frames: int
    patient: str
    sequence: str
    instance: int | None


def dicom_frames(path: str | Path) -> DicomFrames:
    """Read a DICOM header (no pixels): number of frames, patient (PatientName_PatientID), sequence (Series
    Number or Series Instance UID), Instance Number. Raises :class:`DataError` naming the file if unreadable."""
    header = _read_dicom(path, stop_before_pixels=True)
    name = str(header.get("PatientName", "") or "").replace("^", "_").strip("_ ")
    patient_id = str(header.get("PatientID", "") or "").strip()
    patient = "_".join(part for part in (name, patient_id) if part)
    series = header.get("SeriesNumber")
    sequence = str(series) if series not in (None, "") else str(header.get("SeriesInstanceUID", "") or "")
    instance = header.get("InstanceNumber")
    return DicomFrames(
        n_frames=int(header.get("NumberOfFrames", 1) or 1), patient=patient, sequence=sequence,
        instance=int(instance) if instance not in (None, "") else None,
    )
