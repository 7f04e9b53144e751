"""The cache's state database: every table and every SQL statement sdbuild runs live here.

Tables: `file_digest` (content digest and sha256 memoised by path, size, mtime_ns and inode), `object` (what each
stored object holds, and the boot it was written under while its bytes may not be on disk yet), `history` (what each
recipe node was last built from, for "why is it stale"), `stamp` (the no-op fast path), `tensor_digest` (each
tensor's digest in a file of a given content digest: inputs and objects alike) and `object_tensor` (per stored
object, each tensor's tensor key, digest and byte range: what tensor-level reuse copies from). This module imports
no torch: the no-op path reads stamps through it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS file_digest (
  path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,
  digest TEXT, sha256 TEXT
);
CREATE INDEX IF NOT EXISTS file_digest_digest ON file_digest(digest);
CREATE INDEX IF NOT EXISTS file_digest_sha ON file_digest(sha256);
CREATE TABLE IF NOT EXISTS object (
  key TEXT PRIMARY KEY, compute_key TEXT, digest TEXT, size INTEGER, boot TEXT
);
CREATE INDEX IF NOT EXISTS object_compute ON object(compute_key);
CREATE TABLE IF NOT EXISTS history (
  recipe TEXT, node TEXT, key TEXT, compute_key TEXT, params TEXT, inputs TEXT,
  PRIMARY KEY (recipe, node)
);
CREATE TABLE IF NOT EXISTS stamp (key TEXT PRIMARY KEY, files TEXT, report TEXT);
"""

