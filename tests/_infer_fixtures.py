"""Helpers for the inference tests: a small frame set, params files, model folder copies with edited configs.

Everything runs the real demo model (transformers remote code, ``trust_remote_code=True``) on real JPEG frames.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
N_FRAMES = 6  # two sequences of three frames: enough for shards, resume and video mode, fast on 2 cores


def demo_model_dir(assets: Any) -> Path:
    """The trained demo HF folder (reference conversion of the longer training), else the base folder."""
    reference = getattr(assets, "reference_hf", None) or {}
    return Path(reference.get("long") or assets.base_model)


def copy_frames(assets: Any, dest: Path, n_frames: int = N_FRAMES) -> Path:
    """The first ``n_frames`` demo frames, whole sequences first (as ``list_samples`` orders them)."""
    from vesselnb.data import list_samples

    dest.mkdir(parents=True, exist_ok=True)
    for sample in list_samples(assets.images_dir, limit=n_frames):
        shutil.copyfile(sample.image_path, dest / sample.image_path.name)
    return dest


def copy_model(source: Path, dest: Path, **config_changes: Any) -> Path:
    """A copy of an HF folder with ``config.json`` keys changed (e.g. ``demo_behaviour="no_seg"``)."""
    shutil.copytree(source, dest)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config, indent=2))
    return dest


def write_params(path: Path, model_dir: Path, images: Path, annotations: Path | None = None,
                 image_glob: str | None = None, **inference: Any) -> Path:
    """A params YAML pointing at a model folder and frames (no checkpoint: stage 01 is skipped)."""
    data = {"images": str(images), **({"annotations": str(annotations)} if annotations else {}),
            **({"image_glob": image_glob} if image_glob else {})}
    content = {
        "run_name": path.stem,
        "hf_model": str(model_dir),
        "data": data,
        "inference": {"device": "cpu", **inference},
    }
    path.write_text(yaml.safe_dump(content))
    return path


def cli_command(params: Path, run_dir: Path, *extra: str) -> list[str]:
    """``python -m vesselnb.cli infer ...`` in a real subprocess."""
    return [sys.executable, "-m", "vesselnb.cli", "infer", str(params), "--run-dir", str(run_dir), "--no-progress",
            *extra]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: one torch thread each so two shards share 2 cores fairly."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra})
    return env


def run_cli(params: Path, run_dir: Path, *extra: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``vesselnb infer`` to completion; raise with its stderr when it fails."""
    proc = subprocess.run(cli_command(params, run_dir, *extra), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records_without_timing(store: Any) -> list[dict]:
    """Records minus ``seconds`` (wall time differs between runs; everything else must not)."""
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in store.records()]
