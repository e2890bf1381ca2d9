"""The conversion report: coverage of every key, provenance of every output tensor, per-component change.

It is what makes a conversion trustworthy: a reader sees at a glance which tensors came from the checkpoint, which
were LoRA-merged, which were carried over from the base, and how much each model part moved.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vesselnb import htmlrepr as hr
from vesselnb.convert.keymap import BLOCKING_MISSING, CATEGORIES, COMPONENTS
from vesselnb.convert.training_config import TrainingConfig

SOURCES = ("checkpoint", "lora_merged", "pretrained", "base")
# What each source means to a reader of the report (the column headings of the per-component table).
SOURCE_LABELS = {
    "checkpoint": "from the checkpoint",
    "lora_merged": "LoRA-merged",
    "pretrained": "from pretrained_pth",
    "base": "unchanged from the base",
}
# What each model part is, for a reader who does not know the HF key prefixes.
COMPONENT_LABELS = {
    "vision": "vision encoder (vision_model.*)",
    "llm": "language model (language_model.*)",
    "projector": "projector mlp1 (vision → LLM)",
    "sam2": "SAM2 (grounding_encoder.*)",
    "text_hidden_fcs": "text_hidden_fcs ([SEG] state → SAM2 prompt)",
    "other": "other keys",
}
# Where conversion and the report mean the same thing by "change vs the base".
CHANGE_NOTE = ("change vs base = ‖W_out − W_base‖ / ‖W_base‖ over the tensors (L2 norm, in %): 0 means the output "
               "equals the base model bit for bit")
BASE_NOTE = ("unchanged from the base N = N output tensors the checkpoint does not hold, copied as they are from the "
             "base HF folder: Sa2VA saves only what training updates (LoRA factors, modules_to_save, mlp1, SAM2's "
             "mask decoder, text_hidden_fcs), so these are the parts training kept frozen")
_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def _percent(value: Any) -> str:
    """A relative change as a percentage with 3 significant digits (``7.17 %``); exactly 0 reads ``0``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    return "0" if value == 0 else f"{value * 100:.3g} %"


def _trained_by(lora: str | None, flag: str, frozen: bool | None, lora_absent: str = "") -> tuple[bool | None, str]:
    """(trained?, why) for one component: its LoRA, else its freeze flag, else unknown (the config does not say)."""
    if lora is not None:
        return True, lora
    if frozen is False:
        return True, f"trained in full ({flag}=False)"
    if frozen:
        return False, f"frozen ({flag}=True{lora_absent})"
    return None, f"the config does not say (no {flag}{lora_absent})"


def expected_training(config: TrainingConfig | None) -> dict[str, Any]:
    """What the training config says training changed, per component: ``{"config", "components": {name:
    {"trained": True|False|None, "how": text}}, "special_tokens"}``.

    Why: a component coming 100 % from the base is right for a frozen part and a broken save for a trained one; the
    report can only tell which when it states what the config trained (Sa2VA's ``Sa2VAModel`` / ``InternVLMLLM``
    arguments, read without importing the config).
    """
    if config is None:
        return {}
    llm_lora = None
    if config.llm_lora:
        targets = ", ".join(config.lora_target_modules or ["all linear layers"])
        alpha = f"{config.lora_alpha:g}" if config.lora_alpha is not None else "?"
        llm_lora = (f"LoRA r={config.lora_r}, alpha={alpha} on {targets}; the LLM's own weights frozen, "
                    "peft modules_to_save (e.g. embed_tokens, lm_head) trained in full")
    llm = _trained_by(llm_lora, "freeze_llm", config.freeze_llm, ", no llm_lora")
    vision_lora = f"LoRA (visual_encoder_lora r={config.vision_lora.get('r')})" if config.vision_lora else None
    vision = _trained_by(vision_lora, "freeze_visual_encoder", config.freeze_visual_encoder)
    sam2 = ((False, "frozen, mask decoder included (frozen_sam2_decoder=True)") if config.frozen_sam2_decoder else
            (True, "mask decoder trained (sam_mask_decoder.*, frozen_sam2_decoder=False); image encoder and memory "
                   "frozen"))
    parts = {"vision": vision, "llm": llm, "projector": (True, "trained (Sa2VA always trains and saves mlp1)"),
             "sam2": sam2, "text_hidden_fcs": (True, "trained (Sa2VA always trains and saves it)")}
    return {"config": str(config.source) if config.source else None,
            "components": {name: {"trained": trained, "how": how} for name, (trained, how) in parts.items()},
            "special_tokens": list(config.special_tokens)}


