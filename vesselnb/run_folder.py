"""The run folder ``outputs/<run>/``: its layout, its files and the questions asked of it, in one place.

Why one owner: the folder's contract (docs/contracts.md) used to be implemented by every stage that touched it, and
each reader decided for itself which file to trust for the weights fingerprint, which HF folder a run used, how to
read a JSON file and what a timestamp looks like. Here every layout name is spelled once, every JSON file is written
atomically by one helper and read by one function with one error, and each question (fingerprint, HF folder,
iteration, params, neighbouring runs) has one rule. Modelled on papermill's ``iorw`` owning all notebook I/O.

Stage outcomes go into ``manifest.json`` through :meth:`RunFolder.begin_stage` / :meth:`RunFolder.end_stage`: the
two points where a run-folder lock (or an "interrupted" state) hooks in. The manifest holds outcomes and provenance
(versions, git, host) plus the stage files' headline fields copied at the end of each stage; the index trusts that
copy.

The prediction store's own folder layout (``records/``, ``masks/``...) is spelled here too, and ``vesselnb.store``
imports it: this module imports nothing heavier than ``vesselnb.params`` so any module can use it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vesselnb.errors import VesselnbError
from vesselnb.fingerprint import weights_fingerprint
from vesselnb.locks import FolderLock, Mode, process_alive
from vesselnb.params import RunParams
from vesselnb.stages import RUN_STAGES, Stage, StageOutcome, now_iso

__all__ = ["RunFolder", "Fingerprint", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json", "now_iso",
           "output_folders", "comparison_folder_name", "package_versions", "git_revision", "overall_status"]

# --- layout: every name of outputs/<run>/ -------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CONVERSION_FILE = "conversion.json"
COMPARISON_FILE = "comparison.json"
HF_DIR = "hf_model"
PREDICTIONS_DIR = "predictions"
ANALYSIS_DIR = "analysis"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
SWEEP_FILE = "threshold_sweep.parquet"  # per-frame TP/FP/FN at each threshold (stage 03, read by 04)
FIGURES_DIR = "figures"
INDEX_FILE = "index.html"  # in outputs/, beside the run folders
COMPARE_PREFIX = "compare_"  # comparison folders; never a run name
PRIVATE_PREFIXES = ("_", ".")  # demo assets and other folders in outputs/ that are never runs
# Inside predictions/ (the prediction store, vesselnb.store).
STORE_FILE = "store.json"
RECORDS_DIR = "records"
MASKS_DIR = "masks"
PROBS_DIR = "probs"
PARTS_DIR = "parts"
PART_COMPLETE_FILE = "part_complete.json"
MERGE_LOCK_FILE = ".merge.lock"

# Packages whose versions decide what a run computed; looked up without importing them (torch takes seconds).
_VERSIONED = ("vesselnb", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy", "scipy",
              "scikit-image", "monai", "pandas", "matplotlib", "papermill", "nbconvert", "ipykernel")
_ITER_PATTERN = re.compile(r"iter_(\d+)")
_RUN_LOCK_HINT = ("wait for it to finish, or stop it with Ctrl-C / kill -INT <pid> (it saves its report; a rerun "
                  "resumes); to run the same checkpoint twice at once, give the copy another run_name")
_STORE_LOCK_HINT = ("wait for it to finish, or stop it with Ctrl-C / kill -INT <pid> (a rerun resumes); for several "
                    "GPUs use --shard k/n or accelerate launch")


# --- atomic writes, JSON (the time format is stages.now_iso, re-exported here) ---------------------------------

def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``path`` so readers see the old file or the whole new one, never a part (temp file + ``os.replace``).

    ``durable`` also flushes the file to disk before the rename (power-loss safety; crash safety needs no flush).
    The prediction store passes ``durable=False`` for its thousands of per-sample files. The temporary name
    ``.<name>.<pid>-<thread>.tmp`` is unique per writer, so two threads never share one. The folder must exist (a
    store whose folders vanished must fail, not be recreated half-empty); the text and JSON writers create it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a full disk fails in write/close, whose errors name no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temp_owner_pid(tmp: Path) -> int | None:
    """The pid in a temporary name written by :func:`atomic_write_bytes` (None for other names)."""
    parts = tmp.name.rsplit(".", 2)
    owner = parts[-2].split("-", 1)[0] if len(parts) == 3 else ""
    return int(owner) if owner.isdigit() else None


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text (HTML reports, the index), creating the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | Path, data: Any, *, durable: bool = True, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON atomically (non-JSON values such as paths are written as strings)."""
    text = json.dumps(data, indent=indent, default=str, sort_keys=False) + "\n"
    return atomic_write_text(path, text, durable=durable)


