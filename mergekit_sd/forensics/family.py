"""`sdbuild family`: every pairwise distance in one pass over the files, and the families they form.

Files are grouped by architecture first (files of different architectures are never in one family and have no
distance). Within a group, one streaming pass accumulates the Gram matrix of differences from the group's first
file (sums in fp64); then |Xi - Xj|² = G[i,i] + G[j,j] - 2 G[i,j] for every pair, made relative to the pair's mean
squared norm. Average-linkage clustering cut at `cut` (default 0.5) gives the families: fine-tunes and merges of
one base sit well below it, unrelated models (independent training) near √2 ≈ 1.41.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from mergekit_sd.engine.progress import Progress
from mergekit_sd.errors import UserError
from mergekit_sd.forensics.cluster import Link, average_linkage, cut, leaf_order, mermaid
from mergekit_sd.ops import pick_device
from mergekit_sd.forensics.sources import open_many
from mergekit_sd.forensics.stream import stream

DEFAULT_CUT = 0.5


def pairwise(gram: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """Relative distances |Xi - Xj| / sqrt((|Xi|² + |Xj|²)/2) from a Gram matrix of differences from one member."""
    diag = np.diag(gram)
    num = np.maximum(diag[:, None] + diag[None, :] - 2 * gram, 0.0)
    den = (sq[:, None] + sq[None, :]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den > 0, np.sqrt(num / np.where(den > 0, den, 1.0)), 0.0)
    np.fill_diagonal(d, 0.0)
    return (d + d.T) / 2


def family(items: list[str | os.PathLike], *, cut_at: float | None = None, device: str = "cpu",
           progress: Progress | None = None) -> dict[str, Any]:
    """{"files", "architectures", "distance" (None across architectures), "families", "trees", "skipped", "cut"}."""
    threshold = DEFAULT_CUT if cut_at is None else float(cut_at)
    if not math.isfinite(threshold) or threshold < 0:
        raise UserError(f"--cut must be a distance >= 0, got {cut_at!r}")
    dev = pick_device(device)
    members, skipped = open_many(list(items))
    if len(members) < 2:
        raise UserError(f"family needs at least two checkpoints; found {len(members)}" + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.arch.arch, []).append(i)
    n = len(members)
    dist: list[list[float | None]] = [[None] * n for _ in range(n)]
    families: list[list[int]] = []
    trees: list[dict[str, Any]] = []
    compared: dict[str, int] = {}
    for arch, idx in groups.items():
        for i in idx:
            dist[i][i] = 0.0
        if len(idx) == 1:
            families.append(idx)
            trees.append({"architecture": arch, "files": [members[idx[0]].name], "links": []})
            continue
        group = [members[i] for i in idx]
        res = stream(group, reference=0, device=dev, progress=progress, label=f"family {arch}")
        compared[arch] = res.keys
        if res.keys == 0:
            raise UserError(f"the {arch} files share no tensors (same names and shapes); nothing to compare: "
                            + ", ".join(m.name for m in group))
        total = res.total()
        d = pairwise(total.gram, total.sq)
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                dist[i][j] = round(float(d[a, b]), 6)
        links = average_linkage(d)
        families += [[idx[a] for a in fam] for fam in cut(links, len(idx), threshold)]
        trees.append({"architecture": arch, "files": [m.name for m in group], "links": _links_json(links),
                      "order": leaf_order(links, len(idx))})
    families.sort(key=lambda f: f[0])
    return {"files": [m.name for m in members], "architectures": [m.arch.describe() for m in members],
            "distance": dist, "families": [[members[i].name for i in f] for f in families], "cut": threshold,
            "trees": trees, "tensors": compared, "skipped": skipped}


def _links_json(links: list[Link]) -> list[dict[str, Any]]:
    return [{"a": a, "b": b, "distance": round(dd, 6), "size": s} for a, b, dd, s in links]


def family_mermaid(report: dict[str, Any]) -> str:
    """The trees as one Mermaid diagram (one subgraph per architecture)."""
    lines = ["graph LR"]
    for t, tree in enumerate(report["trees"]):
        links = [(e["a"], e["b"], e["distance"], e["size"]) for e in tree["links"]]
        names = [os.path.basename(f) for f in tree["files"]]
        lines.append(f'  subgraph g{t}["{tree["architecture"]}"]')
        lines += ["  " + line for line in mermaid(links, names, prefix=f"g{t}")]
        lines.append("  end")
    return "\n".join(lines) + "\n"
