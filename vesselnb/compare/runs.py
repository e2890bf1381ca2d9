"""Reading the run folders a comparison needs, and deciding whether they *can* be compared.

Identity comes first (users twice compared "two" checkpoints that were the same weights): weight fingerprints, the
per-component weight delta (the converter's :func:`vesselnb.convert.diff_weights`) and the prediction hashes. Then
comparability: runs scored on other annotations, at another threshold, with another prompt, polygon fill, frame set
or image preprocessing, or sharing too few frames, give differences that say nothing about the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vesselnb.errors import StageError, StoreError, VesselnbError
from vesselnb.params import AnalysisParams, RunParams
from vesselnb.run_folder import RunFolder
from vesselnb.store import PredictionStore

# Largest relative change over all components below this: the checkpoints are practically the same weights.
# bf16 keeps ~3 significant digits, so real training steps move weights by far more than 1e-4.
NEAR_ZERO_REL_CHANGE = 1e-4
IDENTITY_KEYS = ("identical_weights", "identical_predictions", "near_zero_weight_delta")
REQUIRED_COLUMNS = ("sample_id", "patient", "sequence", "status", "has_gt", "image", "dice")
# What stage 03 records in summary.json "scoring"; a difference in any of these makes the comparison meaningless.
SCORING_KEYS = {
    "annotations_hash": "annotations (content hash)",
    "threshold": "threshold",
    "prompt": "prompt",
    "polygon_fill": "polygon fill",
    "annotation_format": "annotation format",
}
PREPROCESSING_KEYS = {"mode": "inference mode", "images_hash": "frames on disk (names and sizes)",
                      "image_processor_hash": "image-processor settings"}


@dataclass
class RunInputs:
    """What the comparison needs from one run folder, read once (through :class:`RunFolder`)."""

    label: str  # unique within one comparison (a run compared with itself gets "name#2")
    name: str  # the run's own name (params run_name, else summary run_name, else folder name)
    folder: RunFolder
    params: RunParams | None  # as recorded in the manifest (None for a folder without one)
    manifest: dict[str, Any]
    summary: dict[str, Any]
    metrics: pd.DataFrame
    sweep: pd.DataFrame | None  # analysis/threshold_sweep.parquet: per-frame TP/FP/FN per threshold
    hf_dir: Path | None
    fingerprint: str | None
    fingerprint_source: str
    iteration: int | None
    checkpoint: str | None
    predictions_hash: str | None
    store: PredictionStore

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def analysis_params(self) -> AnalysisParams:
        return self.params.analysis if self.params is not None else AnalysisParams()

    @property
    def scoring(self) -> dict[str, Any]:
        return self.summary.get("scoring") or {}

    @property
    def scored(self) -> pd.DataFrame:
        return self.metrics[self.metrics["has_gt"].astype(bool)]


def _run_command_hint(run_dir: Path, manifest: dict[str, Any]) -> str:
    source = manifest.get("params_file") or (manifest.get("params") or {}).get("source_file")
    return f"run `vesselnb run {source or f'params/{run_dir.name}.yaml'}` first"


def load_run(run_dir: str | Path, label: str | None = None) -> RunInputs:
    """Read one run folder's manifest, summary, metrics table, threshold sweep and prediction store.

    The metrics table, summary and store are required (errors name the missing file and the command that writes
    it); the manifest is optional (then the HF folder and fingerprint come from what the stages recorded).
    """
    folder = RunFolder(Path(run_dir).resolve())
    if not folder.path.is_dir():
        raise VesselnbError(f"{folder.path}: run folder not found; run `vesselnb run params/<run>.yaml` to create it")
    manifest = folder.manifest() or {}
    hint = _run_command_hint(folder.path, manifest)
    for needed in (folder.metrics_path, folder.summary_path):
        if not needed.is_file():
            raise StageError(f"{needed}: missing; the error-analysis stage (03) writes it — {hint}")
    if not folder.store_meta_path.is_file():
        raise StoreError(f"{folder.predictions_dir}: no prediction store; the inference stage (02) writes it — {hint}")
    summary = folder.summary() or {}
    try:
        metrics = pd.read_parquet(folder.metrics_path)
        sweep = pd.read_parquet(folder.sweep_path) if folder.sweep_path.is_file() else None
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise StageError(f"{folder.analysis_dir}: cannot read a table ({exc}); rerun stage 03 — {hint}") from None
    missing = set(REQUIRED_COLUMNS) - set(metrics.columns)
    if missing:
        raise StageError(f"{folder.metrics_path}: columns {sorted(missing)} missing; rerun stage 03 — {hint}")
    store = PredictionStore(folder.predictions_dir)
    params = folder.params()
    name = str((params.run_name if params else "") or summary.get("run_name") or folder.name)
    hf_dir = folder.hf_dir(params)
    fingerprint = folder.fingerprint(params)
    return RunInputs(
        label=label or name,
        name=name,
        folder=folder,
        params=params,
        manifest=manifest,
        summary=summary,
        metrics=metrics.drop_duplicates("sample_id", keep="last").set_index("sample_id", drop=False),
        sweep=sweep,
        hf_dir=hf_dir if (hf_dir / "config.json").is_file() else None,
        fingerprint=fingerprint.value,
        fingerprint_source=fingerprint.source,
        iteration=folder.iteration(params),
        checkpoint=folder.checkpoint_path(params),
        predictions_hash=summary.get("predictions_hash") or store.predictions_hash(),
        store=store,
    )


def unique_labels(names: list[str]) -> list[str]:
    """Run names made unique within one comparison (``name``, ``name#2``...)."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


# --- comparability ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why two runs cannot be compared as they are (shown in the red banner; the stage then exits non-zero)."""

    a: str
    b: str
    code: str  # "no_shared_frames" | "few_shared_frames" | "scored_differently" | "not_recorded"
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"a": self.a, "b": self.b, "code": self.code, "message": self.message}


