"""Sharded safetensors writing that cannot leave a half folder behind.

Shards are written into a hidden temp folder beside the target (``.<name>.partial-<input key>``), each one
atomically (``*.tmp`` then ``os.replace``) with its SHA-256 and per-tensor CRC-32 recorded in ``progress.json``.
An interrupted run with the same inputs resumes from the shards already done, after re-hashing them. When every
shard is written, each is reopened and every key's dtype, shape and checksum is checked against what was meant to
be written; the index goes in last and the folder is renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vesselnb.errors import ConversionError
from vesselnb.fingerprint import INDEX_NAME, SHARD_HASHES_KEY, file_sha256

PROGRESS_NAME = "progress.json"
# Tests: cap the free space the preflight sees (bytes), to simulate a full disk without filling one.
FREE_BYTES_ENV = "VESSELNB_FREE_BYTES_LIMIT"
# Tests: SIGKILL this process right after N shards are finished, to simulate an interrupted conversion.
KILL_AFTER_ENV = "VESSELNB_TEST_KILL_AFTER_SHARDS"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (transformers' convention: GB = 10^9, GiB = 2^30)."""
    if isinstance(size, int):
        return size
    match = _SIZE_RE.match(str(size))
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise ConversionError(f"shard size {size!r} not understood; write e.g. '5GB', '500MB' or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own (as transformers)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def free_bytes(folder: Path) -> int:
    """Free space where ``folder`` lives, capped by ``VESSELNB_FREE_BYTES_LIMIT`` when set (tests)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    limit = os.environ.get(FREE_BYTES_ENV)
    return min(free, int(limit)) if limit else free


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


_SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # key, dtype, shape: known before any data exists


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for key, dtype, shape in specs:
        if dtype not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{key}: dtype {dtype} cannot be stored in safetensors here")
        nbytes = tensor_nbytes(shape, dtype)
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offsets[key] = (offset, offset + nbytes)
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return header_bytes + b" " * (-len(header_bytes) % 8), offsets


def _write_and_hash(handle: Any, digest: Any, data: memoryview, owner: torch.Tensor) -> None:
    """Write and hash one tensor's bytes (``owner`` keeps the memory alive until done)."""
    handle.write(data)
    digest.update(data)
    del owner


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Write a safetensors file tensor by tensor as they are produced, hashing the bytes on their way out.

    The header is written first from ``specs`` (shapes and dtypes are known from the plan), so no more than one
    tensor is ever held: memory stays near the largest tensor whatever the shard size. ``safetensors``' own
    ``save_file`` needs every tensor of the shard at once and copies each into a Python ``bytes``, and we would then
    read the file back to hash it. The format is a little-endian u64 header length, a JSON header padded to 8
    bytes, then the tensors back to back; every shard is reopened with ``safe_open`` afterwards
    (:meth:`ShardedWriter.verify`), so the library itself checks what we wrote.
    Returns the file's SHA-256 and ``{key: {dtype, shape, crc32}}``.
    """
    header_bytes, _ = _header(specs, metadata)
    expected = {key: (dtype, tuple(shape)) for key, dtype, shape in specs}
    order = [key for key, _, _ in specs]
    digest = hashlib.sha256()
    keys: dict[str, dict[str, Any]] = {}
    # Pipeline: while the caller produces the next tensor (LoRA merge, reads), one thread writes + hashes the
    # previous one and another computes its CRC-32 (file writes, hashlib and zlib release the GIL). At most two
    # produced tensors are alive at a time.
    with open(path, "wb") as handle, ThreadPoolExecutor(max_workers=2) as pool:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            handle.write(chunk)
            digest.update(chunk)
        written: list[str] = []
        crcs: dict[str, Any] = {}
        pending = None
        for key, tensor in tensors:
            if len(written) >= len(order) or key != order[len(written)]:
                raise ConversionError(f"{path}: tensor {key} produced out of the planned order")
            if (tensor.dtype, tuple(tensor.shape)) != expected[key]:
                raise ConversionError(f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}, planned {expected[key]}")
            flat = tensor.detach().contiguous().reshape(-1)
            data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
            crcs[key] = pool.submit(zlib.crc32, data)
            if pending is not None:
                pending.result()  # keeps file order and bounds memory
            pending = pool.submit(_write_and_hash, handle, digest, data, flat)
            keys[key] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}
            written.append(key)
        if pending is not None:
            pending.result()
        for key, crc in crcs.items():
            keys[key]["crc32"] = crc.result()
        if written != order:
            raise ConversionError(f"{path}: {len(order) - len(written)} planned tensors were not produced")
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest(), keys


@dataclass
class ShardRecord:
    """What was written into one shard: its hash and, per key, dtype / shape / CRC-32, plus caller stats."""

    name: str
    sha256: str
    nbytes: int
    keys: dict[str, dict[str, Any]]
    stats: dict[str, Any]


class ShardedWriter:
    """Writes one HF folder's shards into a resumable temp folder beside ``target``."""

    def __init__(self, target: Path, input_key: str) -> None:
        self.target = Path(target)
        self.temp = self.target.parent / f".{self.target.name}.partial-{input_key}"
        self.progress_path = self.temp / PROGRESS_NAME
        self.records: dict[str, ShardRecord] = {}
        self.resumed: list[str] = []

    def load_progress(self) -> None:
        """Read what an interrupted run with the same inputs already wrote (creates nothing)."""
        if self.progress_path.is_file():
            try:
                raw = json.loads(self.progress_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raw = {}
            for name, rec in raw.items():
                self.records[name] = ShardRecord(name, rec["sha256"], rec["nbytes"], rec["keys"], rec["stats"])

    def prepare(self) -> None:
        """Create the temp folder (after the disk preflight); drop partial folders of other inputs for this target."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.partial-*"):
            if stale != self.temp and stale.is_dir():
                shutil.rmtree(stale)
        self.temp.mkdir(exist_ok=True)

    def bytes_already_done(self) -> int:
        return sum(r.nbytes for r in self.records.values() if (self.temp / r.name).is_file())

    def resume(self, name: str, keys: list[str]) -> ShardRecord | None:
        """The record of a shard finished by an earlier run, if its file still hashes to what was recorded."""
        record = self.records.get(name)
        path = self.temp / name
        if record is None or not path.is_file() or list(record.keys) != keys:
            return None
        if path.stat().st_size != record.nbytes or file_sha256(path) != record.sha256:
            path.unlink()
            return None
        self.resumed.append(name)
        return record

    def write(
        self,
        name: str,
        specs: list[TensorSpec],
        tensors: Iterable[tuple[str, torch.Tensor]],
        stats: Callable[[], dict[str, Any]],
    ) -> ShardRecord:
        """Write one shard atomically (``.tmp`` + fsync + ``os.replace``) and record it with ``stats()``."""
        final = self.temp / name
        tmp = final.with_name(name + ".tmp")
        sha, keys = write_safetensors(tmp, specs, tensors, {"format": "pt"})
        os.replace(tmp, final)
        record = ShardRecord(name, sha, final.stat().st_size, keys, stats())
        self.records[name] = record
        _atomic_write_text(
            self.progress_path,
            json.dumps(
                {
                    n: {"sha256": r.sha256, "nbytes": r.nbytes, "keys": r.keys, "stats": r.stats}
                    for n, r in self.records.items()
                }
            ),
        )
        kill_after = os.environ.get(KILL_AFTER_ENV)
        if kill_after and len(self.records) - len(self.resumed) >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    def verify(self, shard_names: list[str]) -> None:
        """Reopen every shard: keys, dtype, shape and CRC-32 of every tensor must be what was meant to be written.

        ``safe_open`` (the library) must accept the file and report each key's dtype and shape; the bytes of each
        tensor are then read back into one reused buffer and CRC-checked.
        """
        problems: list[str] = []
        buffer = bytearray()
        for name in tqdm(shard_names, desc="verify shards", unit="shard", leave=False):
            record, path = self.records[name], self.temp / name
            with safe_open(str(path), framework="pt") as handle:
                found = {
                    k: (handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape())) for k in handle.keys()
                }
            if set(found) != set(record.keys):
                problems.append(f"{name}: keys differ ({sorted(set(found) ^ set(record.keys))[:3]})")
                continue
            with open(path, "rb") as raw:
                header_len = struct.unpack("<Q", raw.read(8))[0]
                header = json.loads(raw.read(header_len))
                data_start = 8 + header_len
                for key, meant in record.keys.items():
                    dtype_name = _SAFETENSORS_DTYPES.get(getattr(torch, meant["dtype"]))
                    if found[key] != (dtype_name, meant["shape"]):
                        problems.append(f"{name}:{key}: reads as {found[key]}, meant {dtype_name} {meant['shape']}")
                        continue
                    start, stop = header[key]["data_offsets"]
                    if len(buffer) < stop - start:
                        buffer = bytearray(stop - start)
                    view = memoryview(buffer)[: stop - start]
                    raw.seek(data_start + start)
                    if raw.readinto(view) != stop - start or zlib.crc32(view) != meant["crc32"]:
                        problems.append(f"{name}:{key}: bytes on disk differ from what was written")
        if problems:
            raise ConversionError(
                f"{self.temp}: written shards do not read back as written ({len(problems)} problems, e.g. "
                f"{problems[:3]}); the disk may be failing. Nothing was moved to {self.target}."
            )

    def write_index(self, shard_names: list[str], extra_metadata: dict[str, Any]) -> None:
        """The index, last: its presence marks a finished folder."""
        weight_map = {key: name for name in shard_names for key in self.records[name].keys}
        total = sum(
            tensor_nbytes(m["shape"], getattr(torch, m["dtype"]))
            for name in shard_names
            for m in self.records[name].keys.values()
        )
        metadata = {
            "total_size": total,
            SHARD_HASHES_KEY: {n: self.records[n].sha256 for n in shard_names},
            **extra_metadata,
        }
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(self.temp / INDEX_NAME, json.dumps(index, indent=2))

    def publish(self, replace_existing: Callable[[Path], bool]) -> None:
        """Move the finished temp folder to the target in one rename (an old vesselnb folder is replaced)."""
        self.progress_path.unlink(missing_ok=True)
        if self.target.exists():
            if not replace_existing(self.target):
                raise ConversionError(
                    f"{self.target} exists and was not written by vesselnb; move it away or choose another "
                    f"output folder. The finished conversion is kept in {self.temp}."
                )
            old = self.target.with_name(f".{self.target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.target, old)
            os.replace(self.temp, self.target)
            shutil.rmtree(old)
        else:
            os.replace(self.temp, self.target)
