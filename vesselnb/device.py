"""Where and in what precision the model runs, and the scoped shim that lets upstream Sa2VA code run on a CPU.

The upstream remote code (``modeling_sa2va_chat.py`` + its SAM2) assumes CUDA in three places
(``sa2va_facts.md`` §7):

1. ``torch.tensor(ids).cuda()`` in ``predict_forward`` and ``.cuda()`` on frames, memory tensors and mask logits
   inside SAM2;
2. SAM2's video predictor ``init_state`` builds ``torch.device("cuda")`` for ``device`` and ``storage_device``;
3. SAM2's mask path runs under ``torch.autocast("cuda", dtype=torch.bfloat16)``: on a CPU that autocast is disabled,
   so with bf16 weights the mask down-sampler sees a float input and a bf16 bias and fails.

:func:`cuda_shim` patches exactly these three entry points for the duration of a ``with`` block, and restores the
originals on exit (also after an exception), so nothing leaks into the user's session: ``Tensor.cuda`` moves to the
CPU instead, ``torch.device("cuda...")`` becomes ``torch.device("cpu")``, and ``torch.autocast("cuda", ...)``
becomes a CPU autocast in the model's dtype (or no autocast for fp32 weights, the CPU default). It is
process-global while active (torch has no other hook), so do not run CUDA work in other threads meanwhile. It is
only entered when the model runs on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vesselnb.errors import InferenceError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DevicePlan:
    """How to place the model: ``device`` for inputs, ``device_map``/``max_memory`` for ``from_pretrained``."""

    device: str  # "cpu", "cuda", "cuda:1"
    dtype: torch.dtype
    device_map: Any = None  # None (plain .to(device)), "auto", or {"": index}
    max_memory: dict[Any, str] | None = None
    # Whether the model's code names CUDA at all (see code_assumes_cuda); the shim is skipped when it does not.
    code_assumes_cuda: bool = True

    @property
    def is_cpu(self) -> bool:
        """True when the model runs on the CPU (upstream code then needs the CUDA shim)."""
        return self.device == "cpu"

    @property
    def dtype_name(self) -> str:
        """"bf16"/"fp16"/"fp32" for records and reports."""
        return {v: k for k, v in _DTYPES.items()}[self.dtype]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an ``accelerate launch`` / ``torchrun`` job (from RANK/WORLD_SIZE/LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True when launched as one of several processes."""
        return self.world_size > 1


