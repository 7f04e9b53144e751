"""`sdbuild report`: one self-contained HTML page about a model file.

Inline CSS, no scripts, no fonts, images or styles from anywhere else, so opening it makes no network request.
Sections: the `inspect` summary, hashes, licences and credits, how to prompt, the lineage tree, the recipe, and
per-block distances from each parent that could be found.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from mergekit_sd.provenance.card import CardSource, PROMPT_LABELS, RECOMMENDED_LABELS, ingredients, licence_verdict, prompt_advice
from mergekit_sd.provenance.licences import NOT_LEGAL_ADVICE, describe
from mergekit_sd.provenance.lineage import lineage_lines
from mergekit_sd.provenance.record import CONTENT_DIGEST_KEY, read_provenance
from mergekit_sd.publish.similarity import Comparison

SECTIONS = (("summary", "Summary"), ("hashes", "Hashes"), ("licences", "Licences and credits"), ("prompting", "How to prompt"),
            ("lineage", "Lineage"), ("recipe", "Recipe"), ("similarity", "Similarity to parents"))

CSS = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #d9dee7; --bg: #f6f7fb; --card: #fff; --accent: #3451b2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink); background: var(--bg); }
header { background: var(--accent); color: #fff; padding: 24px 40px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; opacity: .85; }
nav { padding: 10px 40px; background: #e8ebf5; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); margin-right: 18px; text-decoration: none; font-weight: 600; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 40px 60px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 22px; margin: 18px 0; }
h2 { margin: 0 0 12px; font-size: 19px; border-bottom: 2px solid var(--accent); display: inline-block; padding-bottom: 2px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
pre { background: #f3f4f8; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow-x: auto; white-space: pre; }
.kv td:first-child { width: 200px; }
.scroll { max-width: 100%; overflow-x: auto; }
td code { word-break: break-all; }
.warn { background: #fff4e5; border-left: 4px solid #e08a00; padding: 6px 12px; margin: 6px 0; }
.ok { color: #2e7d32; font-weight: 600; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #e8ebf5; font-size: 13px; margin-right: 4px; }
.heat td { min-width: 34px; padding: 4px 2px; text-align: center; font-size: 11px; }
.heat th { font-size: 10.5px; padding: 4px 2px; }
.legend span { display: inline-block; width: 36px; height: 12px; vertical-align: middle; }
"""


@dataclass
class ReportInput:
    source: CardSource
    inspect: Mapping[str, Any]
    legacy_hash: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    parents_missing: list[str] = field(default_factory=list)  # parents recorded but not found
    recipe_yaml: str | None = None


def e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _table(head: list[str] | None, rows: list[list[Any]], cls: str = "", num: tuple[int, ...] = ()) -> str:
    out = [f'<div class="scroll"><table class="{cls}">' + ("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" if head else "")]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="num">{e(c)}</td>' if i in num else f"<td>{c if isinstance(c, Raw) else e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


class Raw(str):
    """HTML that is already escaped."""


def _summary(r: Mapping[str, Any]) -> str:
    kv = [("architecture", r.get("architecture")), ("variant", r.get("variant") or "-"), ("kind", r.get("kind")),
          ("ModelSpec architecture", r.get("modelspec_architecture") or "-"), ("tensors", r.get("tensors")),
          ("tensor data", _size(r.get("bytes") or 0)), ("file size", _size(r.get("file_bytes") or 0)),
          ("prediction type", r.get("prediction_type") or "not recorded"),
          ("could save as fp16", _size(r.get("precision_waste_bytes") or 0))]
    out = [_table(None, [[Raw(f"<b>{e(k)}</b>"), v] for k, v in kv], "kv")]
    comps = r.get("components") or {}
    if comps:
        out.append("<h3>Components</h3>")
        out.append(_table(["component", "tensors", "size"], [[c, t.get("tensors"), _size(t.get("bytes") or 0)] for c, t in comps.items()],
                          num=(1, 2)))
    dts = r.get("dtypes") or {}
    if dts:
        out.append("<h3>Data types</h3>")
        out.append(_table(["dtype", "tensors", "size"], [[d, t["tensors"], _size(t["bytes"])] for d, t in dts.items()], num=(1, 2)))
    junk = r.get("junk") or {}
    out.append("<h3>Junk</h3>")
    if junk.get("tensors"):
        out.append(_table(["category", "tensors", "size", "what"],
                          [[c, j["tensors"], _size(j["bytes"]), j.get("what", "")] for c, j in (junk.get("categories") or {}).items()],
                          num=(1, 2)))
        out.append(f"<p>{e(junk['tensors'])} tensors, {e(_size(junk['bytes']))} that <code>op: prune</code> would remove.</p>")
    else:
        out.append('<p class="ok">No junk: nothing that pruning would remove.</p>')
    keys = r.get("keys") or {}
    if keys.get("missing") or keys.get("unexpected"):
        out.append(f"<p>{len(keys.get('missing') or [])} keys missing from and {len(keys.get('unexpected') or [])} keys "
                   f"unexpected by the reference key list <code>{e(keys.get('reference'))}</code>.</p>")
    if r.get("non_finite"):
        out.append('<div class="warn">Tensors with NaN or Inf: ' + e(", ".join(x["key"] for x in r["non_finite"][:10])) + "</div>")
    return "".join(out)


