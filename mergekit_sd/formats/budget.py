"""A memory budget shared by everything a build holds at once: tensors being computed and tensors waiting for the
writer.

`--max-memory` is about the whole process, but torch and Python take their own ~220 MiB before the first tensor is
read, so the bytes left for tensors are the limit minus what the process already holds when the build starts
(`for_tensors`). Work asks for its estimated peak before it starts and waits while that would exceed the budget;
grants are made in the order they were asked for, so the tensor the writer needs next is never starved by later
ones. Work that alone needs more than the whole budget still runs, alone (nothing else is held meanwhile), with one
warning for that tensor: a model is never refused for being larger than the budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Callable

MIN_TENSOR_BUDGET = 64 << 20  # what tensors get when the process alone is already at (or over) the limit
OVERHEAD = 32 << 20  # not tensors: worker stacks, queues, the allocator's slack


class MemoryBudget:
    """Bytes that may be held at once by work in flight; thread-safe."""

    def __init__(self, limit: int, warn: Callable[[str], None] | None = None):
        self.limit = max(1, int(limit))
        self.warn = warn
        self.used = 0
        self.peak = 0  # the most ever granted at once (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._warned: set[str] = set()

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.used == 0

    def _grant(self, n: int, label: str) -> None:
        if n > self.limit and label not in self._warned:
            self._warned.add(label)
            if self.warn is not None:
                self.warn(f"{label} needs about {n / 2**20:.0f} MiB, more than the memory budget of "
                          f"{self.limit / 2**20:.0f} MiB for tensors; it runs alone")
        self.used += n
        self.peak = max(self.peak, self.used)

    def try_acquire(self, n: int, label: str = "work") -> bool:
        """Take `n` bytes if they fit now (or nothing else is held); never waits."""
        with self._cond:
            if not self._fits(n):
                return False
            self._grant(n, label)
            return True

    def acquire(self, n: int, label: str = "work") -> None:
        """Take `n` bytes, waiting for releases until they fit (or until nothing else is held)."""
        with self._cond:
            self._cond.wait_for(lambda: self._fits(n))
            self._grant(n, label)

    def take(self, n: int) -> None:
        """Count `n` bytes at once, even past the limit: memory that already exists (a tensor handed from one
        holder to another); later requests wait until it is released."""
        with self._cond:
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def process_rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


HEAP_PER_WORKER = 2 << 20  # the evaluation chunks' fp32 temporaries a compute thread leaves in the heap for reuse


def for_tensors(max_memory: int, workers: int = 1) -> int:
    """The part of a whole-process limit left for tensors: the limit minus what the process holds already (torch
    and Python, ~220 MiB), a little for what is not a tensor, and each worker's reusable chunk temporaries."""
    return max(MIN_TENSOR_BUDGET, max_memory - process_rss() - OVERHEAD - workers * HEAP_PER_WORKER)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def return_freed_memory() -> None:
    """Ask glibc to give large freed buffers back to the system at once. By default its mmap threshold grows to
    the largest block ever freed, after which tensor-sized buffers come from per-thread heaps that keep their pages
    after `free`, so a budget-bounded working set would still grow the process; a fixed 1 MiB threshold keeps every
    tensor buffer in its own mapping. Small tensors still come from the heaps, and glibc gives each thread a heap
    of its own (up to 8 per core), each keeping freed pages: two heaps for the whole pool keep that slack small.
    Harmless elsewhere (no glibc: nothing happens)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 8 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass
