"""Lineage rendering: a file's recorded generations as an indented tree or as nested JSON (`sdbuild inspect --tree`).

The lineage table itself (earlier generations keyed by content digest) is built by `provenance.record`; this
module only reads it back, together with any AUTOMATIC1111 / supermerger / kohya metadata it holds.
"""

from __future__ import annotations

from typing import Any, Mapping

from mergekit_sd.ops import op_defaults
from mergekit_sd.provenance.a1111 import parse_merge_metadata
from mergekit_sd.provenance.record import CONTENT_DIGEST_KEY, lineage_entry, read_provenance, refs_in


def lineage_lines(metadata: Mapping[str, str], file_name: str) -> list[str]:
    """An indented tree: the node's steps, their inputs, and every earlier generation recorded in lineage."""
    prov = read_provenance(metadata)
    digest = metadata.get(CONTENT_DIGEST_KEY)
    head = f"{file_name}" + (f"  [digest {digest[:16]}]" if digest else "")
    lines = [head]
    if prov is not None:
        table = prov.get("lineage") or {}
        _render_prov(prov, lines, "", table, set())
        return lines
    entry = lineage_entry(metadata)
    if entry is None:
        lines.append("└─ (no provenance: neither sdbuild nor AUTOMATIC1111/supermerger/kohya metadata)")
    else:
        _render_foreign(entry["foreign"], lines, "")
    return lines


def _short_params(params: Mapping[str, Any], op: str | None = None) -> str:
    """Parameters worth showing in a tree line: not references, not the op's defaults."""
    defaults: dict[str, Any] = {}
    if op:
        defaults = op_defaults(op) or {}
    bits = []
    for k, v in params.items():
        if k in ("models", "model", "op") or v is None or (k in defaults and defaults[k] == v):
            continue
        if isinstance(v, bool) or isinstance(v, (int, float, str)):
            bits.append(f"{k} {v}")
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            bits.append(f"{k} [{len(v)} block weights]")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            bits.append(f"{k} [{len(v)}]")
        elif isinstance(v, dict):
            bits.append(f"{k} {{{len(v)} selectors}}")
    return ", ".join(bits)


def _render_prov(prov: Mapping[str, Any], lines: list[str], prefix: str, table: Mapping[str, Any], seen: set[str]) -> None:
    recipe = prov.get("recipe") or {}
    inputs = recipe.get("inputs") or {}
    steps = recipe.get("steps") or {}
    names = set(inputs) | set(steps)
    node = prov.get("node")
    lines.append(f"{prefix}└─ recipe {recipe.get('name')!r}, node {node!r} ({prov.get('tool', 'sdbuild')})")
    _render_node(node, inputs, steps, names, lines, prefix + "   ", table, seen, last=True, top=True)


def _render_node(name: str, inputs: Mapping, steps: Mapping, names: set[str], lines: list[str], prefix: str,
                 table: Mapping[str, Any], seen: set[str], last: bool, top: bool = False) -> None:
    branch = "└─ " if last else "├─ "
    child_prefix = prefix + ("   " if last else "│  ")
    if name in steps:
        st = steps[name]
        params = _short_params(st, st.get("op"))
        lines.append(f"{prefix}{branch}{name} = {st.get('op')}" + (f" ({params})" if params else ""))
        refs = refs_in([st.get("model"), st.get("models")] + [v for k, v in st.items() if k not in ("op", "model", "models")],
                        names - {name})
        for i, r in enumerate(refs):
            _render_node(r, inputs, steps, names, lines, child_prefix, table, seen, last=i == len(refs) - 1)
        return
    e = inputs.get(name) or {}
    d = e.get("digest") or ""
    credit = f", by {e['author']}" if e.get("author") else ""
    lines.append(f"{prefix}{branch}{name}: {e.get('file')}  [digest {d[:16]}, sha256 {(e.get('sha256') or '')[:10]}{credit}]")
    entry = table.get(d)
    if entry is None:
        return
    if d in seen:
        lines.append(f"{child_prefix}└─ (lineage shown above)")
        return
    seen.add(d)
    if "recipe" in entry:
        _render_prov(entry, lines, child_prefix, table, seen)
    elif "foreign" in entry:
        _render_foreign(entry["foreign"], lines, child_prefix)
    else:
        lines.append(f"{child_prefix}└─ (lineage {', '.join(sorted(entry))})")


