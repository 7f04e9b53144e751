"""File hashes and text digests: the one place that reads a file to hash it.

- `sha256_file`: a whole file's sha256 (Civitai, AUTOMATIC1111 and lock files pin inputs by it), or from an offset.
- `tensor_buffer_sha256`: ModelSpec's `hash_sha256`, the sha256 of everything after a safetensors header.
- `legacy_hash` / `autov2`: AUTOMATIC1111's short model hashes (docs/formats.md §4.4).
- `canonical` / `hash_text`: canonical JSON and the xxh3-128 digest of text that step keys and metadata use.

Content digests of tensors (names, dtypes, shapes, bytes) live with the safetensors reader, which computes them in
the same pass as the file sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import xxhash

BLOCK = 16 << 20  # bytes read at a time
LEGACY_OFFSET = 0x100000
LEGACY_SIZE = 0x10000
EMPTY_LEGACY = "e3b0c442"  # the legacy hash of a file shorter than 1 MiB: sha256 of nothing


def sha256_file(path: str | os.PathLike, offset: int = 0) -> str:
    """Hex sha256 of a file's bytes from `offset` to the end, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def tensor_buffer_sha256(path: str | os.PathLike) -> str:
    """`modelspec.hash_sha256`: "0x" + sha256 of the tensor buffer (everything after the header)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file")
    return "0x" + sha256_file(path, 8 + int.from_bytes(head, "little"))


def legacy_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's old model hash ("AutoV1"): sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        data = f.read(LEGACY_SIZE)
    return hashlib.sha256(data).hexdigest()[:8]


def autov2(sha256: str) -> str:
    """AUTOMATIC1111's short hash and Civitai's AutoV2: the first 10 hex digits of the file sha256."""
    return sha256[:10].lower()


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces, floats by repr) — what keys and metadata hash."""
    return json.dumps(_canon(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canon(v: Any) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("non-finite number in canonical value")
        return int(v) if v.is_integer() and abs(v) < 2**53 else v
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def hash_text(*parts: str) -> str:
    """xxh3-128 of text parts, each terminated by a NUL so that ("ab", "c") and ("a", "bc") differ."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
