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
from vesselnb.run_folder import RunFolder


def build_run(
    outputs: Path, name: str, hf_model: Path, assets: Any, iteration: int | None = None, limit: int | None = None,
    probability_maps: bool = False,
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
        "inference": {"device": "cpu", "probability_maps": probability_maps},
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
    RunFolder(run_dir).write_manifest(params)
    return run_dir


def copy_hf_folder(source: Path, target: Path) -> Path:
    """The same weights under another folder name (the seed-style accident: two names, one model)."""
    if not target.exists():
        shutil.copytree(source, target)
    return target


def nudged_copy(source: Path, target: Path, tensor: str = "language_model.model.embed_tokens.weight") -> Path:
    """A copy of an HF folder with one element of ``tensor`` moved by one bf16/fp16 step (a near-zero weight delta).

    The smallest non-zero element is nudged so the change is far below anything training does; the index's recorded
    shard hashes (if any) are dropped, so the fingerprint is computed from the changed bytes.
    """
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from vesselnb.fingerprint import INDEX_NAME, SHARD_HASHES_KEY

    shutil.copytree(source, target)
    index_path = target / INDEX_NAME
    index = json.loads(index_path.read_text(encoding="utf-8"))
    (index.get("metadata") or {}).pop(SHARD_HASHES_KEY, None)
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    shard = target / index["weight_map"][tensor]
    tensors = load_file(shard)
    flat = tensors[tensor].reshape(-1).clone()
    magnitude = flat.float().abs()
    position = int(torch.where(magnitude > 0, magnitude, torch.inf).argmin())
    flat.view(torch.int16)[position] += 1  # the next representable value
    tensors[tensor] = flat.reshape(tensors[tensor].shape)
    save_file(tensors, shard, metadata={"format": "pt"})
    return target


def configured_copy(source: Path, target: Path, **config: Any) -> Path:
    """A copy of an HF folder with ``config.json`` keys changed (same weights, e.g. ``demo_behaviour="no_seg"``)."""
    import json

    shutil.copytree(source, target)
    path = target / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **config}, indent=2), encoding="utf-8")
    return target
