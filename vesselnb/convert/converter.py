"""Training checkpoint + base HF folder (+ optional pretrained_pth) -> a verified HF folder.

Output = base, overridden by ``pretrained_pth``, overridden by the checkpoint, with LoRA pairs merged as
W + scale · B·A (scale = alpha / r, from the training config). Tensors are made a few at a time on worker threads
and written in order one shard at a time, so peak memory is about one shard plus eight tensors whatever the model
size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vesselnb.convert import checks
from vesselnb.convert.checkpoint import checkpoint_file, load_flat_state_dict, load_training_state_dict
from vesselnb.convert.coverage import ComponentStats, ConversionReport
from vesselnb.convert.hf_folder import (
    BaseFolder,
    build_config,
    check_remote_code,
    copy_support_files,
    declared_dtypes,
    remote_code_files,
    set_vocab_size,
    support_files,
    tokenizer_length,
)
from vesselnb.convert.keymap import BLOCKING_MISSING, MergePlan, TensorPlan, build_merge_plan
from vesselnb.convert.timing import PhaseClock
from vesselnb.convert.training_config import TrainingConfig, read_training_config
from vesselnb.convert.writer import (
    SHARD_METADATA,
    WRITE_DEPTH,
    ShardedWriter,
    ShardRecord,
    aligned_empty,
    block_size,
    data_offsets,
    disk_upper_bound,
    free_bytes,
    parse_size,
    plan_shards,
    shard_file_name,
    tensor_nbytes,
)
from vesselnb.errors import ConversionError
from vesselnb.fingerprint import INDEX_NAME, config_fingerprint, weights_fingerprint

RECORD_NAME = "vesselnb_conversion.json"  # written into the HF folder: the report and its input fingerprint
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LIST_LIMIT = 12


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def input_fingerprint(
    checkpoint_file: Path, base: BaseFolder, pretrained: Path | None, config: Path | None, options: dict[str, Any]
) -> str:
    """Identity of everything a conversion reads (files by path/size/mtime, config text, options): 16 hex."""
    parts = {
        "checkpoint": _file_identity(checkpoint_file),
        "base": [_file_identity(base.path / f) for f in sorted(set(base.key_to_file.values()))]
        + [
            _file_identity(p)
            for p in sorted(base.path.iterdir())
            if p.is_file() and not p.name.endswith(".safetensors")
        ],
        "pretrained": _file_identity(pretrained) if pretrained else None,
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config else None,
        "options": options,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _name_keys(fates: Iterable[Any]) -> str:
    fates = list(fates)
    shown = "; ".join(f"{f.key} -> {f.hf_key or '?'} ({f.detail})" for f in fates[:_LIST_LIMIT])
    return shown + (f"; … and {len(fates) - _LIST_LIMIT} more" if len(fates) > _LIST_LIMIT else "")


def _refuse_non_finite(
    tensors: Mapping[str, torch.Tensor],
    file: Path,
    workers: ThreadPoolExecutor,
    shares: int,
    clock: PhaseClock,
) -> None:
    """Refuse a checkpoint holding NaN/inf weights before anything is written.

    A diverged run saves NaN weights without complaint; merged into the base they give a model that answers with
    empty masks, which inference would record as ``ok``. One pass over the (memory-mapped) tensors
    (:func:`~vesselnb.convert.checks.has_non_finite`), in ``shares`` shares taken by the ``workers`` threads.
    """
    keys = sorted(tensors, key=lambda k: -tensors[k].numel())

    def scan(share: int) -> list[str]:
        return clock.timed(_SCAN_PHASE, lambda: [k for k in keys[share::shares] if checks.has_non_finite(tensors[k])])

    found = set().union(*workers.map(scan, range(shares)))
    bad = [key for key in tensors if key in found]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConversionError(
            f"{file}: {len(bad)} tensors hold NaN or inf values ({shown}); training diverged or the file is damaged. "
            "Convert an earlier checkpoint (a lower iter_N.pth); nothing was written."
        )


def _check_plan(plan: MergePlan, allow_shape_mismatch: bool, allow_missing: bool, warnings: list[str]) -> None:
    mismatched = plan.keys_in("shape_mismatch")
    if mismatched:
        message = (
            f"{len(mismatched)} tensors do not fit the base model's shapes: {_name_keys(mismatched)}. "
            "A checkpoint or pretrained_pth from another model size (e.g. a 26B model's text_hidden_fcs "
            "6144 into an 8B model's 3584) would be silently skipped by a strict=False load."
        )
        if not allow_shape_mismatch:
            raise ConversionError(
                message + " Fix the inputs, or allow it explicitly (--allow-shape-mismatch / "
                "checkpoint.allow_shape_mismatch: true) to keep the base tensors for these keys."
            )
        warnings.append("ALLOWED shape mismatch, base tensors kept: " + message)
    unexplained = [f for cat in BLOCKING_MISSING for f in plan.keys_in(cat)]
    if unexplained:
        message = (
            f"{len(unexplained)} keys are unaccounted for: {_name_keys(unexplained)}. "
            "Is the base folder the one training started from, and is the LoRA target list right?"
        )
        if not allow_missing:
            raise ConversionError(
                message + " Allow it explicitly with --allow-missing "
                "(checkpoint.allow_missing: true) to drop them / keep base tensors."
            )
        warnings.append("ALLOWED unaccounted keys: " + message)


def _lora_scale(plan: MergePlan, config: TrainingConfig) -> float | None:
    if not any(t.lora for t in plan.tensors.values()):
        return None
    if plan.lora_rank == -1:
        raise ConversionError("LoRA pairs of different ranks in one checkpoint; cannot merge with one alpha/r")
    if config.lora_alpha is None:
        raise ConversionError(
            "the checkpoint holds LoRA pairs but lora_alpha is unknown (it is not stored in the .pth): give the "
            "training config (--config / checkpoint.training_config) or --lora-alpha and --lora-r"
        )
    if config.lora_r is None:
        raise ConversionError(f"LoRA rank r unknown: give --lora-r (the checkpoint's tensors say {plan.lora_rank})")
    if config.lora_r != plan.lora_rank:
        raise ConversionError(
            f"LoRA r={config.lora_r} from {config.source or 'the arguments'} but the checkpoint's lora_A tensors "
            f"have rank {plan.lora_rank}: the config is not the one this checkpoint was trained with"
        )
    return config.lora_scale


class _ScratchRing:
    """Output memory reused in turn, by as many slots as tensors may be alive at once: in the making
    (``_Producer.ahead``) or still held by the writer (``WRITE_DEPTH``).

    Fresh memory is expensive to touch for the first time (page faults; on a VM up to several times the cost of a
    copy), and a conversion produces gigabytes of merged tensors that each live only until they are written.
    """

    def __init__(self, slots: int) -> None:
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._turn = 0

    def take(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, file_offset: int | None = None
    ) -> torch.Tensor:
        """Memory for one tensor; placed for a zero-copy direct write when its ``file_offset`` is known."""
        nbytes = tensor_nbytes(shape, dtype)
        slot, self._turn = self._turn, (self._turn + 1) % len(self._buffers)
        element = dtype.itemsize
        offset = file_offset if file_offset is not None and file_offset % element == 0 else 0
        memory, self._buffers[slot] = aligned_empty(nbytes, offset, self._buffers[slot])
        return memory.view(dtype).view(shape)


_MERGE_PHASE = "LoRA merge (+ |W|^2 in the same pass)"
_SCAN_PHASE = "NaN/inf scan"


@dataclass
class _Job:
    """What one output tensor is made from, gathered in the calling thread (the base folder's handles are not
    shared between threads) for :meth:`_Producer.make` on a worker thread."""

    plan: TensorPlan
    base_tensor: torch.Tensor
    weight: torch.Tensor  # the tensor the output starts from: the checkpoint's, pretrained_pth's or the base's
    input_key: str | None
    out: torch.Tensor | None  # output memory when the output is computed (merge, cast), placed for its file offset
    lora: tuple[torch.Tensor, torch.Tensor] | None  # (A, B)


# Tensors in the making per worker thread (a worker that finishes one finds the next already queued), and at most
# in all: each one in the making or in flight holds an output buffer (up to WRITE_DEPTH + _MAX_AHEAD of them, each
# the size of a merged or cast tensor), and beyond a few workers the disk, not the merge, sets the pace.
_AHEAD_PER_WORKER = 2
_MAX_AHEAD = 6


class _Producer:
    """Builds each output tensor from its plan and its provenance statistics, each input byte read once: inputs
    gathered in order by :meth:`prepare`, the work done by :meth:`make` on ``workers`` threads at once."""

    def __init__(
        self,
        base: BaseFolder,
        checkpoint: dict[str, torch.Tensor],
        pretrained: dict[str, torch.Tensor],
        scale: float | None,
        dtype: torch.dtype,
        clock: PhaseClock,
        workers: int,
    ) -> None:
        self.base, self.checkpoint, self.pretrained = base, checkpoint, pretrained
        self.scale, self.dtype, self.clock = scale, dtype, clock
        self._current_shard: str | None = None
        self.ahead = min(workers * _AHEAD_PER_WORKER, _MAX_AHEAD)  # tensors in the making at once
        self._ring = _ScratchRing(WRITE_DEPTH + self.ahead)

    def prepare(self, plan: TensorPlan, file_offset: int | None = None) -> _Job:
        """The inputs of ``plan``'s output and, when it is computed, its memory (placed for ``file_offset``)."""
        shard = self.base.key_to_file[plan.hf_key]
        if self._current_shard not in (None, shard):
            self.base.release(self._current_shard)  # keys come in base-shard order: done with that one
        self._current_shard = shard
        base_tensor = self.base.get_tensor(plan.hf_key)
        out_dtype = self.dtype if base_tensor.is_floating_point() else base_tensor.dtype
        if plan.checkpoint_key is not None:
            weight, input_key = self.checkpoint[plan.checkpoint_key], plan.checkpoint_key
        elif plan.pretrained_key is not None:
            weight, input_key = self.pretrained[plan.pretrained_key], plan.pretrained_key
        else:
            weight, input_key = base_tensor, None
        lora = (self.checkpoint[plan.lora.a_key], self.checkpoint[plan.lora.b_key]) if plan.lora else None
        computed = lora is not None or weight.dtype != out_dtype
        out = self._ring.take(weight.shape, out_dtype, file_offset) if computed else None
        return _Job(plan, base_tensor, weight, input_key, out, lora)

    def make(self, job: _Job) -> tuple[torch.Tensor, dict[str, Any]]:
        """The output tensor of ``job`` and its provenance row (thread-safe: each job has its own memory)."""
        plan, base_tensor, weight = job.plan, job.base_tensor, job.weight
        row: dict[str, Any] = {"hf_key": plan.hf_key, "component": plan.component, "source": plan.source}
        floating = base_tensor.is_floating_point()
        if job.lora is not None:
            (a, b), out = job.lora, job.out
            assert out is not None and plan.lora is not None  # prepare takes memory for every merge
            with self.clock.phase(_MERGE_PHASE):
                merge = _merge_lora(weight, a, b, float(self.scale), plan.lora.embedding, out)
            row.update(input_key=plan.lora.a_key.replace(".lora_A", ".lora_{A,B}"), shape=list(out.shape))
            with self.clock.phase("statistics"):
                if weight is base_tensor:
                    # |out - base| = |scale B A| up to the output rounding; |base| came with the merge's pass. After
                    # rounding to bf16 an output can equal the base only if |delta| <= ~2^-9 |base| (an untrained
                    # B = 0 adapter): only then is the (costly) element-wise comparison made.
                    surely_changed = merge.delta_sq > merge.weight_sq * 2.0**-14
                    identical = not surely_changed and out.dtype == weight.dtype and torch.equal(out, weight)
                    row.update(_change(merge.weight_sq, 0.0 if identical else merge.delta_sq, identical))
                else:  # the merge started from another weight: measure against the base
                    row.update(_change(*_sq_norm_and_diff(out, base_tensor)))
            return out, row
        if job.out is not None:
            with self.clock.phase("dtype cast"):
                out = job.out.copy_(weight)
        else:
            out = weight.contiguous()
        row.update(input_key=job.input_key, shape=list(out.shape))
        with self.clock.phase("statistics"):
            if plan.source == "base" or not floating:
                base_sq = _sq_norm(base_tensor) if floating else 0.0
                row.update(rel_change=0.0, identical_to_base=True, delta_sq=0.0, base_sq=base_sq)
            else:
                row.update(_change(*_sq_norm_and_diff(out, base_tensor)))
        return out, row