def comparability(run_a: RunInputs, run_b: RunInputs, min_shared_fraction: float) -> list[Problem]:
    """Problems that make Δ between these two runs meaningless: too few shared scored frames, or other scoring."""
    problems: list[Problem] = []
    scored_a, scored_b = set(run_a.scored["sample_id"]), set(run_b.scored["sample_id"])
    shared = len(scored_a & scored_b)
    larger = max(len(scored_a), len(scored_b))
    a, b = run_a.label, run_b.label
    if shared == 0:
        problems.append(Problem(a, b, "no_shared_frames",
                                f"{a} and {b} share no scored frame ({len(scored_a)} and {len(scored_b)} scored): "
                                "check that both ran on the same images and annotations"))
    elif shared < min_shared_fraction * larger:
        problems.append(Problem(a, b, "few_shared_frames",
                                f"{a} and {b} share {shared} scored frames, {shared / larger:.0%} of the larger run's "
                                f"{larger} (minimum {min_shared_fraction:.0%}, analysis.min_shared_fraction): the "
                                "comparison covers only part of the data"))
    if not run_a.scoring or not run_b.scoring:
        missing = a if not run_a.scoring else b
        problems.append(Problem(a, b, "not_recorded",
                                f"{missing}: summary.json records no scoring settings (an older stage 03); rerun stage "
                                "03 so the comparison can check that both runs were scored alike"))
        return problems
    differences = []
    for key, label in SCORING_KEYS.items():
        value_a, value_b = run_a.scoring.get(key), run_b.scoring.get(key)
        if value_a != value_b:
            differences.append(f"{label}: {_short(value_a)} vs {_short(value_b)}")
    pre_a, pre_b = run_a.scoring.get("preprocessing") or {}, run_b.scoring.get("preprocessing") or {}
    same_frames = run_a.scoring.get("frames_hash") == run_b.scoring.get("frames_hash")
    for key, label in PREPROCESSING_KEYS.items():
        if key == "images_hash" and not same_frames:
            continue  # a hash over other frame sets says nothing: the shared frames' files are compared below
        if pre_a.get(key) != pre_b.get(key):
            differences.append(f"{label}: {_short(pre_a.get(key))} vs {_short(pre_b.get(key))}")
    if not same_frames and (changed := _changed_images(run_a, run_b, scored_a & scored_b)):
        differences.append(f"frames on disk: {len(changed)} shared frames read from other files, e.g. {changed[0]}")
    if run_a.scoring.get("frames_hash") != run_b.scoring.get("frames_hash"):
        differences.append(f"frame set: {run_a.scoring.get('n_frames')} vs {run_b.scoring.get('n_frames')} scored "
                           f"frames, {shared} shared (only those are compared)")
    hard = [d for d in differences if not d.startswith("frame set")]
    if hard:
        problems.append(Problem(a, b, "scored_differently",
                                f"{a} and {b} were scored differently — " + "; ".join(differences)))
    return problems


