"""`sdbuild graph`: the recipe's DAG with each node's op, key parameters and fresh/stale state, as Mermaid or DOT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergekit_sd.engine.planner import NodeState, Planner
from mergekit_sd.errors import UserError
from mergekit_sd.ops import op_defaults
from mergekit_sd.provenance.card import mermaid_text
from mergekit_sd.recipe.graph import build_order


@dataclass
class GraphNode:
    name: str
    op: str  # "input" for inputs
    params: str  # key parameters, short
    state: str  # fresh | stale | missing
    reason: str
    outputs: tuple[str, ...] = ()


@dataclass
class RecipeGraph:
    nodes: list[GraphNode] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def recipe_graph(planner: Planner) -> RecipeGraph:
    """Plan every node (nothing runs); an input that cannot be found is drawn as missing, not an error."""
    recipe = planner.recipe
    order = build_order(recipe, planner.graph, recipe.node_names())
    g = RecipeGraph()
    missing: set[str] = set()
    for name in order:
        if name in recipe.inputs:
            try:
                planner.plan_node(name)
                g.nodes.append(GraphNode(name, "input", recipe.inputs[name].path, "fresh", "input file", recipe.outputs.get(name, ())))
            except UserError as e:
                missing.add(name)
                planner.states[name] = NodeState(name, "input", None, "stale", str(e))
                g.nodes.append(GraphNode(name, "input", recipe.inputs[name].path or "", "missing", str(e), recipe.outputs.get(name, ())))
            continue
        step = recipe.steps[name]
        st = planner.plan_node(name)
        gone = [r for r in step.refs if r in missing]
        reason = f"input {gone[0]!r} is missing" if gone else st.reason
        if gone:
            missing.add(name)
        g.nodes.append(GraphNode(name, step.op, key_params(step.params, step.op), st.state, reason, recipe.outputs.get(name, ())))
        for r in dict.fromkeys(step.refs):
            g.edges.append((r, name))
    return g


def key_params(params: dict[str, Any], op: str) -> str:
    """Parameters worth drawing: not references, not the op's defaults; small selector maps in full."""
    defaults = op_defaults(op) or {}
    bits = []
    for k, v in params.items():
        if k in ("model", "models") or v is None or (k in defaults and defaults[k] == v):
            continue
        if isinstance(v, (bool, int, float, str)):
            bits.append(f"{k} {v}")
        elif isinstance(v, dict) and len(v) <= 4 and all(isinstance(x, (int, float, str)) for x in v.values()):
            bits.append(f"{k} {{" + ", ".join(f"{a}: {b}" for a, b in v.items()) + "}")
        elif isinstance(v, dict):
            bits.append(f"{k} {{{len(v)} selectors}}")
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            bits.append(f"{k} [{len(v)} block weights]")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            bits.append(f"{k} [{len(v)}]")
    return ", ".join(bits)


STYLE = {"fresh": ("#e3f5e1", "#2e7d32"), "stale": ("#fff3cd", "#b26a00"), "missing": ("#fde2e2", "#c62828")}


def _label_lines(n: GraphNode) -> list[str]:
    lines = [n.name, n.op if n.op != "input" else f"input {n.params}".rstrip()]
    if n.op != "input" and n.params:
        lines.append(n.params)
    lines.append(n.state if n.state == "fresh" or n.op == "input" and n.state != "missing" else f"{n.state}: {n.reason}")
    lines += [f"-> {o}" for o in n.outputs]
    return lines


def to_mermaid(g: RecipeGraph) -> str:
    ids = {n.name: f"n{i}" for i, n in enumerate(g.nodes)}
    out = ["graph LR"]
    for n in g.nodes:
        label = "<br/>".join(mermaid_text(x) for x in _label_lines(n))
        a, b = ('[("', '")]') if n.op == "input" else ('["', '"]')
        out.append(f"  {ids[n.name]}{a}{label}{b}")
    for u, v in g.edges:
        out.append(f"  {ids[u]} --> {ids[v]}")
    for state, (fill, stroke) in STYLE.items():
        members = [ids[n.name] for n in g.nodes if n.state == state]
        if members:
            out.append(f"  classDef {state} fill:{fill},stroke:{stroke}")
            out.append(f"  class {','.join(members)} {state}")
    return "\n".join(out) + "\n"


def _dot_text(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: RecipeGraph) -> str:
    out = ["digraph recipe {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for n in g.nodes:
        fill, stroke = STYLE[n.state]
        label = "\\n".join(_dot_text(x) for x in _label_lines(n))
        shape = ", shape=cylinder" if n.op == "input" else ""
        out.append(f'  "{_dot_text(n.name)}" [label="{label}", fillcolor="{fill}", color="{stroke}"{shape}];')
    for u, v in g.edges:
        out.append(f'  "{_dot_text(u)}" -> "{_dot_text(v)}";')
    out.append("}")
    return "\n".join(out) + "\n"


def to_text(g: RecipeGraph) -> str:
    """A plain listing: each node, what it reads, its state."""
    reads: dict[str, list[str]] = {}
    for u, v in g.edges:
        reads.setdefault(v, []).append(u)
    width = max([len(n.name) for n in g.nodes] + [4])
    out = []
    for n in g.nodes:
        src = f" <- {', '.join(reads[n.name])}" if n.name in reads else ""
        what = f"{n.op} {n.params}".strip() if n.op != "input" else f"input {n.params}"
        out.append(f"{n.name:<{width}}  {n.state:<7}  {what}{src}")
    return "\n".join(out) + "\n"