def _change(base_sq: float, delta_sq: float, identical: bool | None = None) -> dict[str, Any]:
    """Provenance statistics of one output tensor; identical to the base when nothing differs (or as told)."""
    identical = delta_sq == 0.0 if identical is None else identical
    rel = (delta_sq**0.5 / base_sq**0.5) if base_sq > 0 else (0.0 if delta_sq == 0 else float("inf"))
    return {"rel_change": rel, "identical_to_base": identical, "delta_sq": delta_sq, "base_sq": base_sq}


# Work is done in row blocks of this many elements (1 MB of fp32): a block and its fp32 copies stay in a core's L2
# cache, so each input byte comes from RAM once (RAM bandwidth, not arithmetic, bounds a conversion on small VMs).
_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(tensor: torch.Tensor) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, math.prod(tensor.shape[1:])))


_SCRATCH = threading.local()  # each thread's fp32 block buffer, reused: fresh memory costs page faults


def _block_buffer(rows: int, columns: int) -> torch.Tensor:
    buffer = getattr(_SCRATCH, "block", None)
    if buffer is None or buffer.numel() < rows * columns:
        buffer = _SCRATCH.block = torch.empty(max(rows * columns, _BLOCK_ELEMENTS), dtype=torch.float32)
    return buffer[: rows * columns].view(rows, columns)


