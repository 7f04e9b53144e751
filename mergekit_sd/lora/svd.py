"""Low-rank factoring of a weight difference (docs/formats.md §5.6 c, §5.7): deterministic fp64 SVD on the CPU."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def quantile(values: Tensor, q: float) -> float:
    """Linear-interpolated quantile (torch.quantile's definition) without its input-size limit."""
    v = values.reshape(-1).sort().values
    if v.numel() == 0:
        return 0.0
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def factor_rank(shape: tuple[int, ...], rank: int) -> int:
    out = shape[0]
    flat = 1
    for d in shape[1:]:
        flat *= d
    return max(1, min(rank, out, flat))


def svd_factor(delta: Tensor, rank: int, clamp_quantile: float | None = None) -> tuple[Tensor, Tensor]:
    """ΔW ≈ up @ down with rank min(rank, out, in·kh·kw): up = U·diag(S) ([out, R] or [out, R, 1, 1]),
    down = Vh ([R, in] or [R, in, kh, kw]); with `clamp_quantile` both are clamped to ±that quantile of
    their values, as kohya does. fp64 on the CPU so the bytes are the same on every run."""
    m = delta.to(device="cpu", dtype=torch.float64)
    out = m.shape[0]
    flat = m.reshape(out, -1)
    r = factor_rank(tuple(m.shape), rank)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if clamp_quantile is not None:
        hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if m.dim() == 4:
        return up.reshape(out, r, 1, 1), down.reshape((r,) + tuple(m.shape[1:]))
    return up, down
