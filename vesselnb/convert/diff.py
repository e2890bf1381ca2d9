"""Weight differences between two checkpoints or HF folders: the check that would have caught seed 004.

Either side may be a HF folder (read lazily with ``safe_open``) or a training checkpoint (its keys mapped to HF
names; LoRA factors keep their ``lora_A`` / ``lora_B`` names). Tensors are compared one at a time in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from vesselnb import htmlrepr as hr
from vesselnb.convert.checkpoint import load_training_state_dict
from vesselnb.convert.hf_folder import BaseFolder
from vesselnb.convert.keymap import COMPONENTS, component_of, parse_training_key
from vesselnb.errors import ConversionError


class _Side:
    """A name -> tensor view of one side, HF names."""

    def __init__(self, path: str | Path, trust_pickle: bool = False) -> None:
        self.path = Path(path)
        self.folder: BaseFolder | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        if self.path.is_dir() and (self.path / "config.json").is_file():
            self.folder = BaseFolder(self.path)
            self.names = {k: k for k in self.folder.shapes}
            self.kind = "hf_folder"
        else:
            raw, _ = load_training_state_dict(self.path, trust_pickle)
            self.names = {}
            for key in raw:
                parsed = parse_training_key(key)
                name = parsed.candidates[0]
                if parsed.role.startswith("lora"):
                    name = name[: -len(".weight")] + "." + parsed.role
                elif parsed.role == "original":
                    name = name + " (original_module)"
                self.names[name] = key
            self.tensors = raw
            self.kind = "checkpoint"

    def get(self, name: str) -> torch.Tensor:
        key = self.names[name]
        return self.folder.get_tensor(key) if self.folder is not None else self.tensors[key]

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()


@dataclass
class WeightDiff:
    """Per-tensor and per-component differences between ``a`` and ``b``."""

    a: str
    b: str
    tensors: pd.DataFrame  # hf_key, component, shape, max_abs, rel_norm, identical
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Same keys, same shapes, every tensor bit-for-bit equal (as fp32)."""
        return (
            not self.only_in_a
            and not self.only_in_b
            and not self.shape_mismatch
            and len(self.tensors) > 0
            and bool(self.tensors["identical"].all())
        )

    @property
    def n_identical(self) -> int:
        return int(self.tensors["identical"].sum()) if len(self.tensors) else 0

    @property
    def component_table(self) -> pd.DataFrame:
        """Per component: tensors compared, identical count, max abs diff, relative norm of the difference."""
        rows = []
        for name in COMPONENTS:
            part = self.tensors[self.tensors["component"] == name]
            if part.empty:
                continue
            diff_sq, ref_sq = float(part["diff_sq"].sum()), float(part["ref_sq"].sum())
            rows.append(
                {
                    "component": name,
                    "n_tensors": len(part),
                    "n_identical": int(part["identical"].sum()),
                    "max_abs": float(part["max_abs"].max()),
                    "rel_norm": math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else float(diff_sq > 0),
                }
            )
        return pd.DataFrame(rows)

    @property
    def tensor_table(self) -> pd.DataFrame:
        """Per tensor, largest relative change first."""
        return self.tensors.drop(columns=["diff_sq", "ref_sq"]).sort_values("rel_norm", ascending=False)

    def summary_lines(self) -> list[str]:
        verdict = "IDENTICAL weights" if self.identical else "weights differ"
        lines = [f"{self.a} vs {self.b}: {verdict}; {self.n_identical}/{len(self.tensors)} tensors identical"]
        if self.only_in_a or self.only_in_b:
            lines.append(
                f"only in A: {len(self.only_in_a)}, only in B: {len(self.only_in_b)} (e.g. "
                f"{(self.only_in_a + self.only_in_b)[:3]})"
            )
        if self.shape_mismatch:
            lines.append(f"shape mismatch: {self.shape_mismatch[:5]}")
        for row in self.component_table.to_dict("records"):
            lines.append(
                f"  {row['component']:16s} n={row['n_tensors']:5d} identical={row['n_identical']:5d} "
                f"max_abs={row['max_abs']:.3e} rel_norm={row['rel_norm']:.3e}"
            )
        return lines

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())

    def _repr_html_(self) -> str:
        first, *rest = self.summary_lines()[:2]
        return hr.join(
            hr.banner(first, level="error" if self.identical else "ok", lines=rest),
            hr.table(self.component_table, float_format="{:.3e}"),
            hr.table(self.tensor_table.head(15), caption="Largest changes", float_format="{:.3e}"),
        )


def diff_weights(a: str | Path, b: str | Path, trust_pickle: bool = False) -> WeightDiff:
    """Compare two sides tensor by tensor (HF folders or training checkpoints, on HF names)."""
    if Path(a).resolve() == Path(b).resolve():
        raise ConversionError(f"{a}: diff of a path with itself; give two different checkpoints or folders")
    side_a, side_b = _Side(a, trust_pickle), _Side(b, trust_pickle)
    try:
        common = sorted(set(side_a.names) & set(side_b.names))
        rows, mismatched = [], []
        for name in tqdm(common, desc="diff", unit="tensor", leave=False):
            ta, tb = side_a.get(name), side_b.get(name)
            if tuple(ta.shape) != tuple(tb.shape):
                mismatched.append(f"{name}: {list(ta.shape)} vs {list(tb.shape)}")
                continue
            fa, fb = ta.float(), tb.float()
            diff = fa - fb
            diff_sq = float(torch.linalg.vector_norm(diff) ** 2) if diff.numel() else 0.0
            ref_sq = float(torch.linalg.vector_norm(fa) ** 2) if fa.numel() else 0.0
            rows.append(
                {
                    "hf_key": name,
                    "component": component_of(name),
                    "shape": list(ta.shape),
                    "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
                    "rel_norm": math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else float(diff_sq > 0),
                    "identical": bool(torch.equal(fa, fb)),
                    "diff_sq": diff_sq,
                    "ref_sq": ref_sq,
                }
            )
        table = pd.DataFrame(
            rows, columns=["hf_key", "component", "shape", "max_abs", "rel_norm", "identical", "diff_sq", "ref_sq"]
        )
        return WeightDiff(
            str(a),
            str(b),
            table,
            sorted(set(side_a.names) - set(side_b.names)),
            sorted(set(side_b.names) - set(side_a.names)),
            mismatched,
        )
    finally:
        side_a.close()
        side_b.close()