def distributed_context(environ: dict[str, str] | None = None) -> DistributedContext:
    """Read the launcher's environment variables; a plain ``python`` run is rank 0 of 1."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InferenceError(
            "RANK/WORLD_SIZE/LOCAL_RANK are not integers; launch with `accelerate launch -m vesselnb.cli infer ...`"
        ) from None
    return DistributedContext(rank=rank, world_size=max(world, 1), local_rank=local)


def plan_device(
    device: str = "auto",
    dtype: str = "auto",
    max_memory_per_gpu: str | None = None,
    dist: DistributedContext | None = None,
) -> DevicePlan:
    """Resolve ``device: auto|cpu|cuda`` and ``dtype: auto|bf16|fp16|fp32`` into a :class:`DevicePlan`.

    ``auto`` dtype is bf16 on a GPU (what Sa2VA was trained in) and fp32 on a CPU (~8× faster there on CPUs without
    bf16 units). Under a data-parallel launch each process takes its own GPU (``cuda:LOCAL_RANK``); otherwise a GPU
    run uses accelerate's ``device_map="auto"``, optionally capped per GPU so a model larger than one card spreads.
    Asking for CUDA without a usable GPU raises :class:`InferenceError` with the fix, never a silent CPU run.
    """
    dist = dist or DistributedContext()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InferenceError(f"device {device!r} is not one of auto, cpu, cuda (set 'inference.device')")
    cuda_ok = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda_ok:
        raise InferenceError(
            f"device '{device}' was requested but no CUDA GPU is visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}). Set 'inference.device: cpu' (slow), or install a CUDA "
            "build of torch and check CUDA_VISIBLE_DEVICES / nvidia-smi."
        )
    use_cuda = device.startswith("cuda") or (device == "auto" and cuda_ok)
    if dtype not in ("auto", *_DTYPES):
        raise InferenceError(f"dtype {dtype!r} is not one of auto, bf16, fp16, fp32 (set 'inference.dtype')")
    torch_dtype = _DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if use_cuda else torch.float32)
    if not use_cuda:
        return DevicePlan(device="cpu", dtype=torch_dtype)
    if dist.active:
        if dist.local_rank >= torch.cuda.device_count():
            raise InferenceError(
                f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPU(s) visible; launch with "
                "`accelerate launch --num_processes <number of GPUs>`"
            )
        return DevicePlan(device=f"cuda:{dist.local_rank}", dtype=torch_dtype, device_map={"": dist.local_rank})
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        return DevicePlan(device=device, dtype=torch_dtype, device_map={"": index})
    max_memory = None
    if max_memory_per_gpu:
        max_memory = {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
    return DevicePlan(device="cuda:0", dtype=torch_dtype, device_map="auto", max_memory=max_memory)


# --- the CPU shim -------------------------------------------------------------------------------------------------
def _cpu_device(spec: Any = None, index: int | None = None) -> torch.device:
    """``torch.device`` constructor that turns any CUDA device into the CPU (other devices unchanged)."""
    real = _REAL_DEVICE
    if isinstance(spec, real):
        return real("cpu") if spec.type == "cuda" else spec
    if isinstance(spec, int):
        return real("cpu")
    if isinstance(spec, str) and spec.split(":", 1)[0] == "cuda":
        return real("cpu")
    return real(spec) if index is None else real(spec, index)


class _DeviceMeta(type):
    """Makes the stand-in both callable like ``torch.device`` and transparent to ``isinstance`` checks."""

    def __call__(cls, *args: Any, **kwargs: Any) -> torch.device:
        return _cpu_device(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_DEVICE)


class _CpuDevice(metaclass=_DeviceMeta):
    """Stand-in for ``torch.device`` while the shim is active."""


def _tensor_cuda_to_cpu(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any) -> torch.Tensor:
    """Replacement for ``Tensor.cuda``: keep the tensor on the CPU (``.to`` returns ``self`` when already there)."""
    return self.to("cpu", non_blocking=non_blocking)


def _cpu_autocast_class(cpu_dtype: torch.dtype | None) -> type:
    """A ``torch.autocast`` that runs ``"cuda"`` requests on the CPU: in ``cpu_dtype`` (bf16 weights need it, or the
    mask path mixes float inputs with bf16 biases), or disabled when ``cpu_dtype`` is None (fp32 weights: plain fp32
    is correct and much faster on CPUs without bf16 units)."""

    class CpuAutocast(_REAL_AUTOCAST):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                     cache_enabled: bool | None = None) -> None:
            if device_type == "cuda":
                device_type = "cpu"
                enabled = enabled and cpu_dtype is not None
                dtype = cpu_dtype if cpu_dtype is not None else torch.bfloat16
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    return CpuAutocast


_REAL_DEVICE = torch.device
_REAL_AUTOCAST = torch.autocast


@contextlib.contextmanager
def cuda_shim(autocast_dtype: torch.dtype | None = torch.bfloat16) -> Iterator[None]:
    """Within the block, upstream code written for CUDA runs on the CPU (see the module docstring); always restored.

    ``autocast_dtype``: what ``torch.autocast("cuda", ...)`` becomes on the CPU (None = autocast off, for fp32 weights).
    """
    saved = (torch.Tensor.cuda, torch.device, torch.autocast)
    torch.Tensor.cuda = _tensor_cuda_to_cpu  # type: ignore[method-assign]
    torch.device = _CpuDevice  # type: ignore[misc, assignment]
    torch.autocast = _cpu_autocast_class(autocast_dtype)  # type: ignore[misc]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.device, torch.autocast = saved  # type: ignore[misc, method-assign]


# What the shim replaces, as it appears in code: ``x.cuda(...)`` calls and "cuda..." strings (torch.device("cuda"),
# torch.autocast("cuda", ...), .to("cuda:0")). Prose such as "a CUDA OOM" in a docstring is not a reason.
_CUDA_IDIOM = re.compile(r"""\.cuda\(|["']cuda""")


def code_assumes_cuda(hf_dir: str | Path) -> bool:
    """Whether any remote-code ``.py`` file of an HF folder calls ``.cuda(`` or spells a ``"cuda"`` device.

    The shim swaps ``torch.device`` for a Python stand-in, which every device construction and ``isinstance`` check
    in transformers then goes through (about 1.5 % of a small model's CPU time). Code without these idioms needs
    none of it; code with them (upstream Sa2VA) gets the whole shim. Should the scan ever miss one, the model fails
    on the CPU with torch's "not compiled with CUDA" error, recorded as each sample's ``error``: loud, not silent.
    """
    for path in Path(hf_dir).glob("*.py"):
        try:
            if _CUDA_IDIOM.search(path.read_text(encoding="utf-8", errors="replace")):
                return True
        except OSError:
            return True  # unreadable code: assume the worst
    return False


def maybe_cuda_shim(plan: DevicePlan) -> contextlib.AbstractContextManager[None]:
    """The shim on the CPU (autocast in the model's dtype unless fp32) when the model's code names CUDA; nothing
    on a GPU, where upstream's assumptions hold."""
    if not plan.is_cpu or not plan.code_assumes_cuda:
        return contextlib.nullcontext()
    return cuda_shim(None if plan.dtype == torch.float32 else plan.dtype)


def available_ram() -> int | None:
    """The kernel's ``MemAvailable`` in bytes (what a CPU run may still use), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
