"""Reading mmengine / DeepSpeed training checkpoints without running the pickle's code.

A ``.pth`` is a pickle: loading it with plain ``torch.load`` can run anything the file says. We load with
``weights_only=True`` (tensors and plain containers only) plus a short allow-list of the harmless objects real
Sa2VA checkpoints carry in ``meta`` / ``message_hub`` (``TorchVersion``, mmengine ``HistoryBuffer``, config dicts,
numpy arrays). mmengine need not be installed: its classes are replaced by inert stand-ins that only hold data.
mmengine's live ``HistoryBuffer`` pickles its statistics methods through ``builtins.getattr``; that name maps to a
stand-in that answers only ``HistoryBuffer.<min|max|mean|current>`` with a name record and refuses anything else
(the real ``getattr`` is the classic code-execution gadget). Legacy (non-zip) ``torch.save`` files load without
mmap. Anything else is refused unless the user passes ``trust_pickle`` (which runs the pickle's code).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vesselnb.convert.flags import TRUST_PICKLE_FLAG
from vesselnb.errors import CheckpointError

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


class _InertRecord:
    """Stand-in for a class from a package we do not import (mmengine): keeps the pickled state as data."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (data only)>"


class HistoryBuffer(_InertRecord):
    """mmengine.logging.HistoryBuffer, as data."""


# The statistics a HistoryBuffer pickles as ``getattr(HistoryBuffer, name)`` (its ``_statistics_methods``).
HISTORY_BUFFER_STATISTICS = frozenset({"min", "max", "mean", "current"})


class StatisticMethod(_InertRecord):
    """A HistoryBuffer statistic method (``HistoryBuffer.mean``...), as its name only: never callable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<HistoryBuffer.{self.name} (name only)>"


def _inert_getattr(obj: Any, name: str) -> StatisticMethod:
    """The only ``getattr`` a checkpoint may call: ``HistoryBuffer.<statistic>``, answered with a name record.

    mmengine's ``MessageHub.state_dict()`` holds live ``HistoryBuffer`` objects whose ``_statistics_methods`` pickle
    as ``builtins.getattr(HistoryBuffer, "mean")``. The real ``getattr`` is the classic gadget for running code from a
    pickle (``getattr(obj, "system")``...), so it is never allowed: this stand-in answers only that pair.
    """
    if obj is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return StatisticMethod(name)
    raise pickle.UnpicklingError(
        f"the pickle calls getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}); only "
        f"HistoryBuffer.{{{', '.join(sorted(HISTORY_BUFFER_STATISTICS))}}} is allowed"
    )


class ConfigDict(dict):
    """mmengine.config.ConfigDict (a dict subclass), as data."""


class _ConfigRecord(_InertRecord):
    """mmengine.config.Config, as data."""


def _allowed_globals() -> list[Any]:
    """The allow-list: (object, 'module.Name') pairs a real Sa2VA checkpoint needs beyond torch's defaults."""
    import numpy as np
    from torch.torch_version import TorchVersion

    allowed: list[Any] = [TorchVersion, (TorchVersion, "torch.torch_version.TorchVersion")]
    allowed += [(_inert_getattr, "builtins.getattr"), (_inert_getattr, "__builtin__.getattr")]
    for module in ("mmengine.logging.history_buffer", "mmengine.logging"):
        allowed.append((HistoryBuffer, f"{module}.HistoryBuffer"))
    for module in ("mmengine.config.config", "mmengine.config"):
        allowed.append((ConfigDict, f"{module}.ConfigDict"))
        allowed.append((_ConfigRecord, f"{module}.Config"))
    # numpy arrays and scalars in message_hub: reconstruction from raw bytes, no code.
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):  # pickles name either, by writer's numpy
        allowed.append((multiarray._reconstruct, f"{prefix}._reconstruct"))
        allowed.append((multiarray.scalar, f"{prefix}.scalar"))
    allowed += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for dtype in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_):
        dtype_class = type(np.dtype(dtype))
        allowed.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return allowed


