"""Step keys: what a step's tensors depend on (compute key) and what its stored object holds (object key)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import xxhash


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(16 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


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
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def compute_key(op: str, version: int, params: dict, input_digests: list[str]) -> str:
    """What the tensors of a step depend on: op, op version, canonical parameters, inputs' content digests."""
    return hash_text("sdbuild-step-v1", op, str(version), canonical(params), canonical(input_digests))


def object_key(compute: str, metadata_text: str) -> str:
    """The stored object also holds final metadata, so its address covers both."""
    return hash_text("sdbuild-object-v1", compute, metadata_text)
