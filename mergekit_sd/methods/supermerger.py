"""supermerger's calcmodes as methods (docs/formats.md §2.3), with its exact per-key definitions.

smoothAdd MT is smoothAdd computed in a thread pool; the result is the same, so it is `smooth_add` here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_sd.methods import merge_method
from mergekit_sd.methods.filters import smooth

VAE_PREFIX = "first_stage_model."


# ---------------------------------------------------------------------------------------------------------------
# cosineA / cosineB


def _as1d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.ndim == 0 else t


def cos_dim0(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along dim 0 (one value per column; a scalar for 1-D tensors); 0 for zero columns."""
    return F.cosine_similarity(_as1d(x), _as1d(y), dim=0)


def cos_global(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the flattened tensors; 0 when either is all zeros."""
    return F.cosine_similarity(x.reshape(-1), y.reshape(-1), dim=0)


def l2n(x: torch.Tensor) -> torch.Tensor:
    """L2-normalisation along dim 0 (zero columns stay zero)."""
    return F.normalize(_as1d(x), p=2, dim=0)


def cosine_stage0(a: torch.Tensor, b: torch.Tensor, variant: str) -> torch.Tensor:
    """The values one tensor pair adds to the similarity distribution S."""
    if variant == "a":
        return cos_dim0(l2n(a), l2n(b)).reshape(-1)
    return ((cos_dim0(a, b) + cos_global(a, b)) / 2).reshape(-1)


def cosine_similarity_map(a: torch.Tensor, b: torch.Tensor, variant: str) -> torch.Tensor:
    """Stage 1 similarity of one tensor pair (broadcasts over dim 0)."""
    if variant == "a":
        na, nb = l2n(a), l2n(b)
        return (cos_dim0(na, nb) + cos_global(na, nb)) / 2
    return (cos_dim0(a, b) + cos_global(a, b)) / 2


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
    """Whole-model stage 0 (lazy: computed on the first merged tensor, streaming both models key by key)."""

    def __init__(self, inputs, device: torch.device, variant: str):
        self.inputs, self.device, self.variant = inputs, device, variant
        self._bounds: Any = ()

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

    @property
    def bounds(self) -> tuple[float, float] | None:
        if self._bounds == ():
            parts = []
            for k in self.keys():
                ta = self.inputs[0].get(k).to(device=self.device, dtype=torch.float32)
                tb = self.inputs[1].get(k).to(device=self.device, dtype=torch.float32)
                parts.append(cosine_stage0(ta, tb, self.variant).cpu())
            self._bounds = similarity_bounds(torch.cat(parts)) if parts else None
        return self._bounds


def _prepare_a(inputs, params, ctx) -> CosineStats:
    return CosineStats(inputs, ctx.device, "a")


def _prepare_b(inputs, params, ctx) -> CosineStats:
    return CosineStats(inputs, ctx.device, "b")


def cosine_merge(a: torch.Tensor, b: torch.Tensor, alpha: float, bounds, variant: str) -> torch.Tensor:
    """result = lerp(B, A, k): k is A's share per column (pure function; `bounds` from the whole model)."""
    sim = cosine_similarity_map(a, b, variant)
    k = cosine_k(sim, bounds, alpha, variant)
    return torch.lerp(b, a, k)


@merge_method(formula="lerp(B, A, k), k = clip((sim - min S)/(max S - min S) - |alpha|, 0, 1), sim from normalised columns",
              prepare=_prepare_a)
def cosine_a(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, key: str = "", context: Any = None) -> torch.Tensor:
    """supermerger cosineA: columns where A and B agree keep more of A; higher alpha gives less A; VAE kept from A."""
    if key.startswith(VAE_PREFIX):
        return a
    return cosine_merge(a, b, alpha, context.bounds if context is not None else None, "a")


@merge_method(formula="lerp(B, A, k), k = clip((sim - min S)/(max S - min S) - alpha, 0, 1), sim = (cos_dim0 + cos)/2",
              prepare=_prepare_b)
def cosine_b(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, key: str = "", context: Any = None) -> torch.Tensor:
    """supermerger cosineB: like cosine_a on raw (not normalised) columns plus the global cosine; VAE kept from A."""
    if key.startswith(VAE_PREFIX):
        return a
    return cosine_merge(a, b, alpha, context.bounds if context is not None else None, "b")


# ---------------------------------------------------------------------------------------------------------------
# Add-difference family


@merge_method(formula="A + 1.8*alpha*(B - C)*|B - A| / (|B - C| + |B - A|)  (fraction 0 where 0/0)")
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """supermerger trainDifference: add B - C scaled by how far B moved from A; a tensor with B == C stays A."""
    if alpha == 0 or torch.equal(b, c):
        return a
    dist = (b - a).abs()
    denom = (b - c).abs() + dist
    frac = torch.where(denom == 0, torch.zeros_like(denom), dist / torch.where(denom == 0, torch.ones_like(denom), denom))
    return a + (1.8 * alpha) * (b - c) * frac


@merge_method(formula="A + alpha*gaussian(median3(B - C), sigma=1)  (N-D, reflect boundary)")
def smooth_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """supermerger smoothAdd (and smoothAdd MT): add a denoised B - C."""
    if alpha == 0:
        return a
    return a + alpha * smooth(b - c)


def extract_weights(alpha: float, beta: float, gamma: float) -> str | None:
    if not 0 <= alpha <= 1:
        return f"alpha must be between 0 and 1, got {alpha}"
    if not 0 <= beta <= 1:
        return f"beta must be between 0 and 1, got {beta}"
    if gamma < 0:
        return f"gamma must be 0 or more, got {gamma}"
    return None


@merge_method(formula="A + lerp(B-A, C-A, alpha) * lerp(d, 1-d, beta), d = ((cos_rows(B-A, C-A) + 1)/2)^gamma")
def extract_merge(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25,
                  gamma: float = 0.3) -> torch.Tensor:
    """supermerger extract: keep what B and C changed alike (beta 0) or differently (beta 1) relative to A."""
    x, y = b - a, c - a
    x1, y1 = (x.reshape(1), y.reshape(1)) if x.ndim == 0 else (x, y)
    s = F.cosine_similarity(x1, y1, dim=-1).clamp(-1, 1).unsqueeze(-1)
    d = ((s + 1) / 2) ** gamma
    out = a + torch.lerp(x, y, alpha) * torch.lerp(d, 1 - d, beta).reshape(d.shape if x.ndim else ())
    return out


extract_merge.weight_check = extract_weights  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# tensor swaps and self


def swap_rows(a: torch.Tensor, b: torch.Tensor, n: int, alpha: float, beta: float, dim: int) -> torch.Tensor:
    """Take a band of slices along `dim` from B (or A's band into B when alpha + beta > 1); indices from n."""
    if alpha + beta <= 1:
        out, src, lo, hi = a.clone(), b, int(n * beta), int(n * (alpha + beta))
    else:
        out, src, lo, hi = b.clone(), a, int(n * (alpha + beta - 1)), int(n * beta)
    index = [slice(None)] * out.ndim
    index[dim] = slice(lo, hi)
    out[tuple(index)] = src[tuple(index)]
    return out


@merge_method(formula="rows [n*beta, n*(alpha+beta)) of dim 0 from B, the rest from A")
def tensor_swap(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25) -> torch.Tensor:
    """supermerger tensor: swap whole slices along dim 0 instead of blending values."""
    if a.ndim == 0:
        return a
    return swap_rows(a, b, a.shape[0], alpha, beta, 0)


@merge_method(formula="like tensor_swap along dim 1 (index base shape[1] if > 100, else shape[0]); 1-D along dim 0")
def tensor_swap2(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25) -> torch.Tensor:
    """supermerger tensor2: swap slices along dim 1, with supermerger's index quirk kept for identical results."""
    if a.ndim == 0:
        return a
    if a.ndim == 1:
        return swap_rows(a, b, a.shape[0], alpha, beta, 0)
    n = a.shape[1] if a.shape[1] > 100 else a.shape[0]
    return swap_rows(a, b, n, alpha, beta, 1)


SELF_SKIP = ("to_out", "proj_out", "norm")


@merge_method(formula="A*alpha (not for to_out, proj_out, norm tensors)")
def self_scale(a: torch.Tensor, *, alpha: float, key: str = "") -> torch.Tensor:
    """supermerger self: scale a model's own weights; output projections and norms are left alone."""
    if alpha == 0 or any(s in key for s in SELF_SKIP):
        return a
    return a * alpha
