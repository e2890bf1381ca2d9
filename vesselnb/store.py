"""The prediction store: one folder of per-sample records, masks and probability maps (``outputs/<run>/predictions``).

Why it looks like this (layout in docs/contracts.md):

* **Per-sample files, record last and atomic.** Each sample's mask (and probability map) is written first, then
  its record, which goes to a temporary name in the same folder and is moved into place with ``os.replace``. A
  record therefore exists only when its sample is completely stored (images of a sample without a record are never
  read, and are simply overwritten when the sample is redone), so ``kill -9`` loses at most the sample in
  flight and a rerun simply skips the samples that have a record: nothing lost, nothing duplicated.
* **A fingerprint per store.** ``store.json`` names the weights fingerprint, prompt and mode it was written with;
  opening it for writing with anything else raises :class:`StoreError`, so predictions of two models never mix.
* **Parts for data-parallel runs.** A shard ``k`` of ``n`` writes its own complete store under
  ``parts/<k>-of-<n>/`` (no two processes ever write the same folder); :func:`merge_parts` copies the parts into
  the main store, idempotently, and removes them. A reader sees only merged samples and is warned about parts.

Durability is against process death (crash, ``kill -9``), which needs no ``fsync``; set ``durable=True`` for
power-loss safety at the cost of one disk flush per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vesselnb.errors import StoreError
from vesselnb.run_folder import (
    MASKS_DIR,
    MERGE_LOCK_FILE,
    PART_COMPLETE_FILE,
    PARTS_DIR,
    PROBS_DIR,
    RECORDS_DIR,
    STORE_FILE,
    atomic_write_bytes,
    now_iso,
    read_json,
    temp_owner_pid,
)

STORE_FORMAT = 1
STATUSES = ("ok", "no_seg", "error")
# store.json keys that must agree before two sets of predictions may share a store.
IDENTITY_KEYS = ("fingerprint", "model_config", "prompt", "mode", "probability_maps")
# Identity keys a store written by an older vesselnb may lack: not checked when absent from the existing store.
_LATER_IDENTITY_KEYS = ("model_config",)
_STANDARD_META = (
    "format", "fingerprint", "model_config", "model_dir", "prompt", "mode", "created", "probability_maps",
)  # fmt: skip
RECORD_KEYS = (
    "sample_id", "image", "patient", "sequence", "frame", "status", "text", "n_seg", "seconds", "error",
    "height", "width", "mask_resized_from", "has_probability",
)  # fmt: skip
# Record keys written by newer vesselnb, not required of a record (older stores lack them): where the map came from
# (or why there is none), how the frame was windowed to 8 bit, in video mode whether the language model saw the frame
# and which window [first, last] of the sequence it was predicted in.
OPTIONAL_RECORD_KEYS = ("probability_source", "windowing", "llm_saw_frame", "video_window")
_PART_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def _write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Plain write, for files no reader looks at yet (a sample's images before its record exists)."""
    with open(path, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def _png_bytes(image: Image.Image) -> bytes:
    """PNG with zlib's run-length strategy: on PNG-filtered masks and probability maps it was both faster (~1.7 vs
    ~2.5 ms for a 256² probability map) and smaller than the default strategy, and this runs once per frame."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, compress_type=zlib.Z_RLE)
    return buffer.getvalue()


_GRAY_PALETTE = [level for value in range(256) for level in (value, value, value)]


def _gray_png_bytes(values: np.ndarray) -> bytes:
    """A uint8 map as a PNG whose palette is the identity grey ramp: the same pixels, read back by index.

    Pillow filters greyscale PNG rows adaptively (it tries all five PNG filters per row), which was 2/3 of the
    cost of storing a probability map; palette images are stored unfiltered, at half the time for ~1/3 more bytes.
    Any PNG reader shows the same grey levels; :meth:`PredictionStore.probability` reads the indices.
    """
    image = Image.frombuffer("P", (values.shape[1], values.shape[0]), np.ascontiguousarray(values), "raw", "P", 0, 1)
    image.putpalette(_GRAY_PALETTE)
    return _png_bytes(image)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, error=StoreError, fix="delete it and rerun inference to redo it")


def write_sample_files(
    root: Path, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None, durable: bool = False
) -> None:
    """Write one checked sample into the store at ``root``: images first, the record last (the commit point).

    Until the record exists nobody reads the sample's images, so they are written in place (one rename per sample
    instead of three); replacing a stored sample's images goes through temporary files.
    """
    sample_id = str(record["sample_id"])
    record_path = root / RECORDS_DIR / f"{sample_id}.json"
    write_image = atomic_write_bytes if record_path.exists() else _write_bytes
    if mask.size:  # an image that could not be read at all has no size: 0x0 record, no mask file
        write_image(root / MASKS_DIR / f"{sample_id}.png", _png_bytes(Image.fromarray(mask)), durable=durable)
    if probability is not None:
        write_image(root / PROBS_DIR / f"{sample_id}.png", _gray_png_bytes(probability), durable=durable)
    record = dict(record, has_probability=probability is not None)
    payload = json.dumps(record, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(record_path, payload.encode(), durable=durable)


def part_name(shard: tuple[int, int]) -> str:
    """Folder name of shard ``(k, n)`` under ``parts/``: ``"<k>-of-<n>"`` (k counts from 0, like RANK)."""
    k, n = shard
    return f"{k}-of-{n}"


class PredictionStore:
    """Read (and, after :meth:`create_or_open`, write) one prediction store folder.

    Reading: ``PredictionStore(path).records()``, ``.mask(id)``, ``.probability(id)``, ``.fingerprint``,
    ``.predictions_hash()``. The analysis stage only reads; the inference stage writes through :meth:`write`.
    """

    def __init__(self, path: str | Path, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        meta_path = self.path / STORE_FILE
        if not meta_path.is_file():
            if (self.path / PARTS_DIR).is_dir():
                raise StoreError(
                    f"{self.path}: only unmerged shard parts here; run `vesselnb merge-predictions {self.path}` "
                    "once every shard has finished"
                )
            raise StoreError(
                f"{self.path}: no prediction store here ({STORE_FILE} missing); run the inference stage "
                "(notebook 02 or `vesselnb infer`) first"
            )
        self.meta: dict[str, Any] = _read_json(meta_path)
        if self.meta.get("format") != STORE_FORMAT:
            raise StoreError(
                f"{meta_path}: store format {self.meta.get('format')!r}, this vesselnb reads {STORE_FORMAT}; "
                "rerun inference into a new run folder"
            )
        pending = self.unmerged_parts()
        if pending:
            warnings.warn(
                f"{self.path}: {len(pending)} unmerged part(s) ({', '.join(p.name for p in pending)}); their samples "
                "are not visible yet. Run `vesselnb merge-predictions` on this folder.",
                stacklevel=2,
            )

    # --- creating / opening for writing -------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        model_dir: str | Path,
        prompt: str,
        mode: str,
        probability_maps: bool,
        model_config: str | None = None,
        durable: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> PredictionStore:
        """Open ``path`` for writing, creating it if needed; refuse if it holds another model's predictions.

        Identity = weights fingerprint, ``model_config`` (:func:`vesselnb.fingerprint.config_fingerprint`: config,
        tokenizer, remote code), prompt, mode and whether probability maps are stored: mixing any of these in one
        store would make its numbers meaningless, so a mismatch raises :class:`StoreError`.
        """
        folder = Path(path)
        wanted = {
            "format": STORE_FORMAT,
            "fingerprint": fingerprint,
            "model_config": model_config,
            "model_dir": str(model_dir),
            "prompt": prompt,
            "mode": mode,
            "created": now_iso(),
            "probability_maps": bool(probability_maps),
        }
        if extra:
            wanted.update(extra)
        meta_path = folder / STORE_FILE
        if meta_path.is_file():
            check_compatible(_read_json(meta_path), wanted, where=str(folder))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(meta_path, (json.dumps(wanted, indent=2) + "\n").encode(), durable=durable)
        for sub in (RECORDS_DIR, MASKS_DIR, PROBS_DIR):
            (folder / sub).mkdir(exist_ok=True)
        store = cls.__new__(cls)
        store.path = folder
        store.durable = durable
        store.meta = _read_json(meta_path)
        store._remove_stale_temporaries()
        return store

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a killed writer are harmless but clutter the folder; only this process's are removed
        blindly, others only when their pid is dead."""
        for sub in (RECORDS_DIR, MASKS_DIR, PROBS_DIR):
            for tmp in (self.path / sub).glob(".*.tmp"):
                pid = temp_owner_pid(tmp)
                if pid is not None and not _pid_alive(pid):
                    tmp.unlink(missing_ok=True)

    # --- identity -----------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Weights fingerprint of the model that wrote these predictions."""
        return str(self.meta.get("fingerprint"))

    @property
    def has_probability_maps(self) -> bool:
        """Whether probability maps were requested and the model could provide them."""
        return bool(self.meta.get("probability_maps"))

    # --- writing ------------------------------------------------------------------------------------------------
    def write(self, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None = None) -> None:
        """Store one finished sample: mask, then probability map, then the record (the commit point).

        ``mask`` is a 2-D boolean array at the frame's size; ``probability`` a 2-D uint8 array (sigmoid · 255).
        """
        mask, probability = self.check_sample(record, mask, probability)
        write_sample_files(self.path, record, mask, probability, self.durable)

    @staticmethod
    def check_sample(
        record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Refuse a malformed sample before anything is written; returns the mask as bool (and the map as given).

        Separate from the file writes so a background writer can refuse bad input in the caller, at once.
        """
        sample_id = str(record.get("sample_id"))
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing or record.get("status") not in STATUSES:
            status = record.get("status")
            raise StoreError(f"record for {sample_id!r} is malformed (missing {missing}, status {status!r})")
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or mask.shape != (record["height"], record["width"]):
            raise StoreError(f"{sample_id}: mask shape {mask.shape} does not match the record's frame size")
        if probability is not None:
            probability = np.asarray(probability)
            if probability.dtype != np.uint8 or probability.shape != mask.shape:
                raise StoreError(f"{sample_id}: probability map must be uint8 {mask.shape}, got "
                                 f"{probability.dtype} {probability.shape}")
        return mask, probability

    def mark_part_complete(self, n_samples: int) -> None:
        """Say that this part (a shard's store) has every sample of its shard, so the parts may be merged."""
        info = {"n_samples": n_samples, "finished": now_iso()}
        atomic_write_bytes(self.path / PART_COMPLETE_FILE, json.dumps(info).encode(), durable=self.durable)

    # --- reading ------------------------------------------------------------------------------------------------
    def _record_path(self, sample_id: str) -> Path:
        return self.path / RECORDS_DIR / f"{sample_id}.json"  # the layout write_sample_files writes

    def _mask_path(self, sample_id: str) -> Path:
        return self.path / MASKS_DIR / f"{sample_id}.png"

    def _prob_path(self, sample_id: str) -> Path:
        return self.path / PROBS_DIR / f"{sample_id}.png"

    def sample_ids(self) -> list[str]:
        """Ids of all stored samples, sorted (cheap: file names only)."""
        folder = self.path / RECORDS_DIR
        if not folder.is_dir():
            return []
        return sorted(entry.name[:-5] for entry in os.scandir(folder) if entry.name.endswith(".json")
                      and not entry.name.startswith("."))

    def __contains__(self, sample_id: object) -> bool:
        return isinstance(sample_id, str) and self._record_path(sample_id).is_file()

    def __len__(self) -> int:
        return len(self.sample_ids())

    def record(self, sample_id: str) -> dict[str, Any]:
        """One sample's record; :class:`StoreError` if it was never stored."""
        path = self._record_path(sample_id)
        if not path.is_file():
            raise StoreError(f"{self.path}: no prediction for sample {sample_id!r}; rerun inference to add it")
        return _read_json(path)

    def records(self) -> list[dict[str, Any]]:
        """All records, sorted by sample id."""
        return [self.record(sample_id) for sample_id in self.sample_ids()]

    def records_frame(self):  # -> pandas.DataFrame (pandas imported lazily: readers may not need it)
        """All records as a DataFrame with the contract's columns, one row per sample."""
        import pandas as pd

        return pd.DataFrame(self.records(), columns=list(RECORD_KEYS + OPTIONAL_RECORD_KEYS))

    def status_counts(self) -> dict[str, int]:
        """``{"ok": n, "no_seg": n, "error": n}`` over all stored samples."""
        counts = dict.fromkeys(STATUSES, 0)
        for rec in self.records():
            counts[rec["status"]] += 1
        return counts

    def mask(self, sample_id: str) -> np.ndarray:
        """The predicted mask as a 2-D bool array at the frame's size (all False for ``no_seg``/``error``).

        An ``error`` record for an image that could not be decoded at all has ``height == width == 0`` and a
        ``(0, 0)`` mask: there is no frame size to give it.
        """
        rec = self.record(sample_id)
        if not rec["height"] or not rec["width"]:
            return np.zeros((0, 0), dtype=bool)  # unreadable image (status "error"): its size is unknown
        path = self._mask_path(sample_id)
        if not path.is_file():
            raise StoreError(f"{path}: mask file missing for a stored record; delete {self._record_path(sample_id)} "
                             "and rerun inference to redo the sample")
        with Image.open(path) as image:
            return np.array(image.convert("1"), dtype=bool)

    def probability(self, sample_id: str) -> np.ndarray | None:
        """The probability map as uint8 (sigmoid · 255), or None when the model could not provide one."""
        rec = self.record(sample_id)
        path = self._prob_path(sample_id)
        if not rec.get("has_probability") or not path.is_file():
            return None
        with Image.open(path) as image:
            return np.array(image, dtype=np.uint8)

    def predictions_hash(self) -> str:
        """SHA-256 over sorted sample ids and their decoded mask bits: equal hashes = identical predictions.

        Hashes the decoded pixels (shape + packed bits), not PNG bytes, so a different PNG encoder cannot make two
        identical predictions look different.
        """
        digest = hashlib.sha256()
        for sample_id in self.sample_ids():
            mask = self.mask(sample_id)
            digest.update(f"{sample_id}\0{mask.shape[0]}x{mask.shape[1]}\0".encode())
            digest.update(np.packbits(mask).tobytes())
        return digest.hexdigest()

    def unmerged_parts(self) -> list[Path]:
        """Shard parts under ``parts/`` not yet merged into this store."""
        folder = self.path / PARTS_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and _PART_NAME.match(p.name))

    def __repr__(self) -> str:
        return f"PredictionStore({str(self.path)!r}, fingerprint={self.fingerprint!r}, samples={len(self)})"


def read_store_meta(path: str | Path) -> dict[str, Any] | None:
    """``store.json`` of the store at ``path``, or None when there is no store yet."""
    meta_path = Path(path) / STORE_FILE
    return _read_json(meta_path) if meta_path.is_file() else None


def check_compatible(existing: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Raise :class:`StoreError` if two store identities differ (see :data:`IDENTITY_KEYS`)."""
    for key in IDENTITY_KEYS:
        if key in _LATER_IDENTITY_KEYS and existing.get(key) is None:
            continue
        if existing.get(key) != wanted.get(key):
            raise StoreError(
                f"{where}: this prediction store was written with {key}={existing.get(key)!r}, but this run has "
                f"{key}={wanted.get(key)!r}. Refusing to mix predictions; use another run folder, or delete "
                f"{where} to start over."
            )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers cannot be in flight: we are not writing while cleaning
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class MergeReport:
    """What :func:`merge_parts` did."""

    store: Path
    parts: list[str] = field(default_factory=list)
    copied: int = 0
    already_present: int = 0
    incomplete_parts: list[str] = field(default_factory=list)


def merge_parts(predictions_dir: str | Path, *, require_complete: bool = True, durable: bool = False) -> MergeReport:
    """Copy every shard part under ``predictions_dir/parts/`` into the store at ``predictions_dir``, then remove it.

    Idempotent and safe to interrupt: files are copied atomically (mask before record) and a part is deleted only
    after all its samples are in the main store, so rerunning finishes the job. Refuses parts of another model
    (fingerprint/prompt/mode) and a sample stored twice with different masks. With ``require_complete``, parts
    whose shard has not finished are left alone and reported.
    """
    root = Path(predictions_dir)
    if not root.is_dir():
        raise StoreError(f"{root}: folder not found; pass the run's predictions folder (outputs/<run>/predictions)")
    with _merge_lock(root):
        return _merge_parts_locked(root, require_complete, durable)


def _merge_parts_locked(root: Path, require_complete: bool, durable: bool) -> MergeReport:
    parts_root = root / PARTS_DIR
    parts = sorted(p for p in parts_root.iterdir() if p.is_dir() and _PART_NAME.match(p.name)) \
        if parts_root.is_dir() else []
    report = MergeReport(store=root)
    if not parts and not (root / STORE_FILE).is_file():
        raise StoreError(f"{root}: neither a prediction store nor shard parts here; run `vesselnb infer` first")
    metas = {part: _read_json(part / STORE_FILE) for part in parts if (part / STORE_FILE).is_file()}
    counts = {_PART_NAME.match(p.name).group(2) for p in parts}  # type: ignore[union-attr]
    if len(counts) > 1:
        raise StoreError(f"{parts_root}: parts of different shard counts ({sorted(counts)}); "
                         "delete the parts of the old split and rerun those shards")
    main_meta = _read_json(root / STORE_FILE) if (root / STORE_FILE).is_file() else None
    for part, meta in metas.items():
        check_compatible(main_meta or meta, meta, where=str(part))
        main_meta = main_meta or meta
    if main_meta is None:
        return report
    main = PredictionStore.create_or_open(
        root, fingerprint=main_meta["fingerprint"], model_dir=main_meta.get("model_dir", ""),
        prompt=main_meta["prompt"], mode=main_meta["mode"], probability_maps=main_meta["probability_maps"],
        model_config=main_meta.get("model_config"), durable=durable,
        extra={k: v for k, v in main_meta.items() if k not in _STANDARD_META},
    )
    for part in metas:
        if require_complete and not (part / PART_COMPLETE_FILE).is_file():
            report.incomplete_parts.append(part.name)
            continue
        source = open_quietly(part)
        for sample_id in source.sample_ids():
            rec = source.record(sample_id)
            if sample_id in main:
                if not np.array_equal(main.mask(sample_id), source.mask(sample_id)):
                    raise StoreError(
                        f"{part}: sample {sample_id!r} is already in {root} with a different mask; the two runs "
                        "disagree. Delete one of them and rerun that shard."
                    )
                report.already_present += 1
                continue
            _copy_sample(source, main, sample_id, rec)
            report.copied += 1
        report.parts.append(part.name)
        shutil.rmtree(part)
    if parts_root.is_dir() and not any(parts_root.iterdir()):
        parts_root.rmdir()
    return report


def all_parts_complete(predictions_dir: str | Path, n_shards: int) -> bool:
    """True when every shard ``0..n-1`` of an ``n``-way split has a finished part waiting to be merged.

    A shard that has not started yet has no part folder, so it counts as unfinished: merging early would show a
    half-finished run as complete.
    """
    parts_root = Path(predictions_dir) / PARTS_DIR
    return all((parts_root / part_name((k, n_shards)) / PART_COMPLETE_FILE).is_file() for k in range(n_shards))


@contextlib.contextmanager
def _merge_lock(root: Path) -> Iterator[None]:
    """One merger at a time (several shard processes may finish together); a dead holder's lock is taken over."""
    lock = root / MERGE_LOCK_FILE
    for _attempt in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and _pid_alive(holder):
                raise StoreError(
                    f"{root}: process {holder} is merging shard parts right now; wait for it, or delete {lock} "
                    "if that process is not vesselnb"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise StoreError(f"{lock}: could not take the merge lock; delete it and rerun `vesselnb merge-predictions`")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def open_quietly(path: Path) -> PredictionStore:
    """Open a store for reading without the unmerged-parts warning (for code that handles the parts itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PredictionStore(path)


def _copy_sample(source: PredictionStore, target: PredictionStore, sample_id: str, rec: dict[str, Any]) -> None:
    """Copy one sample's files atomically, record last, so an interrupted merge never shows half a sample."""
    prob_src = source._prob_path(sample_id)
    if rec.get("has_probability") and prob_src.is_file():
        atomic_write_bytes(target._prob_path(sample_id), prob_src.read_bytes(), durable=target.durable)
    mask_src = source._mask_path(sample_id)
    if mask_src.is_file():
        atomic_write_bytes(target._mask_path(sample_id), mask_src.read_bytes(), durable=target.durable)
    record = source._record_path(sample_id).read_bytes()
    atomic_write_bytes(target._record_path(sample_id), record, durable=target.durable)
