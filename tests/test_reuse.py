"""Tensor-level reuse: a stale step computes only the tensors whose inputs or parameters changed and copies the
rest from stored objects, with exact counts, byte-identical outputs and damaged objects detected per tensor."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.engine.state import StateDB
from mergekit_sd.formats.safetensors import SafetensorsFile
from mergekit_sd.synth.loras import write_synth_lora
from mergekit_sd.synth.models import synth_vae_tensors

IN04 = "model.diffusion_model.input_blocks.4."  # SD1 block IN04: the 6th of BASE, IN00..IN11, M00, OUT00..OUT11


def mbw(in04: float, rest: float = 0.5) -> str:
    """A 26-value SD1 block-weight list, BASE first, with IN04 (index 5) set apart."""
    values = [rest] * 26
    values[5] = in04
    return ",".join(str(v) for v in values)


def names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def in_block(path: Path, prefix: str) -> int:
    """Tensors of a block, counted from the names alone (the A1111 block map: input_blocks.N -> INnn)."""
    return sum(1 for k in names(path) if k.startswith(prefix))


def build(sdbuild, recipe: Path, cache: Path, out: Path | None = None) -> dict:
    args = ["build", recipe, "--cache-dir", cache, "--json"] + (["--out-dir", out] if out else [])
    r = sdbuild(*args)
    assert r.code == 0, r
    report = json.loads(r.out)
    report["stderr"] = r.err
    return report


def mix_recipe(tmp_path: Path, model_dir: Path, in04: float) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: "{mbw(in04)}"}}
        outputs: {{mix: out/mix.safetensors}}
        """)


def clean_build(sdbuild, recipe: Path, tmp_path: Path, rel: str) -> bytes:
    """The same recipe built with an empty cache into its own folder: what a reusing build must equal."""
    out = tmp_path / "clean"
    build(sdbuild, recipe, tmp_path / "clean-cache", out)
    return (out / rel).read_bytes()


def count_tensor_reads(monkeypatch) -> list[tuple[str, str]]:
    """(file name, tensor name) of every tensor read from a model file."""
    reads: list[tuple[str, str]] = []
    orig = SafetensorsFile.read

    def read(self, name):
        reads.append((self.path.name, name))
        return orig(self, name)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    return reads


def test_one_mbw_value_edited_recomputes_only_that_block(tmp_path, model_dir, sdbuild, monkeypatch):
    total = len(names(model_dir / "a.safetensors"))
    block = in_block(model_dir / "a.safetensors", IN04)
    assert 0 < block < total
    cache = tmp_path / "cache"
    first = build(sdbuild, mix_recipe(tmp_path, model_dir, 0.5), cache)
    assert first["steps"]["mix"]["computed"] == total and first["steps"]["mix"]["reused"] == 0
    rp = mix_recipe(tmp_path, model_dir, 0.9)
    reads = count_tensor_reads(monkeypatch)
    again = build(sdbuild, rp, cache)
    seen = list(reads)
    # the inputs are read for the recomputed tensors only
    expect = {k for k in names(model_dir / "a.safetensors") if k.startswith(IN04)}
    assert sorted(t for f, t in seen if f == "a.safetensors") == sorted(expect)
    assert sorted(t for f, t in seen if f == "b.safetensors") == sorted(expect)
    mix = again["steps"]["mix"]
    assert mix["computed"] == block and mix["reused"] == total - block
    assert mix["source"] == "computed" and isinstance(mix["seconds"], float) and mix["seconds"] >= 0
    assert f"mix: {block} computed, {total - block} reused" in again["stderr"]
    out = (tmp_path / "out" / "mix.safetensors").read_bytes()
    assert out == clean_build(sdbuild, rp, tmp_path, "out/mix.safetensors")
    # the reused tensors hold exactly the formula's values (IN04 at 0.9, every other block at 0.5)
    A, B, M = (load_file(str(p)) for p in (model_dir / "a.safetensors", model_dir / "b.safetensors",
                                              tmp_path / "out" / "mix.safetensors"))
    for k in ("model.diffusion_model.input_blocks.4.0.in_layers.0.weight", "model.diffusion_model.out.0.weight"):
        w = 0.9 if k.startswith(IN04) else 0.5
        ref = A[k].double() * (1 - w) + B[k].double() * w
        assert float((M[k].double() - ref).abs().max()) <= 1e-4  # fp16 rounding; the other weight is ~1e-2 off
    # a no-op build does no per-tensor work and reports nothing computed
    assert build(sdbuild, rp, cache)["built"] == []


