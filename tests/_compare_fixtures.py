"""Run folders for the comparison tests, built by the real stages (inference, error analysis, manifest).

Each run is a params YAML whose ``hf_model`` points at one of the demo's reference HF folders, so no conversion is
needed; the stores, metrics tables and manifests are exactly what ``vesselnb run`` leaves behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from vesselnb.analysis import analyze_stage
from vesselnb.infer import infer_stage
from vesselnb.params import load_params
from vesselnb.report import update_run_manifest


def build_run(
    outputs: Path, name: str, hf_model: Path, assets: Any, iteration: int | None = None, limit: int | None = None
) -> Path:
    """Write ``outputs/params/<name>.yaml`` and run stages 02 and 03 into ``outputs/<name>``; return the run folder."""
    params_dir = outputs / "params"
    params_dir.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "run_name": name,
        "hf_model": str(hf_model),
        "data": {
            "images": str(assets.images_dir),
            "annotations": str(assets.annotations),
            "annotation_format": "sa2va",
            "limit": limit,
        },
        "inference": {"device": "cpu", "probability_maps": False},
        "analysis": {"bootstrap_samples": 200},
    }
    if iteration is not None:
        raw["iteration"] = iteration
    params_file = params_dir / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = load_params(params_file)
    run_dir = outputs / name
    infer_stage(params, run_dir, progress=False)
    analyze_stage(params, run_dir, workers=1)
    update_run_manifest(run_dir, params, [])
    return run_dir


def copy_hf_folder(source: Path, target: Path) -> Path:
    """The same weights under another folder name (the seed-style accident: two names, one model)."""
    if not target.exists():
        shutil.copytree(source, target)
    return target
