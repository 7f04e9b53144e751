"""AUTOMATIC1111's legacy interpolation methods (docs/formats.md §2.1): a weighted sum with a reshaped multiplier.

`Weighted sum` and `Add difference` are the `weighted_sum` and `add_difference` methods.
"""

from __future__ import annotations

import math

import torch

from mergekit_sd.methods import merge_method


def smoothstep(m: float) -> float:
    """A1111's `Sigmoid` multiplier: M² (3 − 2M)."""
    return m * m * (3 - 2 * m)


def inverse_smoothstep(m: float) -> float:
    """A1111's `Inverse Sigmoid` multiplier: 0.5 − sin(asin(1 − 2M) / 3), the inverse of smoothstep on [0, 1]."""
    return 0.5 - math.sin(math.asin(1 - 2 * m) / 3)


@merge_method(formula="A + (B - A)*M', M' = alpha^2*(3 - 2*alpha)", elementwise=True)
def sigmoid(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """A1111 legacy `Sigmoid`: weighted sum eased in and out (smoothstep of the multiplier)."""
    m = smoothstep(alpha)
    if m == 0:
        return a
    return a + (b - a) * m


def _unit_interval(alpha: float) -> str | None:
    return None if 0 <= alpha <= 1 else f"alpha must be between 0 and 1, got {alpha}"


@merge_method(formula="A + (B - A)*M', M' = 0.5 - sin(asin(1 - 2*alpha)/3)", elementwise=True)
def inverse_sigmoid(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """A1111 legacy `Inverse Sigmoid`: weighted sum with the inverse smoothstep of the multiplier."""
    m = inverse_smoothstep(alpha)
    if m == 0:
        return a
    return a + (b - a) * m


inverse_sigmoid.weight_check = _unit_interval  # type: ignore[attr-defined]
