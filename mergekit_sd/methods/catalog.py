"""What `sdbuild methods` prints and README's methods table shows: read from the method registry, never restated."""

from __future__ import annotations

from typing import Any

from mergekit_sd.arch.blocks import DEFAULT_RULE, RULES, TRANSFORMER_RULE
from mergekit_sd.methods import REQUIRED, Method, load_methods

# what the models of a method are, when the signature's names say too little
_MODEL_HINT = {"base": "base", "m1": "M1", "m2": "M2", "a": "A", "b": "B", "c": "C"}


def _models(m: Method) -> str:
    names = ["..." if n.startswith("*") else _MODEL_HINT.get(n, n) for n in m.model_names]
    return "[" + ", ".join(names) + "]" if m.max_models != 1 else names[0] if names else "A"


def _param(p) -> dict[str, Any]:
    d: dict[str, Any] = {"name": p.name, "kind": p.kind}
    d["required"] = p.default is REQUIRED
    if p.default is not REQUIRED:
        d["default"] = p.default
    if p.choices:
        d["choices"] = list(p.choices)
    if p.doc:
        d["doc"] = p.doc
    return d


def describe_methods() -> list[dict]:
    """Every registered merge method: name, models, parameters (kind/default/choices), formula, version, doc."""
    out = []
    for name, m in sorted(load_methods().items()):
        out.append({
            "name": name,
            "models": _models(m),
            "min_models": m.min_models,
            "max_models": m.max_models,
            "params": [_param(p) for p in m.params],
            "formula": m.formula,
            "version": m.version,
            "doc": m.doc,
            "uses_base": m.uses_base,
        })
    return out


def _param_text(p: dict) -> str:
    if p["required"]:
        return p["name"]
    s = f"{p['name']}={p['default']}"
    if p.get("choices"):
        s = f"{p['name']}={'|'.join(map(str, p['choices']))} ({p['default']})"
    return s


def format_methods_table() -> str:
    """The method list for a terminal: one block per method."""
    lines = []
    for d in describe_methods():
        params = ", ".join(_param_text(p) for p in d["params"]) or "-"
        lines.append(f"{d['name']}  v{d['version']}  models {d['models']}  params {params}")
        lines.append(f"    {d['formula']}")
        if d["doc"]:
            lines.append(f"    {d['doc']}")
    lines.append("")
    lines.append("Weight parameters (alpha, beta, ...) take a number or block weights; every merge op also takes")
    lines.append("dtype, on_missing, block_rule (" + ", ".join(RULES) + f"; default {DEFAULT_RULE},")
    lines.append(f"{TRANSFORMER_RULE} on Flux and SD3/3.5), elemental, include, exclude.")
    return "\n".join(lines)


def format_methods_markdown() -> str:
    """README's methods table (Markdown)."""
    rows = ["| op | models | parameters (default) | formula |", "| --- | --- | --- | --- |"]
    for d in describe_methods():
        params = ", ".join(f"`{_param_text(p)}`".replace("|", "\\|") for p in d["params"]) or "—"
        formula = d["formula"].replace("|", "\\|")
        rows.append(f"| `{d['name']}` | {d['models']} | {params} | `{formula}` |")
    return "\n".join(rows)
