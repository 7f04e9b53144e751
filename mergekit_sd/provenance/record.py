"""Metadata written into every output: sdbuild provenance, AUTOMATIC1111-compatible fields, ModelSpec.

Everything is a string (safetensors metadata is str -> str) and deterministic: no timestamps, no absolute paths,
no user or machine names. The recipe subgraph that made a node is embedded, with every input's digests, so the
file alone says how to rebuild it.

`sdbuild.provenance`, schema 1 (canonical JSON):
  schema, tool            the schema number (readers refuse newer ones) and "sdbuild X.Y.Z"
  node                    the recipe node this file is
  recipe                  {sdbuild, name, card, inputs, steps, outputs}: the subgraph `node` needs, runnable as is;
                          inputs: {name: {file (name only), digest, sha256, autov2, legacy_hash, author?, url?, ...}}
  nodes                   {step: {op, version, key, digest (intermediate steps), block_rule?}}
  log, facts              per step: warnings, and what the op reports (method, formula, missing keys, rule, ...)
  lineage                 {content digest: entry} for every earlier generation, flattened and de-duplicated;
                          an entry is an ancestor's own {schema, tool, node, recipe, nodes, facts}, or
                          {"foreign": {sd_merge_recipe, sd_merge_models, ss_*, ...}} for files other tools made
`sdbuild.content_digest` (the file's own tensor digest) is patched in by the writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from mergekit_sd import TOOL
from mergekit_sd.arch.blocks import DEFAULT_RULE, default_rule, family_of
from mergekit_sd.arch.modelspec import resolution
from mergekit_sd.formats.digests import canonical
from mergekit_sd.provenance.a1111 import input_from_metadata, merge_fields

SCHEMA_VERSION = 1
PROVENANCE_KEY = "sdbuild.provenance"
CONTENT_DIGEST_KEY = "sdbuild.content_digest"
MODELSPEC_VERSION = "1.0.1"
# lineage is flattened and de-duplicated by content digest; past this many characters older entries keep only
# their identity, so even absurdly deep lineages stay far below the 100 MB header limit
LINEAGE_LIMIT = 4_000_000
# kohya `ss_*` values longer than this (tag frequencies, dataset folders) are summarised, not copied
FOREIGN_VALUE_LIMIT = 4096
FOREIGN_KEYS = ("sd_merge_recipe", "sd_merge_models", "modelspec.title", "modelspec.architecture", "modelspec.author",
                "modelspec.license", "modelspec.usage_hint", "modelspec.trigger_phrase", "modelspec.prompt_format",
                "modelspec.trigger_words", "modelspec.negative_hint")  # credits and prompting advice a card carries over


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
            # every output of the subgraph, so a recovered recipe writes (and reproduces) the same files
            "outputs": {n.name: list(recipe.outputs[n.name]) for n in nodes if n.name in recipe.outputs},
        },
        "nodes": {n.name: _node_entry(n, node, default_rule(family_of(architecture))) for n in nodes if n.kind == "step"},
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


def _node_entry(n: NodeFacts, node: str, fallback_rule: str = DEFAULT_RULE) -> dict[str, Any]:
    """How a step was computed: op and op version, step key, result digest, and the block rule that mapped
    tensor names to blocks (a rule is versioned by its id; ops report the one they resolved in their facts)."""
    e: dict[str, Any] = {"op": n.op, "version": n.version, "key": n.compute_key, "digest": n.digest if n.name != node else None}
    rule = (n.facts or {}).get("block_rule") or (n.params or {}).get("block_rule")
    if not rule and _has_block_weights(n.params or {}):
        rule = fallback_rule  # an op that does not report its rule used the default for the model's architecture
    if rule:
        e["block_rule"] = rule
    return e


def _has_block_weights(v: Any) -> bool:
    """Does a step's parameter tree hold block weights (a list of numbers or a selector mapping of numbers)?"""
    if isinstance(v, list):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return True
        return any(_has_block_weights(x) for x in v)
    if isinstance(v, dict):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()) and (
                "default" in v or any(str(k).isupper() or str(k).startswith("re:") for k in v)):
            return True
        return any(_has_block_weights(x) for x in v.values())
    return False


def _input_entry(n: NodeFacts) -> dict[str, Any]:
    e: dict[str, Any] = {"file": n.file, "digest": n.digest, "sha256": n.sha256}
    if n.sha256:
        e["autov2"] = n.sha256[:10]
    if n.legacy_hash:
        e["legacy_hash"] = n.legacy_hash
    e.update(dict(n.credits))
    if "license" not in e and (n.metadata or {}).get("modelspec.license"):
        e["license"] = n.metadata["modelspec.license"]  # the licence the file states, unless the recipe says otherwise
    return e


