"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Write to a temporary file in the target's folder (same file system, so the rename is atomic), fsync it, rename it
over the target, fsync the folder so the rename itself survives a crash; on any failure the temporary file is
removed and the target is left as it was.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_name(target: str | os.PathLike) -> Path:
    """The temporary file a write of `target` goes through: hidden, beside it, unique to this process."""
    t = Path(target)
    return t.with_name(f".{t.name}.sdbuild-{os.getpid()}.tmp")


@contextmanager
def atomic_path(target: str | os.PathLike, tmp: str | os.PathLike | None = None, mode: int | None = None,
                sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; when the block succeeds it replaces `target` durably.

    `tmp` overrides where the temporary file goes (it must be on the target's file system); `mode` is applied to
    it before the rename, so the target never exists with other permissions. `sync=False` skips both fsyncs, for
    callers that verify the file after a crash instead (the store's objects and what is linked to them).
    """
    target = Path(target)
    tmp = Path(tmp) if tmp is not None else temp_name(target)
    _remove(tmp)
    try:
        yield tmp
        if sync:
            fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        if sync:
            fsync_dir(target.parent)
    finally:
        _remove(tmp)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `target` atomically."""
    return write_bytes(target, text.encode(encoding))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk (read-only files too: fsync needs no write access on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(d: str | os.PathLike) -> None:
    """Flush a folder's entries, so a rename into it survives a crash; a no-op where folders cannot be synced."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
