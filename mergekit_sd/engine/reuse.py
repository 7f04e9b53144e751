"""Tensor-level reuse: a stale step copies every output tensor the store already holds instead of computing it.

Each output tensor gets a tensor key: the hash of the op and its version, the device kind, the tensor's name,
dtype and shape, the parameters that apply to that tensor alone and the digests of the input tensors it reads, as
its op declares them (`LazyModel.key_inputs`; a tensor whose op declares nothing has no key and is always computed).
Input tensor digests come from the state database, recorded under a file's content digest by the pass that hashed
it (inputs) or by the write that made it (objects). Every stored object records, per tensor, its key, digest and
byte range. A tensor whose key some object holds is read from there, checked against its recorded digest and
written from those checked bytes; a mismatch (a damaged object) forgets that record and computes the tensor instead. The
bytes are those a computation would give, so the output is the same file a clean build writes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import torch

from mergekit_sd.engine.state import StateDB, file_identity
from mergekit_sd.engine.store import Store
from mergekit_sd.errors import SdbuildError
from mergekit_sd.formats.digests import canonical, hash_text
from mergekit_sd.formats.safetensors import WriteResult, dtype_code, file_content_digest, tensor_digest
from mergekit_sd.lazy import LazyModel

Digests = dict[str, str]  # tensor name -> hex digest (xxh3-128 of name, dtype, shape and bytes)


def file_tensor_digests(db: StateDB, path: Path, content: str | None) -> Digests | None:
    """Per-tensor digests of a safetensors file a step reads as stored (None: its digest is not known yet).
    Recorded ones are looked up by content digest; a file hashed before they were recorded is hashed once more
    (stale steps only)."""
    if content is None:
        return None
    found = db.tensor_digests(content)
    if found is not None:
        return found
    per: dict[str, bytes] = {}
    try:
        actual, _ = file_content_digest(path, False, per)
    except (OSError, SdbuildError):  # unreadable or damaged: its tensors are simply computed
        return None
    if actual != content:
        return None
    found = {n: d.hex() for n, d in per.items()}
    db.put_tensor_digests(content, found)
    return found


def tensor_keys(model: LazyModel, op: str, version: int, device: str, inputs: list[Digests | None]) -> dict[str, str]:
    """name -> tensor key for every tensor whose declared inputs all have known digests."""
    keys: dict[str, str] = {}
    for name in model.keys():
        decl = model.key_inputs(name)
        if decl is None:
            continue
        digests = []
        for i, tensor in decl.reads:
            found = inputs[i] if 0 <= i < len(inputs) else None
            d = found.get(tensor) if found is not None else None
            if d is None:
                break
            digests.append(d)
        else:
            spec = model.spec(name)
            try:
                params = canonical(decl.params)
            except (TypeError, ValueError):  # not JSON-able: no key, computed
                continue
            keys[name] = hash_text("sdbuild-tensor-v1", op, str(version), device, name, dtype_code(spec.dtype),
                                   canonical(list(spec.shape)), params, canonical(digests))
    return keys


class TensorReuse:
    """One step's reuse: serves stored tensors in place of computed ones and counts both."""

    def __init__(self, store: Store, model: LazyModel, keys: dict[str, str]):
        self.store = store
        self.base = model
        self.keys = keys
        self.reused = 0
        self.damaged: list[str] = []  # stored tensors that failed their digest check
        self.complete = False  # whether `keys` were made with every input's digests known
        self.result: WriteResult | None = None  # the written object, once written
        self._lock = threading.Lock()
        self._fds: dict[str, int | None] = {}
        self._verified: dict[str, bytes] = {}
        found = store.db.objects_with_tensor_keys(list(keys.values())) if keys else {}
        self._first = {name: found[tkey] for name, tkey in keys.items() if tkey in found}
        self.model = LazyModel(model.specs, self._produce, model.metadata, model.label, model.info,
                               key_inputs=model.key_inputs, coster=model.cost)

    @property
    def computed(self) -> int:
        return len(self.base) - self.reused

    def _fd(self, obj: str) -> int | None:
        with self._lock:
            if obj not in self._fds:
                path = self.store.object_path(obj)
                rec = self.store.record(obj)
                try:
                    fd = os.open(path, os.O_RDONLY) if rec is not None and file_identity(path)[0] == rec[2] else None
                except OSError:
                    fd = None
                self._fds[obj] = fd
            return self._fds[obj]

    def _candidates(self, name: str) -> Iterator[tuple[str, str, str, int, int]]:
        """Stored tensors with this tensor's key: the one found up front, then (only if it fails) every other."""
        if name not in self._first:
            return
        yield self._first[name]
        for row in self.store.db.tensor_copies(self.keys[name]):
            if row[0] != self._first[name][0]:
                yield row

    def _produce(self, name: str) -> torch.Tensor:
        spec = self.base.spec(name)
        for obj, tname, digest, begin, end in self._candidates(name):
            fd = self._fd(obj) if tname == name and end - begin == spec.nbytes else None
            if fd is None:
                continue
            buf = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled: every byte is read into it
            if not _pread_exact(fd, buf, begin) or tensor_digest(name, spec.dtype, spec.shape, buf.numpy()).hex() != digest:
                self.store.db.forget_object_tensor(obj, tname)  # damaged on disk: computed, never offered again
                with self._lock:
                    self.damaged.append(f"{tname} in {self.store.object_path(obj)}")
                continue
            with self._lock:
                self.reused += 1
                self._verified[name] = bytes.fromhex(digest)
            if not buf.numel():
                return torch.empty(spec.shape, dtype=spec.dtype)
            return buf.view(spec.dtype).reshape(spec.shape)
        return self.base.get(name)

    def known_digest(self, name: str) -> bytes | None:
        """The digest a reused tensor's bytes were just checked against (the writer need not hash them again)."""
        return self._verified.get(name)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def record_object(db: StateDB, key: str, path: Path, model: LazyModel, result: WriteResult, keys: dict[str, str]) -> None:
    """What a new object holds, per tensor: its key (when it has one), digest and byte range in the file. The
    writer lays tensors out in name order right after the header, so the ranges follow from the specs."""
    digests = {n: d.hex() for n, d in result.tensor_digests.items()}
    with open(path, "rb") as f:
        pos = 8 + int.from_bytes(f.read(8), "little")
    rows = []
    for n in model.keys():
        end = pos + model.spec(n).nbytes
        rows.append((n, keys.get(n), digests[n], pos, end))
        pos = end
    if pos != result.size:
        raise RuntimeError(f"{path}: {result.size} bytes, but its tensors end at byte {pos}")
    db.put_object_tensors(key, rows)
    db.put_tensor_digests(result.content_digest, digests)


def _pread_exact(fd: int, buf: torch.Tensor, offset: int) -> bool:
    view = memoryview(buf.numpy())
    done = 0
    try:
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                return False
            done += got
    except OSError:
        return False
    return True
