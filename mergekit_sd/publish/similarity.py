"""Per-block distance between a model and one of its parents, streamed a tensor pair at a time.

For each block, relative distance = ||model - parent|| / ||parent|| over the block's float tensors that both
files hold with the same shape (0: identical), and cosine similarity of the flattened blocks. Sums are kept in
fp64, so the result does not depend on the order tensors are read in beyond rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mergekit_sd.arch.blocks import VAE, block_of, blocks_for, family_of, is_vae_key
from mergekit_sd.arch.detect import detect
from mergekit_sd.formats.open import open_model

OTHER = "other"


@dataclass
class BlockDistance:
    block: str
    tensors: int
    relative: float  # ||a - b|| / ||b||
    cosine: float


@dataclass
class Comparison:
    parent: str
    blocks: list[BlockDistance] = field(default_factory=list)
    compared: int = 0
    skipped: int = 0  # tensors of the model the parent lacks, or has with another shape


CHUNK = 1 << 22  # elements converted to fp64 at a time: the largest SDXL tensor would need over 1 GiB at once


def _sums(ta: torch.Tensor, tb: torch.Tensor) -> tuple[float, float, float, float]:
    """(sum (a-b)², sum b², sum a·b, sum a²) in fp64, a slice at a time."""
    a, b = ta.reshape(-1), tb.reshape(-1)
    d2 = p2 = dot = m2 = 0.0
    for i in range(0, a.numel(), CHUNK):
        x = a[i:i + CHUNK].to(torch.float64)
        y = b[i:i + CHUNK].to(torch.float64)
        d2 += float(torch.sum((x - y) ** 2))
        p2 += float(torch.sum(y * y))
        dot += float(torch.dot(x, y))
        m2 += float(torch.sum(x * x))
    return d2, p2, dot, m2


def compare_blocks(model_path: str | Path, parent_path: str | Path, label: str | None = None,
                   on_tensor: Callable[[str, int], None] | None = None) -> Comparison:
    """Distances of `model_path` from `parent_path`, block by block (blocks of the model's architecture);
    `on_tensor(name, bytes)` is called after each tensor pair (progress)."""
    a = open_model(Path(model_path))
    b = open_model(Path(parent_path))
    family = family_of(detect(a.specs))
    sums: dict[str, list[float]] = {}  # block -> [diff², parent², dot, model², tensors]
    comp = Comparison(label or Path(parent_path).name)
    for key in sorted(a.specs):
        sa, sb = a.specs[key], b.specs.get(key)
        if sb is None or tuple(sa.shape) != tuple(sb.shape):
            comp.skipped += 1
            continue
        if not sa.dtype.is_floating_point or not sb.dtype.is_floating_point:  # ids and markers: nothing to measure
            continue
        block = VAE if is_vae_key(key) else (block_of(key, family) if family else None) or OTHER
        s = sums.setdefault(block, [0.0, 0.0, 0.0, 0.0, 0])
        for i, v in enumerate(_sums(a.get(key), b.get(key))):
            s[i] += v
        s[4] += 1
        comp.compared += 1
        if on_tensor is not None:
            on_tensor(key, sa.nbytes + sb.nbytes)
    order = list(blocks_for(family, vae=True)) if family else []
    order += sorted(k for k in sums if k not in order)
    for blk in order:
        if blk not in sums:
            continue
        d2, p2, dot, m2, n = sums[blk]
        rel = math.sqrt(d2 / p2) if p2 > 0 else (0.0 if d2 == 0 else math.inf)
        cos = dot / math.sqrt(m2 * p2) if m2 > 0 and p2 > 0 else (1.0 if m2 == p2 else 0.0)
        comp.blocks.append(BlockDistance(blk, int(n), rel, cos))
    return comp
