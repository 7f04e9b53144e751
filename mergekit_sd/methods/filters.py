"""N-D median and Gaussian filters in torch with scipy.ndimage's default `reflect` boundary.

supermerger's smoothAdd runs `scipy.ndimage.median_filter(size=3)` then `gaussian_filter(sigma=1)` over every axis of a
weight tensor. These are the same filters written with torch so they run on the chosen device and need no scipy:
`reflect` extends an axis by mirroring it including the edge sample (`d c b a | a b c d | d c b a`), repeatedly for
axes shorter than the filter radius; the Gaussian kernel is scipy's (truncate 4.0 -> radius 4 for sigma 1, weights
exp(-x²/2σ²) normalised to sum 1) applied axis by axis, accumulated in float64 and stored in the input dtype after each axis, like scipy does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# keep the 3^N neighbourhood tensor of the median filter under this many elements (memory bound on big tensors)
MEDIAN_CHUNK_ELEMENTS = 1 << 24


def reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of an axis of length n extended by `radius` on both sides, scipy `reflect` mode."""
    i = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def _pad_reflect(x: torch.Tensor, radius: int, dims) -> torch.Tensor:
    for d in dims:
        x = x.index_select(d, reflect_index(x.shape[d], radius, x.device))
    return x


def _median3_block(padded: torch.Tensor, ndim: int) -> torch.Tensor:
    """Median over the 3^N neighbourhood of every element of an already padded block."""
    win = padded
    for d in range(ndim):
        win = win.unfold(d, 3, 1)
    win = win.reshape(*win.shape[:ndim], -1)
    return win.median(dim=-1).values


def median_filter3(x: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.median_filter(x, size=3) (mode reflect) over every axis."""
    if x.ndim == 0 or x.numel() == 0:
        return x.clone()
    ndim = x.ndim
    per_row = max(1, x.numel() // x.shape[0]) * (3 ** ndim)
    rows = max(1, MEDIAN_CHUNK_ELEMENTS // per_row)
    if rows >= x.shape[0]:
        return _median3_block(_pad_reflect(x, 1, range(ndim)), ndim)
    # chunk along axis 0 with a one-row halo taken from the reflected axis
    rest = _pad_reflect(x, 1, range(1, ndim))
    idx0 = reflect_index(x.shape[0], 1, x.device)
    out = []
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        block = rest.index_select(0, idx0[start:stop + 2])
        out.append(_median3_block(block, ndim))
    return torch.cat(out, 0)


def gaussian_kernel(sigma: float = 1.0, truncate: float = 4.0, dtype=torch.float64, device=None) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x: torch.Tensor, sigma: float = 1.0, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(x, sigma) (mode reflect, truncate 4) over every axis; result in x's dtype."""
    if x.ndim == 0 or x.numel() == 0:
        return x.clone()
    k = gaussian_kernel(sigma, truncate, torch.float64, x.device)
    radius = (k.numel() - 1) // 2
    y = x.to(torch.float64)
    for d in range(x.ndim):
        n = y.shape[d]
        padded = y.index_select(d, reflect_index(n, radius, x.device))
        acc = torch.zeros_like(y)
        for j in range(k.numel()):  # correlate: out[i] = sum_j k[j] * in[i + j - radius]
            acc += k[j] * padded.narrow(d, j, n)
        y = acc.to(x.dtype).to(torch.float64)  # scipy stores each axis' result in the output dtype
    return y.to(x.dtype)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """smoothAdd's filter: Gaussian (sigma 1) of the 3^N median."""
    return gaussian_filter(median_filter3(x), 1.0)


MEDIAN_HALO, SLAB_NEIGHBOURHOOD = 1, 1 << 22  # rows the median reads beyond its own; 3^N window elements per slab


def _gaussian_axis(y: torch.Tensor, k: torch.Tensor, d: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """One axis of gaussian_filter on an already extended fp64 block: output length n along d, stored in dtype."""
    acc = torch.zeros_like(y.narrow(d, 0, n))
    for j in range(k.numel()):
        acc += k[j] * y.narrow(d, j, n)
    return acc.to(dtype).to(torch.float64)


def smooth_rows(rows_of: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], r0: int, r1: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [r0, r1) along axis 0 of smooth(x) for an x of `shape` whose rows `rows_of(index)` gives (in `dtype`):
    the same values, bit for bit, as filtering the whole tensor. The Gaussian needs the median's rows within its
    radius, reflected at the tensor's edges as the whole filter does; those need the input's rows within one more,
    reflected likewise; the other axes are within each row."""
    n0 = shape[0]
    k = gaussian_kernel(1.0, 4.0, torch.float64)
    radius = (k.numel() - 1) // 2
    gidx = reflect_index(n0, radius, torch.device("cpu"))[r0:r1 + 2 * radius]  # median rows the Gaussian reads
    m_lo, m_hi = int(gidx.min()), int(gidx.max()) + 1
    midx = reflect_index(n0, MEDIAN_HALO, torch.device("cpu"))[m_lo:m_hi + 2 * MEDIAN_HALO]  # input rows they read
    x = rows_of(midx)
    device = x.device
    ndim = len(shape)
    med = _median3_block(_pad_reflect(x, 1, range(1, ndim)), ndim)  # median rows m_lo..m_hi-1
    k = k.to(device)
    y = med.index_select(0, (gidx - m_lo).to(device)).to(torch.float64)
    y = _gaussian_axis(y, k, 0, r1 - r0, dtype)
    for d in range(1, ndim):
        y = _gaussian_axis(y.index_select(d, reflect_index(y.shape[d], radius, device)), k, d, y.shape[d], dtype)
    return y.to(dtype)


def slab_rows(shape: tuple[int, ...], elements: int) -> int:
    """Rows of axis 0 per slab: about `elements` values, and a 3^N median window within SLAB_NEIGHBOURHOOD."""
    per_row = max(1, math.prod(shape[1:]))
    return max(1, min(elements // per_row, SLAB_NEIGHBOURHOOD // (per_row * 3 ** len(shape))))


__all__ = ["median_filter3", "gaussian_filter", "smooth", "smooth_rows", "slab_rows", "reflect_index", "gaussian_kernel"]
