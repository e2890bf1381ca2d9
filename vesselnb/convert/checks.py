"""Does this checkpoint belong to this base, and does it hold what training trained? Three refusals, each with a flag.

A ``strict=False`` load (the official converter) accepts a checkpoint that lacks whole trained parts, or a base
folder other than the one training started from, and the result silently is the base. Here:

* every component a Sa2VA fine-tune always saves (``mlp1``, SAM2's ``sam_mask_decoder``, ``text_hidden_fcs``;
  the decoder unless the config sets ``frozen_sam2_decoder``) and, when the config wraps the LLM in LoRA, a LoRA
  pair for every targeted projection of every layer must come from the checkpoint (``sa2va_facts.md`` §2);
* frozen copies the checkpoint carries (peft's ``base_layer`` / ``original_module``) must equal the base's tensors:
  they are copies of it, so a difference means another base;
* the base named by the training config (``path``) must be the folder given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vesselnb.convert.keymap import MergePlan, parse_training_key
from vesselnb.convert.training_config import TrainingConfig

# HF key prefix -> what the user knows it as; a Sa2VA checkpoint always holds these (Sa2VAModel.state_dict keeps them).
TRAINED_COMPONENTS = {
    "mlp1.": "projector mlp1 (mllm.model.mlp1.*)",
    "grounding_encoder.sam2_model.sam_mask_decoder.": "SAM2 mask decoder (grounding_encoder.sam2_model."
    "sam_mask_decoder.*)",
    "text_hidden_fcs.": "text_hidden_fcs (text_hidden_fcs.*)",
}
_LAYER_RE = re.compile(r"\.layers\.\d+\.")
_FROM_CHECKPOINT = ("checkpoint", "lora_merged")
_SAMPLE_ELEMENTS = 1 << 22  # frozen copies larger than this are compared on evenly spaced rows (4M elements)
_FROZEN_TOLERANCE = 1e-3  # relative L2 difference; a copy of the base differs by 0 (bf16) or rounding (fp32 base)

FLAG_MISSING_COMPONENTS = "--allow-missing-components"
FLAG_FROZEN_MISMATCH = "--allow-frozen-mismatch"
FLAG_OTHER_BASE = "--allow-other-base"


_FINITE_CHUNK = 1 << 24


def has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds a NaN or an inf, in one cheap pass per chunk.

    A sum is non-finite whenever any term is (NaN and inf propagate through addition; inf + -inf is NaN), so a
    finite chunk sum proves the chunk finite; only a non-finite sum (a NaN/inf, or finite values overflowing) is
    checked element-wise. On bf16 this is ~10x cheaper than ``isfinite().all()``, which allocates a bool tensor and
    was the largest single cost of a conversion.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk.sum())) and not bool(torch.isfinite(chunk).all()):
            return True
    return False


def _names(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def missing_trained(
    plan: MergePlan, config: TrainingConfig, base_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, list[str]]:
    """``{component description: [HF keys the checkpoint should have given but did not]}`` (empty = complete)."""
    missing: dict[str, list[str]] = {}
    for prefix, label in TRAINED_COMPONENTS.items():
        if prefix.endswith("sam_mask_decoder.") and config.frozen_sam2_decoder:
            continue
        keys = sorted(k for k, t in plan.tensors.items() if k.startswith(prefix) and t.source not in _FROM_CHECKPOINT)
        if keys:
            missing[label] = keys
    if config.llm_lora and not config.lora_target_modules:
        # Default targets (xtuner / peft "all linear"): every 2-D weight of every LLM layer. Named targets are checked
        # by the merge plan itself (category "missing").
        keys = sorted(
            k
            for k, t in plan.tensors.items()
            if k.startswith("language_model.")
            and _LAYER_RE.search(k)
            and k.endswith(".weight")
            and t.source not in _FROM_CHECKPOINT
            and t.lora is None
            and len(base_shapes[k]) == 2
        )
        if keys:
            missing[f"LLM LoRA pairs (the config's llm_lora, r={config.lora_r})"] = keys
    return missing


def missing_message(missing: dict[str, list[str]], file: Path) -> str:
    parts = [f"{label}: {len(keys)} tensors, e.g. {_names(keys, 3)}" for label, keys in missing.items()]
    return (
        f"{file}: trained components are absent from the checkpoint, so they would come 100% from the base: "
        + "; ".join(parts)
        + ". A Sa2VA fine-tune always saves them: this is another file (a pretrained_pth, an optimizer state) or a "
        "broken save. Convert the right iter_N.pth, or allow it explicitly with "
        f"{FLAG_MISSING_COMPONENTS} (checkpoint.allow_missing_components: true)."
    )


@dataclass
class FrozenMismatch:
    """A frozen copy in the checkpoint that is not the base's tensor."""

    key: str
    hf_key: str
    rel_diff: float


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() <= _SAMPLE_ELEMENTS or tensor.dim() == 0:
        return tensor
    rows = max(1, _SAMPLE_ELEMENTS // max(1, tensor[0].numel()))
    step = max(1, tensor.shape[0] // rows)
    return tensor[::step]


def frozen_mismatches(
    checkpoint: Mapping[str, torch.Tensor], base_shapes: Mapping[str, tuple[int, ...]], get_base: object
) -> tuple[int, list[FrozenMismatch]]:
    """Compare every ``base_layer`` / ``original_module`` copy with the base tensor it copies.

    Returns (how many copies were compared, the ones that differ). Large copies (``embed_tokens``, ``lm_head``) are
    compared on evenly spaced rows: another base differs everywhere, so a sample finds it at a fraction of the cost.
    """
    compared, bad = 0, []
    for key, tensor in checkpoint.items():
        parsed = parse_training_key(key)
        if parsed.role not in ("base_layer", "original"):
            continue
        hf_key = parsed.resolve(base_shapes)
        if hf_key is None or tuple(base_shapes[hf_key]) != tuple(tensor.shape) or not tensor.is_floating_point():
            continue  # unmatched or misshapen keys are reported by the merge plan
        copy = _sample(tensor).float()
        base = _sample(get_base(hf_key)).to(tensor.dtype).float()  # type: ignore[operator]
        compared += 1
        norm = float(torch.linalg.vector_norm(base))
        diff = float(torch.linalg.vector_norm(copy - base))
        rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
        if rel > _FROZEN_TOLERANCE:
            bad.append(FrozenMismatch(key, hf_key, rel))
    return compared, bad


def frozen_message(bad: list[FrozenMismatch], base: Path, file: Path) -> str:
    shown = "; ".join(f"{m.key} vs {m.hf_key} (rel. diff {m.rel_diff:.2g})" for m in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return (
        f"{file}: {len(bad)} frozen copies of base tensors in the checkpoint differ from {base}: {shown}{more}. They "
        "are copies of the base training started from, so --base is another model (same shapes, other weights). "
        f"Pass the base folder training used, or allow it explicitly with {FLAG_FROZEN_MISMATCH} "
        "(checkpoint.allow_frozen_mismatch: true)."
    )


def _config_base_candidates(config: TrainingConfig) -> list[Path]:
    named = Path(str(config.base_model_path))
    if named.is_absolute():
        return [named]
    roots = [Path.cwd()] + ([config.source.parent] if config.source is not None else [])
    return [root / named for root in roots]


def other_base_message(config: TrainingConfig, given: Path) -> str | None:
    """None when the base given is the one the config names (same folder, or same name: a hub id vs its download)."""
    if not config.base_model_path:
        return None
    for candidate in _config_base_candidates(config):
        if candidate.is_dir() and os.path.samefile(candidate, given):
            return None
    if Path(config.base_model_path.rstrip("/")).name == given.resolve().name:
        return None
    return (
        f"{config.source}: the training config names the base {config.base_model_path!r}, but --base is {given}. "
        "Converting onto another base gives another model. Pass the base the config names (or its local copy under "
        "the same name); if the folder given is that base's Sa2VA HF release (same weights, with SAM2 and the remote "
        f"code), allow it explicitly with {FLAG_OTHER_BASE} (checkpoint.allow_other_base: true)."
    )