def lineage_of(nodes: list[NodeFacts]) -> dict[str, Any]:
    """Provenance of earlier generations, flattened into one table keyed by content digest.

    An input with sdbuild provenance contributes its own entry (recipe subgraph, node, versions) and its own
    lineage table; an input with AUTOMATIC1111, supermerger or kohya metadata contributes those fields. Entries
    refer to their inputs by digest, so the tree is rebuilt from the table; a shared ancestor appears once.
    sdbuild provenance whose recorded digest is not the file's (another tool copied a parent's metadata) is
    filed under the digest it records, as the ancestor it describes.
    """
    out: dict[str, Any] = {}
    nested: list[dict[str, Any]] = []
    for n in nodes:
        if n.kind != "input" or n.digest in out:
            continue
        meta = n.metadata or {}
        prov = read_provenance(meta)
        recorded = meta.get(CONTENT_DIGEST_KEY)
        if prov is not None and recorded and recorded != n.digest:
            entry = _foreign_entry(meta)
            if entry is not None:
                out[n.digest] = entry
            out.setdefault(recorded, _own_entry(prov))
        else:
            entry = lineage_entry(meta)
            if entry is None:
                continue
            out[n.digest] = entry
        if prov and isinstance(prov.get("lineage"), dict):
            nested.append(prov["lineage"])
    for table in nested:
        for digest, entry in table.items():
            out.setdefault(digest, entry)
    return _limit(out)


def lineage_entry(meta: Mapping[str, str]) -> dict[str, Any] | None:
    """What one ancestor file contributes to lineage, or None when it carries no provenance at all."""
    prov = read_provenance(meta)
    if prov is not None:
        return _own_entry(prov)
    if PROVENANCE_KEY in meta:
        return {"unparsed": True}
    return _foreign_entry(meta)


def _own_entry(prov: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: prov[k] for k in ("schema", "tool", "node", "recipe", "nodes") if k in prov}
    if prov.get("facts"):
        entry["facts"] = prov["facts"]
    return entry


def _foreign_entry(meta: Mapping[str, str]) -> dict[str, Any] | None:
    if not any(k in meta for k in ("sd_merge_recipe", "sd_merge_models")) and not any(k.startswith("ss_") for k in meta):
        return None
    foreign = {k: v for k, v in sorted(meta.items()) if k in FOREIGN_KEYS or k.startswith("ss_") or k.startswith("sshs_")}
    for k, v in list(foreign.items()):
        if len(v) > FOREIGN_VALUE_LIMIT and k.startswith("ss_"):
            foreign[k] = f"<{len(v)} characters omitted>"
    return {"foreign": foreign}


def _limit(table: dict[str, Any]) -> dict[str, Any]:
    size = 0
    out: dict[str, Any] = {}
    for digest, entry in table.items():
        text = canonical(entry)
        if size + len(text) > LINEAGE_LIMIT:
            out[digest] = {"omitted": "lineage size limit"}
            continue
        size += len(text)
        out[digest] = entry
    return out


def a1111_fields(me: NodeFacts, by: Mapping[str, NodeFacts]) -> dict[str, str]:
    """AUTOMATIC1111's `sd_merge_recipe` / `sd_merge_models` for a step (docs/formats.md §4.2/§4.3)."""
    if me.kind != "step":
        return {}
    refs = [by[r] for r in me.refs if r in by]
    inputs = [input_from_metadata(r.sha256, r.file or f"{r.name}.safetensors", r.legacy_hash, r.metadata) for r in refs]
    params = {k: v for k, v in me.params.items() if k not in ("models", "model")}
    return merge_fields(me.op or "", params, inputs, custom_name=me.name)


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
    declared = {(n.credits or {}).get("prediction_type") or (n.metadata or {}).get("modelspec.prediction_type")
                for n in nodes if n.kind == "input"} - {None, ""}
    # inputs that say what they predict agree: so does the merge
    prediction = card.get("prediction_type") or (next(iter(declared)) if len(declared) == 1 else None)
    res = resolution(architecture, prediction)
    if res:
        out["modelspec.resolution"] = card.pop("resolution", res)
    titles = []
    for n in sorted(nodes, key=lambda n: n.name):  # by input name: independent of declaration order, so recovered recipes reproduce it
        if n.kind == "input":
            titles.append((n.metadata or {}).get("modelspec.title") or (n.file or n.name).rsplit(".", 1)[0])
    if titles:
        out["modelspec.merged_from"] = ", ".join(titles)
    if "prediction_type" not in card and output_kind != "lora" and prediction is not None:
        out["modelspec.prediction_type"] = prediction
    for k, v in card.items():
        out[f"modelspec.{k}"] = v if isinstance(v, str) else ", ".join(v) if isinstance(v, list) else canonical(v)
    return out


def read_provenance(metadata: Mapping[str, str]) -> dict | None:
    """The decoded `sdbuild.provenance` of a file, or None when it has none (or it is not JSON)."""
    raw = metadata.get(PROVENANCE_KEY)
    if not raw:
        return None
    try:
        prov = json.loads(raw)
    except ValueError:
        return None
    return prov if isinstance(prov, dict) else None


def refs_in(value: Any, names: set[str]) -> list[str]:
    """The node names a recorded step's parameter tree mentions, in order of first mention."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str) and v in names and v not in out:
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    return out
