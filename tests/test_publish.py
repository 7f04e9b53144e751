"""sdbuild graph, sdbuild report (in a real headless browser) and progress a person can read."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import write_recipe


def chain(tmp_path: Path, models: Path) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        name: chain
        card: {{title: Chain Mix, license: creativeml-openrail-m, usage_hint: "1girl, masterpiece"}}
        inputs:
          a: {{path: {models}/a.safetensors, author: alice, license: creativeml-openrail-m}}
          b: {{path: {models}/b.safetensors, author: bob, url: https://example.org/b}}
          c: {models}/c.safetensors
        steps:
          ws: {{op: weighted_sum, models: [a, b], alpha: 0.35}}
          ad: {{op: add_difference, models: [ws, c, a], alpha: 0.5}}
          pr: {{op: prune, model: ad, dtype: fp16}}
        outputs: {{pr: {{path: out/chain.safetensors, card: out/chain.md}}}}
        """)


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Node id -> label and edges, from a `graph` flowchart; anything else on a line is a parse failure."""
    lines = text.strip().splitlines()
    assert re.fullmatch(r"graph (LR|TD)", lines[0])
    nodes, edges = {}, []
    for line in lines[1:]:
        line = line.strip()
        if m := re.fullmatch(r'(\w+)(\[\("|\["|\(\[")(.*?)("\)\]|"\]|"\]\))', line):
            assert '"' not in m.group(3)
            nodes[m.group(1)] = m.group(3)
        elif m := re.fullmatch(r"(\w+) --> (\w+)", line):
            edges.append((m.group(1), m.group(2)))
        else:
            assert re.fullmatch(r"classDef \w+ [\w:#,]+|class [\w,]+ \w+", line), line
    for u, v in edges:
        assert u in nodes and v in nodes
    return nodes, edges


def test_graph_mermaid_and_dot_show_op_params_and_state(tmp_path, model_dir, sdbuild):
    rp = chain(tmp_path, model_dir)
    r = sdbuild("graph", rp, "--mermaid")
    assert r.code == 0, r.err
    nodes, edges = parse_mermaid(r.out)
    assert len(nodes) == 6 and len(edges) == 6  # a, b, c, ws, ad, pr; a->ws, b->ws, ws->ad, c->ad, a->ad, ad->pr
    by_name = {label.split("<br/>")[0]: label for label in nodes.values()}
    assert "weighted_sum<br/>alpha 0.35<br/>stale: never built" in by_name["ws"]
    assert "prune<br/>dtype fp16" in by_name["pr"] and "-#gt; out/chain.safetensors" in by_name["pr"]
    assert sdbuild(rp).code == 0
    r = sdbuild("graph", rp, "--mermaid")
    nodes, _ = parse_mermaid(r.out)
    assert all(label.split("<br/>")[-2 if "-#gt;" in label else -1] == "fresh" for label in nodes.values())
    rp.write_text(rp.read_text().replace("alpha: 0.5", "alpha: 0.6"))
    r = sdbuild("graph", rp, "--dot")
    assert r.code == 0 and r.out.startswith("digraph recipe {") and r.out.rstrip().endswith("}")
    assert len(re.findall(r'^  "[^"]+" -> "[^"]+";$', r.out, re.M)) == 6
    assert len(re.findall(r'^  "[^"]+" \[label=', r.out, re.M)) == 6
    assert re.search(r'"ad" \[label="ad\\nadd_difference\\nalpha 0.6\\nstale: parameters changed"', r.out)
    assert re.search(r'"ws" \[label="ws\\nweighted_sum\\nalpha 0.35\\nfresh"', r.out)
    # a missing input is drawn, not an error
    rp.write_text(rp.read_text().replace(f"{model_dir}/c.safetensors", "gone.safetensors"))
    r = sdbuild("graph", rp)
    assert r.code == 0 and re.search(r"^c\s+missing", r.out, re.M) and re.search(r"^ad\s+stale\s+add_difference", r.out, re.M)


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_is_one_self_contained_page_that_reads_in_a_browser(tmp_path, model_dir, sdbuild):
    rp = chain(tmp_path, model_dir)
    assert sdbuild(rp).code == 0
    out = tmp_path / "out" / "chain.safetensors"
    r = sdbuild("report", out, "--models", model_dir, "-o", tmp_path / "report.html")
    assert r.code == 0, r.err
    page = (tmp_path / "report.html").read_text()
    for section in ("Summary", "Hashes", "Licences and credits", "How to prompt", "Lineage", "Recipe", "Similarity to parents"):
        assert f"<h2>{section}</h2>" in page
    # nothing to fetch: no scripts, no linked styles, fonts or images, no url() in styles
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(", page, re.I)
    assert not re.search(r"""\ssrc\s*=""", page, re.I)
    assert "default-src 'none'" in page
    # the heatmap compares with the parents found in --models: the prune step's parent is `ad`, the recipe's inputs are a, b, c
    assert 'class="heat"' in page and "a (a.safetensors)" in page and "c (c.safetensors)" in page
    assert "alice" in page and "bob" in page and "https://example.org/b" in page and "not legal advice" in page
    # without --models, the section says where to look instead
    r = sdbuild("report", out, "-o", tmp_path / "plain.html")
    assert r.code == 0 and "Parents not found (pass the folders that hold them with <code>--models DIR</code>)" in (tmp_path / "plain.html").read_text()

    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (`.ci/run` installs Debian's chromium package)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-dev-shm-usage"]
    url = (tmp_path / "report.html").as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in ("summary", "hashes", "licences", "prompting", "lineage", "recipe", "similarity"):
        assert f'<section id="{sid}">' in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run(flags + ["--window-size=1280,1600", f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and the header, not one flat colour
    dominant = max(colours)[0] / (img.size[0] * img.size[1])
    assert dominant < 0.9
    r_, g_, b_ = img.crop((0, 0, 1280, 60)).resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))  # mean colour
    assert b_ > r_ + 40  # the blue title bar rendered: the stylesheet applied


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_bytes_per_second_and_time_left_on_a_terminal():
    from mergekit_sd.engine.progress import Progress

    term = FakeTerminal()
    p = Progress(stream=term)
    for i in range(1, 5):
        p.tensor("mix", i, 4, f"model.diffusion_model.t{i}", 256 * 1024, 1024 * 1024)
    text = term.getvalue()
    assert "mix" in text and "1.00M" in text and "B/s" in text and "left" in text
    pipe = io.StringIO()  # not a terminal: nothing
    q = Progress(stream=pipe)
    q.tensor("mix", 1, 1, "x", 10, 10)
    q.line("done")
    assert pipe.getvalue() == "done\n"
    quiet = FakeTerminal()
    Progress(quiet=True, stream=quiet).tensor("mix", 1, 1, "x", 10, 10)
    assert quiet.getvalue() == ""


def test_block_distances_match_an_independent_computation(model_dir):
    import math

    from safetensors.torch import load_file

    from mergekit_sd.publish.similarity import compare_blocks

    a = load_file(str(model_dir / "a.safetensors"))
    b = load_file(str(model_dir / "b.safetensors"))
    comp = compare_blocks(model_dir / "a.safetensors", model_dir / "b.safetensors")
    by = {x.block: x for x in comp.blocks}
    # README's block table: input_blocks.N -> INnn, middle_block -> M00, output_blocks.11 and the head out.* -> OUT11
    for block, marker in (("IN01", ".input_blocks.1."), ("M00", ".middle_block."), ("OUT11", ".output_blocks.11.")):
        keys = [k for k in a if k.startswith("model.diffusion_model") and marker in k or
                block == "OUT11" and k.startswith("model.diffusion_model.out.")]
        d2 = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
        p2 = sum(float((b[k].double() ** 2).sum()) for k in keys)
        dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
        m2 = sum(float((a[k].double() ** 2).sum()) for k in keys)
        assert by[block].tensors == len(keys)
        assert math.isclose(by[block].relative, math.sqrt(d2 / p2), rel_tol=1e-9)
        assert math.isclose(by[block].cosine, dot / math.sqrt(m2 * p2), rel_tol=1e-9)
    same = compare_blocks(model_dir / "a.safetensors", model_dir / "a.safetensors")
    assert all(x.relative == 0.0 for x in same.blocks) and same.skipped == 0