def read_json(path: str | Path, *, error: type[VesselnbError] = VesselnbError,
              fix: str = "rerun the stage that writes it") -> Any:
    """The parsed JSON file; a missing or unreadable file raises ``error`` naming the file and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found; {fix}") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read this JSON file ({exc}); {fix}") from None


# --- provenance -----------------------------------------------------------------------------------------------------

def package_versions(names: Iterable[str] = _VERSIONED) -> dict[str, str | None]:
    """Installed versions (None when absent), plus Python's; without importing the packages."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(folder: Path | None = None) -> dict[str, Any] | None:
    """``{"revision", "dirty"}`` of the vesselnb checkout, or None outside a git checkout (an installed wheel)."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": revision, "dirty": bool(status.strip())}


def overall_status(stages: Iterable[dict[str, Any]]) -> str:
    """A folder's status from its stage entries: failed > interrupted > running > ok (all ok) > incomplete."""
    statuses = [s.get("status") for s in stages]
    if "failed" in statuses:
        return "failed"
    if "interrupted" in statuses:
        return "interrupted"
    if "running" in statuses:
        return "running"
    return "ok" if statuses and all(s == "ok" for s in statuses) else "incomplete"


@dataclass(frozen=True)
class Fingerprint:
    """A weights fingerprint and where it came from (for notes such as "computed from <folder>")."""

    value: str | None
    source: str


# --- the run folder ---------------------------------------------------------------------------------------------

