"""Model cards: a Markdown README for a model file, made from its provenance alone.

Hugging Face front matter (license, base_model, base_model_relation, tags, pipeline_tag), how to prompt the model
(the card's own fields, else the ingredients' recorded ones, labelled with where they came from), every ingredient
with its author, URL, licence and hashes (nested generations included), the licence verdict and why, the runnable
recipe, and the lineage as a Mermaid diagram. The card is a pure function of the file's metadata and hashes, so
the card `sdbuild card FILE` writes and the one a build writes next to the file are identical.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergekit_sd.formats.atomic import write_text
from mergekit_sd.provenance.a1111 import parse_merge_metadata
from mergekit_sd.provenance.licences import KNOWN, NOT_LEGAL_ADVICE, Holder, Verdict, assess, describe, normalise
from mergekit_sd.provenance.record import CONTENT_DIGEST_KEY, lineage_entry, read_provenance, refs_in
from mergekit_sd.provenance.recover import recipe_from_provenance

PROMPT_FIELDS = ("usage_hint", "prompt_format", "trigger_words", "negative_hint", "recommended")
PROMPT_LABELS = {"usage_hint": "Usage", "prompt_format": "Prompt format", "trigger_words": "Trigger words",
                 "negative_hint": "Negative prompt", "recommended": "Recommended settings"}
RECOMMENDED_LABELS = {"sampler": "Sampler", "scheduler": "Scheduler", "steps": "Steps", "cfg": "CFG scale",
                      "clip_skip": "Clip skip", "resolution": "Resolution", "hires": "Hires fix"}
HF_REPO_RE = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.\-]*/[\w.\-]+)")
ARCH_TAGS = {"stable-diffusion-v1": "stable-diffusion", "stable-diffusion-v2": "stable-diffusion-2",
             "stable-diffusion-xl": "stable-diffusion-xl"}


@dataclass
class Ingredient:
    """One input of this file or of any earlier generation."""

    name: str
    file: str | None
    author: str | None
    url: str | None
    licence: str | None  # as recorded (declared in a recipe, or read from the file's modelspec.license)
    sha256: str | None
    digest: str | None
    via: str  # "this recipe" or the ancestor it was an input of

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def label(self) -> str:
        return f"`{self.file or self.name}`"


@dataclass
class CardSource:
    """Everything a card or report is made from: the file's name, metadata and hashes."""

    file: str
    metadata: Mapping[str, str]
    sha256: str | None = None
    content_digest: str | None = None

    @property
    def provenance(self) -> dict | None:
        return read_provenance(self.metadata)


# ----------------------------------------------------------------------------------------------------------------
# what the card is made of


def ingredients(meta: Mapping[str, str]) -> list[Ingredient]:
    """Every ingredient: this recipe's inputs, then each earlier generation's, de-duplicated by digest or sha256."""
    prov = read_provenance(meta)
    out: list[Ingredient] = []
    seen: set[str] = set()

    def add(ing: Ingredient) -> None:
        ident = ing.digest or ing.sha256 or f"{ing.via}/{ing.name}"
        if ident in seen or (ing.sha256 and ing.sha256 in seen):
            return
        seen.add(ident)
        if ing.sha256:
            seen.add(ing.sha256)
        out.append(ing)

    if prov is None:
        entry = lineage_entry(meta)
        if entry and "foreign" in entry:
            for ing in _foreign_ingredients(entry["foreign"], "this file's merge metadata"):
                add(ing)
        return out
    for ing in _recipe_ingredients(prov, "this recipe"):
        add(ing)
    table = prov.get("lineage") or {}
    files = _files_by_digest(prov, table)
    for digest, entry in table.items():
        if not isinstance(entry, dict):
            continue
        via = files.get(digest, f"ancestor {digest[:12]}")
        if "recipe" in entry:
            for ing in _recipe_ingredients(entry, f"{via} (recipe {entry['recipe'].get('name')!r})"):
                add(ing)
        elif "foreign" in entry:
            for ing in _foreign_ingredients(entry["foreign"], f"{via} (merge metadata)"):
                add(ing)
    return out


def _recipe_ingredients(prov: Mapping[str, Any], via: str) -> list[Ingredient]:
    inputs = (prov.get("recipe") or {}).get("inputs") or {}
    return [Ingredient(name, e.get("file"), e.get("author"), e.get("url"), e.get("license"), e.get("sha256"), e.get("digest"), via)
            for name, e in inputs.items() if isinstance(e, dict)]