def _sq_norm(tensor: torch.Tensor) -> float:
    """Squared L2 norm, accumulated in fp32 (bf16 inputs are reduced in fp32 by torch without a copy)."""
    return float(torch.linalg.vector_norm(tensor).double() ** 2) if tensor.numel() else 0.0


def _sq_norm_and_diff(out: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """(|base|^2, |out - base|^2) in one pass over both, block by block (differences in fp32, sums in fp64).

    ``|out - base| == 0`` is what ``torch.equal`` answers for finite tensors (the checkpoint's are, see
    :func:`_refuse_non_finite`), so the same pass says whether the output is identical to the base.
    """
    if out.dim() == 0 or out.numel() == 0:
        diff = out.double() - base.double()
        return _sq_norm(base), float((diff * diff).sum())
    rows = _row_blocks(out)
    base_sq = delta_sq = 0.0
    for start in range(0, out.shape[0], rows):
        b = base[start : start + rows].float()
        base_sq += float(torch.linalg.vector_norm(b).double() ** 2)
        delta_sq += float(torch.linalg.vector_norm(out[start : start + rows].float() - b).double() ** 2)
    return base_sq, delta_sq


def _native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): then one fused bf16 ``addmm`` is fastest.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it also says yes on plain AVX-512, where oneDNN emulates
    bf16 and the fused call is ~5x slower than the fp32 route (measured on this project's 2-core VM).
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


_NATIVE_BF16 = _native_bf16_matmul()


@dataclass
class _Merged:
    delta_sq: float  # |scale * B @ A|^2
    weight_sq: float  # |W|^2


def _merge_lora(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    embedding: bool,
    out: torch.Tensor,
) -> _Merged:
    """``out`` = W + scale * B @ A with fp32 accumulation, rounded once to ``out``'s dtype (peft rounds twice).

    peft stores an embedding's LoRA transposed: delta = (B @ A).T. |scale * B @ A|^2 comes exactly from r x r
    products (|BA|^2 = trace((B^T B)(A A^T))), and |W|^2 from the blocks the merge reads anyway. One thread: the
    converter merges one tensor per worker thread at a time.
    """
    a32 = a.float()
    b32 = b.float()
    if embedding:  # delta = (B @ A).T = A^T @ B^T: rows of the weight <-> columns of A
        left, right = a32.T.contiguous() * scale, b32.T.contiguous()
    else:
        left, right = b32, a32 * scale
    delta_sq = float(torch.trace((left.T @ left) @ (right @ right.T)).double())
    bf16_inputs = weight.dtype == a.dtype == b.dtype == out.dtype == torch.bfloat16
    if bf16_inputs and _NATIVE_BF16 and weight.is_cpu:
        # One fused oneDNN call: fp32 accumulation, the weight added in fp32, one rounding to bf16.
        low, high = (a.T, b.T) if embedding else (b, a)
        torch.addmm(weight, low, high, alpha=scale, out=out)
        return _Merged(delta_sq, _sq_norm(weight))
    return _Merged(delta_sq, _merge_rows(weight, left, right, out, 0, weight.shape[0]))


def _merge_rows(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, first: int, stop: int
) -> float:
    """Rows ``first:stop`` of ``out`` = W + left @ right, in row blocks that stay in L2; returns their |W|^2.

    W's block is cast to fp32 into a reused buffer, ``left_rows @ right`` is added onto it in place (one ``addmm``:
    a single fp32 rounding) and the block is rounded once into ``out``.
    """
    rows = _row_blocks(weight)
    block = _block_buffer(min(rows, stop - first), weight.shape[1])
    weight_sq = 0.0
    for start in range(first, stop, rows):
        end = min(start + rows, stop)
        chunk = block[: end - start].copy_(weight[start:end])
        flat = chunk.view(-1)
        weight_sq += float(torch.dot(flat, flat))
        chunk.addmm_(left[start:end], right)
        out[start:end].copy_(chunk)
    return weight_sq


def _write_shard(
    writer: ShardedWriter,
    producer: _Producer,
    workers: ThreadPoolExecutor,
    plan: MergePlan,
    name: str,
    shard_keys: list[str],
    out_dtypes: dict[str, torch.dtype],
    shapes: dict[str, tuple[int, ...]],
    progress: Any,
) -> ShardRecord:
    """One shard: taken from an interrupted run if it verifies, else produced tensor by tensor and written."""
    record = writer.resume(name, shard_keys)
    if record is not None:
        progress.update(sum(tensor_nbytes(m["shape"], getattr(torch, m["dtype"])) for m in record.keys.values()))
        return record
    rows: list[dict[str, Any]] = []

    specs = [(k, out_dtypes[k], shapes[k]) for k in shard_keys]
    offsets = data_offsets(specs, SHARD_METADATA)

    def produced() -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in file order, ``producer.ahead`` in the making at once on the worker threads. Each worker makes
        whole tensors: splitting each tensor's rows among them made every worker wait for the others at every
        tensor's end (a core idle a quarter of the time in the bench)."""
        ahead: deque[tuple[str, Future[tuple[torch.Tensor, dict[str, Any]]]]] = deque()

        def finish_oldest() -> tuple[str, torch.Tensor]:
            key, making = ahead.popleft()
            tensor, row = making.result()
            rows.append(row)
            progress.update(tensor_nbytes(shapes[key], out_dtypes[key]))
            return key, tensor

        for key, offset in zip(shard_keys, offsets, strict=True):
            ahead.append((key, workers.submit(producer.make, producer.prepare(plan.tensors[key], offset))))
            if len(ahead) >= producer.ahead:
                yield finish_oldest()
        while ahead:
            yield finish_oldest()

    return writer.write(name, specs, produced(), lambda: {"rows": rows})


_MAX_WORKER_THREADS = 8  # beyond this the Python between torch calls (under the GIL) stops scaling


def _worker_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, _MAX_WORKER_THREADS)


