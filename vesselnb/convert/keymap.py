"""Training-checkpoint key names -> HF key names, and the plan that says where every output tensor comes from.

The official converter loads the checkpoint with ``strict=False`` and silently drops what does not fit. Here every
checkpoint key, ``pretrained_pth`` key and base key gets a category (see :data:`CATEGORIES`); anything unexplained
stops the conversion with the keys named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

COMPONENTS = ("vision", "llm", "projector", "sam2", "text_hidden_fcs", "other")

# Coverage categories, each key gets exactly one.
CATEGORIES = {
    "matched": "checkpoint tensor copied to the HF key of the same shape",
    "merged": "LoRA factor merged into its base weight (W + scale * B @ A)",
    "superseded": "peft original_module copy, replaced by the trained modules_to_save copy",
    "pretrained": "base key taken from pretrained_pth",
    "only_in_base": "base key not in the checkpoint: carried over unchanged",
    "only_in_checkpoint": "checkpoint key with no HF key to go to",
    "only_in_pretrained": "pretrained_pth key with no HF key to go to",
    "shape_mismatch": "the tensor does not fit the HF key's shape",
    "missing": "a tensor the checkpoint should hold is absent (half a LoRA pair, a LoRA target without its pair)",
}
BLOCKING_MISSING = ("only_in_checkpoint", "only_in_pretrained", "missing")

_LORA_RE = re.compile(
    r"^(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.(?P<adapter>[^.]+))?(\.weight)?$"
)
_PREFIXES = ("mllm.model.", "mllm.", "")


def component_of(hf_key: str) -> str:
    """The model part a HF key belongs to; shared by provenance and diff."""
    if hf_key.startswith("vision_model."):
        return "vision"
    if hf_key.startswith("language_model."):
        return "llm"
    if hf_key.startswith("mlp1."):
        return "projector"
    if hf_key.startswith("grounding_encoder."):
        return "sam2"
    if hf_key.startswith("text_hidden_fcs."):
        return "text_hidden_fcs"
    return "other"


@dataclass(frozen=True)
class ParsedKey:
    """A training key reduced to its HF-name candidates and its peft role."""

    key: str
    role: str  # "plain" | "base_layer" | "trained_copy" | "original" | "lora_A" | "lora_B" | "lora_embedding_A" | ...
    candidates: tuple[str, ...]  # HF names to try, most likely first

    def resolve(self, known: Mapping[str, object] | set[str]) -> str | None:
        """The first candidate that exists among the known HF keys."""
        return next((c for c in self.candidates if c in known), None)


def parse_training_key(key: str) -> ParsedKey:
    """Undo the training wrappers: ``module.``, ``mllm.model.``, peft's ``base_model.model.`` / ``base_layer`` /
    ``modules_to_save.<adapter>`` / ``original_module``, and SAM2's ``.gamma`` (HF ``.g_weight``)."""
    name = key[len("module.") :] if key.startswith("module.") else key
    name = name.replace("base_model.model.", "")
    role = "plain"
    lora = _LORA_RE.match(name)
    if lora:
        role = lora.group("which")
        name = lora.group("module") + ".weight"
    elif ".base_layer." in name:
        role, name = "base_layer", name.replace(".base_layer.", ".")
    elif ".modules_to_save." in name:
        role = "trained_copy"
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    elif ".original_module." in name:
        role, name = "original", name.replace(".original_module.", ".")
    if name.endswith(".gamma") and "grounding_encoder." in name:
        name = name[: -len(".gamma")] + ".g_weight"
    candidates = tuple(dict.fromkeys(name[len(p) :] for p in _PREFIXES if name.startswith(p)))
    return ParsedKey(key, role, candidates)


@dataclass
class LoraPair:
    """One LoRA pair to merge into ``hf_key`` (embedding LoRA is stored transposed by peft)."""

    a_key: str
    b_key: str
    embedding: bool = False


@dataclass
class TensorPlan:
    """Where one output tensor comes from."""

    hf_key: str
    component: str
    source: str  # "checkpoint" | "lora_merged" | "pretrained" | "base"
    checkpoint_key: str | None = None  # full tensor from the checkpoint (trained copy, plain, base_layer)
    pretrained_key: str | None = None
    lora: LoraPair | None = None


@dataclass
class KeyFate:
    """One row of the coverage table."""

    key: str  # as named in its file
    origin: str  # "checkpoint" | "pretrained" | "base"
    category: str
    hf_key: str | None
    detail: str = ""


@dataclass
class MergePlan:
    """Every output tensor's plan plus every input key's fate."""

    tensors: dict[str, TensorPlan]
    fates: list[KeyFate] = field(default_factory=list)
    lora_rank: int | None = None
    lora_targets: list[str] = field(default_factory=list)

    def keys_in(self, category: str) -> list[KeyFate]:
        return [f for f in self.fates if f.category == category]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CATEGORIES, 0)
        for fate in self.fates:
            counts[fate.category] += 1
        return counts


