"""Provenance you can replay: metadata written, reproduce, recipes recovered, hashes, lineage, lock files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from mergekit_sd.formats import digests
from mergekit_sd.provenance import a1111
from mergekit_sd.engine import memo as hashing
from mergekit_sd.engine.options import Options
from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.runner import Runner
from mergekit_sd.engine.lockfile import lock_path, read_lock
from mergekit_sd.provenance.lineage import lineage_lines
from mergekit_sd.provenance.record import read_provenance
from mergekit_sd.provenance.recover import recover_recipe
from mergekit_sd.recipe.load import load_recipe, parse_recipe
from mergekit_sd.synth.models import write_synth
from mergekit_sd.formats.safetensors import SafetensorsFile, read_header
from test_a1111 import GHOSTXL, SHA_A, SHA_B, SHA_C


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def two_step(tmp_path: Path, models: Path) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        name: trial
        card:
          title: Trial Mix
          author: someone
          description: two steps
          license: creativeml-openrail-m
          usage_hint: "1girl, masterpiece"
          prediction_type: epsilon
        inputs:
          A: {{path: {models}/a.safetensors, author: alice, url: https://example.org/a}}
          B: {models}/b.safetensors
          C: {models}/c.safetensors
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
          final: {{op: add_difference, models: [mix, C, A], alpha: 0.5, dtype: fp32}}
        outputs:
          final: out/final.safetensors
        """)


@pytest.fixture
def own_models(tmp_path: Path) -> Path:
    """Copies of three SD1 models this test may move or change."""
    d = tmp_path / "models"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_synth(d / f"{name}.safetensors", "sd1", 32, "fp16", seed)
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir) -> Path:
    """The two-step recipe built once over the shared models (tests that only read it share it)."""
    d = tmp_path_factory.mktemp("built")
    rp = two_step(d, model_dir)
    Runner(Planner(load_recipe(rp), Options(cache_dir=d / "cache", quiet=True))).build()
    return d


# ---------------------------------------------------------------------------------------------------------------
# what is written


def test_metadata_parses_by_automatic1111_rules(built, model_dir):
    out = built / "out" / "final.safetensors"
    _, meta = read_header(out)
    decoded = a1111.read_webui_metadata(meta)
    for k, v in meta.items():  # every value that starts with `{` is JSON A1111 can decode; nothing else is decoded
        assert isinstance(decoded[k], dict) if v.startswith("{") else decoded[k] == v, k
    rec = decoded["sd_merge_recipe"]
    prov = read_provenance(meta)
    mix_sha = None
    models = decoded["sd_merge_models"]
    sha_c, sha_a = sha256(model_dir / "c.safetensors"), sha256(model_dir / "a.safetensors")
    assert rec["type"] == "webui" and rec["interp_method"] == "Add difference" and rec["multiplier"] == 0.5
    assert rec["secondary_model_hash"] == sha_c and rec["tertiary_model_hash"] == sha_a
    mix_sha = rec["primary_model_hash"]
    assert set(models) == {mix_sha, sha_c, sha_a, sha256(model_dir / "b.safetensors")}  # the step's own inputs, then its ancestry
    assert models[sha_a] == {"name": "a.safetensors", "legacy_hash": digests.legacy_hash(model_dir / "a.safetensors"), "sd_merge_recipe": None}
    assert models[mix_sha]["sd_merge_recipe"]["interp_method"] == "Weighted sum"
    # the sdbuild record: inputs with every hash and their credits, op versions, the output's own digest
    a = prov["recipe"]["inputs"]["A"]
    assert a == {"file": "a.safetensors", "digest": hashing.digest_file(model_dir / "a.safetensors", None)[0], "sha256": sha_a,
                 "autov2": sha_a[:10], "legacy_hash": digests.legacy_hash(model_dir / "a.safetensors"), "author": "alice",
                 "url": "https://example.org/a"}
    assert prov["schema"] == 1 and prov["node"] == "final" and set(prov["nodes"]) == {"mix", "final"}
    assert all(isinstance(n["version"], int) for n in prov["nodes"].values())
    assert meta["sdbuild.content_digest"] == hashing.digest_file(out, None)[0]
    # the card as ModelSpec
    assert meta["modelspec.title"] == "Trial Mix" and meta["modelspec.author"] == "someone"
    assert meta["modelspec.description"] == "two steps" and meta["modelspec.license"] == "creativeml-openrail-m"
    assert meta["modelspec.usage_hint"] == "1girl, masterpiece" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.merged_from"] == "a, b, c"
    assert meta["modelspec.hash_sha256"] == digests.tensor_buffer_sha256(out)


