"""Patient pseudonyms (P01, P02, ...) so reports can be attached to reviews without the users' real names.

The users' frame names carry a patient's name and id (``Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034``).
Reports show a short pseudonym instead. The numbering follows a salted hash of the patient, not the alphabet, so
"P01" says nothing about the name; the salt and the mapping are files in a folder the caller chooses (a run folder),
so every stage and every rerun shows the same pseudonym for the same patient, and a patient seen for the first time
gets the next free number without renumbering the others. The mapping file is for the user; the HTML never holds it.

This module is pure apart from :func:`load_or_create` / :func:`load`, which read and write the two files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from vesselnb.data import list_samples, parse_sample_name
from vesselnb.errors import DataError
from vesselnb.params import DEFAULT_NAME_REGEX, RunParams

SALT_FILE = "pseudonym_salt.txt"
MAPPING_FILE = "pseudonyms.csv"
PREFIX = "P"
_PSEUDONYM = re.compile(rf"^{PREFIX}(\d+)$")
# A patient label "<name>_<digits>" (the default regex joins patient and patient_id so): name and id leak separately.
_NAME_AND_ID = re.compile(r"^(?P<name>.+?)_(?P<id>\d{3,})$")
_MAPPING_HEADER = ("pseudonym", "patient")
# What a name shared by two patients (same name, different ids) becomes in free text: neither pseudonym is right.
AMBIGUOUS = "[patient]"


def new_salt() -> str:
    """A fresh random salt (hex): without it, anyone with the patient list could recompute the order."""
    return secrets.token_hex(16)


def salted_rank_key(patient: str, salt: str) -> str:
    """The sort key that orders patients for numbering: SHA-256 of salt and name, unrelated to the name's order."""
    return hashlib.sha256(f"{salt}\0{patient}".encode()).hexdigest()


def format_pseudonym(number: int) -> str:
    """``P01`` ... ``P99``, then ``P100``: at least two digits so that the first hundred sort as text too."""
    if number < 1:
        raise ValueError(f"pseudonym numbers start at 1, got {number}")
    return f"{PREFIX}{number:02d}"