def _render_foreign(foreign: Mapping[str, str], lines: list[str], prefix: str) -> None:
    rec = parse_merge_metadata(foreign)
    if rec is None:
        kohya = foreign.get("ss_output_name") or foreign.get("ss_sd_model_name")
        what = f"kohya training metadata ({kohya})" if kohya else "foreign metadata without a merge recipe"
        lines.append(f"{prefix}└─ {what}")
        return
    params = _short_params(rec.params)
    lines.append(f"{prefix}└─ {rec.flavour} merge: {rec.op or 'no interpolation'}" + (f" ({params})" if params else ""))
    sub = prefix + "   "
    for i, m in enumerate(rec.models):
        branch = "└─ " if i == len(rec.models) - 1 and not rec.ancestry else "├─ "
        lines.append(f"{sub}{branch}{m.name or '?'}  [sha256 {(m.sha256 or '')[:10]}{', legacy ' + m.legacy_hash if m.legacy_hash else ''}]")
    if rec.ancestry:
        lines.append(f"{sub}└─ earlier: " + ", ".join(f"{(r.name or '?')} [{sha[:10]}]" for sha, r in sorted(rec.ancestry.items())))


def lineage_json(metadata: Mapping[str, str], file_name: str) -> dict[str, Any]:
    """The lineage as nested JSON: each generation's recipe, steps and inputs, each input with its own lineage."""
    prov = read_provenance(metadata)
    out: dict[str, Any] = {"file": file_name, "digest": metadata.get(CONTENT_DIGEST_KEY)}
    if prov is not None:
        out.update(_json_prov(prov, prov.get("lineage") or {}, set()))
        return out
    entry = lineage_entry(metadata)
    out["foreign"] = _json_foreign(entry["foreign"]) if entry and "foreign" in entry else None
    return out


def _json_prov(prov: Mapping[str, Any], table: Mapping[str, Any], seen: set[str]) -> dict[str, Any]:
    recipe = prov.get("recipe") or {}
    inputs: dict[str, Any] = {}
    for name, e in (recipe.get("inputs") or {}).items():
        d = e.get("digest") or ""
        item = {k: e.get(k) for k in ("file", "digest", "sha256", "author", "url") if e.get(k)}
        entry = table.get(d)
        if entry is not None:
            if d in seen:
                item["lineage"] = {"see": d}
            else:
                seen.add(d)
                if "recipe" in entry:
                    item["lineage"] = _json_prov(entry, table, seen)
                elif "foreign" in entry:
                    item["lineage"] = {"foreign": _json_foreign(entry["foreign"])}
                else:
                    item["lineage"] = dict(entry)
        inputs[name] = item
    return {"tool": prov.get("tool"), "recipe": recipe.get("name"), "node": prov.get("node"),
            "steps": recipe.get("steps") or {}, "nodes": prov.get("nodes") or {}, "inputs": inputs}


def _json_foreign(foreign: Mapping[str, str]) -> dict[str, Any]:
    rec = parse_merge_metadata(foreign)
    if rec is None:
        return {"kohya": {k: v for k, v in foreign.items() if k in ("ss_output_name", "ss_sd_model_name", "ss_network_module",
                                                                     "ss_base_model_version")}}
    return {"flavour": rec.flavour, "op": rec.op, "params": rec.params, "notes": rec.notes,
            "models": [{"sha256": m.sha256, "name": m.name, "legacy_hash": m.legacy_hash} for m in rec.models],
            "ancestry": {sha: {"name": r.name, "legacy_hash": r.legacy_hash} for sha, r in sorted(rec.ancestry.items())}}
