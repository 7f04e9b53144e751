"""Producing a lazy model's tensors ahead of their consumer, on several threads, in order, within a memory budget.

The writer consumes tensors in name order; producing them (reading inputs, converting, the math) is what takes the
time, and torch and positioned reads release the GIL, so worker threads compute the next tensors while the writer
hashes and writes the current one. Small tensors travel in batches so that a model of ~1,100 tensors costs a few
hundred thread hand-offs, not thousands.

Memory: without a budget, at most `window` bytes of finished output wait for the consumer. With a budget
(formats.budget), each batch reserves its estimated peak (`LazyModel.cost`: inputs, working copies, result)
before a worker starts it, keeps its result's bytes reserved once done, and the consumer gives those back
(`release_on_yield`, or itself once it has written them). Reservations are made in name order by the one thread
that also consumes, which never blocks on the budget while it holds finished work: so work waits rather than
exceeding the budget, and nothing deadlocks. Batches larger than the whole budget still run, alone. `map_ahead` is the
same pipeline for any per-item work under a plain window (the forensic passes read and reduce chunks of several
files on it).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import torch

from mergekit_sd.formats.budget import MemoryBudget
from mergekit_sd.lazy import LazyModel

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WINDOW = 256 << 20  # bytes of produced tensors that may wait for the consumer (without a budget)
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


def batches(model: LazyModel, names: list[str], batch_bytes: int = BATCH_BYTES, cost: dict[str, int] | None = None,
            max_cost: int | None = None) -> list[list[str]]:
    """Consecutive names grouped so that each group is one tensor of at least `batch_bytes` or many small ones
    (whose summed `cost`, when given, stays within `max_cost`: a batch never needs more than its share of a budget)."""
    out: list[list[str]] = []
    cur: list[str] = []
    size = spent = 0
    for n in names:
        nb = model.spec(n).nbytes
        c = cost[n] if cost is not None else 0
        if cur and (size + nb > batch_bytes or len(cur) >= BATCH_COUNT or (max_cost is not None and spent + c > max_cost)):
            out.append(cur)
            cur, size, spent = [], 0, 0
        cur.append(n)
        size += nb
        spent += c
    if cur:
        out.append(cur)
    return out


def _label(group: list[str]) -> str:
    return f"tensor {group[0]!r}" if len(group) == 1 else f"tensors {group[0]!r}..{group[-1]!r}"


def produce_ahead(model: LazyModel, names: list[str], workers: int | None = None, window: int = DEFAULT_WINDOW,
                  budget: MemoryBudget | None = None, release_on_yield: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for `names` in order; up to `workers` threads produce later tensors meanwhile.

    With `budget`, every yielded tensor keeps its `nbytes` reserved until the next tensor is asked for, or, with
    `release_on_yield=False`, until the consumer calls `budget.release(nbytes)` itself. A failure surfaces when its
    tensor's turn comes, so the first failing tensor in name order is the one reported.
    """
    workers = default_workers() if workers is None else workers
    if budget is None:  # the plain window: only finished output counts
        budget = MemoryBudget(window)
        cost = {n: model.spec(n).nbytes for n in names}
    else:
        cost = {n: max(model.cost(n), model.spec(n).nbytes) for n in names}
    out_bytes = {n: model.spec(n).nbytes for n in names}
    handed: list[int] = []  # reserved bytes of the tensor the consumer holds (released when it asks again)

    def hand_back() -> None:
        if release_on_yield and handed:
            budget.release(handed.pop())

    if workers <= 1:
        try:
            for n in names:
                hand_back()
                budget.acquire(cost[n], _label([n]))
                try:
                    t = model.get(n)
                except BaseException:
                    budget.release(cost[n])
                    raise
                budget.release(cost[n] - out_bytes[n])
                handed.append(out_bytes[n])
                yield n, t
                del t  # released bytes must be free bytes: hold no reference past the hand-back
        finally:
            hand_back()
        return

    groups = batches(model, names, cost=cost, max_cost=max(1, budget.limit // (2 * workers)))
    costs = [sum(cost[n] for n in g) for g in groups]
    outs = [sum(out_bytes[n] for n in g) for g in groups]
    # torch's thread count is per thread: workers take the caller's (a fresh thread would use every core)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="sdbuild-compute", initializer=torch.set_num_threads,
                              initargs=(torch.get_num_threads(),))
    pending: deque[tuple[int, Future]] = deque()
    nxt = 0

    def run(i: int) -> list[torch.Tensor]:
        try:
            got = [model.get(n) for n in groups[i]]
        finally:  # the working memory is free again; the results stay reserved until consumed
            budget.release(costs[i] - outs[i])
        return got

    try:
        while True:
            hand_back()
            while nxt < len(groups) and len(pending) < 2 * workers:
                if pending:
                    if not budget.try_acquire(costs[nxt], _label(groups[nxt])):
                        break
                else:  # nothing of ours in flight: only the consumer's earlier tensors hold the budget
                    budget.acquire(costs[nxt], _label(groups[nxt]))
                pending.append((nxt, pool.submit(run, nxt)))
                nxt += 1
            if not pending:
                return
            i, fut = pending.popleft()
            try:
                tensors = fut.result()
            except BaseException:
                budget.release(outs[i])
                raise
            del fut  # the future keeps its result alive
            tensors.reverse()
            for n in groups[i]:
                t = tensors.pop()  # released bytes must be free bytes: no list or variable keeps a handed tensor
                hand_back()
                handed.append(out_bytes[n])
                yield n, t
                del t
    finally:
        hand_back()
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        for i, fut in pending:  # what never ran (cancelled) or ran but was never consumed gives its bytes back
            if fut.cancelled():
                budget.release(costs[i])
            else:
                budget.release(outs[i])


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
