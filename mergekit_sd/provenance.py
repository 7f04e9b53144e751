"""Metadata written into every output: sdbuild provenance, AUTOMATIC1111-compatible fields, ModelSpec.

Everything is a string (safetensors metadata is str -> str) and deterministic: no timestamps, no absolute paths,
no user or machine names. The recipe subgraph that made a node is embedded, with every input's digests, so the
file alone says how to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import TOOL
from .hashing import canonical

SCHEMA_VERSION = 1
PROVENANCE_KEY = "sdbuild.provenance"
MODELSPEC_VERSION = "1.0.1"
A1111_METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}
SUPERMERGER_MODES = {"weighted_sum": "Weight sum", "add_difference": "Add difference", "triple_sum": "Triple sum", "sum_twice": "sum Twice"}
RESOLUTION = {"stable-diffusion-v1": "512x512", "stable-diffusion-v2-512": "512x512", "stable-diffusion-v2-768-v": "768x768",
              "stable-diffusion-xl-v1-base": "1024x1024", "stable-diffusion-xl-v1-refiner": "1024x1024"}


@dataclass
class NodeFacts:
    """What the executor knows about one node of the subgraph when it writes a descendant."""

    name: str
    kind: str  # "input" | "step"
    digest: str
    sha256: str | None = None
    legacy_hash: str | None = None
    file: str | None = None  # inputs: file name only
    credits: Mapping[str, str] = field(default_factory=dict)
    op: str | None = None
    version: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    refs: tuple[str, ...] = ()
    compute_key: str | None = None
    log: list[str] = field(default_factory=list)
    facts: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)  # the node's own file metadata (lineage)


def build_metadata(recipe, node: str, nodes: list[NodeFacts], architecture: str | None, output_kind: str = "checkpoint",
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata for the object of `node`; `nodes` is its subgraph in build order (the node itself last)."""
    by = {n.name: n for n in nodes}
    me = by[node]
    inputs = {n.name: _input_entry(n) for n in nodes if n.kind == "input"}
    steps = {n.name: {"op": n.op, **{k: v for k, v in n.params.items()}} for n in nodes if n.kind == "step"}
    prov: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "tool": TOOL,
        "node": node,
        "recipe": {
            "sdbuild": 1,
            "name": recipe.name,
            "card": dict(recipe.card),
            "inputs": inputs,
            "steps": steps,
            "outputs": {node: list(recipe.outputs.get(node, ()))},
        },
        "nodes": {n.name: {"op": n.op, "version": n.version, "key": n.compute_key, "digest": n.digest if n.name != node else None}
                  for n in nodes if n.kind == "step"},
    }
    logs = {n.name: list(n.log) for n in nodes if n.kind == "step" and n.log}
    if logs:
        prov["log"] = logs
    facts = {n.name: dict(n.facts) for n in nodes if n.kind == "step" and n.facts}
    if facts:
        prov["facts"] = facts
    lineage = lineage_of(nodes)
    if lineage:
        prov["lineage"] = lineage
    meta: dict[str, str] = {"format": "pt", PROVENANCE_KEY: canonical(prov)}
    meta.update(a1111_fields(me, by))
    meta.update(modelspec_fields(recipe, node, nodes, architecture, output_kind))
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


def _input_entry(n: NodeFacts) -> dict[str, Any]:
    e: dict[str, Any] = {"file": n.file, "digest": n.digest, "sha256": n.sha256}
    if n.legacy_hash:
        e["legacy_hash"] = n.legacy_hash
    e.update(dict(n.credits))
    return e


def lineage_of(nodes: list[NodeFacts]) -> dict[str, Any]:
    """Provenance carried by inputs (earlier generations), de-duplicated by content digest."""
    out: dict[str, Any] = {}
    for n in nodes:
        if n.kind != "input":
            continue
        meta = n.metadata or {}
        if PROVENANCE_KEY in meta:
            try:
                out[n.digest] = json.loads(meta[PROVENANCE_KEY])
            except ValueError:
                out[n.digest] = {"unparsed": True}
        elif "sd_merge_recipe" in meta or any(k.startswith("ss_") for k in meta):
            out[n.digest] = {"foreign": {k: v for k, v in sorted(meta.items()) if k in ("sd_merge_recipe", "sd_merge_models") or k.startswith("ss_")}}
    return out


def a1111_fields(me: NodeFacts, by: Mapping[str, NodeFacts]) -> dict[str, str]:
    if me.kind != "step":
        return {}
    refs = [by[r] for r in me.refs if r in by]
    shas = [r.sha256 for r in refs]
    models = {}
    for r in refs:
        if r.sha256:
            models[r.sha256] = {"name": r.file or f"{r.name}.safetensors", "legacy_hash": r.legacy_hash or "", "sd_merge_recipe": _nested_recipe(r)}
    alpha = me.params.get("alpha")
    recipe: dict[str, Any]
    if me.op in A1111_METHODS and isinstance(alpha, (int, float)):
        recipe = {
            "type": "webui",
            "primary_model_hash": shas[0] if shas else None,
            "secondary_model_hash": shas[1] if len(shas) > 1 else None,
            "tertiary_model_hash": shas[2] if len(shas) > 2 else None,
            "interp_method": A1111_METHODS[me.op],
            "multiplier": alpha,
            "save_as_half": me.params.get("dtype") == "fp16",
            "custom_name": me.name,
            "config_source": 0,
            "bake_in_vae": "None",
            "discard_weights": "",
            "is_inpainting": False,
            "is_instruct_pix2pix": False,
        }
    else:
        recipe = {"type": "sdbuild", "op": me.op, "models": shas, "params": {k: v for k, v in me.params.items() if k not in ("models", "model")}}
    return {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}


def _nested_recipe(n: NodeFacts) -> Any:
    raw = (n.metadata or {}).get("sd_merge_recipe")
    if raw and raw.startswith("{"):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return None


def modelspec_fields(recipe, node: str, nodes: list[NodeFacts], architecture: str | None, output_kind: str) -> dict[str, str]:
    card = dict(recipe.card)
    arch = architecture or "unknown"
    if output_kind == "lora" and not arch.endswith("/lora"):
        arch += "/lora"
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": card.pop("title", None) or (recipe.name if node in recipe.outputs else f"{recipe.name}/{node}"),
    }
    res = RESOLUTION.get(architecture or "")
    if res:
        out["modelspec.resolution"] = card.pop("resolution", res)
    titles = []
    for n in nodes:
        if n.kind == "input":
            titles.append((n.metadata or {}).get("modelspec.title") or (n.file or n.name).rsplit(".", 1)[0])
    if titles:
        out["modelspec.merged_from"] = ", ".join(titles)
    for k, v in card.items():
        out[f"modelspec.{k}"] = v
    return out


def read_provenance(metadata: Mapping[str, str]) -> dict | None:
    raw = metadata.get(PROVENANCE_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
