"""Model cards and licences: front matter, credits through nested lineage, licence rules and --strict."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import yaml

from conftest import write_recipe
from mergekit_sd.provenance.licences import KNOWN, Holder, assess

SD_FAMILY = {"creativeml-openrail-m", "openrail++", "fair-ai-public-license-1.0-sd"}
# which card licence each ingredient licence allows (written out here, independently of the module's table)
ALLOWED = {
    "creativeml-openrail-m": SD_FAMILY,
    "openrail++": SD_FAMILY,
    "fair-ai-public-license-1.0-sd": {"fair-ai-public-license-1.0-sd"},
    "flux-1-dev-non-commercial-license": {"flux-1-dev-non-commercial-license"},
    "apache-2.0": None,  # any
    "stabilityai-ai-community": {"stabilityai-ai-community"},
}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def carded(tmp_path: Path, models: Path, card_licence: str = "creativeml-openrail-m", b_licence: str = "openrail++") -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        name: aurora
        card:
          title: Aurora Mix
          author: someone
          description: Soft anime style.
          license: {card_licence}
          tags: anime, soft
          prompt_format: danbooru tags, quality tags last
          trigger_words: [aurora style, soft light]
          negative_hint: lowres, bad hands
          recommended: {{sampler: DPM++ 2M, steps: 28, cfg: 6.5, clip_skip: 2, resolution: 512x768}}
        inputs:
          a: {{path: {models}/a.safetensors, author: alice, url: https://huggingface.co/alice/base-v1, license: creativeml-openrail-m}}
          b: {{path: {models}/b.safetensors, author: bob, url: https://example.org/b, license: {b_licence}}}
        steps:
          mix: {{op: weighted_sum, models: [a, b], alpha: 0.3}}
        outputs:
          mix: {{path: out/aurora.safetensors, card: out/aurora.md}}
        """)


def test_build_writes_the_card_with_hugging_face_front_matter(tmp_path, model_dir, sdbuild):
    rp = carded(tmp_path, model_dir)
    r = sdbuild(rp)
    assert r.code == 0, r.err
    text = (tmp_path / "out" / "aurora.md").read_text()
    fm = front_matter(text)
    assert fm["license"] == "creativeml-openrail-m"
    assert fm["base_model"] == ["alice/base-v1", "b"]  # Hub repository id from the URL, else the file's name
    assert fm["base_model_relation"] == "merge"
    assert fm["pipeline_tag"] == "text-to-image"
    assert {"stable-diffusion", "merge", "anime", "soft"} <= set(fm["tags"])
    # How to prompt carries every new field; the recommended settings are a table
    assert "## How to prompt" in text
    assert "**Prompt format:** danbooru tags, quality tags last" in text
    assert "`aurora style`, `soft light`" in text and "**Negative prompt:** lowres, bad hands" in text
    assert "| Sampler | DPM++ 2M |" in text and "| CFG scale | 6.5 |" in text and "| Clip skip | 2 |" in text
    out = tmp_path / "out" / "aurora.safetensors"
    assert f"| sha256 | `{sha256(out)}` |" in text and f"| AutoV2 | `{sha256(out)[:10]}` |" in text
    assert "```mermaid" in text and "```yaml" in text and "not legal advice" in text

    # the CLI writes the very same card from the file alone
    r = sdbuild("card", out, "-o", tmp_path / "README.md")
    assert r.code == 0, r.err
    assert (tmp_path / "README.md").read_text() == text
    # the card is rebuilt with the file: deleted, it comes back on the next build (nothing is recomputed)
    (tmp_path / "out" / "aurora.md").unlink()
    r = sdbuild(rp, "--json")
    assert r.code == 0 and (tmp_path / "out" / "aurora.md").read_text() == text


