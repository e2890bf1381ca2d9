"""The fields of an xtuner/mmengine training config that conversion needs, read with the Python AST.

Importing the config would import xtuner, the Sa2VA package, peft, ... (its ``type=`` entries are classes). We
never execute it: module-level assignments are evaluated as literals, ``dict(...)`` calls become dicts, and any other
name (an imported class, ``PROMPT_TEMPLATE.qwen_chat``) becomes a :class:`Symbol` holding its dotted name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesselnb.errors import ConversionError


@dataclass(frozen=True)
class Symbol:
    """A name the config refers to but we do not import (e.g. ``LoraConfig``)."""

    name: str


@dataclass
class TrainingConfig:
    """What conversion reads from the training config (None when the config does not say)."""

    source: Path | None = None
    base_model_path: str | None = None
    pretrained_pth: str | None = None
    template: str | None = None
    special_tokens: list[str] = field(default_factory=list)
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    use_rslora: bool = False
    vision_lora: dict[str, Any] | None = None
    llm_lora: bool = False  # the config wraps the LLM in LoRA: every targeted projection of every layer trains
    frozen_sam2_decoder: bool = False  # Sa2VA trains SAM2's mask decoder unless this is set
    freeze_llm: bool | None = None
    freeze_visual_encoder: bool | None = None

    @property
    def lora_scale(self) -> float | None:
        """alpha / r (alpha / sqrt(r) with rsLoRA), peft's scaling for the merge."""
        if self.lora_r is None or self.lora_alpha is None:
            return None
        return self.lora_alpha / (self.lora_r**0.5 if self.use_rslora else self.lora_r)


class _Evaluator:
    """Evaluates the literal part of a config module; unknown names become Symbols."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            return {
                self.value(k) if k is not None else "**": self.value(v)
                for k, v in zip(node.keys, node.values, strict=True)
            }
        if isinstance(node, ast.Name):
            return self.names.get(node.id, Symbol(node.id))
        if isinstance(node, ast.Attribute):
            base = self.value(node.value)
            base_name = base.name if isinstance(base, Symbol) else "?"
            return Symbol(f"{base_name}.{node.attr}")
        if isinstance(node, ast.Call):
            func = self.value(node.func)
            kwargs = {kw.arg: self.value(kw.value) for kw in node.keywords if kw.arg is not None}
            if isinstance(func, Symbol) and func.name == "dict":
                return kwargs
            return {"__call__": func, **kwargs}
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult, ast.Sub, ast.Div)):
            left, right = self.value(node.left), self.value(node.right)
            try:
                if isinstance(node.op, ast.Add):
                    return left + right
                if isinstance(node.op, ast.Mult):
                    return left * right
                if isinstance(node.op, ast.Sub):
                    return left - right
                return left / right
            except TypeError:
                return Symbol("<expression>")
        if isinstance(node, ast.JoinedStr):
            return Symbol("<f-string>")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.value(node.operand)
            return -inner if isinstance(inner, (int, float)) else Symbol("<expression>")
        return Symbol(f"<{type(node).__name__}>")


def _walk_dicts(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        yield path, value
        for key, inner in value.items():
            yield from _walk_dicts(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, inner in enumerate(value):
            yield from _walk_dicts(inner, f"{path}[{i}]")


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_training_config(path: str | Path) -> TrainingConfig:
    """Parse a training config ``.py`` (never executed) into the fields conversion needs."""
    source = Path(path)
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except FileNotFoundError:
        raise ConversionError(f"{source}: training config not found") from None
    except SyntaxError as exc:
        raise ConversionError(f"{source}: not valid Python (line {exc.lineno}): {exc.msg}") from None
    evaluator = _Evaluator()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            value = evaluator.value(node.value)
            for target in node.targets:
                if isinstance(target, ast.Name):
                    evaluator.names[target.id] = value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            evaluator.names[node.target.id] = evaluator.value(node.value)
    names = evaluator.names
    config = TrainingConfig(source=source)
    config.base_model_path = _as_str(names.get("path"))
    config.pretrained_pth = _as_str(names.get("pretrained_pth"))
    config.template = _as_str(names.get("template"))
    tokens = names.get("special_tokens")
    if isinstance(tokens, (list, tuple)):
        config.special_tokens = [t for t in tokens if isinstance(t, str)]
    model = names.get("model")
    if isinstance(model, dict):
        if config.base_model_path is None:
            for _, node in _walk_dicts(model):
                if isinstance(node.get("model_path"), str):
                    config.base_model_path = node["model_path"]
                    break
        if config.pretrained_pth is None and isinstance(model.get("pretrained_pth"), str):
            config.pretrained_pth = model["pretrained_pth"]
        config.frozen_sam2_decoder = model.get("frozen_sam2_decoder") is True
        for _, node in _walk_dicts(model):
            for flag in ("freeze_llm", "freeze_visual_encoder"):
                if isinstance(node.get(flag), bool):
                    setattr(config, flag, node[flag])
        for where, node in _walk_dicts(model):
            if where.endswith("llm_lora") or (
                where.endswith("lora") and "visual" not in where and "vision" not in where
            ):
                _read_lora(node, config)
            elif where.endswith("visual_encoder_lora") or where.endswith("vision_lora"):
                config.vision_lora = {k: v for k, v in node.items() if not isinstance(v, Symbol)}
    return config


def _read_lora(node: dict[str, Any], config: TrainingConfig) -> None:
    config.llm_lora = True
    if isinstance(node.get("r"), int):
        config.lora_r = node["r"]
    if isinstance(node.get("lora_alpha"), (int, float)):
        config.lora_alpha = float(node["lora_alpha"])
    targets = node.get("target_modules")
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        config.lora_target_modules = list(targets)
    elif isinstance(targets, str):
        config.lora_target_modules = [targets]
    config.use_rslora = bool(node.get("use_rslora", False) is True)
