"""The base HF folder: its tensors (read lazily with ``safe_open``), its remote code, tokenizer and config.json.

The users' own converter copied 6 of the remote-code files and produced a folder that cannot load; here every
``.py`` file is copied and every relative import / ``auto_map`` entry is checked to resolve inside the folder.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vesselnb.errors import ConversionError
from vesselnb.fingerprint import INDEX_NAME, SINGLE_NAME

# Files of the base folder never copied: weights and their index are rewritten, config.json is rebuilt.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json", "config.json", ".gitattributes"}

SAFETENSORS_DTYPES = {  # a safetensors header's dtype names
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class BaseFolder:
    """Read-only view of a HF folder's weights: key -> shard, shapes and dtypes from the headers (no data read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConversionError(f"{self.path}: not a HF model folder (no config.json); give the base model folder")
        self.key_to_file = self._weight_map()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles: dict[str, Any] = {}
        for name in sorted(set(self.key_to_file.values())):
            handle = self._open(name)
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                self.shapes[key] = tuple(tensor_slice.get_shape())
                self.dtypes[key] = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.float32)
            self.release(name)
        missing = sorted(set(self.key_to_file) - set(self.shapes))
        if missing:
            raise ConversionError(f"{self.path}: the index names keys absent from their shards: {missing[:5]}")

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            absent = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if absent:
                raise ConversionError(f"{self.path}: shards named in {INDEX_NAME} are missing: {absent}")
            return dict(weight_map)
        single = self.path / SINGLE_NAME
        if single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                return dict.fromkeys(handle.keys(), SINGLE_NAME)
        raise ConversionError(
            f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}. The base folder must hold safetensors weights "
            "(re-save a .bin model with save_pretrained(safe_serialization=True))"
        )

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            try:
                manager = safe_open(str(self.path / name), framework="pt")
                self._handles[name] = (manager, manager.__enter__())
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise ConversionError(f"{self.path / name}: cannot read this safetensors shard ({exc})") from None
        return self._handles[name][1]

    def release(self, name: str) -> None:
        """Unmap one shard: its pages leave this process's resident set (streaming keeps RSS near one shard)."""
        entry = self._handles.pop(name, None)
        if entry is not None:
            entry[0].__exit__(None, None, None)

    def get_tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard's memory map."""
        return self._open(self.key_to_file[key]).get_tensor(key)

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.key_to_file.values()))

    def close(self) -> None:
        for name in list(self._handles):
            self.release(name)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))


def remote_code_files(folder: Path) -> list[Path]:
    """Every ``.py`` file of the folder (recursively: some remote code lives in sub-packages)."""
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts and not p.name.startswith("."))


def check_remote_code(folder: Path, config: dict[str, Any]) -> list[str]:
    """Module names that ``auto_map`` or a relative import needs but the folder lacks (empty = loadable)."""
    present = {p.relative_to(folder).with_suffix("").as_posix().replace("/", ".") for p in remote_code_files(folder)}
    needed: set[str] = set()
    for ref in (config.get("auto_map") or {}).values():
        for item in ref if isinstance(ref, list) else [ref]:
            if isinstance(item, str) and "." in item:
                needed.add(item.split("--")[-1].rsplit(".", 1)[0])
    for file in remote_code_files(folder):
        package = file.relative_to(folder).parent.as_posix().replace("/", ".").strip(".")
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node.level > 0:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                if node.module:
                    needed.add(".".join([*base, node.module]))
                else:
                    needed.update(".".join([*base, alias.name]) for alias in node.names)
    packages = {m.rsplit(".", 1)[0] for m in present if "." in m}
    return sorted(m for m in needed if m not in present and m not in packages and m + ".__init__" not in present)


def support_files(base: Path) -> list[Path]:
    """The files conversion copies from the base: tokenizer, generation config, remote code, anything not weights."""
    files = []
    for src in sorted(base.rglob("*")):
        rel = src.relative_to(base)
        if src.is_dir() or "__pycache__" in rel.parts or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.name in _NOT_COPIED_NAMES or rel.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        files.append(src)
    return files


def copy_support_files(base: Path, out: Path) -> list[str]:
    """Copy :func:`support_files` into ``out``; returns the names copied."""
    copied = []
    for src in support_files(base):
        rel = src.relative_to(base)
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        copied.append(rel.as_posix())
    return copied


def tokenizer_length(folder: Path) -> int | None:
    """``len(tokenizer)`` of the base folder (None when it has no tokenizer); the HF vocab_size must equal it."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer  # slow import: only when there is a tokenizer to measure

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is reported the same way
        raise ConversionError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    return len(tokenizer)


def set_vocab_size(config: dict[str, Any], vocab_size: int) -> list[str]:
    """Set vocab_size where the config keeps it (``llm_config``, ``text_config`` or top level); returns the paths."""
    places = []
    for sub in ("llm_config", "text_config"):
        if isinstance(config.get(sub), dict):
            config[sub]["vocab_size"] = vocab_size
            places.append(f"{sub}.vocab_size")
    if "vocab_size" in config or not places:
        config["vocab_size"] = vocab_size
        places.append("vocab_size")
    return places


def build_config(
    base_config: dict[str, Any], template: str | None, vocab_size: int | None, torch_dtype: torch.dtype
) -> dict[str, Any]:
    """config.json for the output: the base's, with template, vocab_size and torch_dtype updated."""
    if not base_config.get("auto_map"):
        raise ConversionError(
            "the base folder's config.json has no 'auto_map': the converted folder could not load its remote code "
            "with trust_remote_code. Use the Sa2VA HF folder training started from."
        )
    config = json.loads(json.dumps(base_config))
    if template is not None:
        config["template"] = template
    if vocab_size is not None:
        set_vocab_size(config, vocab_size)
    dtype_name = str(torch_dtype).replace("torch.", "")
    config["torch_dtype"] = dtype_name
    for place in declared_dtypes(config):
        section, _, key = place.rpartition(".")
        (config[section] if section else config)[key] = dtype_name
    return config


# Where a config.json states its dtype: transformers >= 4.56 writes "dtype" and reads it before "torch_dtype".
DTYPE_KEYS = ("dtype", "torch_dtype")
_SUB_CONFIGS = ("llm_config", "text_config", "vision_config")


def declared_dtypes(config: dict[str, Any]) -> dict[str, str]:
    """Every dtype a config.json states, by place (``"dtype"``, ``"llm_config.torch_dtype"``...).

    A base saved by transformers >= 4.56 says ``"dtype": "bfloat16"``; rewriting only ``torch_dtype`` for an fp32
    conversion left a folder that ``torch_dtype="auto"`` loads in bf16. Every place is rewritten, and the doctor
    compares them all with the stored tensors.

    >>> declared_dtypes({"dtype": "bfloat16", "torch_dtype": "float32", "llm_config": {"torch_dtype": "bfloat16"}})
    {'dtype': 'bfloat16', 'torch_dtype': 'float32', 'llm_config.torch_dtype': 'bfloat16'}
    """
    places = {key: config[key] for key in DTYPE_KEYS if isinstance(config.get(key), str)}
    for sub in _SUB_CONFIGS:
        section = config.get(sub)
        if isinstance(section, dict):
            places.update({f"{sub}.{key}": section[key] for key in DTYPE_KEYS if isinstance(section.get(key), str)})
    return places
