"""Builders for the analysis tests: small synthetic vessel datasets and real prediction stores written through
:class:`vesselnb.store.PredictionStore` (no mocks: the analysis reads them exactly as it reads inference output)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from vesselnb.params import AnalysisParams, DataParams, RunParams
from vesselnb.store import PredictionStore

PATIENTS = ("Chen_Fang_0000103366", "Li_Wei_0000200001", "Wang_Min_0000300002")
SEQUENCES = ("1-4_1_04B2D3CF", "2-1_1_0A0B0C0D")


def vessel_mask(size: int, seed: int, thin_branches: bool = True) -> np.ndarray:
    """A synthetic vessel tree: a thick trunk, medium branches and (optionally) one-pixel side branches."""
    rng = np.random.default_rng(seed)
    trunk = np.zeros((size, size), dtype=bool)
    medium = np.zeros_like(trunk)
    thin = np.zeros_like(trunk)
    x0 = int(rng.integers(size // 3, 2 * size // 3))
    rr, cc = draw.line(2, x0, size - 3, int(rng.integers(size // 4, 3 * size // 4)))
    trunk[rr, cc] = True
    for _ in range(3):
        i = int(rng.integers(len(rr) // 5, 4 * len(rr) // 5))
        r1, c1 = draw.line(rr[i], cc[i], int(rng.integers(2, size - 3)), int(rng.choice([3, size - 4])))
        medium[r1, c1] = True
        j = int(rng.integers(len(r1) // 3, 2 * len(r1) // 3 + 1))
        r2, c2 = draw.line(r1[j], c1[j], int(rng.integers(2, size - 3)), int(rng.integers(2, size - 3)))
        thin[r2, c2] = True
    mask = ndimage.binary_dilation(trunk, iterations=3) | ndimage.binary_dilation(medium, iterations=1)
    if thin_branches:
        mask |= thin
    return mask


def thin_branch_mask(size: int, seed: int) -> np.ndarray:
    """Only the one-pixel branches of :func:`vessel_mask` (what a prediction that misses thin vessels loses)."""
    return vessel_mask(size, seed, True) & ~vessel_mask(size, seed, False)


def frame_from_mask(mask: np.ndarray, seed: int) -> np.ndarray:
    """An angiogram-like grey frame: dark vessels on a noisy bright background."""
    rng = np.random.default_rng(seed)
    image = 180.0 + rng.normal(0, 12, mask.shape) - 90.0 * ndimage.gaussian_filter(mask.astype(float), 0.8)
    return image.clip(0, 255).astype(np.uint8)


def make_dataset(root: Path, size: int = 96, frames: int = 3) -> dict[str, np.ndarray]:
    """Frames (``images/*.jpg``) and GT PNGs (``masks/<stem>_mask.png``); returns the GT masks by sample id."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    gts = {}
    seed = 0
    for patient in PATIENTS:
        for sequence in SEQUENCES:
            for frame in range(frames):
                stem = f"{patient}__{sequence}_frame_{34 + frame:06d}"
                mask = vessel_mask(size, seed)
                Image.fromarray(frame_from_mask(mask, seed)).save(images / f"{stem}.jpg", quality=95)
                Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{stem}_mask.png")
                gts[stem] = mask
                seed += 1
    return gts


def write_store(
    run_dir: Path,
    images: Path,
    predictions: dict[str, np.ndarray],
    status: Callable[[str], str] = lambda _id: "ok",
    probabilities: dict[str, np.ndarray] | None = None,
    fingerprint: str = "0123456789abcdef",
) -> PredictionStore:
    """A prediction store under ``run_dir/predictions`` holding ``predictions`` (masks by sample id)."""
    store = PredictionStore.create_or_open(
        run_dir / "predictions", fingerprint=fingerprint, model_dir="demo", prompt="<image>Please segment the blood "
        "vessel.", mode="image", probability_maps=probabilities is not None,
    )
    for sample_id, mask in predictions.items():
        state = status(sample_id)
        mask = mask if state == "ok" else np.zeros_like(mask)
        record = {
            "sample_id": sample_id, "image": str(images / f"{sample_id}.jpg"), "patient": "", "sequence": "",
            "frame": 0, "status": state, "text": "[SEG]" if state == "ok" else "no mask", "n_seg": int(state == "ok"),
            "seconds": 0.01, "error": "boom" if state == "error" else None, "height": mask.shape[0],
            "width": mask.shape[1], "mask_resized_from": None, "has_probability": False,
        }
        probability = None if probabilities is None else probabilities.get(sample_id)
        store.write(record, mask, probability)
    return store


def run_params(root: Path, run_name: str = "test_run", **analysis: object) -> RunParams:
    """Params for :func:`vesselnb.analysis.analyze_stage` on a :func:`make_dataset` folder."""
    settings = {"bootstrap_samples": 200, "gallery_k": 2, **analysis}
    return RunParams(
        run_name=run_name,
        data=DataParams(images=root / "images", annotations=root / "masks", annotation_format="mask_png"),
        analysis=AnalysisParams(**settings),
    )
