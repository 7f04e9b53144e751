"""`sdbuild similar`: rank models by relative distance |MODEL - X| / |MODEL|, globally and per block.

One pass over MODEL and every candidate (stream.py, differences from MODEL, sums in fp64): the distance of X is the
square root of its diagonal Gram entry over MODEL's squared norm, summed over all compared tensors or one block's.
"""

from __future__ import annotations

import math
import os
from typing import Any

from mergekit_sd.engine.progress import Progress
from mergekit_sd.errors import UserError
from mergekit_sd.ops import pick_device
from mergekit_sd.forensics.sources import open_checkpoint, open_many
from mergekit_sd.forensics.stream import stream


def _ratio(num_sq: float, den_sq: float) -> float:
    return math.sqrt(max(num_sq, 0.0) / den_sq) if den_sq > 0 else (0.0 if num_sq <= 0 else float("inf"))


def similar(model: str | os.PathLike, among: list[str | os.PathLike], *, blocks: bool = False, device: str = "cpu",
            progress: Progress | None = None) -> dict[str, Any]:
    """{"model", "ranking": [{"file", "distance", "blocks"?}], "blocks": [order], "skipped", "tensors"}, nearest first."""
    dev = pick_device(device)
    m = open_checkpoint(model)
    cands, skipped = open_many(list(among), exclude=m.path, arch=m.arch)
    if not cands:
        where = ", ".join(str(a) for a in among)
        raise UserError(f"no {m.arch.describe()} checkpoints to compare with in {where}" + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    res = stream([m, *cands], reference=0, device=dev, progress=progress, label="similar")
    if res.keys == 0:
        raise UserError("shares no tensors with the candidates (same names and shapes); nothing to compare", m.name)
    total = res.total()
    ranking = []
    for j, c in enumerate(cands, start=1):
        entry: dict[str, Any] = {"file": c.name, "distance": round(_ratio(total.gram[j, j], total.sq[0]), 6)}
        if blocks:
            entry["blocks"] = {b: round(_ratio(res.buckets[b].gram[j, j], res.buckets[b].sq[0]), 6)
                               for b in res.order if b in res.buckets}
        ranking.append(entry)
    ranking.sort(key=lambda e: (e["distance"], e["file"]))
    out: dict[str, Any] = {"model": m.name, "ranking": ranking, "tensors": res.keys, "skipped": skipped}
    if blocks:
        out["blocks"] = [b for b in res.order if b in res.buckets]
    if res.not_shared:
        out["not_compared"] = res.not_shared
    return out
