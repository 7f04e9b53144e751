"""supermerger's calcmodes as methods (docs/formats.md §2.3), with its exact per-key definitions.

smoothAdd MT is smoothAdd computed in a thread pool; the result is the same, so it is `smooth_add` here.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_sd.methods import chunks, merge_method
from mergekit_sd.methods import filters
from mergekit_sd.methods.filters import smooth

VAE_PREFIX = "first_stage_model."


# ---------------------------------------------------------------------------------------------------------------
# cosineA / cosineB


EPS_NORMALIZE, EPS_COSINE = 1e-12, 1e-8  # torch's F.normalize and F.cosine_similarity clamps, which the formulas use


def rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """A tensor as rows x columns for cosines along dim 0: dim 0 is the rows, the other dims flattened are the
    columns (a 1-D tensor or a scalar is one column)."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) else 1
    return rows, (n // rows if rows else 0)


def column_sums(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...],
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of dim 0: sum a*a, sum b*b, sum a*b in fp64 (flat tensors of `shape`), over row chunks of about
    CHUNK elements, chunk sums added in order: one fp64 chunk of each input in memory, never a whole fp32 copy,
    and the same bits for any thread count."""
    rows, cols = rows_cols(shape)
    dev = device if device is not None else a.device
    aa, bb, ab = (torch.zeros(cols, dtype=torch.float64, device=dev) for _ in range(3))
    step = max(1, chunks.CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = chunks.piece(a, r0 * cols, r1 * cols, dev, torch.float64).view(r1 - r0, cols)
        y = chunks.piece(b, r0 * cols, r1 * cols, dev, torch.float64).view(r1 - r0, cols)
        aa += (x * x).sum(0)
        bb += (y * y).sum(0)
        ab += (x * y).sum(0)
    return aa, bb, ab


def _clamped_norm(sq: torch.Tensor | float, eps: float) -> torch.Tensor:
    return torch.as_tensor(sq, dtype=torch.float64).sqrt().clamp_min(eps)


def column_similarity(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stage-0 values, stage-1 similarity) per column, in fp64, from the column sums.

    cosineA works on columns L2-normalised along dim 0 (x / max(|x|, 1e-12)): their dot product is
    ab / (max|a| max|b|) and their norms |a| / max|a|; cos_dim0 is their cosine, the global cosine that of the
    whole normalised tensors. cosineB takes the raw columns. Cosines divide by max(|x|, 1e-8) per vector, so a
    zero column has cosine 0."""
    if variant == "a":
        sa, sb = _clamped_norm(aa, EPS_NORMALIZE), _clamped_norm(bb, EPS_NORMALIZE)
        aa, bb, ab = aa / (sa * sa), bb / (sb * sb), ab / (sa * sb)
    cos0 = ab / (_clamped_norm(aa, EPS_COSINE) * _clamped_norm(bb, EPS_COSINE))
    cosg = ab.sum() / (_clamped_norm(aa.sum(), EPS_COSINE) * _clamped_norm(bb.sum(), EPS_COSINE))
    sim = (cos0 + cosg) / 2
    return (cos0 if variant == "a" else sim), sim


def midpoint_percentile(sorted_values: torch.Tensor, q: float) -> float:
    """numpy.percentile(..., method="midpoint") of an ascending 1-D tensor (q in percent)."""
    n = sorted_values.numel()
    pos = q / 100.0 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return (float(sorted_values[lo]) + float(sorted_values[hi])) / 2


def similarity_bounds(values: torch.Tensor) -> tuple[float, float] | None:
    """min and max of S after dropping NaNs and values outside the 1st..99th percentile; None when S is empty."""
    s = values.to(torch.float64)
    s = s[~torch.isnan(s)]
    if s.numel() == 0:
        return None
    s, _ = torch.sort(s)
    p1, p99 = midpoint_percentile(s, 1), midpoint_percentile(s, 99)
    kept = s[(s >= p1) & (s <= p99)]
    if kept.numel() == 0:
        return None
    return float(kept[0]), float(kept[-1])


def cosine_k(sim: torch.Tensor, bounds: tuple[float, float] | None, alpha: float, variant: str) -> torch.Tensor:
    """How much of A each column keeps: similarity rescaled to the model's range, minus alpha, clipped to [0, 1].

    A degenerate range (no tensors, or every similarity equal) counts every column as mid-range (0.5) instead of
    dividing by zero.
    """
    if bounds is None or bounds[1] <= bounds[0]:
        k = torch.full_like(sim, 0.5)
    else:
        lo, hi = bounds
        k = (sim - lo) / (hi - lo)
    k = k - (abs(alpha) if variant == "a" else alpha)
    return k.clamp(0.0, 1.0)


class CosineStats:
    """Whole-model stage 0: the bounds of S over every tensor pair, computed once (by the first tensor to need
    them, the others waiting), streaming both models key by key through `column_sums`."""

    def __init__(self, inputs, device: torch.device, variant: str):
        self.inputs, self.device, self.variant = inputs, device, variant
        self._bounds: Any = ()
        self._pending: int | None = None
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        a, b = self.inputs[0], self.inputs[1]
        out = []
        for k in a.keys():
            if "model" not in k or k.startswith(VAE_PREFIX) or k.endswith("position_ids") or k not in b:
                continue
            sa, sb = a.spec(k), b.spec(k)
            if sa.dtype.is_floating_point and sb.dtype.is_floating_point and sa.shape == sb.shape:
                out.append(k)
        return out

    def pending_bytes(self) -> int:
        """What the bounds pass still holds at its peak besides the tensor being merged (one stored tensor of each
        model), so that the memory budget counts it for the tensors that may have to compute it; 0 once done."""
        if self._bounds != ():
            return 0
        if self._pending is None:
            a, b = self.inputs[0], self.inputs[1]
            self._pending = max((a.spec(k).nbytes + b.spec(k).nbytes for k in self.keys()), default=0)
        return self._pending

    @property
    def bounds(self) -> tuple[float, float] | None:
        with self._lock:
            if self._bounds == ():
                parts, a = [], self.inputs[0]
                for k in self.keys():
                    ta, tb = self.inputs[0].get(k).reshape(-1), self.inputs[1].get(k).reshape(-1)
                    stage0, _ = column_similarity(*column_sums(ta, tb, tuple(a.spec(k).shape), self.device), self.variant)
                    parts.append(stage0.cpu())
                    del ta, tb
                self._bounds = similarity_bounds(torch.cat(parts)) if parts else None
            return self._bounds


class ColumnShares:
    """A's share k per column, handed out for consecutive flat chunks of the tensor (the kernel's order)."""

    def __init__(self, k: torch.Tensor):
        self.k, self.column = k.to(torch.float32), chunks.AxisPositions(1, k.numel())

    def next(self, n: int) -> torch.Tensor:
        return self.k[self.column.next(n, self.k.device)]


def _prepare_a(inputs, params, ctx) -> CosineStats:
    return CosineStats(inputs, ctx.device, "a")


def _prepare_b(inputs, params, ctx) -> CosineStats:
    return CosineStats(inputs, ctx.device, "b")


def column_shares(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...], alpha: float, bounds, variant: str,
                  device: torch.device | None = None) -> ColumnShares:
    """k per column of one tensor pair (flat tensors of `shape`): stage-1 similarity, rescaled by the bounds."""
    _, sim = column_similarity(*column_sums(a, b, shape, device), variant)
    return ColumnShares(cosine_k(sim, bounds, alpha, variant))