def tokenizer_summary(folder: str | Path) -> dict[str, Any]:
    """``len(tokenizer)``, ``vocab_size`` of config.json, the ``[SEG]`` id and every added token with its id.

    Why: a ``[SEG]`` missing or beyond the embedding silently yields no masks; the ids are the first thing to compare
    with the training run. Empty when the folder has no tokenizer (the doctor check says why).
    """
    folder = Path(folder)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return {}
    from transformers import AutoTokenizer  # ~2 s to import: only when there is a tokenizer to read

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001 - shown as the reason, the doctor section checks it in full
        return {"error": f"cannot load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})"}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    sizes = {where: sub["vocab_size"] for where, sub in (("config.json", config), *(
        (f"config.json {key}", config.get(key)) for key in ("llm_config", "text_config")))
        if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int)}
    vocab = tokenizer.get_vocab()
    added = dict(sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1]))
    return {"length": len(tokenizer), "vocab_size": sizes, "seg_id": vocab.get("[SEG]"), "added": added}


@dataclass
class ComponentStats:
    """Sums to aggregate a component's relative change: sqrt(sum |out - base|^2) / sqrt(sum |base|^2)."""

    n_tensors: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0
    sources: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))

    @property
    def rel_change(self) -> float:
        return math.sqrt(self.delta_sq) / math.sqrt(self.base_sq) if self.base_sq > 0 else 0.0