def test_lora_strength_change_recomputes_only_touched_tensors(tmp_path, model_dir, sdbuild):
    lora = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", factor=32, rank=4, seed=5)
    modules = {k[: -len(".lora_down.weight")] for k in names(lora) if k.endswith(".lora_down.weight")}
    total = len(names(model_dir / "a.safetensors"))

    def recipe(strength: float) -> Path:
        return write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{base: {model_dir}/a.safetensors, L: {lora}}}
            steps:
              baked: {{op: lora, model: base, loras: [{{lora: L, strength: {strength}}}], dtype: fp32}}
            outputs: {{baked: out/baked.safetensors}}
            """)

    cache = tmp_path / "cache"
    build(sdbuild, recipe(0.5), cache)
    old = load_file(str(tmp_path / "out" / "baked.safetensors"))
    rp = recipe(1.25)
    baked = build(sdbuild, rp, cache)["steps"]["baked"]
    new = load_file(str(tmp_path / "out" / "baked.safetensors"))
    changed = sum(1 for k in old if not torch.equal(old[k], new[k]))
    assert baked["computed"] == len(modules) == changed  # one module per adapted weight in this LoRA
    assert baked["reused"] == total - len(modules)
    assert (tmp_path / "out" / "baked.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/baked.safetensors")


def test_chain_recomputes_downstream_tensors_only_where_inputs_changed(tmp_path, model_dir, sdbuild):
    def recipe(in04: float) -> Path:
        return write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
            steps:
              up: {{op: weighted_sum, models: [A, B], alpha: "{mbw(in04)}"}}
              down: {{op: add_difference, models: [up, B, C], alpha: 0.4}}
              half: {{op: convert, model: down, dtype: bf16}}
            outputs: {{up: out/up.safetensors, down: out/down.safetensors, half: out/half.safetensors}}
            """)

    total = len(names(model_dir / "a.safetensors"))
    block = in_block(model_dir / "a.safetensors", IN04)
    cache = tmp_path / "cache"
    build(sdbuild, recipe(0.2), cache)
    up_old, down_old = (load_file(str(tmp_path / "out" / f"{n}.safetensors")) for n in ("up", "down"))
    rp = recipe(0.8)
    steps = build(sdbuild, rp, cache)["steps"]
    up_new, down_new = (load_file(str(tmp_path / "out" / f"{n}.safetensors")) for n in ("up", "down"))
    changed = {k for k in up_old if not torch.equal(up_old[k], up_new[k])}
    assert steps["up"]["computed"] == block and steps["up"]["reused"] == total - block
    assert changed and all(k.startswith(IN04) for k in changed)
    # early cutoff per tensor: the downstream step computes exactly the tensors whose upstream tensor changed
    assert steps["down"]["computed"] == len(changed) and steps["down"]["reused"] == total - len(changed)
    # and a convert after it casts again only the tensors that changed in its input
    down_changed = sum(1 for k in down_old if not torch.equal(down_old[k], down_new[k]))
    assert steps["half"]["computed"] == down_changed and steps["half"]["reused"] == total - down_changed
    assert (tmp_path / "out" / "half.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/half.safetensors")
    assert (tmp_path / "out" / "down.safetensors").read_bytes() == (tmp_path / "clean" / "out" / "down.safetensors").read_bytes()


