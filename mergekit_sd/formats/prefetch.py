"""Producing a lazy model's tensors ahead of their consumer, on several threads, in order, within a memory window.

The writer consumes tensors in name order; producing them (reading inputs, converting, the math) is what takes the
time, and torch and positioned reads release the GIL, so worker threads compute the next tensors while the writer
hashes and writes the current one. Small tensors travel in batches so that a model of ~1,100 tensors costs a few
hundred thread hand-offs, not thousands. At most `window` bytes of finished output wait for the consumer (a batch
larger than the window still runs, alone), which bounds memory whatever the worker count. `map_ahead` is the same
pipeline for any per-item work (the forensic passes read and reduce chunks of several files on it).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import torch

from mergekit_sd.lazy import LazyModel

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WINDOW = 256 << 20  # bytes of produced tensors that may wait for the consumer
BATCH_BYTES = 4 << 20  # small consecutive tensors up to this size go to one worker together
BATCH_COUNT = 64


def default_workers() -> int:
    """One compute thread per core."""
    return max(1, os.cpu_count() or 1)


def intra_op_threads(workers: int) -> int:
    """torch threads per compute thread: one. The cores are used by running tensors side by side, so results
    never depend on how many threads one torch call was split over (LAPACK's SVD rounds differently), and
    workers x torch threads never oversubscribes the cores."""
    return 1


def batches(model: LazyModel, names: list[str], batch_bytes: int = BATCH_BYTES) -> list[list[str]]:
    """Consecutive names grouped so that each group is one tensor of at least `batch_bytes` or many small ones."""
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in names:
        nb = model.spec(n).nbytes
        if cur and (size + nb > batch_bytes or len(cur) >= BATCH_COUNT):
            out.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    if cur:
        out.append(cur)
    return out


def produce_ahead(model: LazyModel, names: list[str], workers: int | None = None,
                  window: int = DEFAULT_WINDOW) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for `names` in order; up to `workers` threads produce later tensors meanwhile.

    A failure surfaces when its tensor's turn comes, so the first failing tensor in name order is the one reported.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for n in names:
            yield n, model.get(n)
        return
    groups = batches(model, names)
    sizes = [sum(model.spec(n).nbytes for n in g) for g in groups]

    def run(group: list[str]) -> list[torch.Tensor]:
        return [model.get(n) for n in group]

    for group, tensors in zip(groups, map_ahead(run, groups, sizes, workers, window)):
        yield from zip(group, tensors)


def map_ahead(fn: Callable[[T], R], items: list[T], sizes: list[int], workers: int | None = None,
              window: int = DEFAULT_WINDOW) -> Iterator[R]:
    """Yield fn(item) for every item in order, while up to `workers` threads compute later items.

    `sizes` are the bytes each result holds: at most `window` of them wait for the consumer (an item larger than
    the window still runs, alone). Worker threads keep the caller's torch thread count. A failure surfaces when its
    item's turn comes.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for it in items:
            yield fn(it)
        return
    # torch's thread count is per thread: workers take the caller's (a fresh thread would use every core)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="sdbuild-compute", initializer=torch.set_num_threads,
                              initargs=(torch.get_num_threads(),))
    pending: deque[tuple[int, Future]] = deque()
    nxt = 0
    waiting = 0  # bytes submitted and not yet handed to the consumer
    try:
        while True:
            while nxt < len(items) and len(pending) < 2 * workers and (not pending or waiting + sizes[nxt] <= window):
                pending.append((nxt, pool.submit(fn, items[nxt])))
                waiting += sizes[nxt]
                nxt += 1
            if not pending:
                return
            i, fut = pending.popleft()
            result = fut.result()
            waiting -= sizes[i]
            yield result
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
