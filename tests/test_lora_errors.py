"""LoRA modules that do not fit are errors that name them; wrong-architecture LoRAs fail before any tensor is read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, from_tensors
from mergekit_sd.synth.loras import synth_lora, write_synth_lora
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.lora import build_lora

GHOST = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_5_attn1_to_q"
GHOST2 = "lora_te_text_model_encoder_layers_40_mlp_fc1"
MISFIT = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"


def recipe(tmp_path, model, lora, extra=""):
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{base: {model}, L: {lora}}}
        steps:
          baked: {{op: lora, model: base, loras: [{{lora: L, strength: 1}}], dtype: fp32{extra}}}
        outputs: {{baked: out/baked.safetensors}}
        """)


def sd1_lora_with(tmp_path, extra: dict[str, torch.Tensor], name="bad.safetensors", drop=()):
    tensors, meta = synth_lora("sd1", "lora", 32, 2, 1)
    tensors = {k: v for k, v in tensors.items() if k.split(".")[0] not in drop}
    tensors.update(extra)
    save_file(tensors, str(tmp_path / name), meta)
    return tmp_path / name


def test_unmatched_module_fails_naming_it(tmp_path, model_dir, sdbuild):
    lp = sd1_lora_with(tmp_path, {f"{GHOST}.lora_down.weight": torch.zeros(2, 10), f"{GHOST}.lora_up.weight": torch.zeros(10, 2)})
    r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", lp), "-q")
    assert r.code == 2, r
    assert GHOST in r.err and "allow_unmatched" in r.err and len(r.err.strip().splitlines()) == 1


def test_misfit_shape_fails_naming_the_module(tmp_path, model_dir, sdbuild):
    lp = sd1_lora_with(tmp_path, {f"{MISFIT}.lora_down.weight": torch.zeros(2, 7), f"{MISFIT}.lora_up.weight": torch.zeros(20, 2)},
                       drop=(MISFIT,))
    r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", lp), "-q")
    assert r.code == 2, r
    assert MISFIT in r.err and "does not fit" in r.err and "[20, 7]" in r.err