def _leaf_module(hf_weight_key: str) -> str:
    """``language_model.model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = hf_weight_key.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def build_merge_plan(
    checkpoint_shapes: Mapping[str, tuple[int, ...]],
    base_shapes: Mapping[str, tuple[int, ...]],
    pretrained_shapes: Mapping[str, tuple[int, ...]] | None = None,
    lora_r: int | None = None,
    lora_target_modules: Iterable[str] | None = None,
) -> MergePlan:
    """Decide, without reading any tensor data, the fate of every key (shapes are enough)."""
    plan = MergePlan(tensors={k: TensorPlan(k, component_of(k), "base") for k in base_shapes})
    fates = plan.fates
    taken_from_checkpoint: set[str] = set()

    # pretrained_pth first: the checkpoint overrides it, as in training.
    for key, shape in (pretrained_shapes or {}).items():
        parsed = parse_training_key(key)
        hf_key = parsed.resolve(base_shapes)
        if hf_key is None or parsed.role.startswith("lora"):
            fates.append(KeyFate(key, "pretrained", "only_in_pretrained", None, "no HF key with this name"))
        elif tuple(base_shapes[hf_key]) != tuple(shape):
            fates.append(
                KeyFate(
                    key,
                    "pretrained",
                    "shape_mismatch",
                    hf_key,
                    f"pretrained {list(shape)} vs base {list(base_shapes[hf_key])}",
                )
            )
        else:
            plan.tensors[hf_key] = TensorPlan(hf_key, component_of(hf_key), "pretrained", pretrained_key=key)
            fates.append(KeyFate(key, "pretrained", "pretrained", hf_key))

    parsed_keys = [parse_training_key(k) for k in checkpoint_shapes]
    trained_copies = {p.resolve(base_shapes) for p in parsed_keys if p.role == "trained_copy"}
    lora_halves: dict[str, dict[str, str]] = {}
    for parsed in parsed_keys:
        key, shape = parsed.key, tuple(checkpoint_shapes[parsed.key])
        hf_key = parsed.resolve(base_shapes)
        if hf_key is None:
            fates.append(
                KeyFate(key, "checkpoint", "only_in_checkpoint", None, f"tried {', '.join(parsed.candidates)}")
            )
            continue
        if parsed.role.startswith("lora"):
            lora_halves.setdefault(hf_key, {})[parsed.role] = key
            continue
        if parsed.role == "original" and hf_key in trained_copies:
            fates.append(KeyFate(key, "checkpoint", "superseded", hf_key, "modules_to_save copy wins"))
            continue
        if tuple(base_shapes[hf_key]) != shape:
            fates.append(
                KeyFate(
                    key,
                    "checkpoint",
                    "shape_mismatch",
                    hf_key,
                    f"checkpoint {list(shape)} vs base {list(base_shapes[hf_key])}",
                )
            )
            continue
        if hf_key in taken_from_checkpoint and parsed.role != "trained_copy":
            fates.append(KeyFate(key, "checkpoint", "superseded", hf_key, "another checkpoint key already gives it"))
            continue
        previous = plan.tensors[hf_key]
        plan.tensors[hf_key] = TensorPlan(
            hf_key, component_of(hf_key), "checkpoint", checkpoint_key=key, lora=previous.lora
        )
        taken_from_checkpoint.add(hf_key)
        fates.append(KeyFate(key, "checkpoint", "matched", hf_key, parsed.role))

    ranks: set[int] = set()
    for hf_key, halves in sorted(lora_halves.items()):
        embedding = "lora_embedding_A" in halves or "lora_embedding_B" in halves
        a_key = halves.get("lora_embedding_A" if embedding else "lora_A")
        b_key = halves.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            present = a_key or b_key
            fates.append(
                KeyFate(present, "checkpoint", "missing", hf_key, "lora_B absent" if b_key is None else "lora_A absent")
            )
            continue
        a_shape, b_shape = tuple(checkpoint_shapes[a_key]), tuple(checkpoint_shapes[b_key])
        target = tuple(base_shapes[hf_key])
        delta_shape = (b_shape[0], a_shape[1]) if not embedding else (a_shape[1], b_shape[0])
        rank_ok = a_shape[0] == b_shape[1] if not embedding else a_shape[0] == b_shape[1]
        if not rank_ok or delta_shape != target or len(a_shape) != 2 or len(b_shape) != 2:
            for k in (a_key, b_key):
                fates.append(
                    KeyFate(
                        k,
                        "checkpoint",
                        "shape_mismatch",
                        hf_key,
                        f"B{list(b_shape)}·A{list(a_shape)} vs base {list(target)}",
                    )
                )
            continue
        ranks.add(a_shape[0])
        current = plan.tensors[hf_key]
        current.lora = LoraPair(a_key, b_key, embedding)
        current.source = "lora_merged"
        for k in (a_key, b_key):
            fates.append(KeyFate(k, "checkpoint", "merged", hf_key, f"rank {a_shape[0]}"))
    plan.lora_rank = min(ranks) if len(ranks) == 1 else (None if not ranks else -1)

    # LoRA targets the config names (or that the checkpoint shows) but whose pair is absent for some layer.
    targets = set(lora_target_modules or {_leaf_module(k) for k in lora_halves})
    plan.lora_targets = sorted(targets)
    if targets:
        for hf_key, shape in base_shapes.items():
            if (
                component_of(hf_key) == "llm"
                and hf_key.endswith(".weight")
                and len(shape) == 2
                and _leaf_module(hf_key) in targets
                and hf_key not in lora_halves
                and not hf_key.endswith(("lm_head.weight", "embed_tokens.weight"))
            ):
                fates.append(
                    KeyFate(
                        hf_key,
                        "base",
                        "missing",
                        hf_key,
                        f"LoRA target '{_leaf_module(hf_key)}' has no lora_A/lora_B in the checkpoint",
                    )
                )
    for hf_key, tensor_plan in plan.tensors.items():
        if tensor_plan.source == "base":
            fates.append(KeyFate(hf_key, "base", "only_in_base", hf_key, "carried over"))
    _ = lora_r  # the rank check needs the tensors' rank vs the config: done by the caller with plan.lora_rank
    return plan
