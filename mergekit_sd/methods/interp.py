"""Spherical interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math

import torch

from mergekit_sd.methods import merge_method
from mergekit_sd.methods.chunks import sums64

# above this |cos| the two tensors are treated as parallel and interpolated linearly (sin(omega) is ~0)
DOT_THRESHOLD = 0.9995


def slerp_factors(dot: float, alpha: float) -> tuple[float, float] | None:
    """(s_a, s_b) with slerp = s_a*A + s_b*B, or None when A and B are (anti)parallel and lerp is used instead."""
    if abs(dot) > DOT_THRESHOLD:
        return None
    omega = math.acos(max(-1.0, min(1.0, dot)))
    so = math.sin(omega)
    return math.sin((1 - alpha) * omega) / so, math.sin(alpha * omega) / so


def slerp_stats(flats: list[torch.Tensor], device: torch.device | None = None, **_: object) -> tuple[float, float, float]:
    """(|A|, |B|, <A,B>) of the flattened tensors: fp64 sums over fixed chunks (methods.chunks), no whole copies."""
    aa, bb, ab = sums64(flats[:2], lambda x, y: [x * x, y * y, x * y], 3, device)
    return math.sqrt(aa), math.sqrt(bb), ab


@merge_method(formula="sin((1-alpha)w)/sin(w)*A + sin(alpha*w)/sin(w)*B, cos w = <A,B>/(|A||B|); lerp if parallel or zero",
              stats=slerp_stats, version=2)
def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5, stats: tuple | None = None) -> torch.Tensor:
    """Spherical linear interpolation of the flattened tensors (the angle from their directions, lengths kept).

    Norms and the dot product are fp64 sums over fixed chunks; `stats` passes them in when the kernel works chunk
    by chunk."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    na, nb, ab = stats if stats is not None else slerp_stats([a.reshape(-1), b.reshape(-1)])
    if na == 0 or nb == 0:
        return torch.lerp(a, b, alpha)
    f = slerp_factors(ab / (na * nb), alpha)
    if f is None:
        return torch.lerp(a, b, alpha)
    return a * f[0] + b * f[1]