# ---------------------------------------------------------------------------------------------------------------
# reproduce


def test_reproduce_finds_moved_inputs_by_digest_and_verifies_identical_bytes(tmp_path, own_models, sdbuild):
    assert sdbuild("build", two_step(tmp_path, own_models), "-q").code == 0
    out = tmp_path / "out" / "final.safetensors"
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    for n, new in (("a", "renamed-a"), ("b", "b"), ("c", "x")):  # moved, two of them renamed
        shutil.move(own_models / f"{n}.safetensors", elsewhere / f"{new}.safetensors")
    (tmp_path / "elsewhere" / "junk.safetensors").write_bytes(b"not a model")
    r = sdbuild("reproduce", out, "--models", tmp_path / "elsewhere", "--json")
    assert r.code == 0, r
    rep = json.loads(r.out)
    assert rep["identical"] is True and rep["same_bytes"] is True
    assert rep["rebuilt_digest"] == rep["recorded_digest"] == rep["file_digest"]
    assert rep["inputs"] == {"A": str(elsewhere / "renamed-a.safetensors"), "B": str(elsewhere / "b.safetensors"),
                             "C": str(elsewhere / "x.safetensors")}
    # the folder was indexed through the memo database: a second run hashes nothing
    assert rep["hashed"] >= 3
    again = sdbuild("reproduce", out, "--models", tmp_path / "elsewhere", "--json")
    assert again.code == 0 and json.loads(again.out)["hashed"] == 0


def test_reproduce_names_the_altered_tensor(tmp_path, built, model_dir, sdbuild):
    good = built / "out" / "final.safetensors"
    bad = tmp_path / "altered.safetensors"
    shutil.copyfile(good, bad)
    name = "model.diffusion_model.middle_block.1.proj_in.weight"
    with SafetensorsFile(bad) as f:
        start = f.data_start + f.offsets[name][0]
    with open(bad, "r+b") as fh:  # flip one value, keep the header (and its recorded digest) as it was
        fh.seek(start)
        b = fh.read(4)
        fh.seek(start)
        fh.write(bytes(x ^ 0x5A for x in b))
    r = sdbuild("reproduce", bad, "--models", model_dir)
    assert r.code == 1, r
    assert f"1 tensor(s) differ: {name}" in r.err
    assert "altered after it was written" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_reproduce_reports_missing_inputs_with_name_sha_and_url(tmp_path, built, model_dir, sdbuild):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(model_dir / "b.safetensors", empty / "b.safetensors")
    r = sdbuild("reproduce", built / "out" / "final.safetensors", "--models", empty)
    assert r.code == 2, r
    assert "2 input(s) not found" in r.err
    assert f"A (file 'a.safetensors', sha256 {sha256(model_dir / 'a.safetensors')}, url https://example.org/a)" in r.err
    assert f"C (file 'c.safetensors', sha256 {sha256(model_dir / 'c.safetensors')})" in r.err
    assert "Traceback" not in r.err


def test_reproduce_refuses_files_without_provenance(tmp_path, model_dir, sdbuild):
    ghost = tmp_path / "ghost.safetensors"
    save_file({"x": torch.zeros(2)}, str(ghost), metadata=GHOSTXL)
    r = sdbuild("reproduce", ghost, "--models", model_dir)
    assert r.code == 2 and "`sdbuild recipe`" in r.err


# ---------------------------------------------------------------------------------------------------------------
# recipes recovered from files


