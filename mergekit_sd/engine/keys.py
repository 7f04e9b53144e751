"""Digests and keys: file content digests memoised in the cache's state database, and step keys.

An input's digest covers its tensors only (names, dtypes, shapes, bytes), so retitling a file does not
invalidate builds. Digests are memoised by (path, size, mtime_ns, inode): a no-op build stats files and reads
no model bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

import xxhash

from mergekit_sd.errors import UserError

# counters tests use to prove that a no-op build reads no model bytes
STATS = {"files_hashed": 0, "bytes_hashed": 0}

SCHEMA = """
CREATE TABLE IF NOT EXISTS file_digest (
  path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,
  digest TEXT, sha256 TEXT
);
CREATE INDEX IF NOT EXISTS file_digest_digest ON file_digest(digest);
CREATE INDEX IF NOT EXISTS file_digest_sha ON file_digest(sha256);
CREATE TABLE IF NOT EXISTS object (
  key TEXT PRIMARY KEY, compute_key TEXT, digest TEXT, size INTEGER
);
CREATE INDEX IF NOT EXISTS object_compute ON object(compute_key);
CREATE TABLE IF NOT EXISTS history (
  recipe TEXT, node TEXT, key TEXT, compute_key TEXT, params TEXT, inputs TEXT,
  PRIMARY KEY (recipe, node)
);
"""


class StateDB:
    """A small sqlite database inside the cache: memoised digests, object records, last-built history."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = c
        return c

    def execute(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        return self._conn().execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None


def file_identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def digest_file(path: str | os.PathLike, db: StateDB | None, want_sha256: bool = True) -> tuple[str, str | None]:
    """(content digest, file sha256) of a model file, memoised by (path, size, mtime_ns, inode)."""
    from mergekit_sd.formats.open import content_digest_and_sha256

    p = Path(path).resolve()
    try:
        ident = file_identity(p)
    except OSError as e:
        raise UserError(f"cannot read model file: {e.strerror}", str(path)) from None
    if db is not None:
        rows = db.execute("SELECT size, mtime_ns, inode, digest, sha256 FROM file_digest WHERE path=?", (str(p),))
        if rows and tuple(rows[0][:3]) == ident and (rows[0][4] or not want_sha256):
            return rows[0][3], rows[0][4]
    digest, sha = content_digest_and_sha256(p, want_sha256)
    STATS["files_hashed"] += 1
    STATS["bytes_hashed"] += ident[0]
    if db is not None:
        remember_digest(db, p, ident, digest, sha)
    return digest, sha


def remember_digest(db: StateDB, path: Path, ident: tuple[int, int, int], digest: str, sha: str | None) -> None:
    db.execute("INSERT OR REPLACE INTO file_digest VALUES (?,?,?,?,?,?)", (str(path), *ident, digest, sha))


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
