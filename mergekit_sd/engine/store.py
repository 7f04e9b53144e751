"""The content-addressed cache: objects addressed by step key, written atomically, locked per key.

Layout under the cache directory: `objects/ab/<key>.safetensors` (read-only once written), `tmp/` for
objects being written, `locks/` for per-key locks, `state.db` for memoised digests and object records.

Objects are not fsynced where the kernel has a boot id: an object records the boot it was written under, and one
from an earlier boot (its bytes may have been lost with the page cache) is read back whole and checked against its
recorded digest before its first use; a mismatch rebuilds it.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from mergekit_sd.engine.boot import boot_id
from mergekit_sd.engine.memo import digest_file
from mergekit_sd.engine.state import StateDB, file_identity
from mergekit_sd.errors import SdbuildError
from mergekit_sd.formats.atomic import atomic_path, fsync_dir, fsync_file
from mergekit_sd.formats.safetensors import WriteResult, file_content_digest

READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH  # objects are never modified in place


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        for sub in ("objects", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db = StateDB(self.root)
        self.boot = boot_id()

    @property
    def must_fsync(self) -> bool:
        """Objects are fsynced only where no boot id tells a reboot apart (see engine.boot)."""
        return self.boot is None

    def object_path(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / f"{key}.safetensors"

    def record(self, key: str) -> tuple[str, str, int] | None:
        return self.db.object(key)

    def status(self, key: str) -> tuple[str | None, str]:
        """(content digest or None, why): an object is served only if it is present and undamaged.

        Damage is found by the memoised digest: a file whose size, mtime or inode changed is rehashed and must still
        hold the recorded content.
        """
        path = self.object_path(key)
        rec = self.record(key)
        if rec is None or not path.exists():
            return None, "never built" if rec is None else "object missing from the cache"
        _, digest, size = rec
        written_under = self.db.object_boot(key)
        unflushed = written_under is not None and written_under != self.boot
        try:
            if file_identity(path)[0] != size:
                return None, "object damaged"
            if unflushed:  # written without fsync before a reboot: read every byte back, not the memo
                actual, _ = file_content_digest(path, with_sha256=False)
            else:
                actual, _ = digest_file(path, self.db, want_sha256=False)
        except (OSError, SdbuildError):
            return None, "object damaged"
        if actual != digest:
            return None, "object damaged"
        if unflushed:
            self.db.mark_durable(key)
        return digest, "fresh"

    def find_compute(self, compute_key: str) -> str | None:
        """An existing object with the same tensors (only metadata differs), if any is intact."""
        for key in self.db.objects_with_compute(compute_key):
            if self.status(key)[0] is not None:
                return key
        return None

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with FileLock(str(self.root / "locks" / f"{key[:32]}.lock")):
            yield

    def tmp_path(self, key: str) -> Path:
        """Where an object for `key` is written (or downloaded) before it is renamed into place."""
        return self.root / "tmp" / f"{key}.{os.getpid()}.partial"

    def adopt(self, key: str, compute_key: str, tmp: Path, content_digest: str) -> None:
        """Rename a verified temporary object into place (downloads; the caller has checked its digest)."""
        final = self.object_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            fsync_file(tmp)
            os.chmod(tmp, READ_ONLY)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        ident = file_identity(final)
        self.db.remember(final, ident, content_digest, None)
        self.db.put_object(key, compute_key, content_digest, ident[0])

    def put(self, key: str, compute_key: str, write: Callable[[Path], WriteResult]) -> WriteResult:
        """Write an object through a temporary file: a crash never leaves a half object under a real key."""
        final = self.object_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final, self.tmp_path(key), mode=READ_ONLY, sync=self.must_fsync) as path:
            result = write(path)
        self.db.remember(final, file_identity(final), result.content_digest, None)
        self.db.put_object(key, compute_key, result.content_digest, result.size, self.boot)
        return result

    def put_late(self, write: Callable[[Path], WriteResult], keys: Callable[[], tuple[str, str]]) -> WriteResult:
        """Like `put`, for an object whose (key, compute key) is known only once it is written (its inputs were
        hashed by the reads that computed it): `keys` is asked after `write` returns."""
        tmp = self.root / "tmp" / f"new-{uuid.uuid4().hex}.{os.getpid()}.partial"
        try:
            result = write(tmp)
            key, compute_key = keys()
            final = self.object_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if self.must_fsync:
                fsync_file(tmp)
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, final)
            if self.must_fsync:
                fsync_dir(final.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.db.remember(final, file_identity(final), result.content_digest, None)
        self.db.put_object(key, compute_key, result.content_digest, result.size, self.boot)
        return result

    def clean_tmp(self) -> int:
        """Remove partial objects left by killed builds (only those not being written right now)."""
        n = 0
        for p in (self.root / "tmp").glob("*.partial"):
            try:
                pid = int(p.name.rsplit(".", 2)[-2])
            except ValueError:
                pid = -1
            if pid > 0 and _alive(pid) and pid != os.getpid():
                continue
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    def forget(self, key: str) -> None:
        path = self.object_path(key)
        if path.exists():
            path.unlink()
        self.db.forget_object(key)


def collect_garbage(store: "Store", keep: set[str]) -> tuple[int, int]:
    """Delete every object not in `keep`; returns (objects removed, bytes freed)."""
    removed = freed = 0
    for path in sorted((store.root / "objects").glob("*/*.safetensors")):
        key = path.name[: -len(".safetensors")]
        if key in keep:
            continue
        size = path.stat().st_size
        with store.lock(key):
            store.forget(key)
        removed += 1
        freed += size
    store.clean_tmp()
    known = {p.name[: -len(".safetensors")] for p in (store.root / "objects").glob("*/*.safetensors")}
    for key in store.db.object_keys():
        if key not in known:
            store.db.forget_object(key)
    store.db.forget_orphan_history()
    store.db.forget_missing_files()
    store.db.forget_orphan_tensors()
    return removed, freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def materialise(obj: Path, target: Path, sync: bool = True) -> str:
    """Put an object at an output path by hard link (else copy), atomically. Returns "link", "copy" or "same".

    `sync=False` (the store verifies objects after a reboot): a link shares the verified object's bytes, and a copy
    is made again by the next build after a reboot, because no-op stamps do not outlive a boot."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if target.exists() and os.path.samefile(obj, target):
            return "same"
    except OSError:
        pass
    with atomic_path(target, sync=sync) as tmp:
        try:
            os.link(obj, tmp)
            how = "link"
        except OSError:
            shutil.copyfile(obj, tmp)
            how = "copy"
    return how
