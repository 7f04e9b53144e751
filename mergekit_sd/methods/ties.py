"""Delta merges over a shared base: TIES (trim, elect sign, disjoint mean) and DARE (drop and rescale)."""

from __future__ import annotations

import zlib

import torch

from mergekit_sd.methods import merge_method
from mergekit_sd.methods.chunks import kth_largest_chunked, piece, spans


def kth_largest(mag: torch.Tensor, keep: int) -> torch.Tensor:
    """The keep-th largest value of a non-negative float32 tensor, exactly (radix selection, methods.chunks)."""
    f = mag.reshape(-1)
    value = kth_largest_chunked(lambda: (f[s:e] for s, e in spans(f.numel())), keep)
    return torch.tensor(value, dtype=torch.float32, device=mag.device)


# what trimming keeps of one delta: everything, nothing, or the entries whose magnitude reaches a threshold
KEEP_ALL, KEEP_NONE = "all", "none"


def trim_threshold(numel: int, k: float, magnitudes) -> str | float:
    """Keep int(k * numel) entries by magnitude: KEEP_ALL, KEEP_NONE, or the exact k-th largest magnitude
    (every entry tied with it is kept too). `magnitudes()` yields the |delta| chunks in fp32, once per pass."""
    keep = int(k * numel)
    if keep >= numel:
        return KEEP_ALL
    if keep <= 0:
        return KEEP_NONE
    return kth_largest_chunked(magnitudes, keep)


def trim(delta: torch.Tensor, threshold: str | float) -> torch.Tensor:
    if threshold == KEEP_ALL:
        return delta
    if threshold == KEEP_NONE:
        return torch.zeros_like(delta)
    return delta * (delta.abs() >= threshold)


