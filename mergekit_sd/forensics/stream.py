"""One streaming pass over several models: Gram matrices of their differences from a reference, in fp64.

Every forensic number is an inner product of model differences. Reading each file once, chunk by chunk of every
tensor, this accumulates per bucket (a block of the architecture's block map, or VAE) the Gram matrix
G[i, j] = <X_i - R, X_j - R> of every member's difference from the reference member R, and each member's squared
norm. Differences are taken in fp64 before any product, so two models that agree to the last fp16 bit do not
lose their difference to cancellation, and sums run in fp64 whatever the tensor size.

Only tensors that every member has with the same shape and that belong to a model component (UNet, text
encoders, VAE: no EMA copies or other junk, no integer tensors or CLIP position ids) are compared. Memory stays
at a few chunks per member, so peak RSS does not grow with the model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mergekit_sd.arch.blocks import VAE, block_of, blocks_for, is_vae_key
from mergekit_sd.arch.components import COMPONENTS, classify
from mergekit_sd.engine.progress import Progress
from mergekit_sd.forensics.sources import Member

CHUNK_BYTES = 16 << 20  # fp64 working set per chunk across all members
MIN_CHUNK = 1 << 14
# mantissa bits (with the implicit bit) and smallest exponent of the float types models are stored in
_MANTISSA = {torch.float16: (11, -24), torch.bfloat16: (8, -133), torch.float32: (24, -149), torch.float64: (53, -1074)}


@dataclass
class Bucket:
    """What one bucket accumulated: Gram of differences from the reference, squared norms, counts."""

    gram: np.ndarray
    sq: np.ndarray
    tensors: int = 0
    elements: int = 0
    rounding: float = 0.0  # expected squared rounding error of the query member's stored values


@dataclass
class StreamResult:
    names: list[str]
    reference: int
    buckets: dict[str, Bucket]
    order: list[str]  # bucket names in block-map order
    keys: int  # tensors compared
    not_shared: int  # tensors some member lacks (or holds with another shape): not compared
    identical: dict[int, int] = field(default_factory=dict)  # member -> tensors of the query bit-identical to it
    # tensors skipped because the query equals a member there: per bucket, how many, and which members matched all
    skipped: dict[str, int] = field(default_factory=dict)
    kept_from: dict[str, set[int]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # tensors per bucket, compared or skipped

    def total(self) -> Bucket:
        n = len(self.names)
        out = Bucket(np.zeros((n, n)), np.zeros(n))
        for b in self.buckets.values():
            out.gram += b.gram
            out.sq += b.sq
            out.tensors += b.tensors
            out.elements += b.elements
            out.rounding += b.rounding
        return out


def shared_keys(members: list[Member]) -> tuple[list[str], int]:
    """Float component tensors every member holds with one shape (sorted), and how many others there were."""
    first = members[0].model
    cats = classify(first.specs).category
    every: set[str] = set()
    for m in members:
        every |= set(m.model.specs)
    keys = []
    for k in sorted(every):
        specs = [m.model.specs.get(k) for m in members]
        if any(s is None for s in specs):
            continue
        if cats.get(k) not in COMPONENTS or k.endswith("position_ids"):
            continue
        if not all(s.dtype.is_floating_point for s in specs) or len({s.shape for s in specs}) != 1 or specs[0].numel == 0:
            continue
        keys.append(k)
    not_shared = sum(1 for k in every if not all(k in m.model.specs for m in members)
                     or len({m.model.specs[k].shape for m in members}) != 1)
    return keys, not_shared


def block_buckets(family: str | None) -> tuple[Callable[[str], str], list[str]]:
    """Tensor name -> bucket (its block under the default block rule, or VAE), and the buckets in order."""
    if family is None:
        return (lambda key: "ALL"), ["ALL"]

    def bucket(key: str) -> str:
        if is_vae_key(key):
            return VAE
        return block_of(key, family) or "BASE"

    return bucket, list(blocks_for(family, vae=True))


def rounding_variance(t: torch.Tensor) -> float:
    """Expected squared error of rounding exact values to `t`'s float type: ulp²/12 summed over its elements."""
    bits, tiny = _MANTISSA.get(t.dtype, (24, -149))
    x = t.to(torch.float32) if t.dtype != torch.float64 else t
    exp = torch.frexp(x).exponent.to(torch.float64)
    ulp = torch.exp2(torch.clamp(exp - bits, min=tiny))
    ulp = torch.where(x == 0, torch.zeros_like(ulp), ulp)
    return float((ulp * ulp).sum()) / 12.0