def _stats(variant: str):
    def stats(flats: list[torch.Tensor], device: torch.device | None = None, *, shape: tuple[int, ...] = (),
              alpha: float = 0.5, key: str = "", context: CosineStats | None = None, **_: object) -> ColumnShares | None:
        if key.startswith(VAE_PREFIX) or context is None:
            return None
        return column_shares(flats[0], flats[1], shape, alpha, context.bounds, variant, device)
    return stats


def cosine_merge(a: torch.Tensor, b: torch.Tensor, alpha: float, bounds, variant: str,
                 stats: ColumnShares | None) -> torch.Tensor:
    """result = lerp(B, A, k), k A's share per column: from `stats` for a chunk, else from the whole tensors given
    (pure function; `bounds` from the whole model)."""
    if stats is None:
        stats = column_shares(a.reshape(-1), b.reshape(-1), tuple(a.shape), alpha, bounds, variant)
    return torch.lerp(b, a, stats.next(a.numel()).reshape(a.shape))


@merge_method(formula="lerp(B, A, k), k = clip((sim - min S)/(max S - min S) - |alpha|, 0, 1), sim from normalised columns",
              prepare=_prepare_a, stats=_stats("a"), version=2)
def cosine_a(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, key: str = "", context: Any = None,
             stats: ColumnShares | None = None) -> torch.Tensor:
    """supermerger cosineA: columns where A and B agree keep more of A; higher alpha gives less A; VAE kept from A."""
    if key.startswith(VAE_PREFIX):
        return a
    return cosine_merge(a, b, alpha, context.bounds if context is not None and stats is None else None, "a", stats)