@dataclass
class CheckpointSource:
    """Where the tensors of a training checkpoint live, after resolving work dirs and DeepSpeed folders."""

    given: Path
    file: Path  # the file holding the tensors
    layout: str  # "mmengine" (.pth with state_dict), "deepspeed" (module), "flat" (plain state dict)
    info: dict[str, Any] = field(default_factory=dict)  # what meta / message_hub say (see training_info)

    @property
    def nbytes(self) -> int:
        return self.file.stat().st_size


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path means: a ``.pth`` file, a work dir's ``last_checkpoint``, or a DeepSpeed folder."""
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"{given}: checkpoint not found (give an iter_N.pth file or its work dir)")
    if given.is_dir() and (given / "last_checkpoint").is_file() and not (given / DEEPSPEED_MODEL_FILE).exists():
        named = (given / "last_checkpoint").read_text(encoding="utf-8").strip()
        target = Path(named) if Path(named).is_absolute() else given / named
        local = given / Path(named).name
        if not target.resolve().is_relative_to(given.resolve()):
            # mmengine writes an absolute path; a moved or copied work dir then points at another run's file.
            if local.exists():
                return local
            raise CheckpointError(
                f"{given / 'last_checkpoint'} names {named}, outside this work dir, and {local.name} is not in it; "
                "pass the .pth file directly"
            )
        if not target.exists():
            raise CheckpointError(
                f"{given / 'last_checkpoint'} names {named}, which does not exist; pass the .pth file directly"
            )
        return target
    return given


def checkpoint_file(path: str | Path) -> Path:
    """The file that holds a checkpoint's tensors (resolving work dirs and DeepSpeed folders), without loading it."""
    target = resolve_checkpoint(path)
    return _deepspeed_model_file(target) if target.is_dir() else target


def _deepspeed_model_file(folder: Path) -> Path:
    model_file = folder / DEEPSPEED_MODEL_FILE
    if model_file.is_file():
        return model_file
    shards = sorted(folder.glob("*optim_states.pt")) + sorted(folder.glob("zero_pp_rank_*"))
    if shards:
        raise CheckpointError(
            f"{folder}: a DeepSpeed ZeRO-3 folder with partitioned states only ({shards[0].name}, ...) and no "
            f"{DEEPSPEED_MODEL_FILE}. Consolidate it first, e.g. `python {folder.parent}/zero_to_fp32.py "
            f"{folder.parent} consolidated.pth --tag {folder.name}` (DeepSpeed's script, written beside the "
            "checkpoint) or deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict, then convert "
            "the consolidated file."
        )
    raise CheckpointError(
        f"{folder}: a folder without last_checkpoint or {DEEPSPEED_MODEL_FILE}; pass the iter_N.pth file"
    )


def _torch_load(file: Path, trust_pickle: bool) -> Any:
    """torch.load with the allow-list; errors become CheckpointError naming the file and the fix."""
    # mmap needs torch's zip format; a legacy (``_use_new_zipfile_serialization=False``) file is read into memory.
    use_mmap = zipfile.is_zipfile(file)
    try:
        if trust_pickle:
            return torch.load(file, map_location="cpu", weights_only=False, mmap=use_mmap)
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = _unsafe_globals_hint(file)
        raise CheckpointError(
            f"{file}: refused to load: the pickle needs objects outside the safe allow-list{detail} "
            f"({first_line}). Loading it would run code from the file. If you trust its origin, pass "
            f"{TRUST_PICKLE_FLAG} (params: checkpoint.trust_pickle: true)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{file}: cannot read this checkpoint ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}). "
            "It may be truncated (an interrupted save or copy) or not a torch checkpoint; check its size against "
            "the original and copy it again."
        ) from None