# added in schema version 2 (tensor-level reuse); created by `_migrate` for databases of every age
TENSOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS tensor_digest (content TEXT, name TEXT, digest TEXT, PRIMARY KEY (content, name));
CREATE TABLE IF NOT EXISTS object_tensor (
  object TEXT, name TEXT, tkey TEXT, digest TEXT, begin INTEGER, end INTEGER, PRIMARY KEY (object, name)
);
CREATE INDEX IF NOT EXISTS object_tensor_tkey ON object_tensor(tkey);
"""
SCHEMA_VERSION = 2
SQL_VARIABLES = 500  # keys per IN (...) query, well under sqlite's limit

DB_NAME = "state.db"
Identity = tuple[int, int, int]  # (size, mtime_ns, inode)


def file_identity(path: str | os.PathLike) -> Identity:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


class StateDB:
    """One sqlite database per cache folder; a connection per thread, WAL so concurrent builds can share it."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir) / DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._sql().executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema (columns are only ever added)."""
        cols = {row[1] for row in self._rows("PRAGMA table_info(object)")}
        if "boot" not in cols:  # objects written before boot ids were recorded were fsynced: NULL means durable
            try:
                self._rows("ALTER TABLE object ADD COLUMN boot TEXT")
            except sqlite3.OperationalError as e:  # another process added it first
                if "duplicate column" not in str(e):
                    raise
        if self._rows("PRAGMA user_version")[0][0] < SCHEMA_VERSION:
            self._sql().executescript(TENSOR_SCHEMA)
            self._rows(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def existing(cls, cache_dir: str | os.PathLike) -> "StateDB | None":
        """The database if the cache already has one (read-only callers must not create a cache)."""
        return cls(cache_dir) if (Path(cache_dir) / DB_NAME).exists() else None

    def _sql(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = c
        return c

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        return self._sql().execute(sql, tuple(args)).fetchall()

    def _many(self, sql: str, rows: list[tuple]) -> None:
        """One statement over many rows in one transaction (a model's ~1,100 tensors in one commit)."""
        c = self._sql()
        c.execute("BEGIN")
        try:
            c.executemany(sql, rows)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- memoised file digests ---------------------------------------------------------------------------------------

    def memo(self, path: Path) -> tuple[Identity, str, str | None] | None:
        """(identity, content digest, sha256 or None) last recorded for `path`."""
        rows = self._rows("SELECT size, mtime_ns, inode, digest, sha256 FROM file_digest WHERE path=?", (str(path),))
        return (tuple(rows[0][:3]), rows[0][3], rows[0][4]) if rows else None  # type: ignore[return-value]

    def remember(self, path: Path, ident: Identity, digest: str, sha256: str | None) -> None:
        self._rows("INSERT OR REPLACE INTO file_digest VALUES (?,?,?,?,?,?)", (str(path), *ident, digest, sha256))

    def forget_missing_files(self) -> None:
        for (path,) in self._rows("SELECT path FROM file_digest"):
            if not os.path.exists(path):
                self._rows("DELETE FROM file_digest WHERE path=?", (path,))

    # -- objects -------------------------------------------------------------------------------------------------------

    def object(self, key: str) -> tuple[str, str, int] | None:
        """(compute key, content digest, size) of a stored object."""
        rows = self._rows("SELECT compute_key, digest, size FROM object WHERE key=?", (key,))
        return tuple(rows[0]) if rows else None  # type: ignore[return-value]

    def put_object(self, key: str, compute_key: str, digest: str, size: int, boot: str | None = None) -> None:
        """Record an object; `boot` is the boot id it was written under when it was not fsynced (None: durable)."""
        self._rows("INSERT OR REPLACE INTO object (key, compute_key, digest, size, boot) VALUES (?,?,?,?,?)",
                   (key, compute_key, digest, size, boot))

    def object_boot(self, key: str) -> str | None:
        """The boot id an object was written under without fsync, or None once it is known to be on disk."""
        rows = self._rows("SELECT boot FROM object WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def mark_durable(self, key: str) -> None:
        """An object re-verified after a reboot is on disk: later uses need no re-verification."""
        self._rows("UPDATE object SET boot=NULL WHERE key=?", (key,))

    def objects_with_compute(self, compute_key: str) -> list[str]:
        return [k for (k,) in self._rows("SELECT key FROM object WHERE compute_key=?", (compute_key,))]

    def object_keys(self) -> list[str]:
        return [k for (k,) in self._rows("SELECT key FROM object")]

    def forget_object(self, key: str) -> None:
        self._rows("DELETE FROM object WHERE key=?", (key,))
        self._rows("DELETE FROM object_tensor WHERE object=?", (key,))

    # -- per-tensor digests and tensor keys -------------------------------------------------------------------------------

    def put_tensor_digests(self, content: str, digests: dict[str, str]) -> None:
        """Each tensor's digest in the file whose content digest is `content` (recorded once per content)."""
        if digests and not self._rows("SELECT 1 FROM tensor_digest WHERE content=? LIMIT 1", (content,)):
            self._many("INSERT OR IGNORE INTO tensor_digest VALUES (?,?,?)", [(content, n, d) for n, d in digests.items()])

    def tensor_digests(self, content: str) -> dict[str, str] | None:
        """name -> digest of every tensor of a file with this content digest, or None when never recorded."""
        rows = self._rows("SELECT name, digest FROM tensor_digest WHERE content=?", (content,))
        return dict(rows) if rows else None

    def put_object_tensors(self, key: str, rows: list[tuple[str, str | None, str, int, int]]) -> None:
        """(name, tensor key or None, digest, first byte, end byte) of every tensor of a stored object."""
        self._rows("DELETE FROM object_tensor WHERE object=?", (key,))
        self._many("INSERT OR REPLACE INTO object_tensor VALUES (?,?,?,?,?,?)", [(key, *r) for r in rows])

    def object_tensors(self, key: str) -> dict[str, tuple[str | None, str, int, int]]:
        """name -> (tensor key, digest, first byte, end byte) recorded for a stored object."""
        rows = self._rows("SELECT name, tkey, digest, begin, end FROM object_tensor WHERE object=?", (key,))
        return {r[0]: tuple(r[1:]) for r in rows}  # type: ignore[misc]

    def objects_with_tensor_keys(self, tkeys: list[str]) -> dict[str, tuple[str, str, str, int, int]]:
        """tensor key -> (object key, tensor name, digest, first byte, end byte) of one stored tensor with that key
        (the first object by key: one row per tensor key, however many objects share it)."""
        out: dict[str, tuple[str, str, str, int, int]] = {}
        unique = sorted(set(tkeys))
        for i in range(0, len(unique), SQL_VARIABLES):
            part = unique[i:i + SQL_VARIABLES]
            sql = ("SELECT tkey, MIN(object), name, digest, begin, end FROM object_tensor WHERE tkey IN (%s) "
                   "GROUP BY tkey" % ",".join("?" * len(part)))
            for tkey, *rest in self._rows(sql, part):
                out[tkey] = tuple(rest)  # type: ignore[assignment]
        return out

    def tensor_copies(self, tkey: str) -> list[tuple[str, str, str, int, int]]:
        """Every stored tensor with this key: (object key, tensor name, digest, first byte, end byte)."""
        return [tuple(r) for r in self._rows("SELECT object, name, digest, begin, end FROM object_tensor WHERE tkey=? "
                                             "ORDER BY object", (tkey,))]  # type: ignore[misc]

    def forget_object_tensor(self, key: str, name: str) -> None:
        """A stored tensor that failed its digest check is never offered again."""
        self._rows("DELETE FROM object_tensor WHERE object=? AND name=?", (key, name))

    def forget_orphan_tensors(self) -> None:
        """Tensor records of objects and files the cache no longer knows."""
        self._rows("DELETE FROM object_tensor WHERE object NOT IN (SELECT key FROM object)")
        self._rows("DELETE FROM tensor_digest WHERE content NOT IN (SELECT digest FROM file_digest) "
                   "AND content NOT IN (SELECT digest FROM object)")

    # -- build history ---------------------------------------------------------------------------------------------------

    def last_build(self, recipe: str, node: str) -> tuple[str, str, str, list[str] | None] | None:
        """(object key, compute key, canonical params, input digests) of the node's last build."""
        rows = self._rows("SELECT key, compute_key, params, inputs FROM history WHERE recipe=? AND node=?", (recipe, node))
        if not rows:
            return None
        key, ck, params, inputs = rows[0]
        return key, ck, params, json.loads(inputs) if inputs else None

    def record_build(self, recipe: str, node: str, key: str, compute_key: str, params: str, inputs: str) -> None:
        self._rows("INSERT OR REPLACE INTO history VALUES (?,?,?,?,?,?)", (recipe, node, key, compute_key, params, inputs))

    def forget_orphan_history(self) -> None:
        self._rows("DELETE FROM history WHERE key NOT IN (SELECT key FROM object)")

    # -- no-op stamps ----------------------------------------------------------------------------------------------------

    def stamp(self, key: str) -> tuple[list, dict] | None:
        """(files with their identities, report) stamped for an invocation."""
        rows = self._rows("SELECT files, report FROM stamp WHERE key=?", (key,))
        return (json.loads(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def put_stamp(self, key: str, files: list, report: dict) -> None:
        self._rows("INSERT OR REPLACE INTO stamp VALUES (?,?,?)", (key, json.dumps(files), json.dumps(report)))

    def clear_stamps(self) -> None:
        self._rows("DELETE FROM stamp")
