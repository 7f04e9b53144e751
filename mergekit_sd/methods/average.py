"""Averages of several models: plain mean, geometric median (Weiszfeld) and Model Stock."""

from __future__ import annotations

import math

import torch

from mergekit_sd.methods import merge_method
from mergekit_sd.methods.chunks import piece, spans, sums64


@merge_method(formula="(M1 + M2 + ... + Mn)/n", elementwise=True)
def n_average(m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """Plain average of any number of models."""
    ms = (m1, m2, *models)
    total = ms[0].clone()
    for m in ms[1:]:
        total += m
    return total / len(ms)


GM_EPS = 1e-6


GM_CACHE_BYTES = 32 << 20  # tensors whose fp32 points fit here keep them between iterations


def weiszfeld(points: list[torch.Tensor], iterations: int, eps: float = GM_EPS,
              device: torch.device | None = None) -> torch.Tensor:
    """Geometric median of tensors seen as points: y <- sum(c_i x_i), c_i = w_i / sum(w), w_i = 1/max(|x_i - y|, eps),
    from the mean, for `iterations` steps. It stops sooner only at an exact fixed point (a step that changes no bit
    of y), after which every further step would give the same bits, so the result is that of all the steps.

    Works on the flattened native tensors chunk by chunk (methods.chunks) and holds one fp32 copy: y. Distances are
    fp64 sums in a fixed order and the weights are normalised in fp64 before they touch fp32 values, so CPU and
    CUDA differ only by the order of additions inside a chunk (docs/performance.md gives the bound)."""
    flats = [p.reshape(-1) for p in points]
    dev = device if device is not None else flats[0].device
    n = flats[0].numel()
    y = torch.empty(n, dtype=torch.float32, device=dev)
    keep = len(flats) * n * 4 <= GM_CACHE_BYTES
    cached: dict[int, torch.Tensor] = {}

    def stacked(s: int, e: int) -> torch.Tensor:  # the points' chunk as one [models, chunk] fp32 tensor
        if s in cached:
            return cached[s]
        pts = torch.stack([piece(f, s, e, dev) for f in flats])
        if keep:
            cached[s] = pts
        return pts

    def distances(pts: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:  # each |x_i - y|^2 over the chunk, fp64
        return (pts.to(torch.float64) - yc.to(torch.float64)).square().sum(1)

    sq = torch.zeros(len(flats), dtype=torch.float64, device=dev)
    for s, e in spans(n):  # the mean
        pts = stacked(s, e)
        y[s:e] = pts.sum(0) * (1.0 / len(flats))
        if iterations:
            sq += distances(pts, y[s:e])
    for it in range(iterations):
        w = 1.0 / sq.sqrt().clamp(min=eps)
        coef = (w / w.sum()).to(torch.float32).reshape(-1, 1)
        last = it + 1 == iterations
        sq = torch.zeros(len(flats), dtype=torch.float64, device=dev)
        moved = False
        for s, e in spans(n):  # one pass: the new y, and its distances for the next step
            pts = stacked(s, e)
            new = (pts * coef).sum(0)
            if not moved and not torch.equal(new, y[s:e]):
                moved = True
            y[s:e] = new
            if not last:
                sq += distances(pts, new)
        if not moved:
            break
    return y.reshape(points[0].shape)


def gm_streamed(flats: list[torch.Tensor], device: torch.device | None = None, *, iterations: int = 100,
                **_: object) -> torch.Tensor:
    return weiszfeld(flats, max(0, iterations), device=device).reshape(-1)


@merge_method(formula="argmin_Y sum_i |Mi - Y| (Weiszfeld iterations from the mean)", version=2, streamed=gm_streamed,
              docs={"iterations": "Weiszfeld iterations (always this many)"})
def geometric_median(m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """The point nearest to every model in total (robust to one outlier model), tensor by tensor."""
    return weiszfeld([m1, m2, *models], max(0, iterations))


def stock_ratio_from(norms2: list[float], dots: dict[tuple[int, int], float]) -> float:
    """Model Stock's t = N cos / (1 + (N-1) cos), cos = mean pairwise cosine of the deltas; 0 when degenerate."""
    n = len(norms2)
    norms = [math.sqrt(v) for v in norms2]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(0.0 if norms[i] == 0 or norms[j] == 0 else dots[i, j] / (norms[i] * norms[j]))
    c = sum(cos) / len(cos)
    denom = 1 + (n - 1) * c
    if abs(denom) < 1e-6:
        return 0.0
    return n * c / denom


def stock_stats(flats: list[torch.Tensor], device: torch.device | None = None, **_: object) -> float:
    """t of one tensor from its deltas' norms and dot products: fp64 sums over fixed chunks (methods.chunks)."""
    n = len(flats) - 1
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def terms(base, *ms):  # deltas rounded to fp32 as the formula forms them, then squared and multiplied in fp64
        ds = [(m.float() - base.float()).double() for m in ms]
        return [d * d for d in ds] + [ds[i] * ds[j] for i, j in pairs]

    sums = sums64(flats, terms, n + len(pairs), device)
    return stock_ratio_from(sums[:n], dict(zip(pairs, sums[n:])))


def stock_ratio(deltas: list[torch.Tensor]) -> float:
    """t for whole deltas (the same fixed-order fp64 sums as the kernel's chunked pass)."""
    zero = torch.zeros_like(deltas[0]).reshape(-1)
    return stock_stats([zero] + [d.reshape(-1) for d in deltas])


@merge_method(formula="base + t*(mean(Mi) - base), t = N*cos/(1 + (N-1)*cos), cos = mean pairwise cos(Mi - base)",
              uses_base=True, version=2, stats=stock_stats)
def model_stock(base: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor,
                stats: float | None = None) -> torch.Tensor:
    """Model Stock: move from the base toward the fine-tunes' mean as far as their agreement (angle) suggests."""
    ms = (m1, m2, *models)
    t = stats if stats is not None else stock_stats([base.reshape(-1)] + [m.reshape(-1) for m in ms])
    deltas = [m - base for m in ms]
    mean = torch.stack(deltas).mean(0)
    return base + t * mean
