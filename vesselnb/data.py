"""Dataset reading shared by all stages: frames -> samples (id, patient, sequence, frame).

Inference only ever needs :func:`list_samples` (images, never ground truth). Ground-truth readers live further
down this module and are used by the analysis stage only.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage import draw, measure

from vesselnb.errors import DataError
from vesselnb.frames import dicom_frames, frame_reference, frame_size, is_dicom
from vesselnb.masks import resize_mask
from vesselnb.params import DEFAULT_NAME_REGEX
from vesselnb.polyfill import polygon_pixels


@dataclass(frozen=True)
class Sample:
    """One frame to segment. ``sample_id`` is the file stem (``<stem>_frame_<i>`` for frame ``i`` of a multi-frame
    DICOM file, whose ``frame_index`` is then ``i``), unique within a dataset."""

    sample_id: str
    image_path: Path
    patient: str
    sequence: str
    frame: int
    frame_index: int | None = None

    @property
    def reference(self) -> str:
        """What :mod:`vesselnb.frames` decodes, and the store's ``image``: the file, or ``file#frame=i``."""
        return frame_reference(self.image_path, self.frame_index)

    @property
    def video_key(self) -> str:
        """Frames sharing this key form one sequence (the users' prefix before ``_frame_``)."""
        return f"{self.patient}__{self.sequence}"


def parse_sample_name(stem: str, name_regex: str = DEFAULT_NAME_REGEX) -> tuple[str, str, int]:
    """Split a frame's file stem into (patient, sequence, frame).

    The regex needs named groups ``patient`` (``patient_id`` is appended to it when present), ``sequence`` and
    ``frame``. A name that does not match becomes its own patient and sequence with frame 0, so odd files are still
    analysed (and visible as singletons in the per-patient table) rather than dropped.
    """
    match = re.match(name_regex, stem)
    if match is None:
        return stem, stem, 0
    groups = match.groupdict()
    patient = groups.get("patient") or stem
    if groups.get("patient_id"):
        patient = f"{patient}_{groups['patient_id']}"
    sequence = groups.get("sequence") or patient
    frame_text = groups.get("frame")
    frame = int(frame_text) if frame_text and frame_text.isdigit() else 0
    return patient, sequence, frame