@contextmanager
def _worker_threads(count: int) -> Iterator[ThreadPoolExecutor]:
    """``count`` worker threads (one per core) for the NaN scan and for making the output tensors, torch
    single-threaded meanwhile.

    Torch's OpenMP workers spin and wait for each other at every op; when one shares its core with the writer thread
    or another process, every parallel op waits for it (on 2 shared cores a 0.4 GB NaN scan took 5 s of wall for
    1.4 s of CPU). Plain threads that each take their own work (torch releases the GIL) use every core and yield to
    the writer when it needs one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="worker")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, tensors queued ahead are not made
        torch.set_num_threads(before)


def _text_files_estimate(
    plan: MergePlan, hf_config: dict[str, Any], info: dict[str, Any], n_shards: int
) -> list[int]:
    """Upper estimates of the JSON files a conversion writes: config, index, record, progress.

    The record holds every key's fate (known now, measured as written) and one provenance row per output tensor
    (bounded by three copies of its name plus the fixed fields); the progress file holds the rows again with each
    shard's per-key digests.
    """
    fates = len(json.dumps([vars(f) for f in plan.fates], indent=1))
    rows = sum(3 * len(k) + 400 for k in plan.tensors)
    keys = sum(len(k) + 120 for k in plan.tensors)
    config = 2 * len(json.dumps(hf_config, indent=2)) + 256
    index = keys + 80 * n_shards + 1024
    record = fates + rows + len(json.dumps(info, indent=1)) + 8192
    progress = rows + keys + 200 * n_shards
    return [config, index, record, progress]


@contextmanager
def _no_partial_folder_on_full_disk(writer: ShardedWriter, output_dir: Path) -> Iterator[None]:
    """Running out of space while writing: one clear line, and the partial folder removed (it fills the disk).

    Any other failure keeps the partial folder: a rerun with the same inputs resumes from its verified shards.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(writer.temp, ignore_errors=True)
        raise ConversionError(
            f"{output_dir.parent}: the disk filled up while writing the conversion ({exc.strerror}); the partial "
            f"folder was removed and nothing was left at {output_dir}. Free space or choose another output folder."
        ) from None