def test_ingredient_credits_include_nested_lineage(tmp_path, model_dir, sdbuild):
    gen1 = write_recipe(tmp_path, f"""
        sdbuild: 1
        name: first
        card: {{title: First, license: creativeml-openrail-m, usage_hint: "1girl, masterpiece", trigger_words: [firstword]}}
        inputs:
          a: {{path: {model_dir}/a.safetensors, author: alice, url: https://example.org/a, license: creativeml-openrail-m}}
          b: {{path: {model_dir}/b.safetensors, author: bob, license: openrail++}}
        steps: {{m1: {{op: weighted_sum, models: [a, b], alpha: 0.5}}}}
        outputs: {{m1: first.safetensors}}
        """, "first.yaml")
    assert sdbuild(gen1).code == 0
    gen2 = write_recipe(tmp_path, f"""
        sdbuild: 1
        name: second
        card: {{title: Second, license: creativeml-openrail-m}}
        inputs:
          first: {{path: first.safetensors, author: me}}
          c: {{path: {model_dir}/c.safetensors, author: carol, url: https://example.org/c}}
        steps: {{m2: {{op: weighted_sum, models: [first, c], alpha: 0.25}}}}
        outputs: {{m2: second.safetensors}}
        """, "second.yaml")
    assert sdbuild(gen2).code == 0
    r = sdbuild("card", tmp_path / "second.safetensors")
    assert r.code == 0, r.err
    text = r.out
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and ".safetensors" in line.split("|")[1]}
    for file, author, path in (("a.safetensors", "alice", model_dir / "a.safetensors"), ("b.safetensors", "bob", model_dir / "b.safetensors"),
                               ("c.safetensors", "carol", model_dir / "c.safetensors"), ("first.safetensors", "me", tmp_path / "first.safetensors")):
        assert file in rows, f"{file} missing from the ingredients table"
        assert f"| {author} |" in rows[file] and f"`{sha256(path)}`" in rows[file] and f"`{sha256(path)[:10]}`" in rows[file]
    assert "openrail++" in rows["b.safetensors"] and "first.safetensors" in rows["a.safetensors"]  # which ancestor used it
    assert "unknown" in rows["c.safetensors"]  # no licence declared or recorded: listed as unknown, never guessed
    # the licence of `first` is the one its file states (modelspec.license), not declared in the second recipe
    assert "creativeml-openrail-m" in rows["first.safetensors"]
    # prompting advice the card leaves out comes from the ingredient, labelled with it
    assert "**Usage (from ingredient `first.safetensors`):** 1girl, masterpiece" in text
    assert "**Trigger words (from ingredient `first.safetensors`):** `firstword`" in text
    # the Mermaid lineage shows both generations: 2 steps, 4 inputs and the file, 6 edges
    mer = text.split("```mermaid\n", 1)[1].split("```", 1)[0].splitlines()
    assert sum(1 for l in mer if "-->" in l) == 6
    assert sum(1 for l in mer[1:] if "-->" not in l) == 7


@pytest.mark.parametrize("ingredient,card", list(itertools.product(sorted(ALLOWED), sorted(ALLOWED))))
def test_every_known_licence_pair(ingredient, card):
    v = assess(card, [Holder("`x.safetensors`", ingredient)])
    conflict = ALLOWED[ingredient] is not None and card not in ALLOWED[ingredient]
    assert v.conflicts == conflict
    if conflict:
        assert len(v.warnings) == 1 and card in v.warnings[0] and ingredient in v.warnings[0] and "x.safetensors" in v.warnings[0]
    assert v.result == card


