"""Recipe recovery: a runnable sdbuild recipe from a model file's metadata.

sdbuild provenance is replayed exactly (`recipe_from_provenance`); AUTOMATIC1111 and supermerger merge records,
read by the `a1111` codec, as closely as their fields allow, with a comment for everything that could not be
mapped. Everything read here comes from untrusted files: names are checked and every value is written as one
YAML scalar on one line.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import yaml

from mergekit_sd.ops import op_defaults
from mergekit_sd.provenance.a1111 import OP_ARITY, MergeRecord, ModelRef, describe, parse_merge_metadata, parse_recipe_object
from mergekit_sd.provenance.record import SCHEMA_VERSION, read_provenance, refs_in
from mergekit_sd.recipe.load import CARD_FIELDS

# ModelSpec card fields a recipe recovered from foreign metadata leaves out: `implementation` is written into every
# output anyway, a thumbnail is an image (often a data URI of megabytes), and the text-encoder layer and timestep
# range are usage hints of the file recovered from, not facts of the merge that remakes it
NOT_RECOVERED_CARD_FIELDS = ("thumbnail", "encoder_layer", "timestep_range", "implementation")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]+")


def recover_recipe(metadata: Mapping[str, str], file_name: str | None = None, actual_digest: str | None = None) -> str:
    """Runnable YAML (recipe format 1) that remakes the model these metadata describe.

    sdbuild provenance is replayed exactly; AUTOMATIC1111 and supermerger recipes as closely as their fields
    allow, with a comment for everything that could not be mapped. `actual_digest` (the file's content digest)
    unmasks sdbuild provenance that another tool copied from a parent (AUTOMATIC1111's "copy metadata fields"):
    it then describes an ancestor, not this file. Raises ValueError when there is nothing to recover.
    """
    prov = _provenance(metadata)
    if prov is not None and isinstance(prov.get("schema"), int) and prov["schema"] > SCHEMA_VERSION:
        raise ValueError(f"provenance schema {prov['schema']} was written by a newer sdbuild (this one reads {SCHEMA_VERSION}); upgrade sdbuild")
    recorded = metadata.get("sdbuild.content_digest")
    inherited = prov is not None and actual_digest is not None and recorded is not None and recorded != actual_digest
    if prov is not None and not inherited:
        return recipe_from_provenance(prov, file_name, recorded)
    rec = parse_merge_metadata(metadata)
    if rec is None:
        if inherited:
            raise ValueError(f"this file's tensors (digest {actual_digest}) are not the ones its sdbuild provenance describes "
                             f"(digest {recorded}): the metadata was copied from a parent or the file was altered")
        raise ValueError("no merge recipe in this file's metadata (neither sdbuild provenance nor sd_merge_recipe)")
    if inherited and prov is not None:
        rec.notes.append(f"the file also carries sdbuild provenance of an ancestor (recipe {prov['recipe'].get('name')!r}, node "
                         f"{prov.get('node')!r}, digest {recorded}), copied by the tool that made this merge")
    return _recover_foreign(rec, metadata, file_name)


def _provenance(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    prov = read_provenance(metadata)
    return prov if prov is not None and isinstance(prov.get("recipe"), dict) else None


def recipe_from_provenance(prov: Mapping[str, Any], file_name: str | None = None, digest: str | None = None,
                           paths: Mapping[str, str] | None = None) -> str:
    """The recipe embedded in sdbuild provenance, as YAML that rebuilds the same node with the same parameters.

    `paths` overrides input paths (reproduce points them at the files it found); parameters equal to the op's
    defaults are left out, which loads back to the same normalised parameters and so the same step keys.
    """
    r = prov["recipe"]
    lines = [f"# Recovered from the sdbuild provenance of {file_name or 'a model file'} (written by {prov.get('tool', 'sdbuild')})."]
    if digest:
        lines.append(f"# `sdbuild reproduce` rebuilds it and checks the content digest {digest}.")
    lines.append(f"sdbuild: {int(r.get('sdbuild', 1))}")
    if r.get("name"):
        lines.append(f"name: {_scalar(r['name'])}")
    card = r.get("card") or {}
    if card:
        lines.append("card:")
        for k, v in card.items():
            lines.append(f"  {_safe_name(k, 'card field')}: {_flow(v) if isinstance(v, (dict, list)) else _scalar(v)}")
    lines.append("inputs:")
    for name, e in (r.get("inputs") or {}).items():
        lines.append(f"  {_safe_name(name, 'input name')}:")
        path = (paths or {}).get(name) or e.get("file") or e.get("path")
        if path:
            lines.append(f"    path: {_scalar(path)}")
        if e.get("sha256"):
            lines.append(f"    sha256: {e['sha256']}")
        for k in ("author", "url", "prediction_type", "description", "license"):
            if e.get(k):
                lines.append(f"    {k}: {_scalar(e[k])}")
        if e.get("digest"):
            lines.append(f"    # content digest {e['digest']}")
    steps = r.get("steps") or {}
    lines.append("steps:" if steps else "steps: {}")
    for name in _step_order(steps, set(r.get("inputs") or {})):
        st = steps[name]
        op = _safe_name(st.get("op"), "op name")
        defaults = op_defaults(op) or {}
        lines.append(f"  {_safe_name(name, 'step name')}:")
        lines.append(f"    op: {op}")
        ordered = [k for k in ("model", "models") if k in st] + [k for k in st if k not in ("model", "models")]
        for k in ordered:
            v = st[k]
            if k == "op" or v is None:
                continue
            if k in defaults and defaults[k] is not None and defaults[k] == v and k not in ("models", "model"):
                continue
            lines.extend(_field_lines(k, v, "    "))
    lines.append("outputs:")
    for node, paths in (r.get("outputs") or {}).items():
        ps = paths if isinstance(paths, list) else [paths]
        if not ps:
            ps = [f"{node}.safetensors"]
        lines.append(f"  {_safe_name(node, 'output node')}: {_scalar(ps[0]) if len(ps) == 1 else _flow(ps)}")
    lineage = prov.get("lineage") or {}
    if lineage:
        lines.append("# Earlier generations (inputs that carry their own provenance; `sdbuild recipe` on them recovers those recipes):")
        for dg, entry in sorted(lineage.items()):
            if isinstance(entry, dict) and "recipe" in entry:
                lines.append(f"#   {dg}: recipe {entry['recipe'].get('name')!r}, node {entry.get('node')!r}")
            elif isinstance(entry, dict) and "foreign" in entry:
                lines.append(f"#   {dg}: AUTOMATIC1111/supermerger/kohya metadata")
    return _join(lines)


def _step_order(steps: Mapping[str, Any], inputs: set[str]) -> list[str]:
    """Steps with every step they read listed before them (provenance stores them sorted by name)."""
    names = set(steps)
    done: list[str] = []

    def visit(n: str, stack: tuple[str, ...] = ()) -> None:
        if n in done or n in stack:
            return
        for r in refs_in({k: v for k, v in steps[n].items() if k != "op"}, names - {n}):
            visit(r, stack + (n,))
        done.append(n)

    for n in sorted(steps):
        visit(n)
    return done


_BREAKS = re.compile("[\r\n\x85\u2028\u2029]")
# names, and matrix variants' names (`mix@alpha=0.2,te=0`)
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*(@[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.+\-]+(,[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.+\-]+)*)?$")


def _join(lines: list[str]) -> str:
    """One YAML line per entry: a line break smuggled into a name or note (files are untrusted) becomes a space."""
    return "\n".join(_BREAKS.sub(" ", ln) for ln in lines) + "\n"


def _safe_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValueError(f"the provenance holds an invalid {what} {str(name)[:60]!r}")
    return name


def _field_lines(k: str, v: Any, indent: str) -> list[str]:
    _safe_name(k, "field name")
    if isinstance(v, dict):
        out = [f"{indent}{k}:"]
        for kk, vv in v.items():
            out.extend(_field_lines(str(kk), vv, indent + "  "))
        return out
    if isinstance(v, list) and any(isinstance(x, dict) for x in v):
        out = [f"{indent}{k}:"]
        for x in v:
            out.append(f"{indent}  - {_flow(x)}")
        return out
    if isinstance(v, list):
        return [f"{indent}{k}: {_flow(v)}"]
    return [f"{indent}{k}: {_scalar(v)}"]


def _scalar(v: Any) -> str:
    """One YAML scalar (quoted when needed), on one line."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return yaml.safe_dump(v, default_flow_style=True).split("\n")[0]
    style = '"' if any(ord(ch) < 32 or ch in "\x7f\x85\u2028\u2029" for ch in str(v)) else None
    text = yaml.safe_dump(str(v), default_flow_style=True, allow_unicode=True, width=1 << 30, default_style=style)
    text = text.rstrip("\n")
    if text.endswith("\n..."):
        text = text[:-4]
    return text.strip()


def _flow(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_scalar(str(k))}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    return _scalar(v)


def file_name_for(ref: ModelRef) -> str:
    """A file name for a model known only by its web-UI name (supermerger drops the extension)."""
    name = (ref.name or ref.sha256 or "model").replace("\\", "/").split("/")[-1]
    if not re.search(r"\.(safetensors|ckpt|pt|pth|bin)$", name, re.I):
        name += ".safetensors"
    return name


def _recover_foreign(rec: MergeRecord, metadata: Mapping[str, str], file_name: str | None) -> str:
    flavour = {"webui": "AUTOMATIC1111's merger", "sd-webui-supermerger": "supermerger", "sdbuild": "sdbuild (A1111 fields)"}.get(rec.flavour, rec.flavour)
    stem = (file_name or "").rsplit("/", 1)[-1]
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", stem, flags=re.I)
    lines = [f"# Recovered from the {flavour} metadata (sd_merge_recipe) of {file_name or 'a model file'}.",
             "# Inputs are pinned by sha256: put the files in a folder given with --models (or fix the paths)."]
    notes = list(rec.notes)
    defaults = op_defaults(rec.op) if rec.op else None
    if rec.op and defaults is None:
        notes.append(f"op {rec.op!r} is not available in this sdbuild installation")
    params = dict(rec.params)
    if defaults is not None:
        for k in list(params):
            if k not in defaults:
                notes.append(f"{k} = {json.dumps(params[k])[:200]} has no field in op {rec.op!r}")
                del params[k]
    for n in notes:
        lines.append(f"# NOTE: {n}")
    name = _NAME_BAD.sub("_", stem).strip("_") or "recovered"
    if not re.match(r"^[A-Za-z_]", name):
        name = "m_" + name
    lines.append("sdbuild: 1")
    lines.append(f"name: {_scalar(name)}")
    card = {k: metadata[f"modelspec.{k}"] for k in CARD_FIELDS if k not in NOT_RECOVERED_CARD_FIELDS and metadata.get(f"modelspec.{k}")}
    if card:
        lines.append("card:")
        for k, v in card.items():
            lines.append(f"  {k}: {_scalar(v)}")
    roles = ["model_a", "model_b", "model_c"]
    names: list[str] = []
    lines.append("inputs:")
    for i, ref in enumerate(rec.models):
        iname = roles[i] if i < 3 else f"model_{i}"
        names.append(iname)
        lines.append(f"  {iname}:")
        lines.append(f"    path: {_scalar(file_name_for(ref))}")
        if ref.sha256:
            lines.append(f"    sha256: {ref.sha256}")
        else:
            lines.append("    # the recipe gives no sha256 for this model")
        bits = []
        if ref.name:
            bits.append(f"web UI name {ref.name!r}")
        if ref.legacy_hash:
            bits.append(f"legacy hash {ref.legacy_hash}")
        if ref.recipe:
            inner = parse_recipe_object(ref.recipe, {})
            bits.append(f"itself a merge: {describe(inner)}")
        if bits:
            lines.append(f"    # {'; '.join(bits)}")
    if not names:
        raise ValueError("the merge recipe names no input models")
    custom = re.sub(r"\.(safetensors|ckpt)$", "", rec.custom_name or "", flags=re.I)
    out_name = re.sub(r"\.{2,}", ".", _NAME_BAD.sub("_", custom)).strip("_.") or (f"{name}-recovered" if stem else "recovered")
    if rec.op is None:
        # "No interpolation": the output is the first model, optionally cast
        if params.get("dtype"):
            lines.append("steps:")
            lines.append("  merged:")
            lines.append("    op: weighted_sum  # alpha 0 passes model_a through, cast to the chosen dtype")
            lines.append(f"    models: [{names[0]}, {names[0]}]")
            lines.append("    alpha: 0.0")
            lines.append(f"    dtype: {params['dtype']}")
            target = "merged"
        else:
            lines.append("steps: {}")
            target = names[0]
    else:
        lines.append("steps:")
        lines.append("  merged:")
        lines.append(f"    op: {rec.op}")
        arity = OP_ARITY.get(rec.op, len(names))
        takes_one = ("model" in defaults and "models" not in defaults) if defaults is not None else arity == 1
        if takes_one:
            lines.append(f"    model: {names[0]}")
        else:
            lines.append(f"    models: {_flow(names)}")
        for k, v in params.items():
            fl = _field_lines(k, v, "    ")
            if k == "on_missing" and v == "take_b" and rec.flavour == "sd-webui-supermerger":
                fl[-1] += "  # supermerger copies tensors that only B has"
            lines.extend(fl)
        target = "merged"
    lines.append("outputs:")
    lines.append(f"  {target}: {_scalar(out_name + '.safetensors')}")
    if rec.ancestry:
        lines.append("# Earlier generations recorded in sd_merge_models:")
        for sha, ref in sorted(rec.ancestry.items()):
            desc = f"; {describe(parse_recipe_object(ref.recipe, {}))}" if ref.recipe else ""
            lines.append(f"#   {sha} {ref.name or ''}{desc}")
    return _join(lines)