def trim_top_k(delta: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the int(k * numel) largest-magnitude entries (every entry tied with the smallest kept one too)."""
    n = delta.numel()
    if delta.dtype != torch.float32:
        keep = int(k * n)
        if keep >= n:
            return delta
        if keep <= 0:
            return torch.zeros_like(delta)
        mag = delta.abs()
        return delta * (mag >= torch.kthvalue(mag.reshape(-1), n - keep + 1).values)
    f = delta.reshape(-1)
    return trim(delta, trim_threshold(n, k, lambda: (f[s:e].abs() for s, e in spans(n))))


def elect_and_mean(trimmed: list[torch.Tensor], sign_election: str) -> torch.Tensor:
    """Elect a sign per entry (`mass`: sign of the sum, `count`: sign of the majority) and average the entries that
    agree with it (0 where none do). An entry agrees when it is non-zero with the elected sign. Elementwise."""
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
    del sign
    return total.div_(count.clamp_(min=1))


def ties_delta(deltas: list[torch.Tensor], k: float, sign_election: str) -> torch.Tensor:
    """Trim each delta, elect a sign per entry, average the entries that agree with it."""
    return elect_and_mean([trim_top_k(d, k) for d in deltas], sign_election)


def ties_thresholds(flats: list[torch.Tensor], device: torch.device | None = None, *, k: float = 0.2,
                    **_: object) -> list[str | float]:
    """Each fine-tune's trimming threshold, from its delta read in fp32 chunks (three passes, no whole copy)."""
    base, models = flats[0], flats[1:]
    n = base.numel()

    def magnitudes(m):
        return lambda: ((piece(m, s, e, device) - piece(base, s, e, device)).abs() for s, e in spans(n))

    return [trim_threshold(n, k, magnitudes(m)) for m in models]


def _unit_k(k: float) -> str | None:
    return None if 0 <= k <= 1 else f"k must be between 0 and 1, got {k}"


@merge_method(formula="base + alpha*disjoint_mean(sign-elected top-k(Mi - base))", uses_base=True,
              choices={"sign_election": ("mass", "count")}, stats=ties_thresholds,
              docs={"k": "fraction of each delta kept, by magnitude", "sign_election": "mass: sign of the summed deltas; count: majority of signs"})
def add_difference_ties(base: torch.Tensor, m1: torch.Tensor, *models: torch.Tensor, alpha: float = 1.0, k: float = 0.2,
                        sign_election: str = "mass", stats: list | None = None) -> torch.Tensor:
    """TIES-merging: add the deltas of several fine-tunes to their base without them cancelling each other.

    `stats` (each delta's trimming threshold over the whole tensor, `ties_thresholds`) lets the kernel apply the
    formula chunk by chunk; without it the thresholds come from the tensors given."""
    if alpha == 0:
        return base
    ms = (m1, *models)
    if stats is None:
        stats = ties_thresholds([base.reshape(-1)] + [m.reshape(-1) for m in ms], k=k)
    return base + alpha * elect_and_mean([trim(m - base, t) for m, t in zip(ms, stats)], sign_election)


add_difference_ties.weight_check = lambda alpha, k: _unit_k(k)  # type: ignore[attr-defined]


def dare_seed(seed: int, key: str) -> int:
    """The generator seed of one tensor: the step's seed and a stable hash of the tensor name."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) & 0x7FFF_FFFF_FFFF_FFFF


def dare_masks(shape: tuple, count: int, p: float, seed: int, key: str) -> list[torch.Tensor]:
    """Keep masks (True = kept, probability 1 - p), drawn on the CPU so every device gets the same bits."""
    g = torch.Generator(device="cpu").manual_seed(dare_seed(seed, key))
    return [torch.rand(shape, generator=g, dtype=torch.float32) >= p for _ in range(count)]


class DareMasks:
    """The keep masks of one tensor drawn chunk after chunk: one CPU generator per model, each started where the
    whole-tensor draw of `dare_masks` starts that model's mask (the generator draws one value per element in
    order, so chunks concatenate to exactly the whole mask). Call `next(n)` for consecutive chunks, in order."""

    def __init__(self, numel: int, count: int, p: float, seed: int, key: str):
        self.p = p
        g = torch.Generator(device="cpu").manual_seed(dare_seed(seed, key))
        self.gens = []
        for i in range(count):
            own = torch.Generator(device="cpu")
            own.set_state(g.get_state())
            self.gens.append(own)
            if i + 1 < count:  # move the shared generator past this model's mask, a chunk at a time
                for s, e in spans(numel):
                    torch.rand(e - s, generator=g, dtype=torch.float32)

    def next(self, n: int) -> list[torch.Tensor]:
        return [torch.rand(n, generator=g, dtype=torch.float32) >= self.p for g in self.gens]


def dare_stream(flats: list[torch.Tensor], device: torch.device | None = None, *, p: float = 0.9, seed: int = 0,
                key: str = "", **_: object) -> DareMasks:
    return DareMasks(flats[0].numel(), len(flats) - 1, p, seed, key)


def _dare_p(alpha: float, p: float) -> str | None:
    return None if 0 <= p < 1 else f"p (drop probability) must be at least 0 and below 1, got {p}"


@merge_method(formula="base + alpha*sum_i(mask_i*(Mi - base)/(1-p)), mask_i ~ Bernoulli(1-p) seeded by seed and tensor name",
              uses_base=True, stats=dare_stream,
              docs={"p": "probability of dropping each delta entry", "seed": "random seed (same seed, same bytes)"})
def add_difference_dare(base: torch.Tensor, m1: torch.Tensor, *models: torch.Tensor, alpha: float = 1.0, p: float = 0.9,
                        seed: int = 0, key: str = "", stats: DareMasks | None = None) -> torch.Tensor:
    """DARE: randomly drop delta entries and rescale the rest, then add the deltas to the base.

    With `stats` (a `DareMasks` positioned at this chunk) the kernel applies it chunk by chunk."""
    if alpha == 0:
        return base
    ms = (m1, *models)
    if stats is not None:
        masks = [m.reshape(base.shape) for m in stats.next(base.numel())]
    else:
        masks = dare_masks(tuple(base.shape), len(ms), p, seed, key)
    total = torch.zeros_like(base)
    for m, mask in zip(ms, masks):
        total = total + torch.where(mask.to(base.device), m - base, torch.zeros_like(base)) / (1 - p)
    return base + alpha * total


add_difference_dare.weight_check = _dare_p  # type: ignore[attr-defined]