def test_prune_with_a_cast_after_a_partly_changed_merge_redoes_only_changed_tensors(tmp_path, model_dir, sdbuild):
    def recipe(in04: float) -> Path:
        return write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
            steps:
              mix: {{op: weighted_sum, models: [A, B], alpha: "{mbw(in04)}"}}
              slim: {{op: prune, model: mix, dtype: bf16, components: [unet, text_encoder]}}
            outputs: {{mix: out/mix.safetensors, slim: out/slim.safetensors}}
            """)

    cache = tmp_path / "cache"
    build(sdbuild, recipe(0.1), cache)
    old = load_file(str(tmp_path / "out" / "mix.safetensors"))
    rp = recipe(0.6)
    steps = build(sdbuild, rp, cache)["steps"]
    new = load_file(str(tmp_path / "out" / "mix.safetensors"))
    kept = set(names(tmp_path / "out" / "slim.safetensors"))
    assert kept and len(kept) < len(new)  # the VAE was dropped
    changed = {k for k in new if not torch.equal(old[k], new[k])} & kept
    assert changed and steps["slim"]["computed"] == len(changed) and steps["slim"]["reused"] == len(kept) - len(changed)
    assert (tmp_path / "out" / "slim.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/slim.safetensors")


def test_vae_swap_recomputes_only_the_vae_tensors(tmp_path, model_dir, sdbuild):
    for name, seed in (("v1", 7), ("v2", 9)):
        save_file(synth_vae_tensors(32, "fp16", seed, "standalone"), str(tmp_path / f"{name}.safetensors"))
    vae_count = len(synth_vae_tensors(32, "fp16", 7, "standalone"))

    def recipe(vae: str) -> Path:
        return write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{m: {model_dir}/a.safetensors, v: {tmp_path / vae}}}
            steps: {{baked: {{op: vae, model: m, vae: v}}}}
            outputs: {{baked: out/baked.safetensors}}
            """)

    cache = tmp_path / "cache"
    build(sdbuild, recipe("v1.safetensors"), cache)
    rp = recipe("v2.safetensors")
    baked = build(sdbuild, rp, cache)["steps"]["baked"]
    total = len(names(model_dir / "a.safetensors"))
    assert baked["computed"] == vae_count and baked["reused"] == total - vae_count
    assert (tmp_path / "out" / "baked.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/baked.safetensors")


def _only_object(cache: Path) -> Path:
    objs = sorted((cache / "objects").glob("*/*.safetensors"))
    assert len(objs) == 1
    return objs[0]


def test_damaged_stored_tensor_is_detected_and_recomputed(tmp_path, model_dir, sdbuild):
    cache = tmp_path / "cache"
    build(sdbuild, mix_recipe(tmp_path, model_dir, 0.5), cache)
    obj = _only_object(cache)
    victim = "model.diffusion_model.out.0.weight"
    with SafetensorsFile(obj) as sf:
        begin = sf.data_start + sf.offsets[victim][0]
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:  # flip a few bytes inside one stored tensor
        f.seek(begin + 2)
        good = f.read(4)
        f.seek(begin + 2)
        f.write(bytes(b ^ 0xFF for b in good))
    total = len(names(model_dir / "a.safetensors"))
    block = in_block(model_dir / "a.safetensors", IN04)
    rp = mix_recipe(tmp_path, model_dir, 0.9)
    report = build(sdbuild, rp, cache)
    mix = report["steps"]["mix"]
    assert mix["computed"] == block + 1 and mix["reused"] == total - block - 1
    assert "mix: 1 stored tensor(s) failed their digest check" in report["stderr"] and victim in report["stderr"]
    assert (tmp_path / "out" / "mix.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/mix.safetensors")
    # the bad record is forgotten; the intact ones stay offered
    held = StateDB(cache).object_tensors(obj.name[: -len(".safetensors")])
    assert victim not in held and len(held) == total - 1


def test_damaged_stored_tensor_is_copied_from_another_object_holding_it(tmp_path, model_dir, sdbuild):
    cache = tmp_path / "cache"
    build(sdbuild, mix_recipe(tmp_path, model_dir, 0.5), cache)
    build(sdbuild, mix_recipe(tmp_path, model_dir, 0.7), cache)  # a second object with every non-IN04 tensor
    objs = sorted((cache / "objects").glob("*/*.safetensors"), key=lambda p: p.name)
    assert len(objs) == 2
    first = objs[0]  # the one offered first
    victim = "model.diffusion_model.out.0.weight"
    with SafetensorsFile(first) as sf:
        begin = sf.data_start + sf.offsets[victim][0]
    os.chmod(first, 0o644)
    with open(first, "r+b") as f:
        f.seek(begin)
        byte = f.read(1)
        f.seek(begin)
        f.write(bytes([byte[0] ^ 0x01]))
    total = len(names(model_dir / "a.safetensors"))
    block = in_block(model_dir / "a.safetensors", IN04)
    rp = mix_recipe(tmp_path, model_dir, 0.9)
    report = build(sdbuild, rp, cache)
    assert report["steps"]["mix"]["computed"] == block and report["steps"]["mix"]["reused"] == total - block
    assert "failed their digest check" in report["stderr"]
    assert (tmp_path / "out" / "mix.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/mix.safetensors")
    assert victim not in StateDB(cache).object_tensors(first.name[: -len(".safetensors")])