def stream(members: list[Member], *, reference: int, device: torch.device, progress: Progress | None = None,
           label: str = "reading", query: int | None = None, skip_identical: bool = False,
           rounding: bool = False) -> StreamResult:
    """Read every shared tensor of every member once and accumulate the per-bucket Gram matrices.

    With `query`, tensors of that member are compared bit for bit with every other member's (`identical`); with
    `skip_identical`, a tensor where the query equals some other member is left out of the sums (a VAE copied
    as is says nothing about merge weights). `rounding` adds the query's expected rounding error per bucket.
    """
    n = len(members)
    keys, not_shared = shared_keys(members)
    bucket_of, order = block_buckets(members[0].arch.family)
    result = StreamResult([m.name for m in members], reference, {}, [], len(keys), not_shared)
    chunk = max(MIN_CHUNK, CHUNK_BYTES // (8 * n))
    f64 = torch.float64
    for done, key in enumerate(keys):
        if progress is not None:
            progress.tensor(label, done, len(keys), key)
        numel = members[0].model.specs[key].numel
        g = torch.zeros((n, n), dtype=f64, device=device)
        sq = torch.zeros(n, dtype=f64, device=device)
        same = [True] * n
        rvar = 0.0
        work = torch.empty((n, min(chunk, numel)), dtype=f64, device=device)
        for s in range(0, numel, chunk):
            e = min(s + chunk, numel)
            raws = [m.model.get_range(key, s, e) for m in members]
            if query is not None:
                q = raws[query]
                for j in range(n):
                    if j != query and same[j]:
                        same[j] = raws[j].dtype == q.dtype and torch.equal(raws[j], q)
                if rounding:  # an estimate from every 8th element is as good and 8 times cheaper
                    sub = q[::8]
                    rvar += rounding_variance(sub) * (q.numel() / max(sub.numel(), 1))
            x = work[:, : e - s]
            for i, r in enumerate(raws):
                x[i].copy_(r)
            if device.type == "cpu":  # numpy's BLAS is several times faster than torch here for a [n, chunk] product
                xn = x.numpy()
                sq += torch.from_numpy(np.einsum("ij,ij->i", xn, xn))
                xn -= xn[reference].copy()
                g += torch.from_numpy(xn @ xn.T)
            else:
                sq += (x * x).sum(dim=1)
                x -= x[reference].clone()
                g += x @ x.T
        b = bucket_of(key)
        result.seen[b] = result.seen.get(b, 0) + 1
        matched = {j for j in range(n) if j != query and same[j]} if query is not None else set()
        for j in matched:
            result.identical[j] = result.identical.get(j, 0) + 1
        if skip_identical and matched:
            result.skipped[b] = result.skipped.get(b, 0) + 1
            result.kept_from[b] = result.kept_from.get(b, matched) & matched
            continue
        acc = result.buckets.get(b)
        if acc is None:
            acc = result.buckets[b] = Bucket(np.zeros((n, n)), np.zeros(n))
        acc.gram += g.cpu().numpy()
        acc.sq += sq.cpu().numpy()
        acc.tensors += 1
        acc.elements += numel
        acc.rounding += rvar
    if progress is not None:
        progress.tensor(label, len(keys), len(keys), "")
    result.order = [b for b in order if b in result.seen]
    return result
