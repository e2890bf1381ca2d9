"""Shared session fixtures for the whole test suite.

``demo_assets`` builds a small demo (2 patients x 2 sequences x 3 frames, checkpoints ``iter_30.pth`` and
``iter_160.pth``) once per test session, ~20 s of one CPU core. Set ``VESSELNB_TEST_DEMO_DIR`` to a folder to keep the
build between sessions (the build is idempotent: a complete folder with the same settings is reused as is).

``demo_outputs`` is the user's whole demo (`vesselnb demo`, all four notebooks, 12 frames, ~3 min), built once per
session for the end-to-end, browser and JupyterLab tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _spine_fixtures import build_demo_outputs

from vesselnb.demo import DemoAssets, DemoSettings, ensure_demo_assets

# The files are named by the real iteration counts: iter_30.pth ("short") and iter_160.pth ("long").
DEMO_TEST_SETTINGS = DemoSettings(
    n_patients=2,
    sequences_per_patient=2,
    frames_per_sequence=3,
    short_iters=30,
    long_iters=160,
    train_sequences=5,
    pretrain_iters=80,
)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    """The small demo build: frames, annotations, base_hf, training config, two checkpoints, reference HF folders."""
    keep = os.environ.get("VESSELNB_TEST_DEMO_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("demo") / "assets"
    return ensure_demo_assets(root, DEMO_TEST_SETTINGS)


@pytest.fixture(scope="session")
def demo_model_dir(demo_assets: DemoAssets) -> Path:
    """The reference HF folder of the better (longer-trained) demo checkpoint: a ready-to-load demo model."""
    return demo_assets.reference_hf["long"]


@pytest.fixture(scope="session")
def demo_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vesselnb demo` with the real params files (limited to 12 frames) into a temp outputs folder."""
    return build_demo_outputs(tmp_path_factory.mktemp("demo_run"))
