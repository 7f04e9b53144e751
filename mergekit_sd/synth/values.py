"""Deterministic synthetic tensor values, seeded per tensor name (shared by every synthetic model writer)."""

from __future__ import annotations

import zlib

import torch

from mergekit_sd.lazy import TensorSpec


def broken_ids(n: int = 77) -> torch.Tensor:
    """Float position ids as a naive merge leaves them: every 7th id sits just below its integer (e.g. 75.9975)."""
    t = torch.arange(n, dtype=torch.float32)
    t[6::7] -= 0.0025
    return t


def synth_value(name: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """Deterministic values for one tensor: position ids count up, norms sit near 1, weights near 0."""
    if name.endswith("position_ids"):
        if spec.dtype.is_floating_point:
            return broken_ids(spec.numel).reshape(spec.shape).to(spec.dtype)
        return torch.arange(spec.numel, dtype=torch.int64).reshape(spec.shape)
    if name == "model_ema.num_updates":
        return torch.tensor(1000, dtype=torch.int32)
    if not spec.dtype.is_floating_point:
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if name == "model_ema.decay":
        return torch.tensor(0.9999, dtype=spec.dtype)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF)
    t = torch.randn(spec.shape, generator=g, dtype=torch.float32) * 0.05
    if "norm" in name and name.endswith(".weight"):
        t += 1.0
    return t.to(spec.dtype)
