"""The engine's use of a remote cache: a stale step is looked up remotely before it is computed, a download is
verified before it is adopted, and after a build every object the remote lacks is uploaded.

A download is adopted only when it is a well-formed safetensors file whose embedded provenance names this step
with this compute key and whose tensors hash to the content digest recorded in it; anything else (garbage, a
truncated file, another step's object) is discarded and the step is built locally. The first failure of the remote
itself is one warning; the build then goes on without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mergekit_sd.engine.progress import Progress
from mergekit_sd.engine.store import Store
from mergekit_sd.errors import SdbuildError
from mergekit_sd.formats.safetensors import CONTENT_DIGEST_KEY, file_content_digest, read_header
from mergekit_sd.provenance.record import read_provenance
from mergekit_sd.remote.s3 import RemoteStore, RemoteUnavailable


def verify_object(path: Path, node: str, compute_key: str) -> str | None:
    """The object's content digest when it is what `node` with `compute_key` produces, else None."""
    try:
        _, meta = read_header(path)
        prov = read_provenance(meta) or {}
        entry = (prov.get("nodes") or {}).get(node) or {}
        if prov.get("node") != node or entry.get("key") != compute_key:
            return None
        digest, _ = file_content_digest(path, with_sha256=False)
    except (SdbuildError, OSError, ValueError, KeyError):
        return None
    return digest if digest == meta.get(CONTENT_DIGEST_KEY) else None


class RemoteCache:
    def __init__(self, remote: RemoteStore, progress: Progress):
        self.remote = remote
        self.progress = progress
        self.failure: str | None = None
        self.warnings: list[str] = []

    @property
    def usable(self) -> bool:
        return self.failure is None

    def _fail(self, e: BaseException) -> None:
        if self.failure is None:
            self.failure = str(e)
            msg = f"remote cache {self.remote.url} unavailable ({e}); building locally"
            self.progress.warn(msg)
            self.warnings.append(msg)

    def _warn(self, msg: str) -> None:
        self.progress.warn(msg)
        self.warnings.append(msg)

    def fetch(self, store: Store, node: str, key: str, compute_key: str) -> str | None:
        """Download, verify and adopt the object for `key`; its content digest, or None (absent, bad, unavailable)."""
        if not self.usable:
            return None
        tmp = store.tmp_path(key)
        try:
            if not self.remote.download(key, tmp, self.progress.bytes_callback(f"{node}: download")):
                return None
        except RemoteUnavailable as e:
            self._fail(e)
            tmp.unlink(missing_ok=True)
            return None
        digest = verify_object(tmp, node, compute_key)
        if digest is None:
            tmp.unlink(missing_ok=True)
            self._warn(f"{node}: the remote object {key[:16]}… failed verification (not this step's result, or damaged); building locally")
            return None
        store.adopt(key, compute_key, tmp, digest)
        return digest

    def push(self, store: Store, keys: Iterable[str]) -> tuple[int, int, int]:
        """Upload every object the remote lacks (HEAD before PUT): (uploaded, bytes uploaded, already there)."""
        uploaded = nbytes = present = 0
        if self.remote.read_only or not self.usable:
            return 0, 0, 0
        for key in keys:
            path = store.object_path(key)
            if not path.exists():
                continue
            try:
                if self.remote.size(key) is not None:
                    present += 1
                    continue
                self.remote.upload(key, path, self.progress.bytes_callback(f"upload {key[:12]}"))
            except RemoteUnavailable as e:
                self._fail(e)
                break
            uploaded += 1
            nbytes += path.stat().st_size
        return uploaded, nbytes, present
