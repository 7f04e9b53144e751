"""Spherical interpolation between two models, tensor by tensor."""

from __future__ import annotations

import math

import torch

from mergekit_sd.methods import merge_method

# above this |cos| the two tensors are treated as parallel and interpolated linearly (sin(omega) is ~0)
DOT_THRESHOLD = 0.9995


def slerp_factors(dot: float, alpha: float) -> tuple[float, float] | None:
    """(s_a, s_b) with slerp = s_a*A + s_b*B, or None when A and B are (anti)parallel and lerp is used instead."""
    if abs(dot) > DOT_THRESHOLD:
        return None
    omega = math.acos(max(-1.0, min(1.0, dot)))
    so = math.sin(omega)
    return math.sin((1 - alpha) * omega) / so, math.sin(alpha * omega) / so


@merge_method(formula="sin((1-alpha)w)/sin(w)*A + sin(alpha*w)/sin(w)*B, cos w = <A,B>/(|A||B|); lerp if parallel or zero")
def slerp(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Spherical linear interpolation of the flattened tensors (the angle from their directions, lengths kept)."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    na = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    nb = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if na == 0 or nb == 0:
        return torch.lerp(a, b, alpha)
    dot = float(torch.sum(a.to(torch.float64) * b.to(torch.float64))) / (na * nb)
    f = slerp_factors(dot, alpha)
    if f is None:
        return torch.lerp(a, b, alpha)
    return a * f[0] + b * f[1]
