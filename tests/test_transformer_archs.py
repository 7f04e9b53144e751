"""Flux and SD3/3.5: detection in every naming with no false positives, synthetic models, inspect, naming errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_recipe
from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.models.flux import LINEAR1_SPLIT, to_diffusers
from mergekit_sd.arch.registry import named_reference
from mergekit_sd.synth.models import synth_model, synth_specs, synth_tensors

CASES = [("flux", "comfyui"), ("flux", "bfl"), ("flux", "diffusers"), ("sd3", "comfyui"), ("sd3", "bfl"),
         ("sd35m", "comfyui"), ("sd35l", "comfyui")]


@pytest.mark.parametrize("arch,naming", CASES)
def test_detected_in_every_naming(arch, naming):
    info = detect(synth_model(arch, 64, "fp16", naming=naming).specs)
    assert (info.arch, info.naming, info.factor) == (arch, naming, 64)
    assert info.known and info.family is not None and info.modelspec


def test_variants_and_no_false_positives():
    assert detect(synth_model("flux", 64, "fp16").specs).variant == "dev"
    assert detect(synth_model("flux", 64, "fp16", variant="schnell").specs).variant == "schnell"
    assert detect(synth_model("flux", 64, "fp16", diffusion_only=True).specs).modelspec == "flux-1-dev"
    # the older architectures are still what they were, and nothing here is mistaken for Flux/SD3
    assert detect(synth_specs("sd1")).arch == "sd1" and detect(synth_specs("sdxl")).arch == "sdxl"
    ids = {(a, n): detect(synth_model(a, 64, "fp16", naming=n).specs).arch for a, n in CASES}
    assert ids == {(a, n): a for a, n in CASES}


def test_full_size_flux_has_780_diffusion_tensors_of_11_9b_parameters():
    ref = named_reference("flux", "bfl")
    assert len(ref) == 780
    n = sum(torch.Size(e["shape"]).numel() for e in ref.values())
    assert 11.8e9 < n < 12.0e9


def test_diffusers_naming_is_the_bfl_rows_in_order():
    """Restated independently: qkv rows are q, k, v; linear1 rows are q, k, v (hidden each) then the MLP (4x)."""
    bfl = synth_tensors("flux", 64, "fp32", seed=3, naming="bfl")
    dif = synth_tensors("flux", 64, "fp32", seed=3, naming="diffusers")
    qkv = bfl["double_blocks.2.img_attn.qkv.weight"]
    h = qkv.shape[0] // 3
    assert torch.equal(dif["transformer_blocks.2.attn.to_q.weight"], qkv[:h])
    assert torch.equal(dif["transformer_blocks.2.attn.to_k.weight"], qkv[h:2 * h])
    assert torch.equal(dif["transformer_blocks.2.attn.to_v.weight"], qkv[2 * h:])
    txt = bfl["double_blocks.2.txt_attn.qkv.bias"]
    assert torch.equal(dif["transformer_blocks.2.attn.add_v_proj.bias"], txt[2 * h:])
    l1 = bfl["single_blocks.5.linear1.weight"]
    assert l1.shape[0] == 7 * h and LINEAR1_SPLIT == (1, 1, 1, 4)
    assert torch.equal(dif["single_transformer_blocks.5.attn.to_k.weight"], l1[h:2 * h])
    assert torch.equal(dif["single_transformer_blocks.5.proj_mlp.weight"], l1[3 * h:])
    mod = bfl["final_layer.adaLN_modulation.1.weight"]
    half = mod.shape[0] // 2
    assert torch.equal(dif["norm_out.linear.weight"], torch.cat([mod[half:], mod[:half]]))
    assert torch.equal(dif["x_embedder.weight"], bfl["img_in.weight"])
    assert to_diffusers("double_blocks.0.img_attn.norm.query_norm.scale", (128,))[0][0] == "transformer_blocks.0.attn.norm_q.weight"


def test_inspect_reports_components_junk_and_missing(tmp_path, sdbuild):
    from safetensors.torch import save_file

    t = synth_tensors("sd35l", 64, "fp16", seed=1)
    t.pop("model.diffusion_model.joint_blocks.3.x_block.attn.qkv.weight")
    t["model_ema.decay"] = torch.tensor(0.999)
    save_file(t, str(tmp_path / "m.safetensors"))
    r = sdbuild("inspect", tmp_path / "m.safetensors", "--json", "--no-scan")
    rep = json.loads(r.out)
    assert rep["architecture"] == "sd35l" and rep["naming"] == "comfyui"
    assert set(rep["components"]) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    assert rep["keys"]["missing"] == ["model.diffusion_model.joint_blocks.3.x_block.attn.qkv.weight"]
    assert rep["junk"]["categories"]["ema"]["keys"] == ["model_ema.decay"]


def test_synth_cli_writes_every_naming(tmp_path, sdbuild):
    for naming in ("bfl", "comfyui", "diffusers"):
        out = tmp_path / f"{naming}.safetensors"
        assert sdbuild("synth", out, "--arch", "flux", "--factor", "64", "--naming", naming, "-q").code == 0
        rep = json.loads(sdbuild("inspect", out, "--json", "--no-scan").out)
        assert rep["naming"] == naming and rep["keys"]["missing"] == [] and rep["junk"]["tensors"] == 0


def test_merging_two_namings_stops_with_a_clear_error(tmp_path, sdbuild):
    for naming in ("bfl", "diffusers"):
        sdbuild("synth", tmp_path / f"{naming}.safetensors", "--arch", "flux", "--factor", "64", "--naming", naming, "-q")
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {a: bfl.safetensors, b: diffusers.safetensors}
        steps:
          m: {op: weighted_sum, models: [a, b], alpha: 0.5}
        outputs: {m: m.safetensors}
        """)
    r = sdbuild("build", rp, "-q")
    assert r.code == 2
    assert "bfl naming" in r.err and "diffusers naming" in r.err and "one naming" in r.err
    assert not (tmp_path / "m.safetensors").exists()