def list_samples(
    images_dir: str | Path,
    image_glob: str = "*.jpg",
    name_regex: str = DEFAULT_NAME_REGEX,
    limit: int | None = None,
) -> list[Sample]:
    """All frames in ``images_dir`` matching ``image_glob``, sorted by (patient, sequence, frame, id).

    ``limit`` keeps the first N in that order (whole sequences first), which makes quick runs reproducible.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; set 'data.images' in the params file to your frames")
    try:
        re.compile(name_regex)
    except re.error as exc:
        raise DataError(f"name_regex {name_regex!r} is not a valid regular expression: {exc}") from None
    samples = []
    for path in folder.glob(image_glob):
        if not path.is_file():
            continue
        if is_dicom(path):
            samples.extend(dicom_samples(path, name_regex))
            continue
        patient, sequence, frame = parse_sample_name(path.stem, name_regex)
        samples.append(Sample(path.stem, path, patient, sequence, frame))
    if not samples:
        raise DataError(f"{folder}: no files match '{image_glob}'; set 'data.image_glob' (e.g. '*.png')")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{folder}: two files share a stem; sample ids must be unique")
    samples.sort(key=lambda s: (s.patient, s.sequence, s.frame, s.sample_id))
    return samples[:limit] if limit else samples


def dicom_samples(path: Path, name_regex: str = DEFAULT_NAME_REGEX) -> list[Sample]:
    """One sample per frame of a DICOM file (an XA cine run has dozens).

    Patient = PatientName_PatientID and sequence = Series Number (else Series Instance UID) from the tags; where a
    tag is empty the file-name rule fills it in. Frame = the index in a multi-frame file, else Instance Number (else
    the file-name rule). A file whose header cannot be read is one sample named by the file-name rule: decoding it
    fails, so it becomes that sample's ``error`` record, and the run goes on.
    """
    name_patient, name_sequence, name_frame = parse_sample_name(path.stem, name_regex)
    try:
        info = dicom_frames(path)
    except DataError:
        return [Sample(path.stem, path, name_patient, name_sequence, name_frame)]
    patient = info.patient or name_patient
    sequence = info.sequence or name_sequence
    if info.n_frames <= 1:
        frame = info.instance if info.instance is not None else name_frame
        return [Sample(path.stem, path, patient, sequence, frame)]
    return [Sample(f"{path.stem}_frame_{index:06d}", path, patient, sequence, index, index)
            for index in range(info.n_frames)]


# --- Ground truth (analysis stage only) ------------------------------------------------------------------------
#
# Formats read (``annotation_format``; "auto" guesses from the path):
#   sa2va     one JSON file, a list of {image, mask: [flat polygon, ...], text, ...} (entries for one image OR-ed)
#   labelme   a folder of <stem>.json with shapes[].points and imageWidth/imageHeight (or one such file)
#   coco      one JSON file {images: [{id, file_name, width, height}], annotations: [{image_id, segmentation}]}
#   mask_png  a folder of <stem>.png or <stem>_mask.png (vessel = pixel > 127, or > 0 for 0/1 masks)
#
# Polygon filling reproduces the users' scripts (``cv2.fillPoly(mask, [points.astype(int32)], 255)`` called once per
# polygon): vertices are truncated to integers, each polygon is filled on its own with its outline pixels included,
# self-intersections follow the even-odd rule, and the polygons are OR-ed, so overlapping polygons never cancel.
# ``polygon_fill="even_odd"`` instead uses the pixel-centre even-odd rule over all polygons of a frame (holes drawn as
# inner polygons, as the demo's annotations do).

POLYGON_FILLS = ("union", "even_odd")
_log = logging.getLogger("vesselnb.data")


@dataclass
class GroundTruthReport:
    """What reading the annotations found; shown in the report so nothing is fixed up silently."""

    source: Path
    annotation_format: str
    polygon_fill: str
    n_samples: int = 0
    annotated: int = 0
    missing: list[str] = field(default_factory=list)  # frames without any annotation: reported, never scored
    unmatched: list[str] = field(default_factory=list)  # annotations naming frames that are not in the image folder
    rescaled: dict[str, tuple[tuple[int, int], tuple[int, int]]] = field(default_factory=dict)  # id: ((w,h)->(w,h))
    clipped_polygons: int = 0  # polygons reaching outside the frame (cut at the border)
    clipped_points: int = 0
    skipped_polygons: int = 0  # fewer than 3 points
    skipped_shapes: dict[str, int] = field(default_factory=dict)  # LabelMe shape types we do not fill
    nested_polygons: int = 0  # polygons lying inside another one of their frame: holes, if the exporter drew them
    warnings: list[str] = field(default_factory=list)
    quiet: bool = False  # record warnings without logging them (a dataset already reported by stage 03)

    def warn(self, message: str) -> None:
        """Record and log a warning (the report lists them; the log shows them as they happen)."""
        self.warnings.append(message)
        if not self.quiet:
            _log.warning(message)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (lists shortened to counts plus a few examples)."""
        return {
            "source": str(self.source),
            "annotation_format": self.annotation_format,
            "polygon_fill": self.polygon_fill,
            "n_samples": self.n_samples,
            "annotated": self.annotated,
            "missing": len(self.missing),
            "missing_examples": self.missing[:5],
            "unmatched": len(self.unmatched),
            "unmatched_examples": self.unmatched[:5],
            "rescaled": len(self.rescaled),
            "clipped_polygons": self.clipped_polygons,
            "clipped_points": self.clipped_points,
            "skipped_polygons": self.skipped_polygons,
            "skipped_shapes": dict(self.skipped_shapes),
            "nested_polygons": self.nested_polygons,
            "warnings": list(self.warnings),
        }


