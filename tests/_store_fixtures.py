"""Helpers for the store tests: a store identity, a well-formed record and a reproducible mask."""

from __future__ import annotations

import numpy as np

IDENTITY = {"fingerprint": "0123456789abcdef", "model_config": "00aa00aa00aa00aa", "model_dir": "/models/a",
            "prompt": "<image>Segment.", "mode": "image", "probability_maps": True}


def make_record(sample_id: str, status: str = "ok", height: int = 5, width: int = 7) -> dict:
    return {"sample_id": sample_id, "image": f"/data/{sample_id}.jpg", "patient": "P", "sequence": "S", "frame": 0,
            "status": status, "text": "It is [SEG].", "n_seg": 1, "seconds": 0.1, "error": None,
            "height": height, "width": width, "mask_resized_from": None, "has_probability": False}


def random_mask(seed: int, height: int = 5, width: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) > 0.5
