"""``vesselnb doctor HF_FOLDER``: will this folder load and segment? Answered in seconds, before a long run.

A damaged or edited folder used to load with transformers silently initialising or dropping weights (a
``num_hidden_layers`` edit), and inference then reported every frame ``ok``. The checks here read only the config,
the tokenizer and the safetensors headers, and build the model on the ``meta`` device (no memory, no weights) to
compare the keys and shapes the code expects with those the shards hold. The same functions guard
:func:`vesselnb.infer.load_model`: :func:`check_files` before loading, :func:`refuse_loading_info` and
:func:`refuse_non_finite` after.
"""

from __future__ import annotations

import argparse
import html
import json
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vesselnb import htmlrepr as hr
from vesselnb.convert.checks import has_non_finite
from vesselnb.convert.hf_folder import SAFETENSORS_DTYPES, check_remote_code, declared_dtypes
from vesselnb.device import available_ram, plan_device
from vesselnb.errors import InferenceError
from vesselnb.fingerprint import INDEX_NAME, SINGLE_NAME

# transformers versions the project's tests ran with; Sa2VA's remote code needs >= 4.49 (Qwen2.5-VL config).
TESTED_TRANSFORMERS = ("4.49.0", "4.58.0")  # [low, high)
REQUIRED_TOKENS = ("[SEG]", "<img>", "</img>", "<IMG_CONTEXT>")
_RUNTIME_OVERHEAD_BYTES = 3 * 10**9  # SAM2 at 1024², activations, CUDA context: measured ~2.3 GB on one frame
_ST_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LIST = 6


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:_LIST]) + (f" and {len(keys) - _LIST} more" if len(keys) > _LIST else "")


# --- files ------------------------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InferenceError(f"{folder}: not an HF model folder (config.json missing); run stage 01 or fix 'hf_model'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InferenceError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}; restore it") from None


def weight_map(folder: Path) -> dict[str, str]:
    """``{key: shard file}`` from the index (or the single ``model.safetensors``); every named shard must exist."""
    index = folder / INDEX_NAME
    if index.is_file():
        mapping = dict(json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {})
        absent = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if absent:
            raise InferenceError(
                f"{folder}: {INDEX_NAME} names shards that are missing: {_names(absent)}; the folder is incomplete "
                "(an interrupted copy or download). Copy the missing shards again or re-run the conversion."
            )
        return mapping
    if (folder / SINGLE_NAME).is_file():
        return dict.fromkeys(read_header(folder / SINGLE_NAME), SINGLE_NAME)
    raise InferenceError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}: no safetensors weights to load")


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor table ``{key: {dtype, shape, data_offsets}}``, from its header only."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise InferenceError(f"{path}: not a safetensors file (shorter than its header length); copy it again")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise InferenceError(f"{path}: not a safetensors file (header length {length}); copy it again")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InferenceError(f"{path}: damaged safetensors header; copy the file again") from None
    header.pop("__metadata__", None)
    size = path.stat().st_size
    end = 8 + length + max((v["data_offsets"][1] for v in header.values()), default=0)
    if size < end:
        raise InferenceError(f"{path}: the file ends {end - size:,} bytes early (truncated copy); copy it again")
    return header


def stored_tensors(folder: Path) -> dict[str, dict[str, Any]]:
    """Every stored tensor's dtype and shape; the index and the shards must name the same keys."""
    mapping = weight_map(folder)
    stored: dict[str, dict[str, Any]] = {}
    for shard in sorted(set(mapping.values())):
        for key, meta in read_header(folder / shard).items():
            stored[key] = {"dtype": meta["dtype"], "shape": tuple(meta["shape"]), "file": shard}
    absent = set(mapping) - set(stored)
    if absent:
        raise InferenceError(f"{folder}: {INDEX_NAME} names tensors absent from their shards: {_names(absent)}")
    return stored


def check_files(folder: Path) -> dict[str, Any]:
    """Before loading: config, ``auto_map`` and its remote code, the shard set. Returns the config.

    Without ``auto_map`` transformers falls back to its own model types and says "update Transformers", which
    is the wrong fix: the folder has lost the pointer to its remote code.
    """
    config = read_config(folder)
    auto_map = config.get("auto_map") or {}
    if "AutoModel" not in auto_map:
        py = sorted(p.name for p in folder.glob("modeling_*.py"))
        raise InferenceError(
            f"{folder / 'config.json'}: no 'auto_map' entry for AutoModel, so transformers cannot find the model's "
            f"remote code ({', '.join(py) or 'no modeling_*.py here either'}); config.json was edited or replaced. "
            "Restore it from the conversion (vesselnb convert writes it) or the base folder: "
            '"auto_map": {"AutoConfig": "configuration_<name>.<Config>", "AutoModel": "modeling_<name>.<Model>"}.'
        )
    missing = check_remote_code(folder, config)
    if missing:
        raise InferenceError(
            f"{folder}: the remote code needs modules absent from the folder: {_names(missing)}; copy every .py file "
            "of the base folder into it"
        )
    weight_map(folder)
    return config


