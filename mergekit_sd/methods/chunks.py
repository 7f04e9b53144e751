"""Whole-tensor statistics computed over fixed chunks of the flattened tensors, never from whole fp32 copies.

Methods that need a norm, a dot product or a k-th value of a whole tensor (slerp, TIES, Model Stock, the
geometric median) read it chunk by chunk: a chunk is converted to fp32 (or fp64) on the compute device, reduced,
and dropped, so a 49408x768 token embedding costs a few MiB of working memory instead of several 152 MB copies.
Sums are taken in fp64 with a fixed order (each chunk's sum, added chunk after chunk), so the result depends only
on the values and CHUNK, not on the thread or device count; on a GPU only the order inside a chunk differs, an
error of about 1e-16 of the sum of magnitudes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

CHUNK = 1 << 20  # elements of the chunks statistics are summed over (their order fixes the fp64 sums' bits)
# Elements of the chunks a formula is evaluated on (never more than CHUNK): small enough that each fp32
# temporary (256 KiB) stays well under the allocator's mmap threshold (formats.budget) and is reused from the heap
# rather than mapped and page-faulted afresh for every chunk; the result does not depend on it.
EVAL_CHUNK = 1 << 16


def eval_chunk() -> int:
    return min(CHUNK, EVAL_CHUNK)


class AxisPositions:
    """Each element's index along one axis, for consecutive flat chunks of a row-major tensor (the order the kernel
    evaluates chunks in): element p's index is (p // stride) % size. Lets a per-column, per-row or per-slice
    statistic be handed to chunks that do not line up with that axis."""

    def __init__(self, stride: int, size: int):
        self.stride, self.size, self.pos = max(stride, 1), max(size, 1), 0

    def next(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        p = torch.arange(self.pos, self.pos + n, device=device)
        self.pos += n
        return torch.div(p, self.stride, rounding_mode="floor") % self.size


def spans(n: int, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) of each chunk of a flat tensor of `n` elements, in order (CHUNK elements unless given)."""
    chunk = chunk or CHUNK
    for s in range(0, n, chunk):
        yield s, min(s + chunk, n)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def piece(t: torch.Tensor, s: int, e: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [s, e) of a flat tensor, on `device` (default: where it is) in `dtype`."""
    return t[s:e].to(device=device if device is not None else t.device, dtype=dtype)


def sums64(flats: list[torch.Tensor], terms: Callable[..., list[torch.Tensor]], count: int,
           device: torch.device | None = None) -> list[float]:
    """`count` sums over every element, in fp64 and a fixed order: `terms(*chunks)` (the chunks in fp64) returns
    `count` elementwise tensors; each is summed per chunk and the chunk sums are added in chunk order."""
    dev = device if device is not None else flats[0].device
    acc = torch.zeros(count, dtype=torch.float64, device=dev)
    for s, e in spans(flats[0].numel()):
        parts = terms(*[piece(f, s, e, dev, torch.float64) for f in flats])
        acc += torch.stack([p.sum() for p in parts])
    return [float(v) for v in acc.cpu()]


GATHER_LIMIT = 4 << 20  # candidates (int32) kept after the second pass instead of reading the chunks a third time


def kth_largest_chunked(magnitudes: Callable[[], Iterator[torch.Tensor]], keep: int) -> float:
    """The keep-th largest value of non-negative float32 values given as chunks (`magnitudes()` yields them
    afresh for each pass), exactly: radix selection on the bit patterns, which order like the values for
    non-negative floats. Three passes build integer histograms of 11, 11 and 10 bits of the candidates; counts
    are exact whatever the chunking, so the result equals a full sort's. The candidates left after the second
    pass are kept (up to GATHER_LIMIT of them) so that the third pass need not read the chunks again."""
    remaining, prefix = keep, 0
    gathered: list[torch.Tensor] | None = None
    for shift, width, above in ((21, 11, 32), (10, 11, 21), (0, 10, 10)):
        hist = None
        collect: list[torch.Tensor] | None = [] if above == 21 else None
        held = 0
        for mag in (iter(gathered) if gathered is not None else magnitudes()):
            bits = mag.reshape(-1).view(torch.int32)
            if above < 32:  # only the candidates: values whose higher bits equal the prefix found so far
                bits = bits[(bits >> above) == (prefix >> above)]
            if collect is not None:
                held += bits.numel()
                if held <= GATHER_LIMIT:
                    collect.append(bits)
                else:  # too many: the third pass reads the chunks again
                    collect = None
            digits = (bits >> shift) & ((1 << width) - 1)
            h = torch.bincount(digits, minlength=1 << width)
            hist = h if hist is None else hist + h
        assert hist is not None
        gathered = collect
        at_least = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # candidates whose digit is >= d
        d = int((at_least >= remaining).nonzero().max())
        remaining -= int(at_least[d] - hist[d])
        prefix |= d << shift
    return float(torch.tensor(prefix, dtype=torch.int32).view(torch.float32))