@merge_method(formula="lerp(B, A, k), k = clip((sim - min S)/(max S - min S) - alpha, 0, 1), sim = (cos_dim0 + cos)/2",
              prepare=_prepare_b, stats=_stats("b"), version=2)
def cosine_b(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, key: str = "", context: Any = None,
             stats: ColumnShares | None = None) -> torch.Tensor:
    """supermerger cosineB: like cosine_a on raw (not normalised) columns plus the global cosine; VAE kept from A."""
    if key.startswith(VAE_PREFIX):
        return a
    return cosine_merge(a, b, alpha, context.bounds if context is not None and stats is None else None, "b", stats)


# ---------------------------------------------------------------------------------------------------------------
# Add-difference family


def same_tensor(flats: list[torch.Tensor], device: torch.device | None = None, **_: object) -> bool:
    """Whether B equals C over the whole tensor (compared chunk by chunk in fp32, as the formula sees them)."""
    b, c = flats[1], flats[2]
    return all(torch.equal(chunks.piece(b, s, e, device), chunks.piece(c, s, e, device))
               for s, e in chunks.spans(b.numel()))


@merge_method(formula="A + 1.8*alpha*(B - C)*|B - A| / (|B - C| + |B - A|)  (fraction 0 where 0/0)", stats=same_tensor)
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0,
                     stats: bool | None = None) -> torch.Tensor:
    """supermerger trainDifference: add B - C scaled by how far B moved from A; a tensor with B == C stays A.
    `stats` (B == C over the whole tensor) lets the kernel apply it chunk by chunk."""
    if alpha == 0 or (stats if stats is not None else torch.equal(b, c)):
        return a
    dist = (b - a).abs()
    denom = (b - c).abs() + dist
    frac = torch.where(denom == 0, torch.zeros_like(denom), dist / torch.where(denom == 0, torch.ones_like(denom), denom))
    return a + (1.8 * alpha) * (b - c) * frac


def smooth_streamed(flats: list[torch.Tensor], device: torch.device | None = None, *, shape: tuple[int, ...] = (),
                    alpha: float = 1.0, **_: object) -> torch.Tensor:
    """smooth_add over slabs of rows (`filters.smooth_rows`): B - C is read a slab and its halo at a time, in fp32,
    so only the fp32 result is whole; the values are those of the whole-tensor filters, bit for bit."""
    dev = device if device is not None else flats[0].device
    a, b, c = flats
    if alpha == 0:
        return chunks.piece(a, 0, a.numel(), dev)
    out = torch.empty(a.numel(), dtype=torch.float32, device=dev)
    if len(shape) == 0 or a.numel() == 0:
        return _smooth_whole(*(chunks.piece(f, 0, f.numel(), dev).reshape(shape) for f in flats), alpha).reshape(-1)
    width = a.numel() // shape[0]

    def diff_rows(idx: torch.Tensor) -> torch.Tensor:
        rows = [f.view(shape[0], width).index_select(0, idx.to(f.device)).to(device=dev, dtype=torch.float32) for f in (b, c)]
        return (rows[0] - rows[1]).reshape(len(idx), *shape[1:])

    step = filters.slab_rows(shape, chunks.CHUNK)
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        base = chunks.piece(a, r0 * width, r1 * width, dev)
        out[r0 * width:r1 * width] = base + alpha * filters.smooth_rows(diff_rows, shape, r0, r1).reshape(-1)
    return out