def assign(patients: Iterable[str], salt: str, existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """Pseudonyms for ``patients``: ``existing`` ones kept as they are, new ones numbered on in salted-hash order."""
    mapping = dict(existing or {})
    numbers = []
    for patient, pseudonym in mapping.items():
        match = _PSEUDONYM.match(pseudonym)
        if match is None:
            raise ValueError(f"{pseudonym!r} (for {patient!r}) is not a pseudonym like {format_pseudonym(1)}")
        numbers.append(int(match.group(1)))
    if len(set(numbers)) != len(numbers):
        raise ValueError("two patients share one pseudonym in the existing mapping")
    new = sorted({p for p in patients if p not in mapping}, key=lambda p: (salted_rank_key(p, salt), p))
    start = max(numbers, default=0) + 1
    for offset, patient in enumerate(new):
        mapping[patient] = format_pseudonym(start + offset)
    return mapping


def _identifying_parts(patient: str) -> list[str]:
    """Every string in a patient label that identifies the patient on its own (the label, its name, its id)."""
    parts = [patient]
    match = _NAME_AND_ID.match(patient)
    if match:
        name = match.group("name")
        parts += [name, name.replace("_", " "), match.group("id")]
    return parts


def _boundary_pattern(texts: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for all ``texts``, longest first, not matching inside a longer word or number ("_" separates)."""
    unique = sorted({t for t in texts if t}, key=len, reverse=True)
    if not unique:
        return None
    alternatives = "|".join(re.escape(t) for t in unique)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


class Pseudonyms:
    """A fixed patient -> pseudonym mapping, and the replacements reports and figures need."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        values = list(mapping.values())
        if len(set(values)) != len(values):
            raise ValueError("two patients share one pseudonym")
        self._mapping = dict(mapping)
        self._by_part: dict[str, str] = {}
        for patient, pseudonym in self._mapping.items():
            for part in _identifying_parts(patient):
                known = self._by_part.get(part, pseudonym)
                self._by_part[part] = pseudonym if known == pseudonym else AMBIGUOUS
        for patient, pseudonym in self._mapping.items():  # a full label always maps to its own pseudonym
            self._by_part[patient] = pseudonym
        self._pattern = _boundary_pattern(self._by_part)

    @property
    def mapping(self) -> dict[str, str]:
        """A copy of patient -> pseudonym."""
        return dict(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    def __contains__(self, patient: object) -> bool:
        return patient in self._mapping

    def patient(self, patient: str) -> str:
        """The pseudonym of a patient label as :func:`vesselnb.data.parse_sample_name` gives it."""
        try:
            return self._mapping[patient]
        except KeyError:
            raise DataError(
                f"patient {patient!r} has no pseudonym ({len(self)} known): build the mapping from every sample "
                f"of the run (pseudonym.load_or_create with all patients) before rendering"
            ) from None

    def sample_id(self, sample_id: str, name_regex: str = DEFAULT_NAME_REGEX) -> str:
        """``sample_id`` with its patient part (name and id) replaced: ``P01__1-4_1_04B2D3CF_frame_000034``.

        The sequence and frame stay, so rows and thumbnails remain distinguishable. A name the regex does not match
        is its own patient (see ``parse_sample_name``) and becomes the bare pseudonym.
        """
        patient, _, _ = parse_sample_name(sample_id, name_regex)
        pseudonym = self.patient(patient)
        match = re.match(name_regex, sample_id)
        if match is None or match.groupdict().get("patient") is None:
            return pseudonym
        start = match.start("patient")
        end = match.end("patient_id") if match.groupdict().get("patient_id") else match.end("patient")
        return sample_id[:start] + pseudonym + sample_id[end:]

    def text(self, text: str) -> str:
        """Free text (a figure title, a log line, a path) with every patient label, name and id replaced."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self._by_part[m.group(0)], text)

    def leaks(self, text: str) -> list[str]:
        """The identifying strings of known patients that occur in ``text`` (empty when it is safe to attach)."""
        if self._pattern is None:
            return []
        return sorted({m.group(0) for m in self._pattern.finditer(text)})

    def to_csv(self) -> str:
        """The mapping as CSV (pseudonym, patient), ordered by pseudonym number."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_MAPPING_HEADER)
        for patient, pseudonym in sorted(self._mapping.items(), key=lambda kv: int(kv[1][len(PREFIX):])):
            writer.writerow((pseudonym, patient))
        return buffer.getvalue()


def patients_in(sample_ids: Iterable[str], name_regex: str = DEFAULT_NAME_REGEX) -> list[str]:
    """The distinct patient labels of ``sample_ids`` (what :func:`load_or_create` needs), in first-seen order."""
    return list(dict.fromkeys(parse_sample_name(s, name_regex)[0] for s in sample_ids))


def _atomic_write(path: Path, text: str) -> None:
    """Temp file + rename, so a killed run never leaves half a mapping (which would renumber patients)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read_salt(path: Path) -> str:
    salt = path.read_text(encoding="utf-8").strip()
    if not re.fullmatch(r"[0-9a-f]{16,}", salt):
        raise DataError(f"{path} does not hold a pseudonym salt (hex): restore it from a backup, or delete it and "
                        f"{path.parent / MAPPING_FILE} to renumber every patient")
    return salt


def _read_mapping(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows or tuple(rows[0]) != _MAPPING_HEADER or any(len(r) != 2 for r in rows[1:]):
        raise DataError(f"{path} is not a pseudonym mapping (header {','.join(_MAPPING_HEADER)}, two columns): "
                        f"restore it, or delete it to renumber every patient")
    mapping: dict[str, str] = {}
    for pseudonym, patient in rows[1:]:
        if patient in mapping or not _PSEUDONYM.match(pseudonym):
            raise DataError(f"{path}: bad or repeated row {pseudonym},{patient}: restore the file, or delete it to "
                            f"renumber every patient")
        mapping[patient] = pseudonym
    if len(set(mapping.values())) != len(mapping):
        raise DataError(f"{path}: two patients share one pseudonym: restore the file, or delete it to renumber")
    return mapping


def load(folder: Path) -> Pseudonyms:
    """The mapping saved in ``folder`` (for rendering a report after the stage that created it)."""
    path = Path(folder) / MAPPING_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: run the stage that lists the samples (or pseudonym.load_or_create)")
    return Pseudonyms(_read_mapping(path))


def load_or_create(folder: Path, patients: Iterable[str]) -> Pseudonyms:
    """Read the salt and mapping in ``folder`` (creating them), add unseen ``patients``, save, and return it all."""
    folder = Path(folder)
    salt_path, mapping_path = folder / SALT_FILE, folder / MAPPING_FILE
    if salt_path.is_file():
        salt = _read_salt(salt_path)
    else:
        salt = new_salt()
        _atomic_write(salt_path, salt + "\n")
    existing = _read_mapping(mapping_path) if mapping_path.is_file() else {}
    pseudonyms = Pseudonyms(assign(patients, salt, existing))
    if pseudonyms.mapping != existing:
        _atomic_write(mapping_path, pseudonyms.to_csv())
    return pseudonyms


# --- Run folders: one mapping per outputs/<run>/, consistent across the runs of one outputs folder ---------------

def _run_patients(params: RunParams) -> list[str]:
    """Every patient of the run's frames (all of ``data.images``, not only ``data.limit``: a rerun may see more)."""
    if params.data.images is None or not Path(params.data.images).is_dir():
        return []
    try:
        samples = list_samples(params.data.images, params.data.image_glob, params.data.name_regex)
    except DataError:  # no frames yet (stage 02 says so in its own words): no patient to name either
        return []
    return patients_in((s.sample_id for s in samples), params.data.name_regex)


def _seed(folder: Path, patients: Iterable[str], sources: Iterable[Path]) -> None:
    """Give ``patients`` the pseudonyms ``sources`` (other folders' mappings) already gave them, before numbering.

    Why: the same patient must read P03 in run A's report and in the comparison of A and B. A source that
    contradicts what is already assigned is skipped for that patient, never renumbers one.
    """
    path = folder / MAPPING_FILE
    existing = _read_mapping(path) if path.is_file() else {}
    wanted = set(patients)
    seeded, used = dict(existing), set(existing.values())
    for source in sources:
        other_path = Path(source) / MAPPING_FILE
        if Path(source).resolve() == folder.resolve() or not other_path.is_file():
            continue
        try:
            other = _read_mapping(other_path)
        except DataError:
            continue
        for patient, pseudonym in other.items():
            if patient in wanted and patient not in seeded and pseudonym not in used:
                seeded[patient] = pseudonym
                used.add(pseudonym)
    if seeded != existing:
        _atomic_write(path, Pseudonyms(seeded).to_csv())


def _sibling_folders(folder: Path) -> list[Path]:
    return sorted(p.parent for p in Path(folder).resolve().parent.glob(f"*/{MAPPING_FILE}"))


def for_run(folder: str | Path, params: RunParams) -> Pseudonyms | None:
    """The pseudonyms of run folder ``folder`` (None when ``report.pseudonymize`` is off), saved there.

    This is the one call the notebooks, analysis and comparison code need before drawing a figure or table:
    ``names = pseudonym.for_run(run_dir, params)``, then ``names.sample_id(...)`` / ``names.text(...)`` /
    :func:`frame`. Patients already numbered in a sibling run of the same outputs folder keep that number.
    """
    if not params.report.pseudonymize:
        return None
    folder = Path(folder)
    patients = _run_patients(params)
    folder.mkdir(parents=True, exist_ok=True)
    _seed(folder, patients, _sibling_folders(folder))
    return load_or_create(folder, patients)


def for_comparison(folder: str | Path, run_dirs: Iterable[str | Path],
                   run_params: Iterable[RunParams | None] = ()) -> Pseudonyms:
    """The pseudonyms of a comparison folder: every patient of its runs, numbered as the runs number them.

    ``run_params`` (the runs' params, in order) adds the frames of a run that showed names and so saved no mapping.
    """
    folder = Path(folder)
    run_dirs = [Path(d) for d in run_dirs]
    patients: list[str] = []
    for run_dir in run_dirs:
        if (run_dir / MAPPING_FILE).is_file():
            patients += list(_read_mapping(run_dir / MAPPING_FILE))
    for params in run_params:
        if params is not None:
            patients += _run_patients(params)
    folder.mkdir(parents=True, exist_ok=True)
    _seed(folder, patients, [*run_dirs, *_sibling_folders(folder)])
    return load_or_create(folder, patients)


def saved(folder: str | Path) -> Pseudonyms | None:
    """The mapping saved in ``folder``, or None when there is none (a run with names shown, or from before)."""
    return load(Path(folder)) if (Path(folder) / MAPPING_FILE).is_file() else None


def frame(table: pd.DataFrame, pseudonyms: Pseudonyms | None, columns: Iterable[str] = ("patient", "sample_id"),
          name_regex: str = DEFAULT_NAME_REGEX) -> pd.DataFrame:
    """A copy of ``table`` with its patient and sample-id columns (and index levels of those names) pseudonymised.

    ``pseudonyms`` None (names shown) returns the table unchanged, so callers need no branch.
    """
    if pseudonyms is None:
        return table
    table = table.copy()

    def convert(name: str, values: Iterable[Any]) -> list[Any]:
        if name == "patient":
            return [pseudonyms.patient(v) if isinstance(v, str) else v for v in values]
        if name == "sample_id":
            return [pseudonyms.sample_id(v, name_regex) if isinstance(v, str) else v for v in values]
        return [pseudonyms.text(v) if isinstance(v, str) else v for v in values]

    for column in columns:
        if column in table.columns:
            table[column] = convert(column, table[column])
    if any(name in set(columns) for name in table.index.names):
        arrays = [convert(name, table.index.get_level_values(i)) if name in set(columns)
                  else list(table.index.get_level_values(i)) for i, name in enumerate(table.index.names)]
        table.index = pd.MultiIndex.from_arrays(arrays, names=table.index.names) if len(arrays) > 1 \
            else pd.Index(arrays[0], name=table.index.names[0])
    return table