def _changed_images(run_a: RunInputs, run_b: RunInputs, shared: set[str]) -> list[str]:
    """Shared frames whose image files differ (other path and other size, or one of them unreadable)."""
    changed = []
    for sample_id in sorted(shared):
        path_a, path_b = str(run_a.metrics.at[sample_id, "image"]), str(run_b.metrics.at[sample_id, "image"])
        if path_a == path_b:
            continue
        try:
            if Path(path_a).stat().st_size == Path(path_b).stat().st_size:
                continue
        except OSError:
            pass
        changed.append(sample_id)
    return changed


def frame_set_note(run_a: RunInputs, run_b: RunInputs) -> str:
    """A line when the scored frame sets differ (the comparison uses the shared frames only)."""
    if run_a.scoring.get("frames_hash") == run_b.scoring.get("frames_hash"):
        return ""
    return (f"{run_a.label} scored {run_a.scoring.get('n_frames')} frames and {run_b.label} "
            f"{run_b.scoring.get('n_frames')}: only the shared ones are compared")


def _short(value: Any, limit: int = 48) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- identity -----------------------------------------------------------------------------------------------------


def weight_delta(run_a: RunInputs, run_b: RunInputs) -> tuple[pd.DataFrame | None, bool | None, str]:
    """Per-component weight delta from the converter's :func:`diff_weights`; (table, identical, note).

    The table has the diff's per-component columns (``n_tensors``, ``n_identical``, ``max_abs``, ``rel_norm`` =
    ‖B − A‖ / ‖A‖ over the component). Without both HF folders only the fingerprints can speak.
    """
    if run_a.hf_dir is None or run_b.hf_dir is None:
        missing = run_a.label if run_a.hf_dir is None else run_b.label
        return None, None, f"HF folder of {missing} not found: weight delta not computed (fingerprints only)"
    if run_a.hf_dir.resolve() == run_b.hf_dir.resolve():
        return None, True, f"both runs used the same HF folder {run_a.hf_dir}"
    from vesselnb.convert import diff_weights  # torch: imported only when weights are compared

    diff = diff_weights(run_a.hf_dir, run_b.hf_dir)
    table = diff.component_table.set_index("component")
    notes = []
    if diff.only_in_a or diff.only_in_b:
        notes.append(
            f"{len(diff.only_in_a)} tensors only in {run_a.label}, {len(diff.only_in_b)} only in {run_b.label}"
        )
    if diff.shape_mismatch:
        notes.append(f"{len(diff.shape_mismatch)} tensors differ in shape, e.g. {diff.shape_mismatch[0]}")
    return table, diff.identical, "; ".join(notes)


def max_rel_change(table: pd.DataFrame | None, note: str) -> float | None:
    """Largest per-component relative change; None when there is no table or the key sets differ."""
    if table is None or table.empty or note:
        return None
    return float(np.nanmax(table["rel_norm"].to_numpy(dtype=float)))


def masks_identical(run_a: RunInputs, run_b: RunInputs, sample_ids: list[str]) -> bool:
    """Compare predicted masks sample by sample (used only when hashes cannot decide, e.g. different sample sets)."""
    for sample_id in tqdm(sample_ids, desc=f"masks {run_a.label} vs {run_b.label}", leave=False):
        if not np.array_equal(run_a.store.mask(sample_id), run_b.store.mask(sample_id)):
            return False
    return True
