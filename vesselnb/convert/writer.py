"""Sharded safetensors writing that cannot leave a half folder behind.

Shards are written into a hidden temp folder beside the target (``.<name>.partial-<input key>``), each one
atomically (``*.tmp``, fsync, ``os.replace``) with its XXH3-128 digest, taken from the bytes as they are written,
recorded in ``progress.json``. An interrupted run with the same inputs resumes from the shards already done, after
re-hashing them from disk. When every shard is written, each is reopened with ``safe_open`` and every key's dtype
and shape checked against the plan; the index goes in last and the folder is renamed into place in one step.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vesselnb.convert.timing import PhaseClock
from vesselnb.errors import ConversionError
from vesselnb.fingerprint import INDEX_NAME, SHARD_HASHES_KEY, file_digest, new_file_digest

PROGRESS_NAME = "progress.json"
SHARD_METADATA = {"format": "pt"}  # every shard's safetensors metadata, as transformers writes it
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
    return count * dtype.itemsize


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


def block_size(folder: Path) -> int:
    """The allocation unit of the filesystem where ``folder`` will live (every file takes whole blocks)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    try:
        return max(512, os.statvfs(probe).f_frsize)
    except (OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4096


def _blocks(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block if nbytes else 0


DISK_MARGIN_FRACTION = 0.01  # on top of the upper bound: filesystems' own bookkeeping (extents, journal)
DISK_MARGIN_BYTES = 64 << 10


def disk_upper_bound(
    shard_specs: list[list[TensorSpec]], support_file_bytes: list[int], text_file_bytes: list[int], block: int
) -> int:
    """Bytes a conversion can occupy at its peak, rounded up per file to ``block``: never less than it writes.

    Shards: the exact header (built as the writer builds it) + tensor bytes. Support files: their sizes. Text files
    (config, index, record, progress): caller's upper estimates, counted twice because each is written to a
    ``.tmp`` beside the old copy before the rename. Plus one block per file for directories, 1 % and 64 KiB.
    """
    total = 0
    for specs in shard_specs:
        data = sum(tensor_nbytes(shape, dtype) for _, dtype, shape in specs)
        total += _blocks(8 + len(_header(specs, {"format": "pt"})) + data, block)
    total += sum(_blocks(n, block) for n in support_file_bytes)
    total += sum(2 * _blocks(n, block) for n in text_file_bytes)
    total += block * (len(support_file_bytes) + 2)
    return int(total * (1 + DISK_MARGIN_FRACTION)) + DISK_MARGIN_BYTES


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


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The safetensors JSON header for ``specs`` laid out back to back, space-padded to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
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
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return header_bytes + b" " * (-len(header_bytes) % 8)


# Bytes are hashed and written in slices of this size: the hash reads a slice, the copy or write reads it again
# while it is still in the CPU cache (a second pass over a whole 1 GB tensor would come from RAM again).
_SLICE = 8 << 20
# Direct I/O: the file is written from two page-aligned buffers of this size in turn, one filled while the other is
# on its way to the disk. Direct I/O needs offsets and lengths in whole blocks; 4096 covers every common device.
_DIRECT_CHUNK = 8 << 20
DIRECT_ALIGN = 4096
# Memory placed for a zero-copy write (``aligned_empty``) goes to the disk from where it is when it spans at least
# this many bytes; below that, copying it into the staging buffers costs less than the extra write calls.
_MIN_ZERO_COPY = 256 << 10
# Tensors handed to the writer and not yet on the disk, at most: the producer makes the next ones meanwhile and
# reuses an output's memory only once it is written, so it keeps WRITE_DEPTH + (tensors it makes at once) output
# buffers in turn. With one tensor of slack the disk and the merge took turns waiting for each other (bench: 1.3 s
# of waits in a 3 s run).
WRITE_DEPTH = 2
# A reused output buffer is kept up to this size, or up to twice what it holds now (``aligned_empty``).
_KEEP_AT_MOST = 256 << 20
# Buffered fallback: the first bytes are flushed every this many bytes by a flusher thread, then dropped from the
# page cache.
_FLUSH_EVERY = 256 << 20
# Tests: write through the page cache, as on a filesystem without O_DIRECT.
NO_DIRECT_ENV = "VESSELNB_NO_DIRECT_IO"


# Waits, timed so the bench shows which side of the pipeline held the other up (wall matters, CPU ~0).
_WAIT_DISK = "wait: writer thread for the disk"
_WAIT_WRITER = "wait: producer for the writer thread"


def _as_bytes(data: torch.Tensor | bytes) -> torch.Tensor:
    """A flat uint8 tensor over ``data``'s memory (no copy): torch copies release the GIL, memoryview ones do not."""
    if isinstance(data, torch.Tensor):
        return data.detach().contiguous().reshape(-1).view(torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _view(data: torch.Tensor) -> memoryview:
    return memoryview(data.numpy()) if data.numel() else memoryview(b"")


class _DirectSink:
    """Writes a file with ``O_DIRECT``: the bytes go from our buffer to the disk, never through the page cache.

    A conversion writes gigabytes nothing reads back while converting. Through the page cache every byte is copied
    once more by the kernel and needs a fresh page of memory, which on a VM whose freed memory goes back to the host
    (free page reporting, as on this project's machines) costs ~2 s of CPU per GB to touch again; then the final
    ``fsync`` waits for it all. Direct I/O costs almost no CPU (measured here: 2.7 GB in 0.1 s of CPU, 2 s of wall
    on one thread, which runs while the next tensors are merged). The bytes are hashed and copied into two aligned
    buffers in turn (torch copies, which release the GIL); an I/O thread writes the full one. The last buffer is
    padded to a whole block and the file truncated to its size. The price: the next stage reads the folder from disk.
    """

    def __init__(self, fd: int, clock: PhaseClock) -> None:
        import mmap

        self.fd, self.clock = fd, clock
        self.digest = new_file_digest()
        self._maps = [mmap.mmap(-1, _DIRECT_CHUNK) for _ in range(2)]  # page-aligned, reused for the whole file
        self._buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._writing: list[Any] = [None, None]
        self._in_place: list[Future[None]] = []  # zero-copy writes not yet known to be done
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-io")
        self._current = self._fill = self._offset = 0

    def put(self, data: torch.Tensor | bytes) -> list[Future[None]]:
        """Hash ``data`` and queue it for the disk; returns the writes still reading ``data``'s memory.

        Memory placed at the file position's offset within a block (``aligned_empty``: the converter's merge outputs)
        goes to the disk straight from where it is, in whole blocks; only its unaligned ends are copied. The caller
        may reuse ``data``'s memory once the returned writes are done (their ``result()`` raises a failed write's
        ``OSError``); copied bytes need no wait.
        """
        flat = _as_bytes(data)
        head = -(self._offset + self._fill) % DIRECT_ALIGN
        middle = (flat.numel() - head) // DIRECT_ALIGN * DIRECT_ALIGN
        writes: list[Future[None]] = []
        if middle >= _MIN_ZERO_COPY and (flat.data_ptr() + head) % DIRECT_ALIGN == 0:
            self._stage(flat[:head])
            if self._fill:
                self._submit(self._fill)  # ends on a block boundary now
            for start in range(head, head + middle, _SLICE):
                piece = flat[start : min(start + _SLICE, head + middle)]
                with self.clock.phase("hash (XXH3-128)"):
                    self.digest.update(_view(piece))  # xxhash releases the GIL
                writes.append(self._io.submit(self._write_view, _view(piece), self._offset))
                self._offset += piece.numel()
            self._in_place = [write for write in self._in_place if not write.done()] + writes
            flat = flat[head + middle :]
        self._stage(flat)
        return writes

    def _stage(self, flat: torch.Tensor) -> None:
        """Hash and copy into the aligned buffers, handing each full one to the I/O thread."""
        position = 0
        while position < flat.numel():
            count = min(flat.numel() - position, _DIRECT_CHUNK - self._fill, _SLICE)
            piece = flat[position : position + count]
            with self.clock.phase("hash (XXH3-128)"):
                self.digest.update(_view(piece))  # xxhash releases the GIL
            with self.clock.phase("write (copy to aligned buffer)"):
                self._buffers[self._current][self._fill : self._fill + count].copy_(piece)
            self._fill += count
            position += count
            if self._fill == _DIRECT_CHUNK:
                self._submit(_DIRECT_CHUNK)

    def _submit(self, length: int) -> None:
        """Hand the current buffer to the I/O thread; continue in the other once its last write is done."""
        self._writing[self._current] = self._io.submit(self._write, self._current, length, self._offset)
        self._offset += length
        self._current, self._fill = 1 - self._current, 0
        previous = self._writing[self._current]
        if previous is not None:
            with self.clock.phase(_WAIT_DISK):
                previous.result()  # raises that write's OSError (ENOSPC...) here

    def _write(self, index: int, length: int, offset: int) -> None:
        self._write_view(memoryview(self._maps[index])[:length], offset)

    def _write_view(self, view: memoryview, offset: int) -> None:
        with self.clock.phase("write (direct I/O)"):
            while view:  # a write may take fewer bytes than offered (whole blocks)
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written

    def finish(self) -> str:
        """Write the last bytes (padded to a block), cut the file to its size, fsync; the file's XXH3-128."""
        size = self._offset + self._fill
        if self._fill:
            padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
            self._buffers[self._current][self._fill : padded].zero_()
            self._submit(padded)
        self.close()
        with self.clock.phase("fsync"):
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        return self.digest.hexdigest()

    def close(self) -> None:
        """Wait for the writes in flight (raising their error) and free the buffers."""
        try:
            for pending in [*self._in_place, *self._writing]:
                if pending is not None:
                    pending.result()
        finally:
            self._io.shutdown(wait=True)
            self._writing, self._in_place = [None, None], []


class _BufferedSink:
    """Writes through the page cache, where ``O_DIRECT`` is refused (tmpfs, some network filesystems).

    Every ``_FLUSH_EVERY`` bytes a flusher thread ``fdatasync``s (only one outstanding, nobody waits for it), so the
    disk works while the next tensors are computed, then drops the flushed bytes from the page cache
    (``POSIX_FADV_DONTNEED``, as ``dd oflag=nocache``): the cache footprint stays near two flush windows, reused.
    """

    def __init__(self, fd: int, clock: PhaseClock) -> None:
        self.fd, self.clock = fd, clock
        self.digest = new_file_digest()
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush")
        self._flushing: Any = None
        self._position = self._unflushed = 0

    def put(self, data: torch.Tensor | bytes) -> list[Future[None]]:
        """Hash and write ``data`` (into the page cache: its memory may be reused at once, so no writes returned)."""
        view = _view(_as_bytes(data))
        for start in range(0, len(view), _SLICE):
            piece = view[start : start + _SLICE]
            with self.clock.phase("hash (XXH3-128)"):
                self.digest.update(piece)
            with self.clock.phase("write"):
                while piece:
                    piece = piece[os.write(self.fd, piece) :]
        self._position += len(view)
        self._unflushed += len(view)
        if self._unflushed >= _FLUSH_EVERY and (self._flushing is None or self._flushing.done()):
            self._flushing = self._flusher.submit(self._flush, self._position)
            self._unflushed = 0
        return []

    def _flush(self, written: int, sync: Callable[[int], None] = os.fdatasync) -> None:
        """Make the first ``written`` bytes durable, then drop them from the page cache (they are clean now)."""
        with self.clock.phase("fsync"):
            sync(self.fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, written, os.POSIX_FADV_DONTNEED)

    def finish(self) -> str:
        self.close()
        self._flush(self._position, os.fsync)
        return self.digest.hexdigest()

    def close(self) -> None:
        self._flusher.shutdown(wait=True)


def aligned_empty(
    nbytes: int, file_offset: int, reuse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nbytes`` of memory placed at ``file_offset``'s offset within a block, so :class:`_DirectSink` writes it to
    the disk from where it is instead of copying it: (the bytes, the allocation to keep for ``reuse`` next time).

    An allocation much larger than needed (an embedding cast to fp32, say) is not kept: each of the caller's buffers
    (one per tensor in the making or in flight) would otherwise keep the largest tensor it ever held.
    """
    need = nbytes + DIRECT_ALIGN
    if reuse is None or reuse.numel() < need or reuse.numel() > max(2 * need, _KEEP_AT_MOST):
        reuse = torch.empty(need, dtype=torch.uint8)
    start = (file_offset - reuse.data_ptr()) % DIRECT_ALIGN
    return reuse[start : start + nbytes], reuse


def data_offsets(specs: list[TensorSpec], metadata: dict[str, str]) -> list[int]:
    """Where each tensor's bytes start in the safetensors file :func:`write_safetensors` writes for ``specs``."""
    offsets, position = [], 8 + len(_header(specs, metadata))
    for _, dtype, shape in specs:
        offsets.append(position)
        position += tensor_nbytes(shape, dtype)
    return offsets


def _open_sink(path: Path, clock: PhaseClock) -> _DirectSink | _BufferedSink:
    """A new file at ``path`` and its sink: direct I/O where the filesystem allows it, else the page cache."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct and not os.environ.get(NO_DIRECT_ENV):
        try:
            fd = os.open(path, flags | direct, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem does not do O_DIRECT
                raise
        else:
            if _direct_write_works(fd):
                return _DirectSink(fd, clock)
            os.close(fd)
    return _BufferedSink(os.open(path, flags, 0o666), clock)


def _direct_write_works(fd: int) -> bool:
    """Whether one aligned block can be written through ``fd``: some filesystems accept ``O_DIRECT`` at open and
    refuse the writes (EINVAL: a larger block size, a journalled-data mount), which must not fail the conversion."""
    import mmap

    block = mmap.mmap(-1, DIRECT_ALIGN)  # page-aligned zeros; the real bytes overwrite them
    try:
        os.pwrite(fd, block, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        block.close()
    os.ftruncate(fd, 0)
    return True


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    clock: PhaseClock | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Write a safetensors file tensor by tensor as they are produced, hashing each byte once, from memory.

    The header is written first from ``specs`` (shapes and dtypes are known from the plan), so no more than two
    tensors are ever held: memory stays near the largest tensor whatever the shard size. ``safetensors``' own
    ``save_file`` needs every tensor of the shard at once and copies each into a Python ``bytes``. The format is a
    little-endian u64 header length, a JSON header padded to 8 bytes, then the tensors back to back; every shard is
    reopened with ``safe_open`` afterwards (:meth:`ShardedWriter.verify`), so the library itself checks the layout.

    Stages overlap: the caller produces the next tensor (LoRA merge) while a writer thread hashes earlier ones and
    hands them to the file (:class:`_DirectSink`; torch, ``xxhash`` and the writes release the GIL). When the caller is
    asked for the next tensor, up to :data:`WRITE_DEPTH` of those it gave may still be on their way to the disk: it
    must not reuse their memory yet. The file's XXH3-128 is taken
    from the very bytes written, all of which the file accepted, so it is the digest of the file (a test recomputes
    it from disk); reading the file back would only re-read the same bytes. Returns the XXH3-128 and
    ``{key: {dtype, shape}}``.
    """
    clock = clock or PhaseClock()
    header_bytes = _header(specs, metadata)
    expected = {key: (dtype, tuple(shape)) for key, dtype, shape in specs}
    order = [key for key, _, _ in specs]
    keys: dict[str, dict[str, Any]] = {}
    sink = _open_sink(path, clock)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
            sink.put(struct.pack("<Q", len(header_bytes)) + header_bytes)
            in_flight: deque[Future[list[Future[None]]]] = deque()

            def settle_oldest() -> None:  # raises the writer's or the disk's OSError here
                for write in in_flight.popleft().result():
                    write.result()

            for key, tensor in tensors:
                if len(keys) >= len(order) or key != order[len(keys)]:
                    raise ConversionError(f"{path}: tensor {key} produced out of the planned order")
                if (tensor.dtype, tuple(tensor.shape)) != expected[key]:
                    raise ConversionError(
                        f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}, planned {expected[key]}"
                    )
                with clock.phase(_WAIT_WRITER):
                    while len(in_flight) >= WRITE_DEPTH:  # bounds memory; the one writer thread keeps file order
                        settle_oldest()
                in_flight.append(writer.submit(sink.put, tensor))
                keys[key] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape)}
            while in_flight:
                settle_oldest()
        if list(keys) != order:
            raise ConversionError(f"{path}: {len(order) - len(keys)} planned tensors were not produced")
        digest = sink.finish()
    except BaseException:
        try:
            sink.close()
        except OSError:
            pass  # the error being raised already says what went wrong
        raise
    finally:
        os.close(sink.fd)
    return digest, keys


@dataclass
class ShardRecord:
    """What was written into one shard: its XXH3-128 and, per key, dtype and shape, plus caller stats."""

    name: str
    digest: str
    nbytes: int
    keys: dict[str, dict[str, Any]]
    stats: dict[str, Any]


class ShardedWriter:
    """Writes one HF folder's shards into a resumable temp folder beside ``target``."""

    def __init__(self, target: Path, input_key: str, clock: PhaseClock | None = None) -> None:
        self.target = Path(target)
        self.clock = clock or PhaseClock()
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
                if "digest" in rec:  # records of an older format are not resumed: those shards are redone
                    self.records[name] = ShardRecord(name, rec["digest"], rec["nbytes"], rec["keys"], rec["stats"])

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
        if path.stat().st_size != record.nbytes or file_digest(path) != record.digest:
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
        digest, keys = write_safetensors(tmp, specs, tensors, SHARD_METADATA, self.clock)
        os.replace(tmp, final)
        record = ShardRecord(name, digest, final.stat().st_size, keys, stats())
        self.records[name] = record
        _atomic_write_text(
            self.progress_path,
            json.dumps(
                {
                    n: {"digest": r.digest, "nbytes": r.nbytes, "keys": r.keys, "stats": r.stats}
                    for n, r in self.records.items()
                }
            ),
        )
        kill_after = os.environ.get(KILL_AFTER_ENV)
        if kill_after and len(self.records) - len(self.resumed) >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    def verify(self, shard_names: list[str]) -> None:
        """Reopen every shard with ``safe_open``: every key with the dtype and shape meant to be written.

        Each shard's digest was taken from the bytes the file accepted (:func:`write_safetensors`) and a resumed
        shard's was re-checked from disk (:meth:`resume`); this is the library's own view of the finished files.
        """
        problems: list[str] = []
        for name in tqdm(shard_names, desc="verify shards", unit="shard", leave=False):
            record, path = self.records[name], self.temp / name
            try:
                with safe_open(str(path), framework="pt") as handle:
                    found = {
                        k: (handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape()))
                        for k in handle.keys()
                    }
            except Exception as error:  # safetensors raises its own SafetensorError for unreadable headers
                problems.append(f"{name}: safetensors cannot open it ({error})")
                continue
            if set(found) != set(record.keys):
                problems.append(f"{name}: keys differ ({sorted(set(found) ^ set(record.keys))[:3]})")
                continue
            for key, meant in record.keys.items():
                dtype_name = _SAFETENSORS_DTYPES.get(getattr(torch, meant["dtype"]))
                if found[key] != (dtype_name, meant["shape"]):
                    problems.append(f"{name}:{key}: reads as {found[key]}, meant {dtype_name} {meant['shape']}")
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
            SHARD_HASHES_KEY: {n: self.records[n].digest for n in shard_names},
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