def _unsafe_globals_hint(file: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception:  # noqa: BLE001 - only a hint for the message
        return ""
    return f": {', '.join(names[:5])}" if names else ""


def _tensor_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not tensors:
        raise CheckpointError(f"{where}: holds no tensors; is this a training checkpoint?")
    if others:
        raise CheckpointError(f"{where}: entries that are not tensors: {others[:5]}; not a state dict")
    return tensors


def load_training_state_dict(
    path: str | Path, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], CheckpointSource]:
    """The tensors of a training checkpoint (mmengine ``state_dict``, DeepSpeed ``module`` or a flat dict).

    Tensors stay memory-mapped (``mmap=True``), so reading a 3 GB checkpoint costs no RAM until a tensor is used.
    """
    given = Path(path)
    target = resolve_checkpoint(given)
    if target.is_dir():
        file = _deepspeed_model_file(target)
        payload = _torch_load(file, trust_pickle)
        module = payload.get("module") if isinstance(payload, Mapping) else None
        if module is None:
            raise CheckpointError(
                f"{file}: 'module' is empty (ZeRO-3 keeps weights in the partitioned files); consolidate with "
                "DeepSpeed's zero_to_fp32.py and convert the consolidated file"
            )
        tensors = _tensor_dict(module, f"{file} ['module']")
        if all(t.numel() == 0 for t in tensors.values()):
            raise CheckpointError(
                f"{file}: every tensor in 'module' is empty: a ZeRO-3 checkpoint keeps the weights partitioned in "
                "the *optim_states.pt files. Consolidate with DeepSpeed's zero_to_fp32.py (written beside the "
                "checkpoint) and convert the consolidated file."
            )
        return tensors, CheckpointSource(given, file, "deepspeed", training_info(payload))
    payload = _torch_load(target, trust_pickle)
    if isinstance(payload, Mapping) and "state_dict" in payload:
        return _tensor_dict(payload["state_dict"], f"{target} ['state_dict']"), CheckpointSource(
            given, target, "mmengine", training_info(payload)
        )
    if isinstance(payload, Mapping) and "module" in payload and isinstance(payload["module"], Mapping):
        return _tensor_dict(payload["module"], f"{target} ['module']"), CheckpointSource(
            given, target, "deepspeed", training_info(payload)
        )
    return _tensor_dict(payload, str(target)), CheckpointSource(given, target, "flat")


def _plain(value: Any) -> Any:
    """A JSON-able copy of a meta value (numpy scalars to numbers, version objects to strings)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        return value.item()
    return str(value)


def _history(buffer: Any) -> list[float]:
    """The logged values of one message_hub scalar: a (data-only) HistoryBuffer, or the plain dicts of older saves."""
    state = buffer._state if isinstance(buffer, _InertRecord) else buffer
    if isinstance(state, Mapping):
        values = state.get("_log_history", state.get("data"))
        if values is not None:
            try:
                return [float(v) for v in list(values)]
            except (TypeError, ValueError):
                return []
    return []


def training_info(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint's ``meta`` / ``message_hub`` say about the run: iteration, epoch, save time, seed, versions
    and the loss history, so the report shows *which* point of training this file is (the tensors do not say)."""
    meta = payload.get("meta") if isinstance(payload.get("meta"), Mapping) else {}
    hub = payload.get("message_hub") if isinstance(payload.get("message_hub"), Mapping) else {}
    runtime = hub.get("runtime_info") if isinstance(hub.get("runtime_info"), Mapping) else {}
    info: dict[str, Any] = {}
    for key in ("iter", "epoch", "max_iters", "max_epochs"):
        value = meta.get(key, runtime.get(key))
        if value is not None:
            info[key] = _plain(value)
    for key in ("time", "seed", "experiment_name", "mmengine_version", "torch_version"):
        if meta.get(key) is not None:
            info[key] = _plain(meta[key])
    if "global_steps" in payload and "iter" not in info:
        info["iter"] = _plain(payload["global_steps"])
    scalars = hub.get("log_scalars") if isinstance(hub.get("log_scalars"), Mapping) else {}
    histories = {str(name): _history(buffer) for name, buffer in scalars.items()}
    info["scalars"] = {name: values for name, values in histories.items() if values}
    info["has_config_text"] = isinstance(meta.get("cfg"), str)
    return info


def load_flat_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A ``pretrained_pth`` (flat dict, or an mmengine checkpoint whose ``state_dict`` is used as xtuner does)."""
    tensors, _ = load_training_state_dict(path, trust_pickle)
    return tensors