@dataclass
class _Annotation:
    """One frame's ground truth before rasterising: polygons in frame pixels, or a mask PNG."""

    polygons: list[np.ndarray] = field(default_factory=list)  # each (n, 2) as (x, y)
    png: Path | None = None
    bitmaps: list[np.ndarray] = field(default_factory=list)  # COCO RLE masks at their declared size


class GroundTruth:
    """Ground-truth masks by sample id, rasterised on demand and kept packed (1 bit per pixel) up to ``cache_bytes``,
    so a stage rasterises each frame once without 1,000 frames of boolean masks sitting in memory."""

    def __init__(self, annotations: dict[str, _Annotation], sizes: dict[str, tuple[int, int]],
                 report: GroundTruthReport, cache_bytes: int = 64 * 2**20) -> None:
        self._annotations = annotations
        self._sizes = sizes  # sample id -> (height, width) of the frame
        self.report = report
        self._packed: dict[str, np.ndarray] = {}  # sample id -> np.packbits(mask)
        self._cache_room = cache_bytes

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._annotations

    def __len__(self) -> int:
        return len(self._annotations)

    def sample_ids(self) -> list[str]:
        """Ids of the frames that have ground truth."""
        return sorted(self._annotations)

    def mask(self, sample_id: str) -> np.ndarray:
        """The GT mask (bool, frame size); :class:`DataError` for a frame without annotation."""
        entry = self._annotations.get(sample_id)
        if entry is None:
            raise DataError(f"{self.report.source}: no annotation for frame {sample_id!r}")
        shape = self._sizes[sample_id]
        packed = self._packed.get(sample_id)
        if packed is not None:  # unpacking makes a fresh array: callers may modify what they get
            return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)
        if entry.png is not None:
            mask = _read_mask_png(entry.png, shape, sample_id, self.report)
        else:
            mask = polygons_to_mask(entry.polygons, shape, self.report.polygon_fill)
            for bitmap in entry.bitmaps:
                mask |= resize_mask(bitmap, shape)
        self.remember(sample_id, np.packbits(mask))
        return mask

    def remember(self, sample_id: str, packed: np.ndarray) -> None:
        """Keep ``np.packbits(mask)`` of a frame (e.g. one a scoring worker process rasterised) while the cache has
        room; beyond it, masks are simply rasterised again when asked for."""
        if sample_id in self._annotations and sample_id not in self._packed and packed.nbytes <= self._cache_room:
            self._packed[sample_id] = packed
            self._cache_room -= packed.nbytes


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int], polygon_fill: str = "union") -> np.ndarray:
    """Rasterise (x, y) polygons.

    ``"union"`` reproduces the users' ``cv2.fillPoly`` loop (vertices truncated to int, outline pixels included,
    polygons OR-ed); ``"even_odd"`` is the pixel-centre even-odd rule over all polygons of the frame (a pixel is
    inside when its centre lies in an odd number of polygons), for annotations that draw holes as inner polygons.
    """
    if polygon_fill not in POLYGON_FILLS:
        raise DataError(f"polygon_fill must be one of {POLYGON_FILLS}, got {polygon_fill!r}")
    mask = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64)
        if len(points) < 3:
            continue
        if polygon_fill == "even_odd":
            row0, col0, inside = polygon_pixels(points, shape)  # = skimage.draw.polygon's pixels, scanline time
            mask[row0 : row0 + inside.shape[0], col0 : col0 + inside.shape[1]] ^= inside
            continue
        corners = points.astype(np.int32)  # truncation, as the users' `.astype(np.int32)`
        row0, col0, inside = polygon_pixels(corners.astype(np.float64), shape)
        mask[row0 : row0 + inside.shape[0], col0 : col0 + inside.shape[1]] |= inside
        mask[draw.polygon_perimeter(corners[:, 1], corners[:, 0], shape, clip=False)] = True
    return mask


def _read_mask_png(path: Path, shape: tuple[int, int], sample_id: str, report: GroundTruthReport) -> np.ndarray:
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    mask = values > (127 if values.max(initial=0) > 1 else 0)
    return resize_mask(mask, shape)  # a size mismatch was counted when the annotations were read


