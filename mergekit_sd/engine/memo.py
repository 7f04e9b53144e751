"""Input digests memoised in the state database.

An input's digest covers its tensors only (names, dtypes, shapes, bytes), so retitling a file does not invalidate
builds. Digests are memoised by (path, size, mtime_ns, inode): a no-op build stats files and reads no model bytes.
The same pass records each tensor's digest under the file's content digest (what tensor keys are made of).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mergekit_sd.engine.state import StateDB, file_identity
from mergekit_sd.errors import UserError
from mergekit_sd.formats.open import content_digest_and_sha256

# counters tests use to prove that a no-op build reads no model bytes
STATS = {"files_hashed": 0, "bytes_hashed": 0}


def digest_file(path: str | os.PathLike, db: StateDB | None, want_sha256: bool = True) -> tuple[str, str | None]:
    """(content digest, file sha256) of a model file, memoised by (path, size, mtime_ns, inode)."""
    p = Path(path).resolve()
    try:
        ident = file_identity(p)
    except OSError as e:
        raise UserError(f"cannot read model file: {e.strerror}", str(path)) from None
    if db is not None:
        memo = db.memo(p)
        if memo is not None and memo[0] == ident and (memo[2] or not want_sha256):
            return memo[1], memo[2]
    per_tensor: dict[str, bytes] = {}
    digest, sha = content_digest_and_sha256(p, want_sha256, per_tensor)
    _hashed(db, p, ident, digest, sha, per_tensor)
    return digest, sha


def _hashed(db: StateDB | None, path: Path, ident: tuple, digest: str, sha: str | None, per_tensor: dict[str, bytes]) -> None:
    """Count a file just hashed and memoise its digests (and its tensors' digests)."""
    STATS["files_hashed"] += 1
    STATS["bytes_hashed"] += ident[0]
    if db is not None:
        db.remember(path, ident, digest, sha)
        db.put_tensor_digests(digest, {n: d.hex() for n, d in per_tensor.items()})


def digest_files(paths: list[Path], db: StateDB, workers: int, want_sha256: bool = True) -> int:
    """Hash, side by side on up to `workers` threads, the files among `paths` whose digests are not memoised, and
    memoise them, so that a build hashing several inputs before it starts (pinned sha256s, a remote cache, `.ckpt`
    files, `plan`) reads them concurrently instead of one after another. A file that fails is left alone: the
    serial lookup that follows reports it in recipe order. Returns how many files were hashed."""
    todo: list[tuple[Path, tuple]] = []
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        try:
            ident = file_identity(path)
        except OSError:
            continue
        memo = db.memo(path)
        if memo is None or memo[0] != ident or (want_sha256 and not memo[2]):
            todo.append((path, ident))
    if len(todo) < 2 or workers < 2:
        return 0

    def one(item: tuple[Path, tuple]):
        per: dict[str, bytes] = {}
        try:
            return item, content_digest_and_sha256(item[0], want_sha256, per), per
        except (UserError, OSError):
            return item, None, per

    done = 0
    with ThreadPoolExecutor(min(workers, len(todo)), thread_name_prefix="sdbuild-hash") as pool:
        for (path, ident), got, per in pool.map(one, todo):
            if got is None or file_identity(path) != ident:  # failed, or changed while read: hashed again later
                continue
            _hashed(db, path, ident, got[0], got[1], per)
            done += 1
    return done