def _foreign_ingredients(foreign: Mapping[str, str], via: str) -> list[Ingredient]:
    rec = parse_merge_metadata(foreign)
    if rec is None:
        return []
    refs = list(rec.models) + [r for _, r in sorted(rec.ancestry.items())]
    return [Ingredient(r.name or (r.sha256 or "?")[:10], r.name, None, None, None, r.sha256, None, via) for r in refs]


def _files_by_digest(prov: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, str]:
    """A readable name for each ancestor: the file name it had as somebody's input."""
    names: dict[str, str] = {}
    for entry in [prov] + [e for e in table.values() if isinstance(e, dict)]:
        for e in ((entry.get("recipe") or {}).get("inputs") or {}).values():
            if isinstance(e, dict) and e.get("digest") and e.get("file"):
                names.setdefault(e["digest"], f"`{e['file']}`")
    return names


def card_fields(meta: Mapping[str, str]) -> dict[str, Any]:
    """The card this file was built with (recipe card, else the file's modelspec fields)."""
    prov = read_provenance(meta)
    if prov is not None:
        return dict((prov.get("recipe") or {}).get("card") or {})
    out: dict[str, Any] = {}
    for k in ("title", "author", "description", "license", "usage_hint", "tags", "trigger_phrase", "prompt_format",
              "negative_hint"):
        if meta.get(f"modelspec.{k}"):
            out[k] = meta[f"modelspec.{k}"]
    return out


def prompt_advice(meta: Mapping[str, str]) -> list[tuple[str, Any, str | None]]:
    """(field, value, source) for How to prompt: the card's own fields, and for each field it leaves out, what
    the ingredients recorded (source names the ingredient)."""
    own = card_fields(meta)
    if "trigger_phrase" in own and "trigger_words" not in own:
        own["trigger_words"] = [own["trigger_phrase"]]
    out: list[tuple[str, Any, str | None]] = [(k, own[k], None) for k in PROMPT_FIELDS if own.get(k)]
    missing = [k for k in PROMPT_FIELDS if not own.get(k)]
    prov = read_provenance(meta)
    if not missing or prov is None:
        return out
    table = prov.get("lineage") or {}
    files = _files_by_digest(prov, table)
    for k in missing:
        for digest, entry in table.items():
            if not isinstance(entry, dict):
                continue
            if "foreign" in entry:  # a LoRA or a web-UI merge: its ModelSpec fields
                card = {f[len("modelspec."):]: v for f, v in (entry["foreign"] or {}).items() if f.startswith("modelspec.")}
            else:
                card = (entry.get("recipe") or {}).get("card") or {}
            value = card.get(k) or (card.get("trigger_phrase") and [card["trigger_phrase"]] if k == "trigger_words" else None)
            if value:
                out.append((k, value, files.get(digest, f"ancestor {digest[:12]}")))
    return out


def licence_verdict(meta: Mapping[str, str]) -> Verdict:
    """The licence the card states, checked against every ingredient (nested generations included)."""
    declared = card_fields(meta).get("license") or (None if read_provenance(meta) else meta.get("modelspec.license"))
    holders = [Holder(f"{i.label} (via {i.via})" if i.via != "this recipe" else i.label, i.licence) for i in ingredients(meta)]
    return assess(declared, holders)


def base_models(meta: Mapping[str, str]) -> list[str]:
    """Hugging Face `base_model`: each direct input's repository id when its URL is on the Hub, else its name."""
    out: list[str] = []
    for ing in ingredients(meta):
        if ing.via not in ("this recipe", "this file's merge metadata"):
            continue
        m = HF_REPO_RE.match(ing.url or "")
        ident = m.group(1) if m else (ing.file or ing.name).rsplit(".", 1)[0]
        if ident not in out:
            out.append(ident)
    return out


# ----------------------------------------------------------------------------------------------------------------
# lineage as a graph


@dataclass
class LineageGraph:
    nodes: list[tuple[str, str, str]]  # (id, label, kind: file | step | input)
    edges: list[tuple[str, str]]


def lineage_graph(meta: Mapping[str, str], file_name: str) -> LineageGraph:
    """Steps and inputs of every generation; an ancestor reached along several paths appears once."""
    prov = read_provenance(meta)
    g = LineageGraph([], [])
    root = "f0"
    g.nodes.append((root, file_name, "file"))
    if prov is None:
        entry = lineage_entry(meta)
        if entry and "foreign" in entry:
            for ing in _foreign_ingredients(entry["foreign"], ""):
                nid = f"n{len(g.nodes)}"
                g.nodes.append((nid, f"{ing.file or ing.name} [{ing.autov2 or '?'}]", "input"))
                g.edges.append((nid, root))
        return g
    by_digest: dict[str, str] = {}
    _add_generation(g, prov, root, prov.get("lineage") or {}, by_digest, set())
    return g