class RunFolder:
    """``outputs/<run>/`` (or a comparison folder ``outputs/compare_.../``): paths, reads, writes and answers.

    Reads return None when the stage that writes the file has not run yet, and raise :class:`VesselnbError`
    naming the file when it exists but cannot be read. Writes are atomic.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._run_lock: FolderLock | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_comparison(self) -> bool:
        return self.name.startswith(COMPARE_PREFIX)

    def create(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # --- paths ------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def conversion_path(self) -> Path:
        return self.path / CONVERSION_FILE

    @property
    def comparison_path(self) -> Path:
        return self.path / COMPARISON_FILE

    @property
    def default_hf_dir(self) -> Path:
        """Where stage 01 writes the HF folder unless the params name another (see :meth:`hf_dir`)."""
        return self.path / HF_DIR

    @property
    def predictions_dir(self) -> Path:
        """The prediction store (``vesselnb.store.PredictionStore(folder.predictions_dir)``)."""
        return self.path / PREDICTIONS_DIR

    @property
    def store_meta_path(self) -> Path:
        return self.predictions_dir / STORE_FILE

    @property
    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS_DIR

    @property
    def metrics_path(self) -> Path:
        return self.analysis_dir / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.analysis_dir / SUMMARY_FILE

    @property
    def sweep_path(self) -> Path:
        return self.analysis_dir / SWEEP_FILE

    @property
    def figures_dir(self) -> Path:
        """Stage 03's figures (``analysis/figures``); a comparison folder's are ``figures/`` (:attr:`path`)."""
        return (self.path if self.is_comparison else self.analysis_dir) / FIGURES_DIR

    def notebook_path(self, stage: Stage) -> Path:
        """The executed notebook of ``stage`` (``01_convert.ipynb``)."""
        return self.path / f"{stage.stem}.ipynb"

    def html_path(self, stage: Stage) -> Path:
        """The HTML report of ``stage`` (``01_convert.html``)."""
        return self.path / f"{stage.stem}.html"

    # --- reading the stages' files ----------------------------------------------------------------------------
    def _optional(self, path: Path) -> Any:
        return read_json(path) if path.is_file() else None

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, with any stage left ``running`` by a process that is gone (``kill -9``) as ``interrupted``."""
        return _settle_dead_stages(_mapping(self._optional(self.manifest_path), self.manifest_path))

    def conversion(self) -> dict[str, Any] | None:
        return _mapping(self._optional(self.conversion_path), self.conversion_path)

    def store_meta(self) -> dict[str, Any] | None:
        return _mapping(self._optional(self.store_meta_path), self.store_meta_path)

    def summary(self) -> dict[str, Any] | None:
        return _mapping(self._optional(self.summary_path), self.summary_path)

    def comparison(self) -> dict[str, Any] | None:
        return _mapping(self._optional(self.comparison_path), self.comparison_path)

    def n_records(self) -> int:
        """Samples stored so far (record files; the store's commit point)."""
        records = self.predictions_dir / RECORDS_DIR
        return sum(1 for p in records.glob("*.json")) if records.is_dir() else 0

    # --- writing ----------------------------------------------------------------------------------------------
    def write_conversion(self, data: dict[str, Any]) -> Path:
        return write_json(self.conversion_path, data)

    def write_summary(self, data: dict[str, Any]) -> Path:
        return write_json(self.summary_path, data)

    def write_comparison(self, data: dict[str, Any]) -> Path:
        return write_json(self.comparison_path, data)

    # --- answers ----------------------------------------------------------------------------------------------
    def params(self) -> RunParams | None:
        """The params the run was made with, as recorded in the manifest (None before the first stage)."""
        manifest = self.manifest() or {}
        raw = manifest.get("params")
        return RunParams.from_dict(raw) if isinstance(raw, dict) else None

    def hf_dir(self, params: RunParams | None = None) -> Path:
        """The HF folder this run reads: ``hf_model`` (given), else ``checkpoint.hf_output``, else ``hf_model/``.

        Without ``params`` the manifest's are used; a folder without a manifest falls back to where conversion
        wrote (``conversion.json`` ``output_dir``) or what the store recorded (``model_dir``).
        """
        params = params or self.params()
        if params is not None:
            if params.hf_model is not None:
                return Path(params.hf_model)
            if params.checkpoint.hf_output is not None:
                return Path(params.checkpoint.hf_output)
            return self.default_hf_dir
        for recorded in ((self.conversion() or {}).get("output_dir"), (self.store_meta() or {}).get("model_dir")):
            if recorded and (Path(recorded) / "config.json").is_file():
                return Path(recorded)
        return self.default_hf_dir

    def fingerprint(self, params: RunParams | None = None, *, compute: bool = True) -> Fingerprint:
        """The weights fingerprint of this run and where it came from: the one rule.

        1. computed from the run's HF folder when it exists: the folder is the truth (free for a folder vesselnb
           wrote, whose index records its shard hashes; hashed once and cached for other folders); an unfinished
           folder raises :class:`VesselnbError` rather than falling back to a record of other weights;
        2. else ``conversion.json``'s, when it names this HF folder (or none);
        3. else ``predictions/store.json``'s: the weights the predictions were made with (the folder may be gone).

        ``compute=False`` skips step 1 where hashing a foreign folder is not wanted (the report header, the
        manifest's copy); the answer is then what the stages recorded.
        """
        hf_dir = self.hf_dir(params)
        if compute and hf_dir.is_dir():
            return Fingerprint(weights_fingerprint(hf_dir), f"computed from {hf_dir}")
        conversion = self.conversion() or {}
        recorded_dir = conversion.get("output_dir")
        if conversion.get("fingerprint") and (not recorded_dir or _same_path(recorded_dir, hf_dir)):
            return Fingerprint(str(conversion["fingerprint"]), CONVERSION_FILE)
        stored = (self.store_meta() or {}).get("fingerprint")
        if stored:
            return Fingerprint(str(stored), f"{PREDICTIONS_DIR}/{STORE_FILE}")
        return Fingerprint(None, "unknown (no record, HF folder not found)")

    def weights_fingerprint(self, params: RunParams | None = None, *, compute: bool = True) -> str | None:
        """:meth:`fingerprint`'s value."""
        return self.fingerprint(params, compute=compute).value

    def checkpoint_path(self, params: RunParams | None = None) -> str | None:
        """The training checkpoint the run converted (recorded by stage 01, else the params')."""
        params = params or self.params()
        source = (self.conversion() or {}).get("source") or {}
        if source.get("path"):
            return str(source["path"])
        if params is not None and params.checkpoint.path is not None:
            return str(params.checkpoint.path)
        return None

    def iteration(self, params: RunParams | None = None) -> int | None:
        """Training iteration: params ``iteration``, else ``iter_N`` in the checkpoint path, ``hf_model`` or name."""
        params = params or self.params()
        if params is not None and params.iteration is not None:
            return int(params.iteration)
        hf_model = params.hf_model if params is not None else None
        for text in (self.checkpoint_path(params), hf_model, self.name):
            match = _ITER_PATTERN.search(str(text or ""))
            if match:
                return int(match.group(1))
        return None

    def neighbours(self, extra: Sequence[str | Path] = ()) -> list[RunFolder]:
        """The other run folders beside this one (same ``outputs/``), plus ``extra`` folders; sorted, no duplicates.

        Comparison folders and private folders (``_...``, ``.``) are not runs and are left out.
        """
        me = self.path.resolve()
        candidates = {Path(p).resolve() for p in extra}
        parent = me.parent
        if parent.is_dir():
            candidates |= {p.resolve() for p in parent.iterdir() if p.is_dir() and _is_run_name(p.name)}
        return [RunFolder(p) for p in sorted(candidates) if p != me and p.is_dir()]

    # --- the manifest -----------------------------------------------------------------------------------------
    def stage_files(self) -> dict[str, Any]:
        """The manifest fields copied from the stages' own files (conversion.json, store.json, summary.json)."""
        gathered: dict[str, Any] = {}
        conversion = self.conversion()
        store = self.store_meta()
        summary = self.summary()
        fingerprint = self.fingerprint(compute=False).value
        if fingerprint:
            gathered["weights_fingerprint"] = fingerprint
        if conversion is not None:
            gathered["source_checkpoint"] = conversion.get("source")
            gathered["conversion"] = {k: conversion.get(k) for k in ("dtype", "output_dir", "output_bytes", "coverage")}
            gathered["conversion"]["n_warnings"] = len(conversion.get("warnings") or [])
        if store is not None:
            gathered["predictions"] = {**store, "n_records": self.n_records()}
        if summary is not None:
            gathered["summary"] = summary
            gathered["headline"] = summary.get("headline")
        return gathered

    def write_manifest(self, params: RunParams, outcomes: Iterable[StageOutcome | dict[str, Any]] = ()) -> dict:
        """Merge stage outcomes into ``manifest.json`` with provenance and the stage files' fields; write it.

        Stages not in ``outcomes`` keep their earlier entry, so ``--stages analyze`` does not forget the conversion.
        """
        old = self.manifest() if self.manifest_path.is_file() else None
        old = old or {}
        stages = {s.key: {"key": s.key, "notebook": s.notebook, "status": "not_run"} for s in RUN_STAGES}
        stages.update(old.get("stages") or {})
        for outcome in outcomes:
            entry = outcome.to_dict() if isinstance(outcome, StageOutcome) else dict(outcome)
            stages[entry["key"]] = entry
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": "run",
            "run_name": params.run_name,
            "description": params.description,
            "iteration": self.iteration(params),
            "params_file": str(params.source_file) if params.source_file else None,
            "params": params.to_dict(),
            "run_dir": str(self.path),
            "created": old.get("created") or now_iso(),
            "updated": now_iso(),
            "status": overall_status(stages.values()),
            "stages": stages,
            "versions": package_versions(),
            "git": git_revision(),
            "host": {"platform": platform.platform(), "python": sys.executable},
            **self.stage_files(),
        }
        manifest["last_good"] = _last_good(manifest, old.get("last_good"))
        write_json(self.manifest_path, manifest)
        return manifest

    # --- locks: one writer per folder (vesselnb.locks) ------------------------------------------------------------
    def lock(self, mode: Mode = "exclusive") -> FolderLock:
        """The run folder's lock: exclusive for ``vesselnb run``, shared by the shards of ``vesselnb infer``."""
        return FolderLock(self.path, mode, what="run folder", hint=_RUN_LOCK_HINT)

    def store_locks(self, shard: tuple[int, int] | None = None) -> list[FolderLock]:
        """Locks a writer of the prediction store takes, in order: the store, then (sharded) its own part.

        Shards of one ``infer`` each write ``parts/<k>-of-<n>/``, so they share the store and exclude each other only
        on the same part; an unsharded writer excludes every other writer of the store.
        """
        store = FolderLock(self.predictions_dir, "exclusive" if shard is None else "shared",
                           what="prediction store", hint=_STORE_LOCK_HINT)
        if shard is None:
            return [store]
        part = self.predictions_dir / PARTS_DIR / f"{shard[0]}-of-{shard[1]}"
        return [store, FolderLock(part, "exclusive", what=f"shard {shard[0]}/{shard[1]}", hint=_STORE_LOCK_HINT)]

    def begin_run(self, params: RunParams, stages: Sequence[Stage]) -> dict[str, StageOutcome]:
        """Lock the folder (refused at once, naming the holder, if another process writes it), record the stages
        about to run as ``pending``; returns their outcomes. :meth:`end_run` releases the lock."""
        self.create()
        if self._run_lock is None or not self._run_lock.held:
            self._run_lock = self.lock().acquire()
            for note in self._run_lock.notes:
                print(f"vesselnb: note: {note}", file=sys.stderr, flush=True)
        outcomes = {s.key: StageOutcome(s.key, s.notebook, status="pending") for s in stages}
        self.write_manifest(params, outcomes.values())
        return outcomes

    def end_run(self) -> None:
        """Release the lock :meth:`begin_run` took (the OS releases it anyway if the process dies)."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    def begin_stage(self, params: RunParams, outcome: StageOutcome) -> StageOutcome:
        """A stage starts: mark it ``running`` with this process's pid and host (a killed run still says where it
        stopped, and a reader can tell that its process is gone)."""
        outcome.status, outcome.started = "running", now_iso()
        outcome.pid, outcome.host = os.getpid(), socket.gethostname()
        self.write_manifest(params, [outcome])
        return outcome

    def end_stage(self, params: RunParams, outcome: StageOutcome) -> StageOutcome:
        """A stage ended (ok, failed, skipped, interrupted): record it with the stage files. Lock hook: release."""
        self.write_manifest(params, [outcome])
        return outcome

    def write_compare_manifest(self, run_dirs: Sequence[Path], outcome: StageOutcome) -> dict[str, Any]:
        """``manifest.json`` of a comparison folder: which runs, the stage outcome, provenance."""
        old = (self.manifest() if self.manifest_path.is_file() else None) or {}
        entry = outcome.to_dict()
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": "comparison",
            "name": self.name,
            "runs": [Path(d).name for d in run_dirs],
            "run_dirs": [str(d) for d in run_dirs],
            "created": old.get("created") or now_iso(),
            "updated": now_iso(),
            "status": overall_status([entry]),
            "stages": {outcome.key: entry},
            "versions": package_versions(),
            "git": git_revision(),
        }
        write_json(self.manifest_path, manifest)
        return manifest


def output_folders(outputs_dir: str | Path) -> tuple[list[RunFolder], list[RunFolder]]:
    """``(runs, comparisons)`` in ``outputs_dir``: folders holding a manifest, private folders left out."""
    runs, comparisons = [], []
    for manifest_path in sorted(Path(outputs_dir).glob(f"*/{MANIFEST_FILE}")):
        name = manifest_path.parent.name
        if name.startswith(PRIVATE_PREFIXES):
            continue
        (comparisons if name.startswith(COMPARE_PREFIX) else runs).append(RunFolder(manifest_path.parent))
    return runs, comparisons


def comparison_folder_name(run_names: Sequence[str]) -> str:
    """``compare_<a>_vs_<b>[...]``: the folder of a comparison of these runs."""
    return COMPARE_PREFIX + "_vs_".join(run_names)


def _is_run_name(name: str) -> bool:
    return not name.startswith(PRIVATE_PREFIXES) and not name.startswith(COMPARE_PREFIX)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _mapping(value: Any, path: Path) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise VesselnbError(f"{path}: expected a JSON object, found {type(value).__name__}; rerun the stage that writes it")


def _settle_dead_stages(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stage ``running`` whose recorded process is gone on this host was killed (``kill -9``, OOM, power): say so.

    On disk it stays as written until the next run rewrites the manifest; every reader sees it settled.
    """
    if not manifest or not isinstance(manifest.get("stages"), dict):
        return manifest
    changed = False
    for entry in manifest["stages"].values():
        if not isinstance(entry, dict) or entry.get("status") != "running" or not entry.get("pid"):
            continue
        if process_alive(int(entry["pid"]), entry.get("host")) is False:
            entry["status"] = "interrupted"
            entry["error"] = {"ename": "Interrupted",
                              "evalue": f"its process (pid {entry['pid']} on {entry.get('host')}) ended without "
                                        "finishing it (killed?); run again to resume"}
            changed = True
    if changed:
        manifest["status"] = overall_status(manifest["stages"].values())
    return manifest


def _last_good(manifest: dict[str, Any], previous: Any) -> dict[str, Any] | None:
    """What the run showed when every stage last succeeded: the index shows it as "last good", never as current."""
    if manifest.get("status") != "ok":
        return previous if isinstance(previous, dict) else None
    params = manifest.get("params") or {}
    checkpoint = (manifest.get("source_checkpoint") or {}).get("path") \
        or (params.get("checkpoint") or {}).get("path") or params.get("hf_model")
    return {"at": manifest.get("updated"), "headline": manifest.get("headline"), "checkpoint": checkpoint,
            "weights_fingerprint": manifest.get("weights_fingerprint")}
