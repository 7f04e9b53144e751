"""The four merge modes every web-UI merger has (docs/formats.md §2.2)."""

from __future__ import annotations

import torch

from mergekit_sd.methods import merge_method


@merge_method(formula="A*(1-alpha) + B*alpha", elementwise=True)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Linear interpolation between two models."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    return torch.lerp(a, b, alpha)


@merge_method(formula="A + alpha*(B - C)", elementwise=True)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Add what B learned on top of C to A."""
    if alpha == 0:
        return a
    return a + alpha * (b - c)


@merge_method(formula="A*(1-alpha-beta) + B*alpha + C*beta", elementwise=True)
def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25) -> torch.Tensor:
    """Three-way weighted average."""
    return a * (1 - alpha - beta) + b * alpha + c * beta


@merge_method(formula="(A*(1-alpha) + B*alpha)*(1-beta) + C*beta", elementwise=True)
def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.25) -> torch.Tensor:
    """Weighted sum of A and B, then weighted sum of that and C."""
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)
