"""One streaming pass over several models: Gram matrices of their differences from a reference.

Every forensic number is an inner product of model differences. Reading each file once, chunk by chunk, this
accumulates per bucket (a block of the architecture's block map, or VAE) the Gram matrix
G[i, j] = <X_i - R, X_j - R> of every member's difference from the reference member R, and each member's squared
norm. Each chunk's differences are taken in fp32 (the difference of two fp16/bf16 values of one model family is
exact or within one fp32 rounding) before any product, so two models that agree to the last fp16 bit do not lose
their difference to cancellation. One batched fp32 matrix product per chunk gives every inner product at once,
as partial sums over blocks of BLOCK elements that are then summed in fp64: a partial sum of 256 products rounds
to about 3e-8 of itself, and fp64 keeps it there whatever the model size. That matters because a residual near a
model's fp16 rounding floor is a difference of Gram entries some 1e5 times larger (one fp32 sum over a whole chunk
would move it by 15%; this moves it by about 0.2%), at less than half the cost of fp64 products.

Small tensors of one bucket travel in one chunk (one product for dozens of tensors); large ones are cut into
chunks. Chunks are read and reduced on worker threads (formats/prefetch.map_ahead: positioned reads and torch
release the GIL) while results are summed in file order, so the sums do not depend on the thread count.

Only tensors that every member has with the same shape and that belong to a model component (UNet, text
encoders, VAE: no EMA copies or other junk, no integer tensors or CLIP position ids) are compared. Memory stays
at a few chunks per member and worker, so peak RSS does not grow with the model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mergekit_sd.arch.blocks import VAE, block_of, blocks_for, is_vae_key
from mergekit_sd.arch.components import COMPONENTS, classify
from mergekit_sd.engine.progress import Progress
from mergekit_sd.formats.prefetch import default_workers, map_ahead
from mergekit_sd.forensics.sources import Member

CHUNK = 1 << 18  # elements per chunk: a few fp32 rows of 1 MiB, few enough chunks that Python overhead stays small
BLOCK = 256  # elements per fp32 partial sum: its rounding error stays near 3e-8 of the sum
BATCH_COUNT = 64  # small tensors per chunk at most
# mantissa bits (with the implicit bit) and smallest exponent of the float types models are stored in
_MANTISSA = {torch.float16: (11, -24), torch.bfloat16: (8, -133), torch.float32: (24, -149), torch.float64: (53, -1074)}


@dataclass
class Bucket:
    """What one bucket accumulated: Gram of differences from the reference, squared norms, counts."""

    gram: np.ndarray
    sq: np.ndarray
    tensors: int = 0
    elements: int = 0
    rounding: float = 0.0  # expected squared rounding error of the query member's stored values


@dataclass
class StreamResult:
    names: list[str]
    reference: int
    buckets: dict[str, Bucket]
    order: list[str]  # bucket names in block-map order
    keys: int  # tensors compared
    not_shared: int  # tensors some member lacks (or holds with another shape): not compared
    identical: dict[int, int] = field(default_factory=dict)  # member -> tensors of the query bit-identical to it
    # tensors skipped because the query equals a member there: per bucket, how many, and which members matched all
    skipped: dict[str, int] = field(default_factory=dict)
    kept_from: dict[str, set[int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # tensors per bucket, compared or skipped
    # per bucket, the Gram matrix of the skipped tensors (left out of the fit; a recipe's error there still counts)
    skipped_gram: dict[str, np.ndarray] = field(default_factory=dict)

    def total(self) -> Bucket:
        n = len(self.names)
        out = Bucket(np.zeros((n, n)), np.zeros(n))
        for b in self.buckets.values():
            out.gram += b.gram
            out.sq += b.sq
            out.tensors += b.tensors
            out.elements += b.elements
            out.rounding += b.rounding
        return out


def shared_keys(members: list[Member]) -> tuple[list[str], int]:
    """Float component tensors every member holds with one shape (sorted), and how many others there were."""
    first = members[0].model
    cats = classify(first.specs).category
    every: set[str] = set()
    for m in members:
        every |= set(m.model.specs)
    keys = []
    for k in sorted(every):
        specs = [m.model.specs.get(k) for m in members]
        if any(s is None for s in specs):
            continue
        if cats.get(k) not in COMPONENTS or k.endswith("position_ids"):
            continue
        if not all(s.dtype.is_floating_point for s in specs) or len({s.shape for s in specs}) != 1 or specs[0].numel == 0:
            continue
        keys.append(k)
    not_shared = sum(1 for k in every if not all(k in m.model.specs for m in members)
                     or len({m.model.specs[k].shape for m in members}) != 1)
    return keys, not_shared


def block_buckets(family: str | None) -> tuple[Callable[[str], str], list[str]]:
    """Tensor name -> bucket (its block under the default block rule, or VAE), and the buckets in order."""
    if family is None:
        return (lambda key: "ALL"), ["ALL"]

    def bucket(key: str) -> str:
        if is_vae_key(key):
            return VAE
        return block_of(key, family) or "BASE"

    return bucket, list(blocks_for(family, vae=True))


def rounding_variance(t: torch.Tensor) -> float:
    """Expected squared error of rounding exact values to `t`'s float type: ulp²/12 summed over its elements."""
    if t.dtype == torch.float16:
        return _fp16_rounding_variance(t)
    bits, tiny = _MANTISSA.get(t.dtype, (24, -149))
    x = t.to(torch.float32) if t.dtype != torch.float64 else t
    exp = torch.frexp(x).exponent.to(torch.float64)
    ulp = torch.exp2(torch.clamp(exp - bits, min=tiny))
    ulp = torch.where(x == 0, torch.zeros_like(ulp), ulp)
    return float((ulp * ulp).sum()) / 12.0


