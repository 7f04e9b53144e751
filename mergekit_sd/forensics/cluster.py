"""Average-linkage hierarchical clustering (UPGMA) of a small distance matrix, its cut into families, and the tree
as Mermaid text.

A few dozen model files at most: a plain O(n³) implementation is exact, deterministic (ties broken by cluster
number) and needs no dependency. The linkage rows follow scipy's convention: (cluster a, cluster b, distance,
size), new clusters numbered n, n+1, ...
"""

from __future__ import annotations

import numpy as np

Link = tuple[int, int, float, int]


def average_linkage(d: np.ndarray) -> list[Link]:
    """Merge the two closest clusters until one is left; cluster distance = mean of their members' distances."""
    n = d.shape[0]
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    links: list[Link] = []
    nxt = n
    while len(members) > 1:
        ids = sorted(members)
        best: tuple[float, int, int] | None = None
        for x, a in enumerate(ids):
            for b in ids[x + 1:]:
                dist = float(np.mean([d[i, j] for i in members[a] for j in members[b]]))
                if best is None or dist < best[0] - 1e-15:
                    best = (dist, a, b)
        assert best is not None
        dist, a, b = best
        members[nxt] = members.pop(a) + members.pop(b)
        links.append((a, b, dist, len(members[nxt])))
        nxt += 1
    return links


def cut(links: list[Link], n: int, threshold: float) -> list[list[int]]:
    """Clusters joined at a distance <= threshold: lists of leaf indices, each sorted, ordered by first leaf."""
    groups: dict[int, list[int]] = {i: [i] for i in range(n)}
    for idx, (a, b, dist, _) in enumerate(links):
        if dist <= threshold and a in groups and b in groups:
            groups[n + idx] = groups.pop(a) + groups.pop(b)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def leaf_order(links: list[Link], n: int) -> list[int]:
    """Leaves left to right as a dendrogram draws them."""
    if n == 1:
        return [0]
    children = {n + i: (a, b) for i, (a, b, _, _) in enumerate(links)}

    def walk(c: int) -> list[int]:
        return [c] if c < n else walk(children[c][0]) + walk(children[c][1])

    return walk(n + len(links) - 1)


def mermaid(links: list[Link], names: list[str], prefix: str = "") -> list[str]:
    """Mermaid `graph` lines: inner nodes carry the distance at which their two sides join."""
    n = len(names)
    lines = [f'  {prefix}f{i}["{names[i]}"]' for i in range(n)]
    for i, (a, b, dist, _) in enumerate(links):
        node = f"{prefix}j{n + i}"
        lines.append(f'  {node}(("{dist:.3f}"))')
        for c in (a, b):
            lines.append(f"  {node} --- {prefix}{'f' if c < n else 'j'}{c}")
    return lines