def detect_annotation_format(path: Path) -> str:
    """Guess the format from the path: folder of JSON = labelme, folder of PNG = mask_png, JSON list = sa2va, JSON
    with ``images``/``annotations`` = coco, JSON with ``shapes`` = labelme."""
    if path.is_dir():
        if any(path.glob("*.json")):
            return "labelme"
        if any(path.glob("*.png")):
            return "mask_png"
        raise DataError(f"{path}: folder holds neither LabelMe *.json nor mask *.png; set 'data.annotation_format'")
    payload = _load_json(path)
    if isinstance(payload, list):
        return "sa2va"
    if isinstance(payload, dict) and "annotations" in payload and "images" in payload:
        return "coco"
    if isinstance(payload, dict) and "shapes" in payload:
        return "labelme"
    raise DataError(
        f"{path}: cannot tell the annotation format (expected a Sa2VA list, a COCO dict or a LabelMe file); "
        "set 'data.annotation_format'"
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotations JSON ({exc}); check the file") from None


def _frame_sizes(samples: list[Sample]) -> dict[str, tuple[int, int]]:
    """(height, width) of every frame, from the image headers only."""
    sizes = {}
    for sample in samples:
        size = frame_size(sample.reference)
        if size != (0, 0):  # an unreadable frame is an inference "error"; it simply gets no ground truth
            sizes[sample.sample_id] = size
    return sizes


def _flat_to_points(flat: Any) -> np.ndarray | None:
    values = np.asarray(flat, dtype=np.float64).ravel()
    if values.size % 2:
        return None
    return values.reshape(-1, 2)


def load_ground_truth(
    annotations: str | Path,
    samples: list[Sample],
    annotation_format: str = "auto",
    polygon_fill: str = "union",
    frames_in_folder: set[str] | None = None,
    quiet: bool = False,
) -> GroundTruth:
    """Read the ground truth for ``samples`` from any supported format.

    ``frames_in_folder`` (all frame ids in the image folder) tells annotations of frames left out on purpose
    (``data.limit``) from annotations naming frames that do not exist; only the latter are warned about.
    ``quiet`` keeps the warnings in ``report.warnings`` without logging them: for a second reader of a dataset whose
    problems stage 03 already reported (compare's panels).

    Annotations whose declared image size differs from the frame are rescaled (logged warning); polygons reaching
    outside the frame are cut at the border and counted; frames without annotation are listed in
    ``report.missing`` and get no mask (the analysis reports them instead of scoring them as empty).
    """
    source = Path(annotations)
    if not source.exists():
        raise DataError(f"{source}: annotations not found; set 'data.annotations' to your annotation file/folder")
    if polygon_fill not in POLYGON_FILLS:
        raise DataError(f"polygon_fill must be one of {POLYGON_FILLS}, got {polygon_fill!r}")
    fmt = detect_annotation_format(source) if annotation_format == "auto" else annotation_format
    report = GroundTruthReport(source=source, annotation_format=fmt, polygon_fill=polygon_fill,
                               n_samples=len(samples), quiet=quiet)
    sizes = _frame_sizes(samples)
    by_stem = {s.sample_id: s for s in samples}
    readers = {"sa2va": _read_sa2va, "labelme": _read_labelme, "coco": _read_coco, "mask_png": _read_mask_folder}
    if fmt not in readers:
        raise DataError(f"annotation_format {fmt!r} unknown; use one of auto, {', '.join(readers)}")
    # raw: stem -> (annotation, declared (width, height) or None)
    raw = readers[fmt](source, report)
    found: dict[str, _Annotation] = {}
    # Names are matched in Unicode NFC: a file saved in NFD (macOS) must meet its NFC annotation, not be "missing".
    nfc_ids = {unicodedata.normalize("NFC", sample_id): sample_id for sample_id in by_stem}
    nfc_folder = {unicodedata.normalize("NFC", f) for f in frames_in_folder} if frames_in_folder is not None else None
    for raw_stem, (entry, declared) in raw.items():
        stem = nfc_ids.get(unicodedata.normalize("NFC", raw_stem), raw_stem)
        if stem not in by_stem:
            if nfc_folder is None or unicodedata.normalize("NFC", stem) not in nfc_folder:
                report.unmatched.append(stem)
            continue
        if stem not in sizes:
            continue
        height, width = sizes[stem]
        if declared is not None and tuple(declared) != (width, height):
            report.rescaled[stem] = ((int(declared[0]), int(declared[1])), (width, height))
            scale = np.array([width / declared[0], height / declared[1]])
            entry.polygons = [polygon * scale for polygon in entry.polygons]
        if entry.png is not None:
            with Image.open(entry.png) as image:
                if (image.height, image.width) != (height, width):
                    report.rescaled[stem] = ((image.width, image.height), (width, height))
        for polygon in entry.polygons:
            # The frame spans [-0.5, size - 0.5] in pixel-centre coordinates and [0, size] in corner ones: both fine.
            x, y = polygon[:, 0], polygon[:, 1]
            outside = (x < -0.5) | (x > width) | (y < -0.5) | (y > height)
            if outside.any():
                report.clipped_polygons += 1
                report.clipped_points += int(outside.sum())
        if polygon_fill == "union":
            report.nested_polygons += _count_nested(entry.polygons)
        found[stem] = entry
    report.annotated = len(found)
    report.missing = sorted(set(by_stem) - set(found))
    _summarise_problems(report)
    return GroundTruth(found, {k: sizes[k] for k in found}, report)


def _summarise_problems(report: GroundTruthReport) -> None:
    """One warning per kind of problem (600 rescaled files are one message, with the ids in the report)."""
    if report.rescaled:
        pairs = sorted({(a, b) for a, b in report.rescaled.values()})
        described = "; ".join(f"{a[0]}x{a[1]} -> {b[0]}x{b[1]}" for a, b in pairs[:3])
        report.warn(f"{len(report.rescaled)} annotation(s) were drawn at another size than their frame and were "
                    f"rescaled ({described}); first: {sorted(report.rescaled)[0]}")
    if report.clipped_polygons:
        report.warn(f"{report.clipped_polygons} polygon(s) reach outside their frame ({report.clipped_points} "
                    "points); they were cut at the border")
    if report.skipped_polygons:
        report.warn(f"{report.skipped_polygons} polygon(s) with fewer than 3 points were skipped")
    if report.skipped_shapes:
        report.warn(f"LabelMe shapes not filled (not polygons): {report.skipped_shapes}")
    if report.nested_polygons:
        report.warn(f"{report.nested_polygons} polygon(s) lie inside another polygon of their frame and were filled "
                    "(union rule, as cv2.fillPoly per polygon). If your exporter draws holes as inner polygons, set "
                    "'data.polygon_fill: even_odd'")
    if report.missing:
        report.warn(f"{len(report.missing)} frame(s) have no annotation and are not scored; first: "
                    f"{report.missing[0]}")
    if report.unmatched:
        report.warn(f"{len(report.unmatched)} annotation(s) name frames not in the image folder; first: "
                    f"{report.unmatched[0]}")


def _count_nested(polygons: list[np.ndarray]) -> int:
    """Polygons whose vertices all lie inside another polygon of the same frame (bounding boxes first: cheap)."""
    if len(polygons) < 2:
        return 0
    boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons])
    nested = 0
    for i, inner in enumerate(polygons):
        inside_box = ((boxes[:, 0] <= boxes[i, 0]) & (boxes[:, 1] <= boxes[i, 1]) & (boxes[:, 2] >= boxes[i, 2])
                      & (boxes[:, 3] >= boxes[i, 3]))
        inside_box[i] = False
        for j in np.flatnonzero(inside_box):
            if measure.points_in_poly(inner, polygons[j]).all():
                nested += 1
                break
    return nested