def expected_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Keys and shapes the folder's code builds from its config, parameters on the ``meta`` device (no weights).

    accelerate's ``init_empty_weights`` (what transformers itself loads under), not ``with torch.device("meta")``:
    upstream Sa2VA's InternViT and SAM2 build their drop-path schedules with ``torch.linspace(...)[i].item()``
    in ``__init__``, which a meta default device turns into "Tensor.item() cannot be called on meta tensors".
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel  # ~2 s to import: only when a folder is examined

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    with init_empty_weights():
        model = AutoModel.from_config(config, trust_remote_code=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_keys(expected: dict[str, tuple[int, ...]], stored: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """``missing`` (would be newly initialised), ``unexpected`` (dropped), ``mismatched`` (shape differs)."""
    return {
        "missing": sorted(set(expected) - set(stored)),
        "unexpected": sorted(set(stored) - set(expected)),
        "mismatched": sorted(
            f"{k}: stored {list(stored[k]['shape'])} vs config {list(expected[k])}"
            for k in set(expected) & set(stored)
            if tuple(stored[k]["shape"]) != tuple(expected[k])
        ),
    }


_KEY_MEANING = {
    "missing": "not in the weights, so transformers would initialise them randomly",
    "unexpected": "in the weights but not in the model the config describes, so they would be dropped",
    "mismatched": "of another shape than the config describes",
}


def keys_message(folder: Path, problems: dict[str, list[str]]) -> str | None:
    parts = [f"{len(v)} {kind} ({_KEY_MEANING[kind]}: {_names(v)})" for kind, v in problems.items() if v]
    if not parts:
        return None
    return (
        f"{folder}: the weights do not fit the model config.json describes: " + "; ".join(parts) + ". config.json "
        "was edited (num_hidden_layers, hidden_size...) or belongs to another model, or the shards are incomplete. "
        "Restore config.json from the conversion (or re-run `vesselnb convert`)."
    )


def refuse_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """After ``from_pretrained(output_loading_info=True)``: any missing, unexpected or mismatched key refuses."""
    problems = {
        "missing": list(info.get("missing_keys") or []),
        "unexpected": list(info.get("unexpected_keys") or []),
        "mismatched": [
            f"{i[0]}: {list(i[1])} vs {list(i[2])}" if isinstance(i, tuple) and len(i) == 3 else str(i)
            for i in info.get("mismatched_keys") or []
        ],
    }
    message = keys_message(folder, problems)
    if message:
        raise InferenceError(message)


def size_mismatch_message(folder: Path, error: BaseException) -> str:
    """One line for transformers' size-mismatch RuntimeError (a ``hidden_size`` edit), naming the keys.

    torch's message names a submodule's local parameter (``weight``); the keys come from comparing the shards'
    headers with the model built from config.json on the meta device.
    """
    try:
        message = keys_message(folder, compare_keys(expected_tensors(folder), stored_tensors(folder)))
    except Exception:  # noqa: BLE001 - the comparison only improves the message
        message = None
    if message:
        return message
    lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
    return (
        f"{folder}: the weights' shapes do not fit config.json ({'; '.join(lines[:3]) or str(error).splitlines()[0]})."
        " config.json was edited (hidden_size, intermediate_size...) or belongs to another model: restore it from "
        "the conversion."
    )


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating tensors holding NaN or inf (meta tensors, which hold no values, are skipped)."""
    return [name for name, tensor in tensors if tensor.device.type != "meta" and has_non_finite(tensor)]


def refuse_non_finite(folder: Path, model: Any) -> None:
    bad = non_finite(list(model.named_parameters()) + list(model.named_buffers()))
    if bad:
        raise InferenceError(
            f"{folder}: {len(bad)} weights hold NaN or inf ({_names(bad)}); every answer would be garbage (empty "
            "masks reported as ok). Convert an earlier checkpoint, or copy the shards again if the folder is damaged."
        )


def _stored_non_finite(folder: Path, stored: dict[str, dict[str, Any]]) -> list[str]:
    bad: list[str] = []
    for shard in sorted({m["file"] for m in stored.values()}):
        with safe_open(str(folder / shard), framework="pt") as handle:
            bad += non_finite((key, handle.get_tensor(key)) for key in handle.keys())
    return bad


# --- the report -------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


@dataclass
class DoctorReport:
    """Every check of one folder; ``failed`` means the folder will not load or not segment."""

    folder: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warned(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    def __str__(self) -> str:
        head = f"doctor {self.folder}: " + (
            f"{len(self.failed)} FAILED" if self.failed else ("ok with warnings" if self.warned else "ok")
        ) + f" ({self.seconds:.1f} s)"
        return "\n".join([head] + [f"  [{c.status:4s}] {c.name}: {c.detail}" for c in self.checks])

    def _repr_html_(self) -> str:
        colour = "#b00020" if self.failed else ("#b26a00" if self.warned else "#1b5e20")
        title = "Model folder check: " + ("FAILED" if self.failed else "warnings" if self.warned else "OK")
        rows = "".join(
            f"<tr><td>{'✗' if c.status == 'fail' else '!' if c.status == 'warn' else '✓'}</td>"
            f"<td style='text-align:left'>{html.escape(c.name)}</td>"
            f"<td style='text-align:left'>{html.escape(c.detail)}</td></tr>"
            for c in self.checks
        )
        return (
            f'<div style="border-left:6px solid {colour};padding:6px 10px;background:{colour}14">'
            f'<div style="color:{colour};font-weight:bold">{title}</div><div>{html.escape(self.folder)} · '
            f"{self.seconds:.1f} s</div><table>{rows}</table></div>"
        )


def _version_check(report: DoctorReport) -> None:
    import transformers  # ~2 s to import: only when a folder is examined
    from packaging.version import Version

    low, high = TESTED_TRANSFORMERS
    version = Version(transformers.__version__)
    inside = Version(low) <= version < Version(high)
    report.add(
        "transformers version",
        "ok" if inside else "warn",
        f"{transformers.__version__} ({'within' if inside else 'OUTSIDE'} the tested range >={low},<{high})",
    )


def _tokenizer_check(report: DoctorReport, folder: Path, config: dict[str, Any], stored: dict[str, Any]) -> None:
    from transformers import AutoTokenizer  # ~2 s to import: only when a folder is examined

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is one finding
        report.add("tokenizer", "fail", f"cannot load ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return
    vocab = tokenizer.get_vocab()
    absent = [t for t in REQUIRED_TOKENS if t not in vocab]
    report.add(
        "tokenizer tokens",
        "fail" if absent else "ok",
        f"missing {absent}: the model cannot emit masks or take images" if absent
        else f"{', '.join(REQUIRED_TOKENS)} present (len {len(tokenizer)})",
    )
    sizes = {
        where: sub.get("vocab_size")
        for where, sub in (("config", config), ("llm_config", config.get("llm_config") or {}),
                           ("text_config", config.get("text_config") or {}))
        if isinstance(sub, dict) and sub.get("vocab_size") is not None
    }
    rows = {
        stored[k]["shape"][0] for k in stored if k.endswith(("embed_tokens.weight", "tok_embeddings.weight"))
    }
    problems = [f"{w}.vocab_size={v}" for w, v in sizes.items() if v < len(tokenizer)]
    problems += [f"embedding rows {r}" for r in rows if r < len(tokenizer)]
    report.add(
        "vocab_size vs tokenizer",
        "fail" if problems else "ok",
        (f"len(tokenizer)={len(tokenizer)} but {', '.join(problems)}: token ids beyond the embedding crash"
         if problems else f"len(tokenizer)={len(tokenizer)}, " + ", ".join(f"{w}.vocab_size={v}" for w, v in
                                                                           sizes.items()) + f", rows {sorted(rows)}"),
    )


def _dtype_check(report: DoctorReport, config: dict[str, Any], stored: dict[str, Any]) -> None:
    """The dtype config.json states (every place it states one) against the floating dtypes stored.

    ``from_pretrained(..., torch_dtype="auto")`` loads the weights in the dtype the config states, whatever is
    stored: a config saying bf16 beside fp32 shards silently halves the precision, a sign of an edited config or of
    a converter that rewrote one of the two keys transformers reads.
    """
    dtypes: dict[str, int] = {}
    for meta in stored.values():
        dtypes[meta["dtype"]] = dtypes.get(meta["dtype"], 0) + 1
    known = [SAFETENSORS_DTYPES[name] for name in dtypes if name in SAFETENSORS_DTYPES]
    floats = {str(dtype).replace("torch.", "") for dtype in known if dtype.is_floating_point}
    declared = declared_dtypes(config)
    stated = ", ".join(f"{place} {value}" for place, value in declared.items()) or "no dtype"
    detail = f"config.json: {stated}; stored {dtypes}"
    disagree = len(set(declared.values())) > 1 or bool(floats and set(declared.values()) - floats)
    if disagree:
        detail += (
            f". torch_dtype='auto' loads these weights as {next(iter(declared.values()))} (transformers >= 4.56 "
            f"reads 'dtype' first). Set every one of {', '.join(declared)} to what is stored "
            f"({', '.join(sorted(floats))}), or convert again."
        )
    report.add("dtype", "warn" if disagree else "ok", detail)


def _memory_check(report: DoctorReport, stored: dict[str, Any], device: str, dtype: str) -> None:
    try:
        plan = plan_device(device, dtype)
    except InferenceError as exc:
        report.add("device plan", "fail", str(exc))
        return
    n_params = sum(int(torch.Size(m["shape"]).numel()) for m in stored.values())
    weight_bytes = n_params * torch.empty((), dtype=plan.dtype).element_size()
    need = weight_bytes + _RUNTIME_OVERHEAD_BYTES
    if plan.is_cpu:
        available = available_ram()
        where = "RAM available"
    else:
        available = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        where = f"GPU memory on {torch.cuda.device_count()} GPU(s)"
    status = "ok" if available is None or need <= available else "warn"
    report.add(
        "device plan and memory",
        status,
        f"{plan.device} {plan.dtype_name} (device_map {plan.device_map}); {n_params / 1e6:.1f} M parameters = "
        f"{hr.size(weight_bytes)} of weights + ~{_RUNTIME_OVERHEAD_BYTES / 1e9:.0f} GB at run time = "
        f"~{need / 1e9:.1f} GB; " + (f"{where}: {available / 1e9:.1f} GB" if available is not None else where),
    )


def diagnose(folder: str | Path, device: str = "auto", dtype: str = "auto", scan_values: bool = True) -> DoctorReport:
    """Run every check on an HF folder; never raises for a problem of the folder (each is a ``fail`` line)."""
    started = time.monotonic()
    folder = Path(folder)
    report = DoctorReport(str(folder))
    try:
        config = check_files(folder)
    except InferenceError as exc:
        report.add("files", "fail", str(exc))
        report.seconds = time.monotonic() - started
        return report
    code = sorted(p.name for p in folder.glob("*.py"))
    classes = "; ".join(f"{auto} → {target}" for auto, target in config["auto_map"].items())
    report.add("remote code files", "ok", f"{len(code)} .py files; auto_map: {classes}")
    stored: dict[str, Any] = {}
    try:
        stored = stored_tensors(folder)
    except InferenceError as exc:
        report.add("weights", "fail", str(exc))
    try:
        expected = expected_tensors(folder)
        report.add("remote code importable", "ok", f"the model builds from config.json ({len(expected)} tensors)")
    except Exception as exc:  # noqa: BLE001 - an import or build failure of user code is one finding
        expected = None
        report.add("remote code importable", "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    if stored and expected is not None:
        message = keys_message(folder, compare_keys(expected, stored))
        report.add("weights complete", "fail" if message else "ok",
                   message or f"{len(stored)} tensors in {len({m['file'] for m in stored.values()})} shards = config")
    if stored:
        _dtype_check(report, config, stored)
        if scan_values:
            bad = _stored_non_finite(folder, stored)
            report.add("weights finite", "fail" if bad else "ok",
                       f"{len(bad)} tensors hold NaN/inf: {_names(bad)}" if bad else "no NaN/inf in any tensor")
        else:
            report.add("weights finite", "warn", "not scanned (--quick)")
    _tokenizer_check(report, folder, config, stored)
    _version_check(report)
    if stored:
        _memory_check(report, stored, device, dtype)
    report.seconds = time.monotonic() - started
    return report


def cli_main(args: argparse.Namespace) -> int:
    """``vesselnb doctor``: print the report; exit 1 when a check failed."""
    report = diagnose(args.folder, args.device, args.dtype, scan_values=not args.quick)
    print(report)
    return 1 if report.failed else 0
