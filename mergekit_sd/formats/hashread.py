"""Hashing a safetensors file from the reads that feed a build, instead of in a pass of its own.

A file read for the first time is read once: every tensor the build reads is also fed, on a thread of its own, to
its xxh3 tensor digest (the content digest) and to the file's sha256. The sha256 needs the bytes in file order while
the build reads in name order, so tensors that arrive early are held until the bytes before them have been hashed;
should more than `hold_limit` bytes wait, the held tensors are dropped and the sha256 is finished by reading the
rest of the file in order at the end. `finish` reads what the build never asked for. Tensors handed out must not be
modified in place (no op does: the writer relies on the same rule). With `inline` (a build on one thread) the
hashing runs on the reading thread instead of a thread of its own. With a `budget` (formats.budget), a tensor
waiting to be hashed keeps its bytes counted until hashed, so a hasher that falls behind the readers makes them
wait instead of growing the process. Tensors held for the sha256 are bounded by `hold_limit` instead (set to a
share of the budget by the runner): they may wait for a tensor the build reads only at the end.
"""

from __future__ import annotations

import hashlib
import queue
import threading

import torch
import xxhash

from mergekit_sd.formats.budget import MemoryBudget
from mergekit_sd.formats.safetensors import (
    SafetensorsFile,
    _pread_all,
    _tensor_prefix,
    combine_digests,
    tensor_bytes,
)
from mergekit_sd.lazy import LazyModel

HOLD_LIMIT = 64 << 20  # per input: past this the sha256 finishes with an in-order read (from the page cache)
SEQUENTIAL_CHUNK = 16 << 20


class HashingReader:
    """Serves a file's tensors to a build and returns its (content digest, sha256) once the build is done."""

    def __init__(self, sf: SafetensorsFile, hold_limit: int = HOLD_LIMIT, inline: bool = False,
                 budget: MemoryBudget | None = None):
        self.sf = sf
        self.budget = budget
        self.hold_limit = hold_limit
        self.digests: dict[str, bytes] = {}
        self._offered: set[str] = set()
        self._counted: set[str] = set()  # queued tensors whose bytes the budget holds
        self._lock = threading.Lock()
        self.sha = hashlib.sha256(sf.header_bytes)
        # tensors with bytes, in file order; bytes between them (rare) are read when the sha256 reaches them
        spans = sorted((b, e, n) for n, (b, e) in sf.offsets.items() if e > b)
        self._next_start = {spans[i][1]: spans[i + 1][0] for i in range(len(spans) - 1)}
        self._pos = spans[0][0] if spans else 0
        if self._pos:
            self.sha.update(_pread_all(sf._fd, self._pos, sf.data_start))
        self._held: dict[int, tuple[int, memoryview, torch.Tensor]] = {}
        self._held_bytes = 0
        self._sequential = False  # too much waited: finish the sha256 by reading in order
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._failure: list[BaseException] = []
        self._inline = inline
        self._thread = threading.Thread(target=self._run, name="sdbuild-input-hash", daemon=True)
        if not inline:
            self._thread.start()

    # -- serving ------------------------------------------------------------------------------------------------

    def read(self, name: str) -> torch.Tensor:
        t = self.sf.read(name)
        with self._lock:
            first = name not in self._offered
            self._offered.add(name)
        if first and self._inline:
            if not self._failure:
                try:
                    self._hash(name, t)
                except BaseException as e:
                    self._failure.append(e)
        elif first:
            if self.budget is not None:  # counted twice until the reader's own reservation ends: never too little
                with self._lock:
                    self._counted.add(name)
                self.budget.take(self.sf.specs[name].nbytes)
            self._q.put((name, t))
        return t

    def _let_go(self, name: str) -> None:
        """Give a queued tensor's bytes back to the budget (once, whatever path it took)."""
        with self._lock:
            if name not in self._counted:
                return
            self._counted.discard(name)
        if self.budget is not None:
            self.budget.release(self.sf.specs[name].nbytes)

    def lazy(self) -> LazyModel:
        return LazyModel(self.sf.specs, self.read, self.sf.metadata, label=self.sf.path.name)

    # -- hashing (own thread) -------------------------------------------------------------------------------------

    def _run(self) -> None:
        item = None
        try:
            while (item := self._q.get()) is not None:
                self._hash(*item)
                item = None  # not kept alive while waiting for the next one
        except BaseException as e:
            self._failure.append(e)
            if item is not None:
                self._let_go(item[0])
            while (item := self._q.get()) is not None:  # drain so readers never block
                self._let_go(item[0])

    def _hash(self, name: str, t: torch.Tensor) -> None:
        spec = self.sf.specs[name]
        data = tensor_bytes(t)
        h = xxhash.xxh3_128(_tensor_prefix(name, spec.dtype, spec.shape))
        h.update(data)
        self.digests[name] = h.digest()
        b, e = self.sf.offsets[name]
        if self._sequential or e == b:
            self._let_go(name)
            return
        if b != self._pos:
            # held for the sha256 until the bytes before it arrive, which may be only at `finish` (a tensor the
            # build never reads): held bytes leave the budget, or work would wait for them forever; `hold_limit`
            # bounds them instead
            self._let_go(name)
            self._held[b] = (e, data, t)
            self._held_bytes += e - b
            if self._held_bytes > self.hold_limit:
                self._held.clear()
                self._held_bytes = 0
                self._sequential = True
            return
        self._feed(e, data)
        self._let_go(name)
        while self._pos in self._held:
            e2, d2, _ = self._held.pop(self._pos)
            self._held_bytes -= e2 - self._pos
            self._feed(e2, d2)

    def _feed(self, end: int, data: memoryview) -> None:
        self.sha.update(data)
        self._pos = end
        nxt = self._next_start.get(end)
        if nxt is not None and nxt > end:  # bytes between tensors belong to the file too
            self.sha.update(_pread_all(self.sf._fd, nxt - end, self.sf.data_start + end))
            self._pos = nxt

    def close(self) -> None:
        """Stop the hasher (after `finish`, or when the build failed); the file stays open for its owner."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    # -- the end --------------------------------------------------------------------------------------------------

    def finish(self) -> tuple[str, str]:
        """Hash what the build did not read, wait for the hasher, and return (content digest, sha256)."""
        for name in sorted(self.sf.specs, key=lambda n: self.sf.offsets[n]):
            if name not in self._offered:
                self.read(name)
        if not self._inline:
            self._q.put(None)
            self._thread.join()
        if self._failure:
            raise self._failure[0]
        end = self.sf.size - self.sf.data_start
        if self._pos < end:
            cur = self._pos
            while cur < end:
                n = min(SEQUENTIAL_CHUNK, end - cur)
                self.sha.update(_pread_all(self.sf._fd, n, self.sf.data_start + cur))
                cur += n
        return combine_digests(self.digests), self.sha.hexdigest()