@dataclass
class ConversionReport:
    """Result of :func:`vesselnb.convert.convert_checkpoint` / ``convert_stage``; displays itself in a notebook."""

    output_dir: str
    fingerprint: str
    dtype: str
    source: dict[str, Any]  # {"path", "bytes", "layout", "file"}
    base_model: str | None = None
    input_fingerprint: str | None = None
    output_bytes: int = 0
    coverage: dict[str, int] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why conversion did not run (already done, hf_model given)
    lora: dict[str, Any] = field(default_factory=dict)
    resumed_shards: int = 0
    n_shards: int = 0
    seconds: float = 0.0
    fates: list[dict[str, Any]] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    training_info: dict[str, Any] = field(default_factory=dict)  # the checkpoint's meta / message_hub, summarised
    config_fingerprint: str = ""  # config, tokenizer and remote code: the half of the identity weights do not cover
    expected: dict[str, Any] = field(default_factory=dict)  # expected_training(config): what the config trained
    tokenizer: dict[str, Any] = field(default_factory=dict)  # tokenizer_summary(output_dir)

    # --- tables -------------------------------------------------------------------------------------------------
    @property
    def coverage_table(self) -> pd.DataFrame:
        """One row per category: how many keys, what it means, a few example keys."""
        rows = []
        for category, meaning in CATEGORIES.items():
            keys = [f["key"] for f in self.fates if f["category"] == category]
            count = self.coverage.get(category, len(keys))
            rows.append(
                {
                    "category": category,
                    "keys": count,
                    "meaning": meaning,
                    "examples": ", ".join(keys[:3]) + (" …" if len(keys) > 3 else ""),
                }
            )
        return pd.DataFrame(rows)

    @property
    def keys_table(self) -> pd.DataFrame:
        """Every input key's fate (checkpoint, pretrained_pth and base keys)."""
        return pd.DataFrame(self.fates, columns=["key", "origin", "category", "hf_key", "detail"])

    @property
    def provenance_table(self) -> pd.DataFrame:
        """One row per output tensor: where it came from and its relative change vs the base."""
        return pd.DataFrame(
            self.provenance,
            columns=["hf_key", "component", "source", "input_key", "shape", "rel_change", "identical_to_base"],
        )

    @property
    def training_table(self) -> pd.DataFrame:
        """What the checkpoint's ``meta`` / ``message_hub`` say: iteration, epoch, save time, seed, versions and,
        per logged scalar, how many values, the first, the last and the minimum (the loss history)."""
        info = self.training_info or {}
        rows = [{"field": k, "value": str(v)} for k, v in info.items() if k not in ("scalars",)]
        for name, values in (info.get("scalars") or {}).items():
            if values:
                rows.append(
                    {
                        "field": name,
                        "value": f"{len(values)} logged (kept by mmengine): first {values[0]:.4g}, last "
                        f"{values[-1]:.4g}, min {min(values):.4g}",
                    }
                )
        return pd.DataFrame(rows, columns=["field", "value"])

    @property
    def loss_history(self) -> list[float]:
        """The logged training loss values the checkpoint carries (``message_hub`` ``train/loss``), oldest first."""
        scalars = (self.training_info or {}).get("scalars") or {}
        return list(scalars.get("train/loss") or scalars.get("loss") or [])

    @property
    def component_table(self) -> pd.DataFrame:
        """Per model part: tensors by source and relative change vs the base."""
        rows = []
        for name in COMPONENTS:
            comp = self.components.get(name)
            if not comp:
                continue
            rows.append(
                {"component": name, "n_tensors": comp["n_tensors"], **comp["sources"], "rel_change": comp["rel_change"]}
            )
        return pd.DataFrame(rows)

    # --- serialisation --------------------------------------------------------------------------------------------
    def to_json(self, with_tables: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_tables:
            data.pop("fates")
            data.pop("provenance")
        return data

    def conversion_json(self) -> dict[str, Any]:
        """The ``run_dir/conversion.json`` record of docs/contracts.md (plus a few extra keys)."""
        return {
            "fingerprint": self.fingerprint,
            "config_fingerprint": self.config_fingerprint,
            "source": {"path": self.source.get("path"), "bytes": self.source.get("bytes")},
            "coverage": self.coverage,
            "components": self.components,
            "warnings": self.warnings,
            "dtype": self.dtype,
            "output_dir": self.output_dir,
            "output_bytes": self.output_bytes,
            "skipped": self.skipped,
            "notes": self.notes,
            "input_fingerprint": self.input_fingerprint,
            "base_model": self.base_model,
            "lora": self.lora,
            "expected_training": self.expected,
            "tokenizer": self.tokenizer,
            "training": {k: v for k, v in self.training_info.items() if k != "scalars"},
            "seconds": round(self.seconds, 2),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversionReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")

    # --- display ------------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        lines = [
            f"output: {self.output_dir}",
            f"fingerprint: {self.fingerprint}  config: {self.config_fingerprint or '?'}  dtype: {self.dtype}  "
            f"bytes: {self.output_bytes:,}",
        ]
        training = self.training_line()
        if training:
            lines.append(f"training: {training}")
        if self.source.get("path"):
            lines.append(f"source: {self.source['path']} ({self.source.get('bytes', 0):,} bytes)")
        if self.skipped:
            lines.append(f"skipped: {self.skipped}")
        if self.coverage:
            lines.append("coverage: " + ", ".join(f"{k}={v}" for k, v in self.coverage.items() if v))
        for name, comp in self.components.items():
            lines.append(
                f"  {name:16s} n={comp['n_tensors']:5d} rel_change={comp['rel_change']:.3e} "
                + " ".join(f"{s}={n}" for s, n in comp["sources"].items() if n)
            )
        lines += [f"WARNING: {w}" for w in self.warnings] + [f"note: {n}" for n in self.notes]
        return lines

    def training_line(self) -> str:
        """``iter=…, epoch=…, time=…, seed=…, loss a -> b (n logged)`` from the checkpoint's meta / message_hub."""
        info = self.training_info or {}
        said = ", ".join(f"{k}={info[k]}" for k in ("iter", "epoch", "time", "seed") if k in info)
        losses = self.loss_history
        if losses:
            said += f", loss {losses[0]:.4g} -> {losses[-1]:.4g} ({len(losses)} logged)"
        return said

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())

    def _repr_html_(self) -> str:
        """The banner only: notebook 01 shows each section (training, components, LoRA and tokenizer, coverage,
        provenance) under its own heading, so displaying the report must not show them a second time."""
        title = "Conversion with warnings" if self.warnings else "Conversion OK"
        if self.skipped:
            title += f" (skipped: {self.skipped})"
        lines = [f"output: {self.output_dir} ({hr.size(self.output_bytes)}, dtype {self.dtype})",
                 f"weights fingerprint {self.fingerprint} · config fingerprint {self.config_fingerprint or '?'} "
                 "(both recorded in conversion.json; stage 02 refuses a prediction store made with others)"]
        if self.source.get("path"):
            lines.append(f"source: {self.source['path']} ({hr.size(self.source.get('bytes') or 0)})")
        counts = ", ".join(f"{k} {v}" for k, v in self.coverage.items() if v)
        if counts:
            lines.append(f"coverage (keys): {counts}")
        training = self.training_line()
        if training:
            lines.append(f"training (meta / message_hub): {training}")
        return hr.join(hr.banner(title, level="error" if self.warnings else "ok", lines=lines,
                                 items=[*self.warnings, *self.notes]))

    # --- report sections (notebook 01 shows each under its own heading) ----------------------------------------------
    def training_html(self) -> str:
        """What the checkpoint's ``meta`` / ``message_hub`` say, and the logged loss as a small plot."""
        info = self.training_info or {}
        rows = [(k, v) for k, v in info.items() if k != "scalars"]
        rows += [(name, f"{len(values)} values kept by mmengine: first {values[0]:.4g}, last {values[-1]:.4g}, "
                        f"min {min(values):.4g}")
                 for name, values in (info.get("scalars") or {}).items() if values]
        if not rows:
            return hr.join(hr.muted("The checkpoint carries no meta / message_hub (or conversion was not run)."))
        parts = [hr.table(rows)]
        losses = self.loss_history
        if losses:
            from matplotlib.figure import Figure  # slow import: only when there is a loss to draw

            fig = Figure(figsize=(5, 2.4), layout="constrained")
            ax = fig.subplots()
            ax.plot(range(1, len(losses) + 1), losses, marker=".")
            ax.set_xlabel("logged value (oldest kept first)")
            ax.set_ylabel("train loss")
            parts.append(hr.figure(fig, caption=f"train loss: the last {len(losses)} values mmengine kept in "
                                                 f"message_hub (checkpoint at iteration {info.get('iter', '?')})"))
        return hr.join(*parts)

    def components_html(self) -> str:
        """Per component: what the training config trained, where each output tensor came from, how far it moved."""
        plan = (self.expected or {}).get("components") or {}
        rows = []
        for name in COMPONENTS:
            comp = self.components.get(name)
            if not comp:
                continue
            sources = comp["sources"]
            from_training = sources.get("checkpoint", 0) + sources.get("lora_merged", 0)
            expected = plan.get(name) or {}
            rows.append({
                "component": COMPONENT_LABELS.get(name, name),
                "training config": expected.get("how", "not known (no training config given)"),
                "tensors": comp["n_tensors"],
                **{SOURCE_LABELS[s]: sources.get(s, 0) for s in SOURCES},
                "change vs base": _percent(comp["rel_change"]),
                "config vs checkpoint": _component_check(expected.get("trained"), from_training, comp["rel_change"]),
            })
        if not rows:
            return hr.join(hr.muted("No per-component record (conversion was not run here)."))
        where = (self.expected or {}).get("config")
        said = (f"'training config' is read from {where} (never executed)." if where else
                "No training config was given: what training was meant to change is not known; the counts below "
                "say what the checkpoint holds.")
        check = ("config vs checkpoint: ✓ trained = the config trains the part and the checkpoint holds it; ✓ frozen "
                 "= the config freezes it and it is the base's; ✗ or ! = they disagree (read the warnings)")
        return hr.join(hr.table(pd.DataFrame(rows)), hr.notes([said, BASE_NOTE, CHANGE_NOTE, check]))

    def lora_tokenizer_html(self) -> str:
        """The LoRA merge's r, alpha and scale, and the tokenizer's length, ``[SEG]`` id and added tokens."""
        lora = self.lora or {}
        parts = []
        if lora.get("scale") is not None:
            targets = ", ".join(lora.get("targets") or []) or "?"
            rows = [("r (rank)", lora.get("r")), ("alpha", f"{lora.get('alpha'):g}"),
                    ("scale", f"{lora['scale']:g} (= alpha / r; alpha / √r with rsLoRA)"),
                    ("pairs merged", f"{self.coverage.get('merged', 0) // 2} (W + scale·B·A, in fp32, rounded once)"),
                    ("target modules", targets)]
            parts.append(hr.table(rows, caption="LoRA merge"))
        else:
            parts.append(hr.muted("LoRA: the checkpoint holds no LoRA pairs (nothing merged)." if self.components
                                  else "LoRA: conversion was not run here."))
        tok = self.tokenizer or {}
        if tok.get("error") or not tok:
            parts.append(hr.muted(f"Tokenizer: {tok.get('error') or 'not recorded'}."))
            return hr.join(*parts)
        seg = tok.get("seg_id")
        wanted = (self.expected or {}).get("special_tokens") or []
        absent = [t for t in wanted if t not in (tok.get("added") or {})]
        sizes = ", ".join(f"{where} {size}" for where, size in (tok.get("vocab_size") or {}).items()) or "not set"
        rows = [("[SEG] token id", seg if seg is not None else "ABSENT: the model can never emit a mask"),
                ("len(tokenizer)", tok.get("length")), ("vocab_size", sizes),
                ("added tokens (id)", ", ".join(f"{t} {i}" for t, i in (tok.get("added") or {}).items()) or "none")]
        if wanted:
            rows.append(("special tokens of the training config",
                         ", ".join(wanted) + (f": ABSENT from the tokenizer: {', '.join(absent)}" if absent
                                              else ": all in the tokenizer")))
        parts.append(hr.table(rows, caption="Tokenizer (of the output folder)"))
        return hr.join(*parts)

    def coverage_html(self) -> str:
        """Keys per category with what the category means and two example keys; empty categories in one line."""
        table = self.coverage_table
        present = table[table["keys"] > 0]
        empty = table[table["keys"] == 0]["category"].tolist()
        if present.empty:
            return hr.join(hr.muted("No coverage record (conversion was not run here)."))
        examples = [", ".join([f["key"] for f in self.fates if f["category"] == c][:2]) for c in present["category"]]
        parts = [hr.table(present.assign(examples=examples))]
        if empty:
            blocking = [c for c in empty if c in BLOCKING_MISSING]
            parts.append(hr.muted("0 keys: " + ", ".join(empty) + (
                f" ({', '.join(blocking)} would have stopped the conversion)" if blocking else "")))
        return hr.join(*parts)

    def provenance_html(self) -> str:
        """Output tensors grouped by name pattern (layer numbers as ``*``), then every tensor in a ``<details>``.

        Names are never cut: long keys wrap inside their cell, so the list fits a 1280 px page.
        """
        table = self.provenance_table
        if table.empty:
            return hr.join(hr.muted("No provenance record (conversion was not run here)."))
        patterns = table["hf_key"].map(lambda k: _LAYER_NUMBER.sub("*", k).rpartition("."))
        table = table.assign(stem=patterns.map(lambda p: p[0] or p[2]), leaf=patterns.map(lambda p: p[2]),
                             order=table["component"].map(lambda c: COMPONENTS.index(c) if c in COMPONENTS else 99))
        groups = []
        for (_, stem, source), part in table.groupby(["order", "stem", "source"], sort=True):
            leaves = sorted(set(part["leaf"]))
            name = stem if stem == leaves[0] else stem + "." + (leaves[0] if len(leaves) == 1 else
                                                                 "{" + ", ".join(leaves) + "}")
            changes = part["rel_change"].astype(float)
            low, high = _percent(changes.min()), _percent(changes.max())
            groups.append({"output tensors (layer numbers as *)": name, "component": part["component"].iloc[0],
                           "tensors": len(part), "source": SOURCE_LABELS.get(source, source),
                           "change vs base": low if low == high else f"{low} – {high}"})
        full = pd.DataFrame({
            "output tensor": table["hf_key"], "component": table["component"],
            "source": table["source"].map(lambda s: SOURCE_LABELS.get(s, s)),
            "from (input key)": table["input_key"].map(lambda k: k if isinstance(k, str) and k else "—"),
            "shape": table["shape"].map(lambda s: " × ".join(str(n) for n in s) if isinstance(s, list) else str(s)),
            "change vs base": table["rel_change"].map(_percent),
        })
        full = full.assign(order=table["order"]).sort_values(["order", "output tensor"]).drop(columns="order")
        details = (f"<details style='margin:4px 0 10px 0'><summary style='cursor:pointer'>All {len(full)} output "
                   f"tensors, one row each (name, source, input key, shape, change)</summary>"
                   f"{_break_after_dots(hr.table(full))}</details>")
        return hr.join(hr.muted(f"{len(table)} output tensors in {len(groups)} groups; {CHANGE_NOTE}."),
                       _break_after_dots(hr.table(pd.DataFrame(groups))), details)


_CELL = re.compile(r"(<td>)([^<]*)(</td>)")


def _break_after_dots(page: str) -> str:
    """A table whose cells may break after each dot (``<wbr>``, which a copy leaves out): long tensor names wrap at
    their own separators, never inside a word, and the page keeps its width."""
    return _CELL.sub(lambda m: m.group(1) + m.group(2).replace(".", ".<wbr>") + m.group(3), page)


def _component_check(trained: bool | None, from_training: int, rel_change: float) -> str:
    """One verdict per component: does what the checkpoint holds match what the config trained?"""
    if trained is None:
        return f"{from_training} tensors from training" if from_training else "all from the base"
    if trained and not from_training:
        return "✗ the config trains it, but the checkpoint holds none of it"
    if trained and rel_change == 0:
        return "✗ trained, yet identical to the base"
    if trained:
        return "✓ trained"
    if from_training:
        return f"! frozen in the config, yet the checkpoint holds {from_training} of its tensors"
    return "✓ frozen"