def _check_output_free(output_dir: Path, base: Path, overwrite: bool) -> None:
    """``output_dir`` must be new, empty, or an earlier vesselnb conversion with ``overwrite``: checked before any
    work, so an hour is never spent on a conversion that cannot be put in place."""
    if output_dir.exists() and os.path.samefile(output_dir, base):
        raise ConversionError(f"{output_dir}: the output folder is the base folder; choose another output folder")
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        return
    if not _is_ours(output_dir):
        raise ConversionError(
            f"{output_dir} exists and was not written by vesselnb; move it away or choose another output folder "
            "(nothing was done)."
        )
    if not overwrite:
        raise ConversionError(
            f"{output_dir} holds an earlier conversion from other inputs; pass --overwrite "
            "(params: checkpoint.overwrite: true) to replace it, or choose another output folder (nothing was done)."
        )


def _check_trained_and_frozen(
    plan: MergePlan,
    config: TrainingConfig,
    base: BaseFolder,
    ckpt_tensors: dict[str, torch.Tensor],
    file: Path,
    allow_missing_components: bool,
    allow_frozen_mismatch: bool,
    other_base: str | None,
    warnings: list[str],
) -> None:
    """Refuse (or, allowed, warn loudly) when trained parts are absent or the checkpoint's frozen copies are not
    the base's (see :mod:`vesselnb.convert.checks`).

    ``other_base`` (the base given is not the one the training config names) is decided here, after the frozen
    copies: when the checkpoint holds frozen copies and every one equals the given base, that base *is* the weights
    training started from under another name (typically the Sa2VA HF release of the InternVL base the config names),
    so it is a warning; without frozen copies to vouch for it (a full fine-tune) it is refused unless allowed."""
    missing = checks.missing_trained(plan, config, base.shapes)
    if missing:
        message = checks.missing_message(missing, file)
        if not allow_missing_components:
            raise ConversionError(message)
        warnings.append("ALLOWED missing trained components, taken from the base: " + message)
    compared, bad = checks.frozen_mismatches(ckpt_tensors, base.shapes, base.get_tensor)
    if other_base and (bad or not compared):
        raise ConversionError(other_base)
    if other_base:
        warnings.append(f"the base given is not the one the training config names, but all {compared} frozen copies "
                        "in the checkpoint equal its tensors, so it holds the weights training started from: "
                        + other_base)
    if bad:
        message = checks.frozen_message(bad, base.path, file)
        if not allow_frozen_mismatch:
            raise ConversionError(message)
        warnings.append("ALLOWED frozen copies differing from the base: " + message)