def test_licence_derivation_without_a_declared_licence():
    assert set(KNOWN) == set(ALLOWED)
    assert assess(None, [Holder("a", "creativeml-openrail-m"), Holder("b", "creativeml-openrail-m")]).result == "creativeml-openrail-m"
    assert assess(None, [Holder("a", "openrail++"), Holder("b", "fair-ai-public-license-1.0-sd")]).result == "fair-ai-public-license-1.0-sd"
    assert assess(None, [Holder("a", "apache-2.0")]).result == "apache-2.0"
    v = assess(None, [Holder("a", "creativeml-openrail-m"), Holder("b", None)])
    assert v.result == "unknown" and any("b: licence unknown" in w for w in v.why)
    v = assess(None, [Holder("a", "my-own-licence")])
    assert v.result == "unknown" and "my-own-licence" in v.why[-1]
    v = assess(None, [Holder("a", "flux-1-dev-non-commercial-license"), Holder("b", "fair-ai-public-license-1.0-sd")])
    assert v.result == "conflict" and "a (flux-1-dev-non-commercial-license) and b (fair-ai-public-license-1.0-sd)" in v.warnings[0]


def test_licence_conflict_warns_and_strict_exits_2(tmp_path, model_dir, sdbuild):
    rp = carded(tmp_path, model_dir, card_licence="creativeml-openrail-m", b_licence="fair-ai-public-license-1.0-sd")
    r = sdbuild(rp, "--strict")
    assert r.code == 2 and "fair-ai-public-license-1.0-sd" in r.err and "creativeml-openrail-m" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "out" / "aurora.md").exists()
    r = sdbuild(rp)
    assert r.code == 0 and "warning: mix: licence: card licence creativeml-openrail-m contradicts `b.safetensors`'s licence fair-ai" in r.err
    out = tmp_path / "out" / "aurora.safetensors"
    r = sdbuild("card", out, "--strict")
    assert r.code == 2 and "contradicts" in r.err and r.out == ""
    r = sdbuild("card", out)
    assert r.code == 0 and "warning: licence:" in r.err and "> **Warning:** card licence creativeml-openrail-m contradicts" in r.out


def test_card_fields_are_validated(tmp_path, model_dir, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        card:
          recommended: {{sampler: Euler, stpes: 20}}
        inputs: {{a: {model_dir}/a.safetensors}}
        steps: {{p: {{op: prune, model: a}}}}
        outputs: {{p: {{path: p.safetensors, card: p.txt}}}}
        """)
    r = sdbuild("plan", rp)
    assert r.code == 2 and "recipe.yaml:3" in r.err and "'stpes'" in r.err and "did you mean 'steps'" in r.err
    rp.write_text(rp.read_text().replace("stpes", "steps"))
    r = sdbuild("plan", rp)
    assert r.code == 2 and "recipe.yaml:6" in r.err and "must end in .md" in r.err
    rp.write_text(rp.read_text().replace("p.txt", "../p.md"))
    r = sdbuild("plan", rp)
    assert r.code == 2 and "leaves the output directory" in r.err


def test_lora_trigger_phrase_is_carried_into_the_card(tmp_path, model_dir, sdbuild):
    from safetensors.torch import load_file, save_file

    from mergekit_sd.synth.loras import write_synth_lora

    raw = write_synth_lora(tmp_path / "raw.safetensors", arch="sd1", format="lora", factor=32, rank=4, seed=3)
    tensors = load_file(str(raw))
    save_file(tensors, str(tmp_path / "style.safetensors"), metadata={
        "ss_output_name": "style", "modelspec.trigger_phrase": "inkwash style", "modelspec.license": "openrail++"})
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        card: {{title: Baked, license: creativeml-openrail-m}}
        inputs: {{a: {model_dir}/a.safetensors, style: style.safetensors}}
        steps: {{baked: {{op: lora, model: a, loras: [{{lora: style, strength: 0.5}}]}}}}
        outputs: {{baked: {{path: baked.safetensors, card: baked.md}}}}
        """)
    r = sdbuild(rp)
    assert r.code == 0, r.err
    text = (tmp_path / "baked.md").read_text()
    assert "**Trigger words (from ingredient `style.safetensors`):** `inkwash style`" in text
    row = next(l for l in text.splitlines() if l.startswith("| style.safetensors |"))
    assert "| openrail++ |" in row  # the licence the LoRA file states, read from its modelspec.license
