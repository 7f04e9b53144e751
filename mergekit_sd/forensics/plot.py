"""Pictures of forensic reports with matplotlib (imported only when a plot is asked for; drawn off screen).

The heatmap shows `similar`'s per-block distances (blocks down, candidates across); the dendrogram shows
`family`'s average-linkage trees, one panel per architecture, with the family cut drawn as a dashed line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergekit_sd.errors import UserError
from mergekit_sd.forensics.cluster import leaf_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError("plots are written as .png, .svg or .pdf", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", metadata={"Software": None} if path.suffix.lower() == ".png" else None)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def similar_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Blocks x candidates, colour = relative distance |MODEL - X| / |MODEL| in that block."""
    plt = _pyplot()
    blocks = report["blocks"]
    cols = report["ranking"]
    values = [[c["blocks"].get(b, float("nan")) for c in cols] for b in blocks]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.28 * len(blocks)))
    im = ax.imshow(values, aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(cols)), [Path(c["file"]).stem for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_title(f"distance from {Path(report['model']).stem}, by block")
    fig.colorbar(im, ax=ax, label="|MODEL - X| / |MODEL|")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def family_dendrogram(report: dict[str, Any], path: Path) -> Path:
    """One dendrogram per architecture: leaves are files, joins are drawn at their average-linkage distance."""
    plt = _pyplot()
    trees = report["trees"]
    height = sum(max(1.2, 0.35 * len(t["files"])) for t in trees) + 0.6
    fig, axes = plt.subplots(len(trees), 1, figsize=(7, height), squeeze=False)
    for ax, tree in zip(axes[:, 0], trees):
        names = [Path(f).name for f in tree["files"]]
        n = len(names)
        links = [(e["a"], e["b"], e["distance"], e["size"]) for e in tree["links"]]
        order = leaf_order(links, n)
        y = {leaf: i for i, leaf in enumerate(order)}
        x = {leaf: 0.0 for leaf in range(n)}
        for i, (a, b, d, _) in enumerate(links):
            ax.plot([x[a], d, d, x[b]], [y[a], y[a], y[b], y[b]], color="tab:blue", lw=1.2)
            x[n + i], y[n + i] = d, (y[a] + y[b]) / 2
        ax.set_yticks(range(n), [names[leaf] for leaf in order])
        ax.axvline(report["cut"], color="tab:red", ls="--", lw=1)
        ax.set_xlabel("relative distance (average linkage)")
        ax.set_title(f"{tree['architecture']}: families cut at {report['cut']}")
        ax.set_xlim(left=0)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