def _config_states(folder: Path, dtype: torch.dtype) -> bool:
    """Whether every dtype ``folder``'s config.json states is ``dtype`` (what ``torch_dtype="auto"`` loads)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return set(declared_dtypes(config).values()) <= {str(dtype).replace("torch.", "")}


def _is_ours(folder: Path) -> bool:
    return (folder / RECORD_NAME).is_file()


def read_record(hf_dir: Path) -> ConversionReport | None:
    """The report stored in a finished vesselnb HF folder (None if absent or unfinished)."""
    record = Path(hf_dir) / RECORD_NAME
    if not record.is_file() or not (Path(hf_dir) / INDEX_NAME).is_file():
        return None
    try:
        return ConversionReport.from_json(json.loads(record.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError):
        return None


def convert_checkpoint(
    checkpoint: str | Path,
    base_model: str | Path | None,
    output_dir: str | Path,
    *,
    training_config: str | Path | None = None,
    pretrained_pth: str | Path | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_target_modules: list[str] | None = None,
    dtype: str = "bf16",
    shard_size: str | int = "5GB",
    allow_shape_mismatch: bool = False,
    allow_missing: bool = False,
    trust_pickle: bool = False,
    check_free_space: bool = True,
    reuse_existing: bool = True,
    allow_missing_components: bool = False,
    allow_frozen_mismatch: bool = False,
    allow_other_base: bool = False,
    overwrite: bool = False,
    clock: PhaseClock | None = None,
) -> ConversionReport:
    """Convert a training checkpoint into a HF folder at ``output_dir``; every key accounted for.

    Raises :class:`~vesselnb.errors.ConversionError` / :class:`~vesselnb.errors.CheckpointError` before anything
    is written at ``output_dir`` when inputs do not fit (trained components absent, frozen copies or the config's
    base naming another base: see :mod:`vesselnb.convert.checks`), ``output_dir`` exists without ``overwrite``,
    the disk is too small or the pickle is unsafe. Running out of space anyway removes what was written.
    ``clock`` collects CPU and wall seconds per phase (the bench prints them).
    """
    started = time.monotonic()
    clock = clock or PhaseClock()
    output_dir = Path(output_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)} (bf16 = training dtype)")
    out_dtype = DTYPES[dtype]
    config = read_training_config(training_config) if training_config else TrainingConfig()
    config.lora_r = lora_r if lora_r is not None else config.lora_r
    config.lora_alpha = float(lora_alpha) if lora_alpha is not None else config.lora_alpha
    config.lora_target_modules = lora_target_modules or config.lora_target_modules
    warnings: list[str] = []
    notes: list[str] = []

    base_path = _resolve_base(base_model, config)
    pretrained_path = _resolve_pretrained(pretrained_pth, config, warnings)
    ckpt_file = checkpoint_file(checkpoint)  # a wrong checkpoint path fails before the base folder is scanned
    other_base = checks.other_base_message(config, base_path) if base_model is not None and training_config else None
    if other_base and allow_other_base:
        warnings.append("ALLOWED other base: " + other_base)
        other_base = None
    with clock.phase("read base headers"):
        base = BaseFolder(base_path)
    threads = ExitStack()  # worker threads, torch single-threaded: from the NaN scan to the last shard
    try:
        options = {
            "dtype": dtype,
            "shard_size": parse_size(shard_size),
            "lora": [config.lora_r, config.lora_alpha, config.lora_target_modules, config.use_rslora],
            "template": config.template,
            "allow": [allow_shape_mismatch, allow_missing, allow_missing_components, allow_frozen_mismatch,
                      allow_other_base],
            "format": 2,  # 2: XXH3 digests (1 was SHA-256 + CRC-32)
        }
        in_key = input_fingerprint(
            ckpt_file, base, pretrained_path, Path(training_config) if training_config else None, options
        )
        existing = read_record(output_dir) if reuse_existing else None
        same_inputs = existing is not None and existing.input_fingerprint == in_key
        stale_config = same_inputs and not _config_states(output_dir, out_dtype)
        if stale_config:
            notes.append(
                f"{output_dir} held a conversion of the same inputs whose config.json stated another dtype than its "
                f"{dtype} weights (vesselnb rewrote only torch_dtype before); converted again"
            )
        elif same_inputs and existing is not None:
            existing.fingerprint = weights_fingerprint(output_dir)
            existing.config_fingerprint = config_fingerprint(output_dir)
            existing.skipped = "already converted from the same inputs (input fingerprint matches); not redone"
            existing.seconds = time.monotonic() - started
            return existing
        _check_output_free(output_dir, base.path, overwrite or stale_config)
        with clock.phase("load checkpoint (torch.load, mmap)"):
            ckpt_tensors, source = load_training_state_dict(checkpoint, trust_pickle)
        n_workers = _worker_count()
        workers = threads.enter_context(_worker_threads(n_workers))
        _refuse_non_finite(ckpt_tensors, source.file, workers, n_workers, clock)
        pretrained = load_flat_state_dict(pretrained_path, trust_pickle) if pretrained_path else {}
        plan = build_merge_plan(
            {k: tuple(v.shape) for k, v in ckpt_tensors.items()},
            base.shapes,
            {k: tuple(v.shape) for k, v in pretrained.items()},
            config.lora_r,
            config.lora_target_modules,
        )
        _check_plan(plan, allow_shape_mismatch, allow_missing, warnings)
        with clock.phase("checks (components, frozen copies)"):
            _check_trained_and_frozen(
                plan, config, base, ckpt_tensors, source.file, allow_missing_components, allow_frozen_mismatch,
                other_base, warnings,
            )
        scale = _lora_scale(plan, config)

        missing_modules = check_remote_code(base.path, base.config())
        if missing_modules:
            raise ConversionError(
                f"{base.path}: the remote code imports modules absent from the folder: {missing_modules}. The "
                "converted folder could not load; complete the base folder with those .py files."
            )
        vocab = tokenizer_length(base.path)
        hf_config = build_config(base.config(), config.template, None, out_dtype)
        vocab = _check_vocab(vocab, base, hf_config, warnings)

        keys = sorted(base.shapes, key=lambda k: (base.key_to_file[k], k))
        out_dtypes = {k: out_dtype if base.dtypes[k].is_floating_point else base.dtypes[k] for k in keys}
        sizes = [
            (k, tensor_nbytes(base.shapes[k], out_dtype if base.dtypes[k].is_floating_point else base.dtypes[k]))
            for k in keys
        ]
        shards = plan_shards(sizes, parse_size(shard_size))
        names = [shard_file_name(i, len(shards)) for i in range(len(shards))]
        writer = ShardedWriter(output_dir, in_key, clock)
        writer.load_progress()
        needed = disk_upper_bound(
            [[(k, out_dtypes[k], tuple(base.shapes[k])) for k in shard_keys] for shard_keys in shards],
            [f.stat().st_size for f in support_files(base.path)],
            _text_files_estimate(plan, hf_config, source.info, len(shards)),
            block_size(output_dir.parent),
        )
        needed -= writer.bytes_already_done()
        if check_free_space:
            free = free_bytes(output_dir.parent)
            if needed > free:
                raise ConversionError(
                    f"not enough disk space at {output_dir.parent}: the conversion needs at most {needed:,} bytes "
                    f"({needed / 1e9:.2f} GB, dtype {dtype}; tensors, headers, support files and records) but "
                    f"{free:,} bytes ({free / 1e9:.2f} GB) are free. Free space or choose another output folder; "
                    "nothing was written."
                )
        with _no_partial_folder_on_full_disk(writer, output_dir):
            writer.prepare()
            provenance: list[dict[str, Any]] = []
            progress = tqdm(total=sum(n for _, n in sizes), unit="B", unit_scale=True, desc="convert")
            producer = _Producer(base, ckpt_tensors, pretrained, scale, out_dtype, clock, n_workers)
            records = [
                _write_shard(writer, producer, workers, plan, name, shard_keys, out_dtypes, base.shapes, progress)
                for name, shard_keys in zip(names, shards, strict=True)
            ]
            threads.close()
            for record in records:
                provenance.extend(record.stats["rows"])
            progress.close()
            if writer.resumed:
                notes.append(f"resumed: {len(writer.resumed)} of {len(names)} shards were already written and verified")

            copied = copy_support_files(base.path, writer.temp)
            n_code = len(remote_code_files(base.path))
            notes.append(f"copied {len(copied)} support files ({n_code} remote-code .py)")
            if vocab is not None:
                set_vocab_size(hf_config, vocab)
            (writer.temp / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")

            components = _components(provenance)
            changed = [r for r in provenance if not r["identical_to_base"]]
            if not changed:
                warnings.append(
                    "THIS CHECKPOINT CHANGES NOTHING vs the base model: every output tensor equals the base. The "
                    "checkpoint's trained tensors are identical to the base's (untrained, or the wrong base folder)."
                )
            with clock.phase("verify (safe_open headers)"):
                writer.verify(names)
            report = ConversionReport(
                output_dir=str(output_dir),
                fingerprint="",
                dtype=dtype,
                source={
                    "path": str(Path(checkpoint)),
                    "file": str(source.file),
                    "bytes": source.nbytes,
                    "layout": source.layout,
                },
                base_model=str(base.path),
                input_fingerprint=in_key,
                output_bytes=0,
                coverage=plan.counts(),
                components=components,
                warnings=warnings,
                notes=notes,
                lora={"r": config.lora_r, "alpha": config.lora_alpha, "scale": scale, "targets": plan.lora_targets},
                resumed_shards=len(writer.resumed),
                n_shards=len(names),
                fates=[vars(f) for f in plan.fates],
                training_info=source.info,
                provenance=[{k: v for k, v in r.items() if k not in ("delta_sq", "base_sq")} for r in provenance],
            )
            report.save(writer.temp / RECORD_NAME)
            writer.write_index(names, {"vesselnb_input_fingerprint": in_key, "vesselnb_source": str(source.file)})
            writer.publish(_is_ours)
            report.fingerprint = weights_fingerprint(output_dir)
            report.config_fingerprint = config_fingerprint(output_dir)
            report.output_bytes = sum(f.stat().st_size for f in output_dir.rglob("*") if f.is_file())
            report.seconds = time.monotonic() - started
            report.save(output_dir / RECORD_NAME)
            return report

    finally:
        threads.close()
        base.close()


def _components(provenance: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    stats: dict[str, ComponentStats] = {}
    for row in provenance:
        comp = stats.setdefault(row["component"], ComponentStats())
        comp.n_tensors += 1
        comp.delta_sq += row["delta_sq"]
        comp.base_sq += row["base_sq"]
        comp.sources[row["source"]] += 1
    return {
        name: {"rel_change": s.rel_change, "n_tensors": s.n_tensors, "sources": s.sources} for name, s in stats.items()
    }


def _resolve_base(base_model: str | Path | None, config: TrainingConfig) -> Path:
    if base_model is not None:
        return Path(base_model)
    if config.base_model_path:
        candidate = Path(config.base_model_path)
        if not candidate.is_absolute() and config.source is not None:
            for root in (config.source.parent, Path.cwd()):
                if (root / candidate).is_dir():
                    return root / candidate
        if candidate.is_dir():
            return candidate
        raise ConversionError(
            f"{config.source}: the config's base model path {config.base_model_path!r} is not found here; "
            "pass the base HF folder explicitly (--base / checkpoint.base_model)"
        )
    raise ConversionError("no base HF folder: pass --base (params: checkpoint.base_model) or a training config")


def _resolve_pretrained(pretrained_pth: str | Path | None, config: TrainingConfig, warnings: list[str]) -> Path | None:
    if pretrained_pth is not None:
        path = Path(pretrained_pth)
        if not path.is_file():
            raise ConversionError(f"{path}: pretrained_pth not found")
        return path
    if config.pretrained_pth:
        candidate = Path(config.pretrained_pth)
        roots = [Path.cwd()] + ([config.source.parent] if config.source else [])
        for root in roots:
            if (root / candidate).is_file():
                return root / candidate
        warnings.append(
            f"the training config names pretrained_pth {config.pretrained_pth!r}, which is not found here: keys the "
            "checkpoint lacks are taken from the base folder instead. Pass pretrained_pth explicitly if it differs."
        )
    return None


def _check_vocab(vocab: int | None, base: BaseFolder, hf_config: dict[str, Any], warnings: list[str]) -> int | None:
    """vocab_size must be len(tokenizer); the embedding rows must agree or the folder cannot load."""
    if vocab is None:
        warnings.append(f"{base.path}: no tokenizer files; vocab_size left as in the base config")
        return None
    embed_keys = [k for k in base.shapes if k.endswith(("embed_tokens.weight", "tok_embeddings.weight"))]
    rows = {base.shapes[k][0] for k in embed_keys}
    if rows and rows != {vocab}:
        warnings.append(
            f"len(tokenizer)={vocab} but the embedding has {sorted(rows)} rows: vocab_size kept at the embedding "
            "size so the folder loads; tokens beyond the tokenizer are unused, tokens beyond the embedding break"
        )
        return max(rows)
    _ = hf_config
    return vocab
