"""Dataset reading shared by all stages: frames -> samples (id, patient, sequence, frame).

Inference only ever needs :func:`list_samples` (images, never ground truth). Ground-truth readers live further
down this module and are used by the analysis stage only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vesselnb.errors import DataError
from vesselnb.params import DEFAULT_NAME_REGEX


@dataclass(frozen=True)
class Sample:
    """One frame to segment. ``sample_id`` is the file stem, unique within a dataset."""

    sample_id: str
    image_path: Path
    patient: str
    sequence: str
    frame: int

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
        patient, sequence, frame = parse_sample_name(path.stem, name_regex)
        samples.append(Sample(path.stem, path, patient, sequence, frame))
    if not samples:
        raise DataError(f"{folder}: no files match '{image_glob}'; set 'data.image_glob' (e.g. '*.png')")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{folder}: two files share a stem; sample ids must be unique")
    samples.sort(key=lambda s: (s.patient, s.sequence, s.frame, s.sample_id))
    return samples[:limit] if limit else samples


# --- Ground truth (analysis stage only) ------------------------------------------------------------------------