def _polygons_from(items: Any, report: GroundTruthReport) -> list[np.ndarray]:
    """Flat polygons ``[x0, y0, x1, y1, ...]``, possibly nested one level deeper (one list per expression)."""
    polygons = []
    for item in items or []:
        if item and isinstance(item[0], (list, tuple)):
            polygons.extend(_polygons_from(item, report))
            continue
        points = _flat_to_points(item)
        if points is None or len(points) < 3:
            report.skipped_polygons += 1
            continue
        polygons.append(points)
    return polygons


_Raw = dict[str, tuple[_Annotation, tuple[float, float] | None]]


def _read_sa2va(source: Path, report: GroundTruthReport) -> _Raw:
    payload = _load_json(source)
    if not isinstance(payload, list):
        raise DataError(f"{source}: a Sa2VA annotations file is a JSON list of {{image, mask, text}} entries")
    raw: _Raw = {}
    for index, entry in enumerate(payload):
        if not isinstance(entry, dict) or "image" not in entry or "mask" not in entry:
            raise DataError(f"{source}: entry {index} lacks 'image' or 'mask'; is this a Sa2VA annotations file?")
        stem = Path(str(entry["image"])).stem
        annotation = raw.setdefault(stem, (_Annotation(), None))[0]
        annotation.polygons.extend(_polygons_from(entry["mask"], report))
    return raw