def _add_generation(g: LineageGraph, prov: Mapping[str, Any], target: str, table: Mapping[str, Any], by_digest: dict[str, str],
                    expanding: set[str]) -> None:
    recipe = prov.get("recipe") or {}
    inputs = recipe.get("inputs") or {}
    steps = recipe.get("steps") or {}
    names = set(inputs) | set(steps)
    ids: dict[str, str] = {}

    def node_id(name: str) -> str:
        if name in ids:
            return ids[name]
        if name in inputs:
            e = inputs[name] or {}
            d = e.get("digest") or ""
            if d and d in by_digest:
                ids[name] = by_digest[d]
                return ids[name]
            nid = f"n{len(g.nodes)}"
            short = (e.get("sha256") or "")[:10]
            g.nodes.append((nid, f"{e.get('file') or name}" + (f" [{short}]" if short else ""), "input"))
            ids[name] = nid
            if d:
                by_digest[d] = nid
                entry = table.get(d)
                if isinstance(entry, dict) and "recipe" in entry and d not in expanding:
                    _add_generation(g, entry, nid, table, by_digest, expanding | {d})
                elif isinstance(entry, dict) and "foreign" in entry:
                    for ing in _foreign_ingredients(entry["foreign"], ""):
                        fid = f"n{len(g.nodes)}"
                        g.nodes.append((fid, f"{ing.file or ing.name} [{ing.autov2 or '?'}]", "input"))
                        g.edges.append((fid, nid))
            return nid
        nid = f"n{len(g.nodes)}"
        st = steps[name]
        g.nodes.append((nid, f"{name} = {st.get('op')}", "step"))
        ids[name] = nid
        for r in refs_in({k: v for k, v in st.items() if k != "op"}, names - {name}):
            g.edges.append((node_id(r), nid))
        return nid

    node = prov.get("node")
    if node in names:
        g.edges.append((node_id(node), target))


def mermaid_lines(g: LineageGraph, direction: str = "TD") -> list[str]:
    shapes = {"file": ('(["', '"])'), "step": ('["', '"]'), "input": ('[("', '")]')}
    out = [f"graph {direction}"]
    for nid, label, kind in g.nodes:
        a, b = shapes[kind]
        out.append(f"  {nid}{a}{mermaid_text(label)}{b}")
    for u, v in g.edges:
        out.append(f"  {u} --> {v}")
    return out


def mermaid_text(text: str) -> str:
    """A label inside Mermaid quotes: entity codes for the characters its parser would read as syntax."""
    return (str(text).replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
            .replace("\n", " "))


# ----------------------------------------------------------------------------------------------------------------
# the card


def front_matter(src: CardSource, verdict: Verdict) -> dict[str, Any]:
    meta = src.metadata
    card = card_fields(meta)
    fm: dict[str, Any] = {}
    lid = normalise(verdict.result)
    if lid and KNOWN[lid].hf != "other":
        fm["license"] = KNOWN[lid].hf
    else:
        fm["license"] = "other"
        fm["license_name"] = lid or verdict.result
        if lid:
            fm["license_link"] = KNOWN[lid].url
    bases = base_models(meta)
    if bases:
        fm["base_model"] = bases
        if len(bases) > 1 or _is_merge(meta):
            fm["base_model_relation"] = "merge"
    arch = meta.get("modelspec.architecture") or ""
    tags = []
    for prefix, tag in ARCH_TAGS.items():
        if arch.startswith(prefix):
            tags.append(tag)
    if arch.endswith("/lora"):
        tags.append("lora")
    tags += (["merge"] if _is_merge(meta) else []) + ["sdbuild"]
    for t in str(card.get("tags") or "").split(","):
        if t.strip() and t.strip() not in tags:
            tags.append(t.strip())
    fm["tags"] = tags
    if arch.startswith("stable-diffusion"):
        fm["pipeline_tag"] = "text-to-image"
    return fm


def _is_merge(meta: Mapping[str, str]) -> bool:
    prov = read_provenance(meta) or {}
    return len((prov.get("recipe") or {}).get("inputs") or {}) > 1 or "sd_merge_recipe" in meta


