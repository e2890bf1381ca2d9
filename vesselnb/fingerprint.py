"""Weights fingerprints: one short hash that says "these are the same weights".

The users once had two different checkpoints convert to identical weights and only found out by accident; every
run therefore records the fingerprint of the HF folder it used, and the store refuses to mix two of them.

For a folder vesselnb wrote, the per-shard digests are already in the index metadata (computed while writing), so
fingerprinting a 16 GB folder costs nothing; other folders are hashed shard by shard once.

The digest is XXH3-128, not SHA-256: the question is "same bytes?", never an adversary forging a collision, and
XXH3 runs at ~15 GB/s where SHA-256 runs at ~1.3 GB/s, which was the single largest cost of a conversion after
the LoRA merge.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import xxhash

from vesselnb.errors import VesselnbError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_HASHES_KEY = "vesselnb_shard_xxh3_128"  # in the index's "metadata"


def new_file_digest() -> xxhash.xxh3_128:
    """The incremental hasher behind :func:`file_digest` (the writer feeds it while writing)."""
    return xxhash.xxh3_128()


def file_digest(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """XXH3-128 of a file (32 hex), read into one reused buffer so memory stays flat for multi-GB shards."""
    digest = new_file_digest()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _cache_path() -> Path:
    """Where hashes of folders vesselnb did not write are remembered (resumed runs must not re-hash 16 GB)."""
    root = os.environ.get("VESSELNB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vesselnb")
    return Path(root) / "shard_xxh3_128.json"


def cached_file_digest(path: Path) -> str:
    """:func:`file_digest`, remembered by (absolute path, size, mtime) so an unchanged file is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = file_digest(path)
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def shard_hashes(hf_dir: str | Path) -> dict[str, str]:
    """``{shard file name: XXH3-128 hex}`` for the safetensors weights of an HF folder.

    Taken from the index metadata when vesselnb wrote the folder, otherwise computed from the files.
    """
    folder = Path(hf_dir)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        recorded = (index.get("metadata") or {}).get(SHARD_HASHES_KEY)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if recorded and set(recorded) == set(shards):
            return {name: recorded[name] for name in shards}
        return {name: cached_file_digest(folder / name) for name in shards}
    if (folder / SINGLE_NAME).is_file():
        return {SINGLE_NAME: cached_file_digest(folder / SINGLE_NAME)}
    raise VesselnbError(
        f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; this is not a finished HF folder "
        "(an interrupted conversion leaves no index — rerun the conversion)"
    )


def weights_fingerprint(hf_dir: str | Path) -> str:
    """A 16-hex-digit fingerprint of an HF folder's weights (tensor names, shard layout and shard bytes)."""
    folder = Path(hf_dir)
    digest = hashlib.sha256()
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        digest.update(json.dumps(weight_map, sort_keys=True).encode())
    for name, shard_digest in sorted(shard_hashes(folder).items()):
        digest.update(f"{name}:{shard_digest}\n".encode())
    return digest.hexdigest()[:16]


# Files of an HF folder that are not model behaviour: the weights' index and vesselnb's own conversion record.
_NOT_BEHAVIOUR = {INDEX_NAME, "vesselnb_conversion.json"}
_BEHAVIOUR_SUFFIXES = {".json", ".py", ".txt", ".model", ".tiktoken", ".jinja"}


def config_fingerprint(hf_dir: str | Path) -> str:
    """16 hex digits over everything in an HF folder that is not weights but changes answers.

    config.json (template, special token ids), the generation config, the tokenizer files and the remote code.
    Two folders with the same weights and another template answer differently, so a prediction store records this
    next to :func:`weights_fingerprint` (which deliberately stays a pure statement about weights).
    """
    digest = hashlib.sha256()
    for path in sorted(Path(hf_dir).iterdir()):
        if path.is_file() and path.suffix in _BEHAVIOUR_SUFFIXES and path.name not in _NOT_BEHAVIOUR:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
