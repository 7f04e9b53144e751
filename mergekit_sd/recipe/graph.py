"""The build graph: inputs and steps as one DAG, validated before anything runs."""

from __future__ import annotations

from typing import Iterable

import networkx as nx

from mergekit_sd.errors import UserError, did_you_mean
from mergekit_sd.recipe.load import Recipe
from mergekit_sd.recipe.matrix import resolve_targets


def build_graph(recipe: Recipe) -> nx.DiGraph:
    g = nx.DiGraph()
    for name in recipe.inputs:
        g.add_node(name, kind="input")
    for name, step in recipe.steps.items():
        g.add_node(name, kind="step")
    for name, step in recipe.steps.items():
        for r in step.refs:
            g.add_edge(r, name)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [u for u, _ in cycle] + [cycle[0][0]]
        first = min(names[:-1], key=lambda n: recipe.steps[n].line if n in recipe.steps else 0)
        i = names.index(first)
        ordered = names[i:-1] + names[:i] + [first]
        raise UserError(f"steps form a cycle: {' -> '.join(ordered)}", recipe.where("steps", first))
    return g


def build_order(recipe: Recipe, g: nx.DiGraph, targets: Iterable[str] | None = None) -> list[str]:
    """Nodes needed for `targets` (default: every output) in a deterministic topological order."""
    wanted = resolve_targets(list(targets), recipe.variants) if targets else list(recipe.outputs)
    known = recipe.node_names()
    needed: set[str] = set()
    for t in wanted:
        if t not in g:
            raise UserError(f"no input or step named {t!r}{did_you_mean(t, known)}", recipe.path.name)
        needed.add(t)
        needed |= nx.ancestors(g, t)
    sub = g.subgraph(needed)
    order = {n: i for i, n in enumerate(known)}
    return list(nx.lexicographical_topological_sort(sub, key=lambda n: order[n]))


def subgraph_of(recipe: Recipe, g: nx.DiGraph, node: str) -> list[str]:
    """Every node `node` depends on, itself included, in build order."""
    return build_order(recipe, g, [node])