def _fp16_rounding_variance(t: torch.Tensor) -> float:
    """rounding_variance for fp16 from the bits, three times cheaper: a value with exponent field E (subnormals
    as E = 1) has ulp 2^(E - 25), so ulp² is the fp32 number with exponent field 2E + 77; zeros, inf and nan
    count nothing."""
    mag = t.reshape(-1).view(torch.int16).to(torch.int32) & 0x7FFF
    e = (mag >> 10).clamp_(min=1)
    ulp2 = ((2 * e + 77) << 23).view(torch.float32)
    ulp2 = torch.where((mag == 0) | (mag >= 0x7C00), 0.0, ulp2)
    return float(ulp2.sum(dtype=torch.float64)) / 12.0


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of one tensor; `whole` when that is all of it."""

    key: str
    start: int
    stop: int
    numel: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.numel

    @property
    def last(self) -> bool:
        return self.stop == self.numel


def plan_chunks(keys: list[str], numel: Callable[[str], int], bucket_of: Callable[[str], str],
                chunk: int = CHUNK) -> list[list[Piece]]:
    """Chunks in key order: consecutive small tensors of one bucket together (up to `chunk` elements and
    BATCH_COUNT tensors), a tensor larger than `chunk` cut into pieces of its own."""
    out: list[list[Piece]] = []
    cur: list[Piece] = []
    size = 0
    for k in keys:
        n = numel(k)
        if n > chunk:
            if cur:
                out.append(cur)
                cur, size = [], 0
            out += [[Piece(k, s, min(s + chunk, n), n)] for s in range(0, n, chunk)]
            continue
        if cur and (size + n > chunk or len(cur) >= BATCH_COUNT or bucket_of(cur[0].key) != bucket_of(k)):
            out.append(cur)
            cur, size = [], 0
        cur.append(Piece(k, 0, n, n))
        size += n
    if cur:
        out.append(cur)
    return out


@dataclass
class Run:
    """Consecutive pieces of a chunk that go to one sum: their products, the query's matches, its rounding."""

    pieces: list[Piece]
    same: list[list[bool]]  # per piece: does each member equal the query there (bit for bit)
    products: np.ndarray  # [n, n] fp64: rows are X_i - R, and R itself in the reference's row
    rounding: float