def _labelme_entry(payload: dict[str, Any], report: GroundTruthReport) -> tuple[_Annotation, tuple[float, float]]:
    annotation = _Annotation()
    for shape in payload.get("shapes", []):
        kind = shape.get("shape_type") or "polygon"
        points = np.asarray(shape.get("points", []), dtype=np.float64).reshape(-1, 2)
        if kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            kind = "polygon"
        if kind != "polygon":
            report.skipped_shapes[kind] = report.skipped_shapes.get(kind, 0) + 1
            continue
        if len(points) < 3:
            report.skipped_polygons += 1
            continue
        annotation.polygons.append(points)
    declared = None
    if payload.get("imageWidth") and payload.get("imageHeight"):
        declared = (float(payload["imageWidth"]), float(payload["imageHeight"]))
    return annotation, declared


def _read_labelme(source: Path, report: GroundTruthReport) -> _Raw:
    files = sorted(source.glob("*.json")) if source.is_dir() else [source]
    raw: _Raw = {}
    for path in files:
        payload = _load_json(path)
        if not isinstance(payload, dict) or "shapes" not in payload:
            report.warn(f"{path}: not a LabelMe file (no 'shapes'); ignored")
            continue
        stem = path.stem if source.is_dir() else Path(str(payload.get("imagePath", path.stem))).stem
        raw[stem] = _labelme_entry(payload, report)
    return raw


def _decode_uncompressed_rle(rle: dict[str, Any], source: Path) -> np.ndarray:
    counts = rle.get("counts")
    if not isinstance(counts, list):
        raise DataError(f"{source}: compressed COCO RLE is not supported; export polygons or uncompressed RLE")
    height, width = rle["size"]
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(width, height).T  # COCO RLE runs down the columns


def _read_coco(source: Path, report: GroundTruthReport) -> _Raw:
    payload = _load_json(source)
    images = {image["id"]: image for image in payload.get("images", [])}
    raw: _Raw = {}
    for ann in payload.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None:
            report.warn(f"{source}: annotation {ann.get('id')} names unknown image_id {ann.get('image_id')}")
            continue
        stem = Path(str(image["file_name"])).stem
        declared = (float(image["width"]), float(image["height"])) if image.get("width") else None
        annotation = raw.setdefault(stem, (_Annotation(), declared))[0]
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict):
            rle = _decode_uncompressed_rle(segmentation, source)
            annotation.bitmaps.append(rle)
            continue
        annotation.polygons.extend(_polygons_from(segmentation, report))
    return raw


def _read_mask_folder(source: Path, report: GroundTruthReport) -> _Raw:
    raw: _Raw = {}
    for path in sorted(source.glob("*.png")):
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        raw[stem] = (_Annotation(png=path), None)
    return raw