def _smooth_whole(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    return a + alpha * smooth(b - c)


@merge_method(formula="A + alpha*gaussian(median3(B - C), sigma=1)  (N-D, reflect boundary)", streamed=smooth_streamed)
def smooth_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """supermerger smoothAdd (and smoothAdd MT): add a denoised B - C."""
    if alpha == 0:
        return a
    return _smooth_whole(a, b, c, alpha)


def extract_weights(alpha: float, beta: float, gamma: float) -> str | None:
    if not 0 <= alpha <= 1:
        return f"alpha must be between 0 and 1, got {alpha}"
    if not 0 <= beta <= 1:
        return f"beta must be between 0 and 1, got {beta}"
    if gamma < 0:
        return f"gamma must be 0 or more, got {gamma}"
    return None


class RowFactors:
    """One factor per row of the last dim, handed out for consecutive flat chunks of the tensor (the kernel's
    order)."""

    def __init__(self, factors: torch.Tensor, width: int):
        self.f, self.row = factors, chunks.AxisPositions(width, factors.numel())

    def next(self, n: int) -> torch.Tensor:
        return self.f[self.row.next(n, self.f.device)]


def extract_factors(flats: list[torch.Tensor], device: torch.device | None = None, *, shape: tuple[int, ...] = (),
                    beta: float = 0.25, gamma: float = 0.3, **_: object) -> RowFactors:
    """lerp(d, 1 - d, beta) per row, d = ((cos(B - A, C - A) + 1)/2)^gamma with the cosine along the last dim in
    fp32, from chunks of whole rows (contiguous in the flat tensor): a row's cosine never spans two chunks."""
    width = shape[-1] if shape else 1
    rows = flats[0].numel() // width if width else 0
    dev = device if device is not None else flats[0].device
    step = max(1, chunks.CHUNK // max(width, 1))
    out = torch.empty(rows, dtype=torch.float32, device=dev)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a, b, c = (chunks.piece(f, r0 * width, r1 * width, dev).view(r1 - r0, width) for f in flats)
        cos = F.cosine_similarity(b - a, c - a, dim=-1).clamp(-1, 1)
        d = ((cos + 1) / 2) ** gamma
        out[r0:r1] = torch.lerp(d, 1 - d, beta)
    return RowFactors(out, width)


@merge_method(formula="A + lerp(B-A, C-A, alpha) * lerp(d, 1-d, beta), d = ((cos_rows(B-A, C-A) + 1)/2)^gamma",
              stats=extract_factors, version=2)
def extract_merge(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25,
                  gamma: float = 0.3, stats: RowFactors | None = None) -> torch.Tensor:
    """supermerger extract: keep what B and C changed alike (beta 0) or differently (beta 1) relative to A.
    `stats` (the factor of each row, `extract_factors`) lets the kernel apply it chunk by chunk."""
    if stats is None:
        stats = extract_factors([a.reshape(-1), b.reshape(-1), c.reshape(-1)], shape=tuple(a.shape), beta=beta, gamma=gamma)
    return a + torch.lerp(b - a, c - a, alpha) * stats.next(a.numel()).reshape(a.shape)


extract_merge.weight_check = extract_weights  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# tensor swaps and self


def swap_band(shape: tuple[int, ...], n: int, alpha: float, beta: float, dim: int) -> tuple[bool, int, int]:
    """(whether B is the base, lo, hi): the band [lo, hi) of indices along `dim` taken from the other model; the
    indices come from n (supermerger's), and slicing clips them to the dimension."""
    if alpha + beta <= 1:
        return False, int(n * beta), int(n * (alpha + beta))
    return True, int(n * (alpha + beta - 1)), int(n * beta)


def swap_rows(a: torch.Tensor, b: torch.Tensor, n: int, alpha: float, beta: float, dim: int) -> torch.Tensor:
    """Take a band of slices along `dim` from B (or A's band into B when alpha + beta > 1); indices from n."""
    b_base, lo, hi = swap_band(tuple(a.shape), n, alpha, beta, dim)
    out, src = (b.clone(), a) if b_base else (a.clone(), b)
    index = [slice(None)] * out.ndim
    index[dim] = slice(lo, hi)
    out[tuple(index)] = src[tuple(index)]
    return out


class SwapMask:
    """Which elements lie in the swapped band, for consecutive flat chunks of the tensor (the kernel's order)."""

    def __init__(self, shape: tuple[int, ...], b_base: bool, lo: int, hi: int, dim: int):
        self.b_base, self.lo, self.hi = b_base, lo, hi
        self.index = chunks.AxisPositions(math.prod(shape[dim + 1:]) if shape else 1, shape[dim] if shape else 1)

    def next(self, n: int, device: torch.device) -> torch.Tensor:
        at = self.index.next(n, device)
        return (at >= self.lo) & (at < self.hi)


def swap_axis(shape: tuple[int, ...], second: bool) -> tuple[int, int] | None:
    """(dim, n) of tensor_swap (second=False) or tensor_swap2's quirk; None for a scalar (kept from A)."""
    if len(shape) == 0:
        return None
    if not second or len(shape) == 1:
        return 0, shape[0]
    return 1, (shape[1] if shape[1] > 100 else shape[0])


def _swap_stats(second: bool):
    def stats(flats: list[torch.Tensor], device: torch.device | None = None, *, shape: tuple[int, ...] = (),
              alpha: float = 0.5, beta: float = 0.25, **_: object) -> SwapMask:
        axis = swap_axis(shape, second)
        if axis is None:
            return SwapMask(shape, False, 0, 0, 0)
        return SwapMask(shape, *swap_band(shape, axis[1], alpha, beta, axis[0]), axis[0])
    return stats


def swap(a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float, second: bool, stats: SwapMask | None) -> torch.Tensor:
    if stats is None:  # whole tensors
        axis = swap_axis(tuple(a.shape), second)
        return a if axis is None else swap_rows(a, b, axis[1], alpha, beta, axis[0])
    band = stats.next(a.numel(), a.device)
    return torch.where(band, a, b) if stats.b_base else torch.where(band, b, a)


@merge_method(formula="rows [n*beta, n*(alpha+beta)) of dim 0 from B, the rest from A", stats=_swap_stats(False))
def tensor_swap(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25,
                stats: SwapMask | None = None) -> torch.Tensor:
    """supermerger tensor: swap whole slices along dim 0 instead of blending values."""
    return swap(a, b, alpha, beta, False, stats)


@merge_method(formula="like tensor_swap along dim 1 (index base shape[1] if > 100, else shape[0]); 1-D along dim 0",
              stats=_swap_stats(True))
def tensor_swap2(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25,
                 stats: SwapMask | None = None) -> torch.Tensor:
    """supermerger tensor2: swap slices along dim 1, with supermerger's index quirk kept for identical results."""
    return swap(a, b, alpha, beta, True, stats)


SELF_SKIP = ("to_out", "proj_out", "norm")


@merge_method(formula="A*alpha (not for to_out, proj_out, norm tensors)", elementwise=True)
def self_scale(a: torch.Tensor, *, alpha: float, key: str = "") -> torch.Tensor:
    """supermerger self: scale a model's own weights; output projections and norms are left alone."""
    if alpha == 0 or any(s in key for s in SELF_SKIP):
        return a
    return a * alpha