def test_recipe_from_sdbuild_provenance_rebuilds_the_same_file(tmp_path, built, model_dir, sdbuild):
    out = built / "out" / "final.safetensors"
    again = tmp_path / "again"
    again.mkdir()
    r = sdbuild("recipe", out, "-o", again / "final.yaml", "-q")
    assert r.code == 0, r
    rec = load_recipe(again / "final.yaml")
    orig = load_recipe(built / "recipe.yaml")
    assert {n: s.params for n, s in rec.steps.items()} == {n: s.params for n, s in orig.steps.items()}
    assert rec.card == orig.card and rec.name == orig.name
    b = sdbuild("build", again / "final.yaml", "--models", model_dir, "--cache-dir", tmp_path / "cache2", "-q")
    assert b.code == 0, b
    assert sha256(again / "out" / "final.safetensors") == sha256(out)


def test_ghostxl_recipe_validates_and_builds_with_standins(tmp_path, sdbuild):
    ghost = tmp_path / "GhostXL.safetensors"
    save_file({"x": torch.zeros(2)}, str(ghost), metadata=GHOSTXL)
    r = sdbuild("recipe", ghost)
    assert r.code == 0, r
    text = r.out
    parse_recipe(text, tmp_path / "ghost.yaml")  # validates as written
    stand = tmp_path / "standins"
    for i, sha in enumerate((SHA_A, SHA_B, SHA_C)):
        p = write_synth(stand / f"xl{i}.safetensors", "sdxl", 64, "fp16", 10 + i)
        text = text.replace(sha, sha256(p))
    rp = tmp_path / "ghost.yaml"
    rp.write_text(text)
    b = sdbuild("build", rp, "--models", stand, "--json", "-q")
    assert b.code == 0, b
    out = Path(json.loads(b.out)["outputs"]["merged"])
    assert out.name == "GhostXL-recovered.safetensors"
    with SafetensorsFile(out) as f:
        key = "model.diffusion_model.out.2.weight"
        got = f.read(key).double()
    xs = [SafetensorsFile(stand / f"xl{i}.safetensors").read(key).double() for i in range(3)]
    torch.testing.assert_close(got, 0.7 * xs[0] + 0.15 * xs[1] + 0.15 * xs[2], rtol=1e-3, atol=1e-3)


def test_recipe_of_a_plain_file_is_a_user_error(tmp_path, model_dir, sdbuild):
    r = sdbuild("recipe", model_dir / "a.safetensors")
    assert r.code == 2 and "no merge recipe" in r.err


# ---------------------------------------------------------------------------------------------------------------
# hash


def test_hash_prints_all_four_and_is_memoised(tmp_path, model_dir, sdbuild):
    p = model_dir / "b.safetensors"
    r = sdbuild("hash", p, "--json")
    assert r.code == 0, r
    h = json.loads(r.out)
    sha = sha256(p)
    assert h == {"file": "b.safetensors", "sha256": sha, "autov2": sha[:10], "legacy_hash": digests.legacy_hash(p),
                 "content_digest": hashing.digest_file(p, None)[0]}
    before = hashing.STATS["files_hashed"]
    assert sdbuild("hash", p).code == 0
    assert hashing.STATS["files_hashed"] == before
    assert sdbuild("hash", tmp_path / "nope.safetensors").code == 2


# ---------------------------------------------------------------------------------------------------------------
# lineage