def products(rows: list[list[torch.Tensor]], reference: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> np.ndarray:
    """[n, n] inner products of the rows X_i - R (i != reference) and R (in the reference's row), each member's
    pieces laid end to end: one batched product in `dtype` over blocks of BLOCK elements, summed in fp64. Members
    equal to R in every piece add nothing but zeros and are not converted at all."""
    n = len(rows)
    ref = rows[reference]
    live = [i for i in range(n) if i == reference or not all(torch.equal(a, b) for a, b in zip(rows[i], ref))]
    length = sum(r.numel() for r in ref)
    width = -(-length // BLOCK) * BLOCK
    x = torch.empty((len(live), width), dtype=dtype, device=device)
    x[:, length:] = 0.0
    at = live.index(reference)
    _fill(x[at], ref)
    for row, i in enumerate(live):
        if i != reference:
            _fill(x[row], rows[i])
            x[row, :length].sub_(x[at, :length])
    # one batched product over blocks of BLOCK elements: fp32 sums stay short, the blocks are summed in fp64
    xb = x.view(len(live), width // BLOCK, BLOCK).transpose(0, 1)
    p = torch.bmm(xb, xb.transpose(1, 2)).to(dtype=torch.float64).sum(0).cpu().numpy()
    out = np.zeros((n, n))
    out[np.ix_(live, live)] = p
    return out


def _fill(dst: torch.Tensor, pieces: list[torch.Tensor]) -> None:
    at = 0
    for p in pieces:
        dst[at: at + p.numel()].copy_(p)
        at += p.numel()


def gram_and_norms(p: np.ndarray, reference: int) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix of differences from R (zero row and column for R) and every member's squared norm, from
    `products`' matrix: |X_i|² = |X_i - R|² + 2 <X_i - R, R> + |R|²."""
    g = p.copy()
    g[reference, :] = 0.0
    g[:, reference] = 0.0
    rr = p[reference, reference]
    sq = np.diag(p) + 2.0 * p[:, reference] + rr
    sq[reference] = rr
    return g, sq


def stream(members: list[Member], *, reference: int, device: torch.device, progress: Progress | None = None,
           label: str = "reading", query: int | None = None, skip_identical: bool = False,
           rounding: bool = False, workers: int | None = None, chunk: int = CHUNK) -> StreamResult:
    """Read every shared tensor of every member once and accumulate the per-bucket Gram matrices.

    With `query`, tensors of that member are compared bit for bit with every other member's (`identical`); with
    `skip_identical`, a tensor where the query equals some other member is left out of the sums (a VAE copied
    as is says nothing about merge weights; its Gram goes to `skipped_gram`). `rounding` adds the query's expected
    rounding error per bucket.
    """
    n = len(members)
    keys, not_shared = shared_keys(members)
    bucket_of, order = block_buckets(members[0].arch.family)
    result = StreamResult([m.name for m in members], reference, {}, [], len(keys), not_shared)
    specs = members[0].model.specs
    chunks = plan_chunks(keys, lambda k: specs[k].numel, bucket_of, chunk)
    sizes = [n * 4 * sum(p.stop - p.start for p in c) for c in chunks]

    # a GPU is bound by the transfer, not the arithmetic: it takes fp64 (and no TF32 setting can touch it)
    work_dtype = torch.float32 if device.type == "cpu" else torch.float64

    def work(pieces: list[Piece]) -> list[Run]:
        rows = [[m.model.get_range(p.key, p.start, p.stop) for p in pieces] for m in members]
        same = [[False] * n for _ in pieces]
        if query is not None:
            q = rows[query]
            for a in range(len(pieces)):
                same[a] = [j != query and rows[j][a].dtype == q[a].dtype and torch.equal(rows[j][a], q[a])
                           for j in range(n)]
        # whole tensors that will be skipped and those that will not are summed apart
        skips = [skip_identical and p.whole and any(same[a]) for a, p in enumerate(pieces)]
        runs: list[list[int]] = []
        for a, skip in enumerate(skips):
            if runs and skips[runs[-1][0]] == skip:
                runs[-1].append(a)
            else:
                runs.append([a])
        out = []
        for run in runs:
            sub = [[r[a] for a in run] for r in rows]
            rvar = 0.0
            if rounding and query is not None:
                if pieces[run[0]].whole:  # small tensors (a few percent of a model), each counted exactly
                    rvar = rounding_variance(torch.cat(sub[query]) if len(run) > 1 else sub[query][0])
                else:  # a piece of a large tensor: every 8th element estimates it as well, 8 times cheaper
                    q = sub[query][0]
                    every8 = q[::8]
                    rvar = rounding_variance(every8) * (q.numel() / every8.numel())
            prods = products(sub, reference, device, work_dtype)
            out.append(Run([pieces[a] for a in run], [same[a] for a in run], prods, rvar))
        return out

    done = 0
    open_key: tuple[str, list[bool], np.ndarray, float] | None = None  # a large tensor read so far
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores run chunks side by side; a thin product gains nothing from more threads
    try:
        for runs in map_ahead(work, chunks, sizes, default_workers() if workers is None else workers):
            for run in runs:
                if run.pieces[0].whole:
                    for p in run.pieces:
                        if progress is not None:
                            progress.tensor(label, done, len(keys), p.key)
                        done += 1
                    _finish(result, [(p.key, p.numel, s) for p, s in zip(run.pieces, run.same)], run.products,
                            run.rounding, bucket_of, query, skip_identical, n)
                    continue
                p = run.pieces[0]
                if p.start == 0:
                    open_key = (p.key, list(run.same[0]), run.products.copy(), run.rounding)
                else:
                    assert open_key is not None and open_key[0] == p.key
                    k, s, acc, rv = open_key
                    open_key = (k, [x and y for x, y in zip(s, run.same[0])], acc + run.products, rv + run.rounding)
                if p.last:
                    k, s, acc, rv = open_key
                    open_key = None
                    if progress is not None:
                        progress.tensor(label, done, len(keys), k)
                    done += 1
                    _finish(result, [(k, p.numel, s)], acc, rv, bucket_of, query, skip_identical, n)
    finally:
        torch.set_num_threads(threads)
    if progress is not None:
        progress.tensor(label, len(keys), len(keys), "")
    result.order = [b for b in order if b in result.seen]
    return result


def _finish(result: StreamResult, tensors: list[tuple[str, int, list[bool]]], prods: np.ndarray, rvar: float,
            bucket_of: Callable[[str], str], query: int | None, skip_identical: bool, n: int) -> None:
    """Count finished tensors (all of one bucket and one skip decision) and add their products to their sum."""
    b = bucket_of(tensors[0][0])
    skip = False
    for _, _, same in tensors:
        result.seen[b] = result.seen.get(b, 0) + 1
        matched = {j for j in range(n) if j != query and same[j]} if query is not None else set()
        for j in matched:
            result.identical[j] = result.identical.get(j, 0) + 1
        if skip_identical and matched:
            skip = True
            result.skipped[b] = result.skipped.get(b, 0) + 1
            result.kept_from[b] = result.kept_from.get(b, matched) & matched
    g, sq = gram_and_norms(prods, result.reference)
    if skip:
        result.skipped_gram[b] = result.skipped_gram.get(b, np.zeros((n, n))) + g
        return
    acc = result.buckets.get(b)
    if acc is None:
        acc = result.buckets[b] = Bucket(np.zeros((n, n)), np.zeros(n))
    acc.gram += g
    acc.sq += sq
    acc.tensors += len(tensors)
    acc.elements += sum(numel for _, numel, _ in tensors)
    acc.rounding += rvar
