"""The conversion report: coverage of every key, provenance of every output tensor, per-component change.

It is what makes a conversion trustworthy: a reader sees at a glance which tensors came from the checkpoint, which
were LoRA-merged, which were carried over from the base, and how much each model part moved.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from vesselnb import htmlrepr as hr
from vesselnb.convert.keymap import CATEGORIES, COMPONENTS

SOURCES = ("checkpoint", "lora_merged", "pretrained", "base")


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
        """The banner only: notebook 01 shows each table (coverage, components, provenance) under its own heading,
        so displaying the report must not show them a second time."""
        title = "Conversion with warnings" if self.warnings else "Conversion OK"
        if self.skipped:
            title += f" (skipped: {self.skipped})"
        line = (f"weights fingerprint {self.fingerprint} · config fingerprint {self.config_fingerprint or '?'} · "
                f"dtype {self.dtype} · {self.output_bytes / 1e9:.3f} GB · {self.output_dir}")
        counts = ", ".join(f"{k} {v}" for k, v in self.coverage.items() if v)
        lines = [line] + ([f"coverage: {counts}"] if counts else [])
        training = self.training_line()
        if training:
            lines.append(f"training (meta / message_hub): {training}")
        return hr.join(hr.banner(title, level="error" if self.warnings else "ok", lines=lines,
                                 items=[*self.warnings, *self.notes]))