def test_allow_unmatched_warns_listing_every_skipped_module(tmp_path, model_dir, sdbuild):
    lp = sd1_lora_with(tmp_path, {f"{GHOST}.lora_down.weight": torch.zeros(2, 10), f"{GHOST}.lora_up.weight": torch.zeros(10, 2),
                                  f"{GHOST2}.lora_down.weight": torch.zeros(2, 24), f"{GHOST2}.lora_up.weight": torch.zeros(96, 2),
                                  f"{MISFIT}.lora_down.weight": torch.zeros(2, 7), f"{MISFIT}.lora_up.weight": torch.zeros(20, 2)},
                       drop=(MISFIT,))
    r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", lp, ", allow_unmatched: true"))
    assert r.code == 0, r
    warning = [line for line in r.err.splitlines() if "skipped 3 LoRA modules" in line]
    assert len(warning) == 1 and all(n in warning[0] for n in (GHOST, GHOST2, MISFIT))
    # the rest is baked exactly as without the bad modules
    good = sd1_lora_with(tmp_path, {}, name="good.safetensors", drop=(MISFIT,))
    d = tmp_path / "ref"
    d.mkdir()
    assert sdbuild("build", recipe(d, model_dir / "a.safetensors", good), "-q").code == 0
    a, b = load_file(str(tmp_path / "out" / "baked.safetensors")), load_file(str(d / "out" / "baked.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("metadata,te", [(True, True), (False, True), (False, False)])
def test_sdxl_lora_on_sd1_is_an_architecture_error(metadata, te, tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "xl.safetensors", "sdxl", "lora", 32, 2, 1, metadata=metadata, te=te)
    r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", lp), "-q")
    assert r.code == 2, r
    assert "SD1" in r.err and ("SDXL" in r.err or "another architecture" in r.err), r.err


def test_sd1_lora_on_sdxl_is_an_architecture_error(tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "sd1.safetensors", "sd1", "lora", 32, 2, 1)
    r = sdbuild("build", recipe(tmp_path, model_dir / "xl.safetensors", lp), "-q")
    assert r.code == 2 and "is for SD1" in r.err and "SDXL" in r.err, r


def test_architecture_error_comes_before_any_tensor_is_read():
    tensors, _ = synth_lora("sdxl", "lora", 32, 2, 1, metadata=False, te=False)
    from mergekit_sd.synth.models import synth_specs

    def no_read(name):
        raise AssertionError(f"read {name}")

    model = LazyModel(synth_specs("sd1", 32), no_read, label="sd1")
    lora = LazyModel(from_tensors(tensors).specs, no_read, label="xl")
    ctx = OpContext(step="s", input_labels=["sd1.safetensors", "xl.safetensors"])
    with pytest.raises(UserError, match="another architecture.*context width 64"):
        build_lora([model, lora], {"model": "m", "loras": [{"lora": "L", "strength": 1.0}]}, ctx)


def test_refused_formats_say_what_they_are(tmp_path, model_dir, sdbuild):
    for fmt, word in (("oft", "OFT"), ("glora", "GLoRA")):
        lp = write_synth_lora(tmp_path / f"{fmt}.safetensors", "sd1", fmt, 32, 2, 1)
        r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", lp), "-q")
        assert r.code == 2 and word in r.err, r


def test_bad_strength_is_a_recipe_error(tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", 32, 2, 1)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{base: {model_dir}/a.safetensors, L: {lp}}}
        steps:
          baked: {{op: lora, model: base, loras: [{{lora: L, strength: [1, 2, 3]}}]}}
        outputs: {{baked: out/b.safetensors}}
        """)
    r = sdbuild("build", rp, "-q")
    assert r.code == 2 and "recipe.yaml:4" in r.err and "17 or 26" in r.err, r


def test_sd2_text_encoder_rows_and_linear_proj_in():
    """SD2: q/k/v modules land on row blocks of in_proj_weight; proj_in is linear (no 1x1 kernel)."""
    d = 4
    inproj = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"
    inbias = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias"
    proj = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    W = {inproj: torch.randn(3 * d, d), inbias: torch.randn(3 * d), proj: torch.randn(6, 6)}
    k = "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    p = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = {f"{k}.lora_up.weight": torch.randn(d, 1), f"{k}.lora_down.weight": torch.randn(1, d), f"{k}.alpha": torch.tensor(0.5),
            f"{p}.lora_up.weight": torch.randn(6, 2), f"{p}.lora_down.weight": torch.randn(2, 6)}
    ctx = OpContext(step="s", input_labels=["sd2", "l"])
    out = build_lora([from_tensors(W), from_tensors(lora, {"ss_base_model_version": "sd_v2", "ss_v2": "True"})],
                     {"model": "m", "loras": [{"lora": "L", "strength": 2.0}], "dtype": "fp32"}, ctx)
    got = out.get(inproj)
    expect = W[inproj].clone()
    expect[d:2 * d] += 2.0 * 0.5 * (lora[f"{k}.lora_up.weight"] @ lora[f"{k}.lora_down.weight"])
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(out.get(proj), W[proj] + 2.0 * lora[f"{p}.lora_up.weight"] @ lora[f"{p}.lora_down.weight"])
    assert torch.equal(out.get(inbias), W[inbias])
    # an SD1 LoRA (declared by metadata) is refused on it
    with pytest.raises(UserError, match="is for SD1"):
        build_lora([from_tensors(W), from_tensors(lora, {"ss_base_model_version": "sd_v1"})],
                   {"model": "m", "loras": [{"lora": "L", "strength": 1.0}]}, ctx)


def test_a_checkpoint_given_as_a_lora_is_refused(tmp_path, model_dir, sdbuild):
    r = sdbuild("build", recipe(tmp_path, model_dir / "a.safetensors", model_dir / "b.safetensors"), "-q")
    assert r.code == 2 and "needs a lora for 'L'" in r.err and "b.safetensors looks like a checkpoint" in r.err, r


def _sd2_like(path, factor=32):
    """An SD2-layout checkpoint: SD1's UNet with linear proj_in/proj_out and 1024-wide context, OpenCLIP ViT-H text
    encoder (24 blocks), all shrunk by `factor` like the synthetic models."""
    from mergekit_sd.synth.models import synth_tensors

    t = {k: v.float() for k, v in synth_tensors("sd1", factor, "fp32", 11).items() if not k.startswith("cond_stage_model.")}
    d, g = 1024 // factor, torch.Generator().manual_seed(3)
    for k in list(t):
        if k.endswith(("proj_in.weight", "proj_out.weight")):
            t[k] = t[k].reshape(t[k].shape[0], t[k].shape[1])
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            t[k] = torch.randn(t[k].shape[0], d, generator=g) * 0.05
    pre = "cond_stage_model.model."
    t[pre + "token_embedding.weight"] = torch.randn(49408 // 8, d, generator=g)
    for n in range(24):
        b = f"{pre}transformer.resblocks.{n}."
        for name, shape in (("attn.in_proj_weight", (3 * d, d)), ("attn.in_proj_bias", (3 * d,)), ("attn.out_proj.weight", (d, d)),
                            ("attn.out_proj.bias", (d,)), ("mlp.c_fc.weight", (4 * d, d)), ("mlp.c_fc.bias", (4 * d,)),
                            ("mlp.c_proj.weight", (d, 4 * d)), ("mlp.c_proj.bias", (d,)), ("ln_1.weight", (d,)), ("ln_1.bias", (d,))):
            t[b + name] = torch.randn(shape, generator=g) * 0.05
    save_file(t, str(path))
    return t


def test_sd2_bake_through_the_cli(tmp_path, sdbuild):
    from mergekit_sd.arch.lora_keys import default_modules

    W = _sd2_like(tmp_path / "sd2.safetensors")
    g = torch.Generator().manual_seed(5)
    lora, expect = {}, {k: v.clone() for k, v in W.items()}
    mods = default_modules("sd2")
    assert len(mods) == 192 + 144
    for name, tg in mods.items():
        w = W[tg.weight]
        rows = slice(None) if tg.part is None else slice(tg.part * w.shape[0] // 3, (tg.part + 1) * w.shape[0] // 3)
        out, inp = w[rows].shape
        up, down = torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g)
        lora.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)})
        expect[tg.weight][rows] += 0.3 * 0.5 * (up @ down)
    save_file(lora, str(tmp_path / "l.safetensors"), {"ss_base_model_version": "sd_v2", "ss_v2": "True"})
    rp = recipe(tmp_path, tmp_path / "sd2.safetensors", tmp_path / "l.safetensors")
    rp.write_text(rp.read_text().replace("strength: 1", "strength: 0.3"))
    r = sdbuild("build", rp, "-q")
    assert r.code == 0, r
    out = load_file(str(tmp_path / "out" / "baked.safetensors"))
    for k, v in out.items():
        torch.testing.assert_close(v, expect[k], rtol=1e-5, atol=2e-6, msg=k)
    # an SD1 LoRA does not fit it
    sd1 = write_synth_lora(tmp_path / "sd1.safetensors", "sd1", "lora", 32, 2, 1)
    d = tmp_path / "x"
    d.mkdir()
    r = sdbuild("build", recipe(d, tmp_path / "sd2.safetensors", sd1), "-q")
    assert r.code == 2 and "is for SD1" in r.err and "SD2" in r.err, r