def test_flux_merge_is_exact_and_named(tmp_path, sdbuild):
    from safetensors import safe_open

    for s in (1, 2):
        sdbuild("synth", tmp_path / f"f{s}.safetensors", "--arch", "flux", "--factor", "64", "--dtype", "fp32",
                "--seed", str(s), "--naming", "bfl", "-q")
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {a: f1.safetensors, b: f2.safetensors}
        steps:
          m: {op: weighted_sum, models: [a, b], alpha: 0.25}
        outputs: {m: m.safetensors}
        """)
    assert sdbuild("build", rp, "-q").code == 0
    a = synth_tensors("flux", 64, "fp32", seed=1, naming="bfl")
    b = synth_tensors("flux", 64, "fp32", seed=2, naming="bfl")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        k = "double_blocks.7.img_attn.qkv.weight"
        assert torch.allclose(f.get_tensor(k), a[k] * 0.75 + b[k] * 0.25, rtol=0, atol=1e-7)
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["modelspec.resolution"] == "1024x1024"


def _objects(cache):
    return sorted(p.name for p in (cache / "objects").rglob("*.safetensors")) if (cache / "objects").exists() else []


@pytest.mark.parametrize("late", [
    "{op: weighted_sum, models: [xl_mix, f1], alpha: 0.5}",                       # Flux x SDXL
    "{op: weighted_sum, models: [f1, f2], alpha: {default: 0.3, IN00: 0.6}}",     # block weights without a block map
])
def test_a_mistake_in_a_late_step_fails_before_anything_is_built(tmp_path, sdbuild, late):
    from mergekit_sd.synth.models import write_synth

    write_synth(tmp_path / "x1.safetensors", "sdxl", 64, "fp16", 1)
    write_synth(tmp_path / "x2.safetensors", "sdxl", 64, "fp16", 2)
    for s in (1, 2):
        sdbuild("synth", tmp_path / f"f{s}.safetensors", "--arch", "flux", "--factor", "64", "--seed", str(s), "-q")
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{x1: x1.safetensors, x2: x2.safetensors, f1: f1.safetensors, f2: f2.safetensors}}
        steps:
          xl_mix: {{op: weighted_sum, models: [x1, x2], alpha: 0.5}}
          late: {late}
        outputs: {{xl_mix: xl.safetensors, late: late.safetensors}}
        """)
    cache = tmp_path / "cache"
    r = sdbuild("build", rp, "-q", "--cache-dir", cache)
    assert r.code == 2
    assert "recipe.yaml:" in r.err and "'late'" in r.err
    assert _objects(cache) == [] and not (tmp_path / "xl.safetensors").exists()


def test_sd1_lora_bake_into_flux_is_refused_clearly(tmp_path, sdbuild):
    from mergekit_sd.synth.loras import write_synth_lora

    sdbuild("synth", tmp_path / "f.safetensors", "--arch", "flux", "--factor", "64", "-q")
    write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", 64, 4, 0)
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {f: f.safetensors, l: l.safetensors}
        steps:
          b: {op: lora, model: f, loras: [{lora: l, strength: 1}]}
        outputs: {b: b.safetensors}
        """)
    r = sdbuild("build", rp, "-q")
    assert r.code == 2 and "is for SD1" in r.err and "Flux.1" in r.err and r.err.count("\n") == 1