def _hashes(ri: ReportInput) -> str:
    src = ri.source
    digest = src.metadata.get(CONTENT_DIGEST_KEY)
    rows = [["file", Raw(f"<code>{e(src.file)}</code>")]]
    if src.sha256:
        rows += [["sha256", Raw(f"<code>{e(src.sha256)}</code>")], ["AutoV2", Raw(f"<code>{e(src.sha256[:10])}</code>")]]
    if ri.legacy_hash:
        rows.append(["legacy hash", Raw(f"<code>{e(ri.legacy_hash)}</code>")])
    if src.content_digest:
        state = "" if not digest else (" (matches the recorded digest)" if digest == src.content_digest else
                                       f" (the file records {digest}: its tensors were altered, or the metadata copied)")
        rows.append(["content digest", Raw(f"<code>{e(src.content_digest)}</code>{e(state)}")])
    return _table(None, [[Raw(f"<b>{e(k)}</b>"), v] for k, v in rows], "kv")


def _ticks(text: str) -> str:
    """Escaped text with `quoted` spans as code."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", e(text))


def _licences(ri: ReportInput) -> str:
    meta = ri.source.metadata
    v = licence_verdict(meta)
    out = [f'<p>Licence: <span class="badge">{e(v.result)}</span></p><ul>' + "".join(f"<li>{_ticks(w)}</li>" for w in v.why) + "</ul>"]
    out += [f'<div class="warn"><b>Warning:</b> {_ticks(w)}</div>' for w in v.warnings]
    out.append(f'<p class="muted"><i>{e(NOT_LEGAL_ADVICE)}</i></p>')
    ings = ingredients(meta)
    out.append("<h3>Credits</h3>")
    if ings:
        rows = []
        for i in ings:
            url = Raw(f'<a href="{e(i.url)}" rel="noreferrer">{e(i.url)}</a>') if i.url and i.url.startswith(("http://", "https://")) else (i.url or "")
            rows.append([i.file or i.name, i.author or "", url, describe(i.licence), Raw(f"<code>{e(i.sha256 or '?')}</code>"),
                         Raw(f"<code>{e(i.autov2 or '?')}</code>"), Raw(_ticks(i.via))])
        out.append(_table(["name", "author", "URL", "licence", "sha256", "AutoV2", "used by"], rows))
    else:
        out.append("<p>No ingredients are recorded in this file.</p>")
    return "".join(out)


def _prompting(meta: Mapping[str, str]) -> str:
    advice = prompt_advice(meta)
    if not advice:
        return "<p>Neither this model's card nor its ingredients record how to prompt it.</p>"
    out = ["<ul>"]
    for k, value, source in advice:
        label = PROMPT_LABELS[k] + (f" (from ingredient {source.strip('`')})" if source else "")
        if isinstance(value, dict):
            text = ", ".join(f"{RECOMMENDED_LABELS.get(s, s)}: {x}" for s, x in value.items())
        elif isinstance(value, list):
            text = ", ".join(map(str, value))
        else:
            text = str(value)
        out.append(f"<li><b>{e(label)}:</b> {e(text)}</li>")
    return "".join(out) + "</ul>"


def _colour(rel: float, top: float) -> str:
    """White (identical) to deep blue (as far as the farthest block), on a square-root scale."""
    t = 0.0 if top <= 0 or not math.isfinite(rel) else min(1.0, math.sqrt(rel / top))
    r, g, b = (int(255 + (c - 255) * t) for c in (33, 81, 178))
    return f"rgb({r},{g},{b})"


def _similarity(ri: ReportInput) -> str:
    out = []
    comps = [c for c in ri.comparisons if c.blocks]
    if comps:
        blocks: list[str] = []
        for c in comps:
            blocks += [b.block for b in c.blocks if b.block not in blocks]
        top = max((b.relative for c in comps for b in c.blocks if math.isfinite(b.relative)), default=0.0)
        out.append("<p>Relative distance ‖this − parent‖ / ‖parent‖ per block (0 = identical; darker = farther). "
                   "Hover a cell for the cosine similarity.</p>")
        rows = ['<div class="scroll"><table class="heat"><tr><th>parent</th>' + "".join(f"<th>{e(b)}</th>" for b in blocks) + "</tr>"]
        for c in comps:
            by = {b.block: b for b in c.blocks}
            cells = []
            for blk in blocks:
                b = by.get(blk)
                if b is None:
                    cells.append("<td>-</td>")
                    continue
                dark = top > 0 and math.isfinite(b.relative) and b.relative / top > 0.35
                cells.append(f'<td style="background:{_colour(b.relative, top)};color:{"#fff" if dark else "#1d2433"}" '
                             f'title="{e(blk)}: relative distance {b.relative:.4g}, cosine {b.cosine:.6f}, {b.tensors} tensors">'
                             f"{b.relative:.2f}</td>")
            rows.append(f"<tr><th>{e(c.parent)}</th>{''.join(cells)}</tr>")
        rows.append("</table></div>")
        out.append("".join(rows))
        out.append('<p class="legend muted">scale: ' + "".join(f'<span style="background:{_colour(top * f, top)}"></span>'
                                                              for f in (0, .05, .2, .45, .8, 1)) + f" 0 … {top:.3g}</p>")
        for c in comps:
            if c.skipped:
                out.append(f'<p class="muted">{e(c.parent)}: {c.compared} tensors compared; {c.skipped} of this file\'s tensors '
                           "are missing from it or have another shape.</p>")
    for c in ri.comparisons:
        if not c.blocks:
            out.append(f"<p>{e(c.parent)}: no tensors in common with this file (a LoRA or another architecture).</p>")
    if ri.parents_missing:
        out.append("<p>Parents not found (pass the folders that hold them with <code>--models DIR</code>): "
                   + e(", ".join(ri.parents_missing)) + ".</p>")
    if not out:
        out.append("<p>This file records no parents to compare with.</p>")
    return "".join(out)


def render_report(ri: ReportInput) -> str:
    src = ri.source
    meta = src.metadata
    prov = read_provenance(meta)
    title = ((prov or {}).get("recipe") or {}).get("card", {}).get("title") or meta.get("modelspec.title") or src.file
    node = f"node {prov.get('node')!r} of recipe {prov['recipe'].get('name')!r}, made by {prov.get('tool')}" if prov and isinstance(prov.get("recipe"), dict) else "no sdbuild provenance"
    body = {
        "summary": _summary(ri.inspect),
        "hashes": _hashes(ri),
        "licences": _licences(ri),
        "prompting": _prompting(meta),
        "lineage": f"<pre>{e(chr(10).join(lineage_lines(meta, src.file)))}</pre>",
        "recipe": f"<pre>{e(ri.recipe_yaml)}</pre>" if ri.recipe_yaml else "<p>This file carries no recipe.</p>",
        "similarity": _similarity(ri),
    }
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # nothing may be fetched: no scripts, no remote images, fonts or styles
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
             f"<title>{e(title)} — sdbuild report</title><style>{CSS}</style></head><body>",
             f"<header><h1>{e(title)}</h1><p>{e(src.file)} · {e(node)}</p></header>",
             "<nav>" + "".join(f'<a href="#{sid}">{e(name)}</a>' for sid, name in SECTIONS) + "</nav><main>"]
    for sid, name in SECTIONS:
        parts.append(f'<section id="{sid}"><h2>{e(name)}</h2>{body[sid]}</section>')
    parts.append('<p class="muted">Made by sdbuild from the file\'s own metadata and tensors.</p></main></body></html>')
    return "\n".join(parts) + "\n"