def tiny(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_file({"model.diffusion_model.x.weight": torch.randn(4, 4, generator=g)}, str(path))
    return path


def _chain_build(tmp_path: Path, gen: int, a: Path, b: Path) -> Path:
    d = tmp_path / f"gen{gen}"
    d.mkdir()
    fresh = tiny(d / f"fresh{gen}.safetensors", 1000 + gen)
    rp = write_recipe(d, f"""
        sdbuild: 1
        name: gen{gen}
        card: {{title: Generation {gen}, author: chain}}
        inputs:
          A: {a}
          B: {b}
          F: {fresh}
        steps:
          m: {{op: triple_sum, models: [A, B, F], alpha: 0.3, beta: 0.2}}
        outputs:
          m: g{gen}.safetensors
        """)
    Runner(Planner(load_recipe(rp), Options(cache_dir=tmp_path / "cache", quiet=True))).build()
    return d / f"g{gen}.safetensors"


def test_fifty_generation_lineage_stays_small(tmp_path):
    """Each generation merges the two before it: without de-duplication the lineage would double every time."""
    prev2, prev = tiny(tmp_path / "g0.safetensors", 0), tiny(tmp_path / "g1.safetensors", 1)
    for gen in range(2, 52):
        prev2, prev = prev, _chain_build(tmp_path, gen, prev, prev2)
    with open(prev, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert header < 1_000_000
    _, meta = read_header(prev)
    prov = read_provenance(meta)
    assert len(prov["lineage"]) == 49  # generations 2..50; the plain files carry nothing
    assert all("recipe" in e for e in prov["lineage"].values())
    # AUTOMATIC1111's flattened ancestry: g0, g1, generations 2..50 and the 50 fresh inputs, each once
    assert len(json.loads(meta["sd_merge_models"])) == 101
    tree = "\n".join(lineage_lines(meta, prev.name))
    assert "recipe 'gen2', node 'm'" in tree and "(lineage shown above)" in tree
    assert len(tree) < 200_000


def test_inspect_tree_shows_generations_and_foreign_lineage(tmp_path, model_dir, sdbuild):
    ghost = tmp_path / "ghost.safetensors"
    spec_src = model_dir / "a.safetensors"
    from safetensors.torch import load_file

    # a model carrying supermerger's recipe (GhostXL's metadata on a small SD1 stand-in: only the text matters here)
    save_file(load_file(str(model_dir / "b.safetensors")), str(ghost), metadata=GHOSTXL)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        name: child
        inputs:
          G: {ghost}
          X: {spec_src}
        steps:
          m: {{op: weighted_sum, models: [G, X], alpha: 0.25}}
        outputs:
          m: child.safetensors
        """)
    assert sdbuild("build", rp, "-q").code == 0
    rp2 = write_recipe(tmp_path, f"""
        sdbuild: 1
        name: grandchild
        inputs:
          C: child.safetensors
          X: {model_dir}/c.safetensors
        steps:
          g: {{op: weighted_sum, models: [C, X], alpha: 0.5}}
        outputs:
          g: grandchild.safetensors
        """, name="r2.yaml")
    assert sdbuild("build", rp2, "-q").code == 0
    r = sdbuild("inspect", "--tree", tmp_path / "grandchild.safetensors")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[1] == "└─ recipe 'grandchild', node 'g' (sdbuild 0.1.0)"
    assert "      ├─ C: child.safetensors" in r.out
    assert "recipe 'child', node 'm'" in r.out
    assert "└─ sd-webui-supermerger merge: triple_sum (alpha 0.15, beta 0.15, on_missing take_b)" in r.out
    assert "SDXL_train_ghost_test2  [sha256 3fe89f167d, legacy f61799f2]" in r.out
    j = json.loads(sdbuild("inspect", "--tree", "--json", tmp_path / "grandchild.safetensors").out)
    assert j["recipe"] == "grandchild" and j["node"] == "g"
    child = j["inputs"]["C"]["lineage"]
    assert child["recipe"] == "child" and child["steps"]["m"]["alpha"] == 0.25
    ghost_lineage = child["inputs"]["G"]["lineage"]["foreign"]
    assert ghost_lineage["flavour"] == "sd-webui-supermerger" and ghost_lineage["op"] == "triple_sum"
    assert [m["sha256"] for m in ghost_lineage["models"]] == [SHA_A, SHA_B, SHA_C]
    # the foreign recipe was kept verbatim in the child's lineage
    prov = read_provenance(read_header(tmp_path / "grandchild.safetensors")[1])
    foreign = [e for e in prov["lineage"].values() if "foreign" in e]
    assert len(foreign) == 1 and foreign[0]["foreign"]["sd_merge_recipe"] == GHOSTXL["sd_merge_recipe"]


# ---------------------------------------------------------------------------------------------------------------
# lock files


def test_lock_then_locked_build_and_changed_input(tmp_path, own_models, sdbuild):
    rp = two_step(tmp_path, own_models)
    r = sdbuild("lock", rp)
    assert r.code == 0, r
    lock = read_lock(lock_path(rp))
    assert lock is not None and sorted(lock.of_kind("input")) == ["A", "B", "C"] and list(lock.of_kind("output")) == ["final"]
    assert lock.get("input", "B").sha256 == sha256(own_models / "b.safetensors")
    assert lock.get("output", "final").digest == hashing.digest_file(tmp_path / "out" / "final.safetensors", None)[0]
    text = lock_path(rp).read_text()
    assert text.splitlines()[2].startswith("input A sha256=")
    ok = sdbuild("build", rp, "--locked")
    assert ok.code == 0, ok
    assert "warning" not in ok.err
    # B's content changes (same name, same path)
    write_synth(own_models / "b.safetensors", "sd1", 32, "fp16", 99)
    bad = sdbuild("build", rp, "--locked")
    assert bad.code == 2, bad
    assert "input(s) 'B' differ from recipe.yaml.lock" in bad.err
    assert len(bad.err.strip().splitlines()) == 1
    # a normal build goes ahead and reports what no longer matches the lock
    normal = sdbuild("build", rp)
    assert normal.code == 0, normal
    assert "warning: input 'B': sha256" in normal.err
    assert "warning: output 'final': digest" in normal.err
    # re-locking accepts the change
    assert sdbuild("lock", rp, "-q").code == 0
    assert sdbuild("build", rp, "--locked", "-q").code == 0


def test_locked_build_without_a_lock_is_a_user_error(tmp_path, model_dir, sdbuild):
    r = sdbuild("build", two_step(tmp_path, model_dir), "--locked")
    assert r.code == 2 and "no lock file recipe.yaml.lock" in r.err


# ---------------------------------------------------------------------------------------------------------------
# provenance copied by another tool


def _inherited_meta(built: Path) -> dict[str, str]:
    """Metadata as AUTOMATIC1111 writes it when it merges an sdbuild output with "copy metadata fields" on."""
    _, parent = read_header(built / "out" / "final.safetensors")
    meta = dict(parent)
    meta["sd_merge_recipe"] = json.dumps({"type": "webui", "primary_model_hash": SHA_A, "secondary_model_hash": SHA_B,
                                          "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.4,
                                          "save_as_half": False, "custom_name": "", "config_source": 3, "bake_in_vae": "None",
                                          "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False})
    meta["sd_merge_models"] = json.dumps({SHA_A: {"name": "final.safetensors", "legacy_hash": "00000000", "sd_merge_recipe": None},
                                          SHA_B: {"name": "b.safetensors", "legacy_hash": "11111111", "sd_merge_recipe": None}})
    return meta


def test_copied_sdbuild_provenance_is_not_taken_for_this_files(tmp_path, built, sdbuild):
    meta = _inherited_meta(built)
    child = tmp_path / "a1111-child.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.ones(3)}, str(child), metadata=meta)
    r = sdbuild("recipe", child)
    assert r.code == 0, r
    rec = parse_recipe(r.out, tmp_path / "c.yaml")
    assert rec.steps["merged"].op == "weighted_sum" and rec.steps["merged"].params["alpha"] == 0.4
    assert "NOTE: the file also carries sdbuild provenance of an ancestor (recipe 'trial', node 'final'" in r.out
    # without a foreign recipe to fall back on, the stale provenance is refused rather than replayed
    del meta["sd_merge_recipe"]
    save_file({"model.diffusion_model.x.weight": torch.ones(3)}, str(child), metadata=meta)
    r2 = sdbuild("recipe", child)
    assert r2.code == 2 and "are not the ones its sdbuild provenance describes" in r2.err


def test_copied_provenance_becomes_the_ancestor_in_lineage(built):
    from mergekit_sd.provenance.record import NodeFacts, lineage_of

    meta = _inherited_meta(built)
    recorded = meta["sdbuild.content_digest"]
    table = lineage_of([NodeFacts(name="X", kind="input", digest="f" * 32, metadata=meta)])
    assert set(table) == {"f" * 32, recorded}
    assert table["f" * 32]["foreign"]["sd_merge_recipe"] == meta["sd_merge_recipe"]
    assert table[recorded]["recipe"]["name"] == "trial" and table[recorded]["node"] == "final"


def test_recipe_recovery_round_trips_lora_and_prune_parameters(tmp_path, model_dir, sdbuild):
    from mergekit_sd.synth.loras import write_synth_lora

    write_synth_lora(tmp_path / "detail.safetensors", arch="sd1", format="lora", factor=32, rank=4, seed=1)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        name: baked
        inputs:
          A: {model_dir}/a.safetensors
          B: {model_dir}/b.safetensors
          detail: {{path: detail.safetensors, author: lora-maker}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.4}}
          baked:
            op: lora
            model: mix
            loras:
              - {{lora: detail, strength: 0.6}}
          release: {{op: prune, model: baked, dtype: fp16}}
        outputs:
          release: out/release.safetensors
        """)
    assert sdbuild("build", rp, "-q").code == 0
    out = tmp_path / "out" / "release.safetensors"
    r = sdbuild("recipe", out)
    assert r.code == 0, r
    rec = parse_recipe(r.out, tmp_path / "again.yaml")
    orig = load_recipe(rp)
    assert {n: s.params for n, s in rec.steps.items()} == {n: s.params for n, s in orig.steps.items()}
    assert rec.inputs["detail"].credits == {"author": "lora-maker"}
    meta = a1111.read_webui_metadata(read_header(out)[1])
    assert meta["sd_merge_recipe"]["interp_method"] == "No interpolation" and meta["sd_merge_recipe"]["save_as_half"] is True
    tree = sdbuild("inspect", "--tree", out).out
    assert "   └─ release = prune (dtype fp16)\n      └─ baked = lora (loras [1])\n         ├─ mix = weighted_sum (alpha 0.4)\n" in tree
    assert "└─ kohya training metadata" in tree


def test_lineage_beyond_the_limit_keeps_only_digests(monkeypatch):
    from mergekit_sd.provenance import record as provenance

    monkeypatch.setattr(provenance, "LINEAGE_LIMIT", 110)  # two entries of 52 characters fit
    table = {f"{i:032x}": {"recipe": {"name": "x" * 30}} for i in range(5)}
    out = provenance._limit(table)
    assert list(out) == list(table)
    assert [("recipe" in e) for e in out.values()] == [True, True, False, False, False]
    assert out[f"{4:032x}"] == {"omitted": "lineage size limit"}


def test_block_weights_are_written_as_supermerger_mbw_and_recorded_with_their_rule(tmp_path, built, model_dir, sdbuild):
    w = "0.1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,0,0,0,0,0,0.8,0,0,0,0,0,0"
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A: {model_dir}/a.safetensors
          B: {model_dir}/b.safetensors
        steps:
          m: {{op: weighted_sum, models: [A, B], alpha: "{w}"}}
        outputs:
          m: mbw.safetensors
        """)
    assert sdbuild("build", rp, "-q").code == 0
    meta = read_header(tmp_path / "mbw.safetensors")[1]
    rec = json.loads(meta["sd_merge_recipe"])
    nums = [float(x) for x in w.split(",")]
    assert rec["type"] == "sd-webui-supermerger" and rec["mbw"] is True and rec["mode"] == "Weight sum"
    assert rec["weights_alpha"] == nums[1:] and rec["base_alpha"] == 0.1
    assert read_provenance(meta)["nodes"]["m"]["block_rule"] == "supermerger-2025"
    # and back: the supermerger record recovers to a recipe with the same block list, which validates
    foreign = {"sd_merge_recipe": meta["sd_merge_recipe"], "sd_merge_models": meta["sd_merge_models"]}
    text = recover_recipe(foreign, "mbw.safetensors")
    step = parse_recipe(text, tmp_path / "back.yaml").steps["merged"]
    assert step.params["alpha"] == nums
    # a scalar step records no block rule
    assert "block_rule" not in read_provenance(read_header(built / "out" / "final.safetensors")[1])["nodes"]["mix"]


def test_prediction_type_follows_inputs_that_agree(tmp_path, model_dir, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A: {{path: {model_dir}/a.safetensors, prediction_type: v}}
          B: {{path: {model_dir}/b.safetensors, prediction_type: v}}
          C: {model_dir}/c.safetensors
        steps:
          m: {{op: add_difference, models: [A, B, C], alpha: 0.5}}
        outputs:
          m: m.safetensors
        """)
    assert sdbuild("build", rp, "-q").code == 0
    meta = read_header(tmp_path / "m.safetensors")[1]
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.resolution"] == "512x512"