def test_ops_without_tensor_keys_always_compute(tmp_path, model_dir, sdbuild):
    """cosine_a scales by whole-model statistics: no tensor can declare what it depends on, so none is reused."""
    def recipe(alpha: float) -> Path:
        return write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
            steps:
              cos: {{op: cosine_a, models: [A, B], alpha: {alpha}}}
            outputs: {{cos: out/cos.safetensors}}
            """)

    cache = tmp_path / "cache"
    build(sdbuild, recipe(0.3), cache)
    merged = sum(1 for k in names(model_dir / "a.safetensors") if not k.endswith("position_ids"))
    cos = build(sdbuild, recipe(0.6), cache)["steps"]["cos"]
    total = len(names(model_dir / "a.safetensors"))
    # only the unmerged tensors (copied from A, keyed on A's tensor alone) can be reused
    assert cos["computed"] == merged and cos["reused"] == total - merged


def test_cache_without_tensor_records_still_reuses_after_one_hashing_pass(tmp_path, model_dir, sdbuild):
    """A cache made before per-tensor records existed: the inputs' and objects' tensor digests are hashed once."""
    cache = tmp_path / "cache"
    build(sdbuild, mix_recipe(tmp_path, model_dir, 0.5), cache)
    obj = _only_object(cache).name[: -len(".safetensors")]
    tkeys = {n: rec[0] for n, rec in StateDB(cache).object_tensors(obj).items()}
    with sqlite3.connect(cache / "state.db") as c:
        c.execute("DELETE FROM tensor_digest")
    total = len(names(model_dir / "a.safetensors"))
    block = in_block(model_dir / "a.safetensors", IN04)
    mix = build(sdbuild, mix_recipe(tmp_path, model_dir, 0.9), cache)["steps"]["mix"]
    assert mix["computed"] == block and mix["reused"] == total - block
    assert all(tkeys.values())  # every tensor of a merge has a key


def test_migration_adds_tensor_tables_to_an_old_database(tmp_path):
    db = tmp_path / "old"
    db.mkdir()
    with sqlite3.connect(db / "state.db") as c:
        c.execute("CREATE TABLE object (key TEXT PRIMARY KEY, compute_key TEXT, digest TEXT, size INTEGER)")
        c.execute("INSERT INTO object VALUES ('k', 'c', 'd', 1)")
    s = StateDB(db)
    assert s.object("k") == ("c", "d", 1) and s.object_boot("k") is None
    s.put_object_tensors("k", [("t", "tk", "dg", 8, 16)])
    s.put_object_tensors("j", [("t", "tk", "dg", 24, 32)])
    assert s.objects_with_tensor_keys(["tk", "none"]) == {"tk": ("j", "t", "dg", 24, 32)}  # one row per key
    assert s.tensor_copies("tk") == [("j", "t", "dg", 24, 32), ("k", "t", "dg", 8, 16)]
    s.forget_object("k")
    assert s.object_tensors("k") == {}


def test_reused_bytes_are_written_as_checked_and_not_hashed_again(tmp_path, model_dir, sdbuild, monkeypatch):
    """Reused tensors are written from the bytes just checked against their digest, which the writer takes as
    given; the file is the one a clean build writes."""
    import mergekit_sd.engine.reuse as reuse_mod

    checked = []
    real = reuse_mod.TensorReuse.known_digest
    def spy(self, name):
        got = real(self, name)
        checked.append(got)
        return got

    monkeypatch.setattr(reuse_mod.TensorReuse, "known_digest", spy)
    cache = tmp_path / "cache"
    build(sdbuild, mix_recipe(tmp_path, model_dir, 0.5), cache)
    rp = mix_recipe(tmp_path, model_dir, 0.7)
    checked.clear()
    reused = build(sdbuild, rp, cache)["steps"]["mix"]["reused"]
    assert reused > 0 and sum(d is not None for d in checked) == reused  # the writer hashed only the computed ones
    assert (tmp_path / "out" / "mix.safetensors").read_bytes() == clean_build(sdbuild, rp, tmp_path, "out/mix.safetensors")