def render_card(src: CardSource) -> tuple[str, Verdict]:
    """The card's Markdown, and the licence verdict (its warnings are the caller's to show)."""
    meta = src.metadata
    card = card_fields(meta)
    verdict = licence_verdict(meta)
    prov = read_provenance(meta)
    title = card.get("title") or meta.get("modelspec.title") or src.file.rsplit(".", 1)[0]
    out = ["---", yaml.safe_dump(front_matter(src, verdict), sort_keys=False, allow_unicode=True, width=1 << 20).rstrip(), "---", ""]
    out += [f"# {_md(title)}", ""]
    if card.get("author"):
        out += [f"By {_md(card['author'])}.", ""]
    if card.get("description"):
        out += [_md(card["description"]), ""]

    out += ["## How to prompt", ""]
    advice = prompt_advice(meta)
    if not advice:
        out += ["Neither this model's card nor its ingredients record how to prompt it.", ""]
    for k, value, source in advice:
        label = PROMPT_LABELS[k] + (f" (from ingredient {source})" if source else "")
        if k == "recommended" and isinstance(value, dict):
            if out[-1]:
                out.append("")
            ordered = [s for s in RECOMMENDED_LABELS if s in value] + [s for s in value if s not in RECOMMENDED_LABELS]
            out += [f"**{label}:**", "", "| setting | value |", "| --- | --- |"]
            out += [f"| {RECOMMENDED_LABELS.get(s, s)} | {_cell(value[s])} |" for s in ordered]
            out.append("")
        elif k == "trigger_words":
            words = value if isinstance(value, list) else [value]
            out += [f"- **{label}:** " + ", ".join(f"`{_code(w)}`" for w in words)]
        else:
            out += [f"- **{label}:** {_md(value)}"]
    if advice and advice[-1][0] != "recommended":
        out.append("")

    ings = ingredients(meta)
    out += ["## Ingredients", ""]
    if ings:
        out += ["| name | author | URL | licence | sha256 | AutoV2 | used by |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for i in ings:
            url = f"<{i.url}>" if i.url and re.match(r"^https?://", i.url) else _cell(i.url or "")
            out.append(f"| {_cell(i.file or i.name)} | {_cell(i.author or '')} | {url} | {_cell(describe(i.licence))} | "
                       f"`{i.sha256 or '?'}` | `{i.autov2 or '?'}` | {_cell(i.via)} |")
    else:
        out.append("No ingredients are recorded in this file.")
    out.append("")

    out += ["## Licence", "", f"**{_md(verdict.result)}**", ""]
    out += [f"- {_md(w)}" for w in verdict.why]
    if verdict.warnings:
        out += [""] + [f"> **Warning:** {_md(w)}" for w in verdict.warnings]
    out += ["", f"_{NOT_LEGAL_ADVICE}_", ""]

    if prov is not None:
        out += ["## Recipe", "", "Rebuild it with `sdbuild recipe FILE -o recipe.yaml` and `sdbuild reproduce FILE --models DIR`.", "",
                "```yaml", recipe_from_provenance(prov, src.file, meta.get(CONTENT_DIGEST_KEY)).rstrip(), "```", ""]

    out += ["## Lineage", "", "```mermaid", *mermaid_lines(lineage_graph(meta, src.file)), "```", ""]

    out += ["## Hashes", "", "| | |", "| --- | --- |", f"| file | `{_code(src.file)}` |"]
    if src.sha256:
        out += [f"| sha256 | `{src.sha256}` |", f"| AutoV2 | `{src.sha256[:10]}` |"]
    digest = meta.get(CONTENT_DIGEST_KEY) or src.content_digest
    if digest:
        out.append(f"| content digest | `{digest}` |")
    out += ["", "_Card made by sdbuild from the file's provenance._", ""]
    return "\n".join(out), verdict


def _md(text: Any) -> str:
    """Text in Markdown prose: no raw HTML."""
    return str(text).replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: Any) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _code(text: Any) -> str:
    return str(text).replace("`", "'")


def write_card_file(path: str | os.PathLike, text: str) -> bool:
    """Write a card atomically; False (and nothing written) when the file already holds exactly `text`."""
    p = Path(path)
    try:
        if p.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text(p, text)
    return True


def input_holders(file: str, licence: str | None, meta: Mapping[str, str]) -> list[Holder]:
    """Licence holders an input brings to a build: itself, and every ingredient its own provenance records."""
    out = [Holder(f"`{file}`", licence)]
    for i in ingredients(meta):
        via = f"`{file}`" if i.via in ("this recipe", "this file's merge metadata") else i.via
        out.append(Holder(f"{i.label} (via {via})", i.licence))
    return out
