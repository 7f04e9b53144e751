"""Delta merges over a shared base: TIES (trim, elect sign, disjoint mean) and DARE (drop and rescale)."""

from __future__ import annotations

import zlib

import torch

from mergekit_sd.methods import merge_method


def kth_largest(mag: torch.Tensor, keep: int) -> torch.Tensor:
    """The keep-th largest value of a non-negative float32 tensor, exactly (radix selection on the bit patterns,
    which order like the values for non-negative floats: three histogram passes instead of a sort)."""
    bits = mag.reshape(-1).view(torch.int32)
    remaining, prefix, cand = keep, 0, bits
    for shift, width in ((21, 11), (10, 11), (0, 10)):
        digits = (cand >> shift) & ((1 << width) - 1)
        hist = torch.bincount(digits, minlength=1 << width)
        at_least = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # entries whose digit is >= d
        d = int((at_least >= remaining).nonzero().max())
        remaining -= int(at_least[d] - hist[d])
        prefix |= d << shift
        if shift:
            cand = cand[digits == d]
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).to(mag.device)


def trim_top_k(delta: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the int(k * numel) largest-magnitude entries (every entry tied with the smallest kept one too)."""
    n = delta.numel()
    keep = int(k * n)
    if keep >= n:
        return delta
    if keep <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs()
    if mag.dtype == torch.float32:
        threshold = kth_largest(mag, keep)
    else:
        threshold = torch.kthvalue(mag.reshape(-1), n - keep + 1).values
    return delta * (mag >= threshold)


def ties_delta(deltas: list[torch.Tensor], k: float, sign_election: str) -> torch.Tensor:
    """Trim each delta, elect a sign per entry (`mass`: sign of the sum, `count`: sign of the majority), average the
    entries that agree with it (0 where none do). An entry agrees when it is non-zero with the elected sign."""
    trimmed = [trim_top_k(d, k) for d in deltas]
    sign = torch.zeros_like(trimmed[0])
    for t in trimmed:
        sign += torch.sign(t) if sign_election == "count" else t
    sign.sign_()
    total = torch.zeros_like(sign)
    count = torch.zeros_like(sign)
    for t in trimmed:
        agree = (t * sign) > 0
        total += t * agree
        count += agree
    del trimmed, sign
    return total.div_(count.clamp_(min=1))


def _unit_k(k: float) -> str | None:
    return None if 0 <= k <= 1 else f"k must be between 0 and 1, got {k}"


@merge_method(formula="base + alpha*disjoint_mean(sign-elected top-k(Mi - base))", uses_base=True,
              choices={"sign_election": ("mass", "count")},
              docs={"k": "fraction of each delta kept, by magnitude", "sign_election": "mass: sign of the summed deltas; count: majority of signs"})
def add_difference_ties(base: torch.Tensor, m1: torch.Tensor, *models: torch.Tensor, alpha: float = 1.0, k: float = 0.2,
                        sign_election: str = "mass") -> torch.Tensor:
    """TIES-merging: add the deltas of several fine-tunes to their base without them cancelling each other."""
    if alpha == 0:
        return base
    deltas = [m - base for m in (m1, *models)]
    return base + alpha * ties_delta(deltas, k, sign_election)


add_difference_ties.weight_check = lambda alpha, k: _unit_k(k)  # type: ignore[attr-defined]


def dare_seed(seed: int, key: str) -> int:
    """The generator seed of one tensor: the step's seed and a stable hash of the tensor name."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) & 0x7FFF_FFFF_FFFF_FFFF


def dare_masks(shape: tuple, count: int, p: float, seed: int, key: str) -> list[torch.Tensor]:
    """Keep masks (True = kept, probability 1 - p), drawn on the CPU so every device gets the same bits."""
    g = torch.Generator(device="cpu").manual_seed(dare_seed(seed, key))
    return [torch.rand(shape, generator=g, dtype=torch.float32) >= p for _ in range(count)]


def _dare_p(alpha: float, p: float) -> str | None:
    return None if 0 <= p < 1 else f"p (drop probability) must be at least 0 and below 1, got {p}"


@merge_method(formula="base + alpha*sum_i(mask_i*(Mi - base)/(1-p)), mask_i ~ Bernoulli(1-p) seeded by seed and tensor name",
              uses_base=True, docs={"p": "probability of dropping each delta entry", "seed": "random seed (same seed, same bytes)"})
def add_difference_dare(base: torch.Tensor, m1: torch.Tensor, *models: torch.Tensor, alpha: float = 1.0, p: float = 0.9,
                        seed: int = 0, key: str = "") -> torch.Tensor:
    """DARE: randomly drop delta entries and rescale the rest, then add the deltas to the base."""
    if alpha == 0:
        return base
    ms = (m1, *models)
    masks = dare_masks(tuple(base.shape), len(ms), p, seed, key)
    total = torch.zeros_like(base)
    for m, mask in zip(ms, masks):
        total = total + torch.where(mask.to(base.device), m - base, torch.zeros_like(base)) / (1 - p)
    return base + alpha * total


add_difference_dare.weight_check = _dare_p  # type: ignore[attr-defined]
