"""op: vae: a bake replaces exactly the 248 VAE tensors and nothing else, from any of the three VAE layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import from_tensors
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.vae import build_vae, diffusers_to_ldm, ldm_to_diffusers, reference_vae
from mergekit_sd.synth.models import synth_tensors, synth_vae_tensors, write_synth, write_synth_ckpt

VAE = "first_stage_model."


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", ["standalone", "checkpoint", "diffusers"])
def test_bake_replaces_exactly_the_vae_keys(tmp_path, sdbuild, layout):
    m = write_synth(tmp_path / "m.safetensors", "sd1", 32, "fp16", 1)
    vae = synth_vae_tensors(32, "fp32", 7, layout)  # fp32 VAE into an fp16 model: cast to the model's VAE dtype
    if layout == "checkpoint":
        vae.update({k: v for k, v in synth_tensors("sd1", 32, "fp32", 8).items() if not k.startswith(VAE)})
    save_file(vae, str(tmp_path / "v.safetensors"))
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {m}, v: {tmp_path / 'v.safetensors'}}}
        steps: {{baked: {{op: vae, model: m, vae: v}}}}
        outputs: {{baked: baked.safetensors}}
        """)
    r = sdbuild("build", rec, "-q")
    assert r.code == 0, r
    got, src = load_file(str(tmp_path / "baked.safetensors")), load_file(str(m))
    assert sorted(got) == sorted(src)
    expect_vae = synth_vae_tensors(32, "fp32", 7, "standalone")
    changed = sorted(k for k in src if raw(got[k]) != raw(src[k]))
    assert changed == sorted(VAE + k for k in expect_vae)
    for k in src:
        assert got[k].dtype == src[k].dtype and got[k].shape == src[k].shape
        if k.startswith(VAE):
            assert raw(got[k]) == raw(expect_vae[k[len(VAE):]].half()), k
    assert got[VAE + "decoder.mid.attn_1.q.weight"].dim() == 4


def test_missing_vae_keys_fail_naming_them(tmp_path):
    vae = synth_vae_tensors(32, "fp16", 7, "diffusers")
    del vae["decoder.mid_block.attentions.0.to_q.weight"]
    m = from_tensors(synth_tensors("sd1", 32, "fp16", 1))
    with pytest.raises(UserError, match=r"lacks 1 of the 248 VAE tensors, e\.g\. decoder\.mid\.attn_1\.q\.weight"):
        build_vae([m, from_tensors(vae, label="v")], {}, OpContext(step="bake"))


def test_shape_mismatch_fails(tmp_path):
    vae = synth_vae_tensors(16, "fp16", 7)  # a VAE of another size
    m = from_tensors(synth_tensors("sd1", 32, "fp16", 1))
    with pytest.raises(UserError, match="does not fit the model"):
        build_vae([m, from_tensors(vae)], {}, OpContext(step="bake"))


def test_model_without_vae_gets_one_in_its_unet_dtype():
    t = {k: v for k, v in synth_tensors("sdxl", 32, "bf16", 1).items() if not k.startswith(VAE)}
    ctx = OpContext(step="bake")
    out = build_vae([from_tensors(t), from_tensors(synth_vae_tensors(32, "fp32", 7, "diffusers"))], {}, ctx)
    assert len(out) == len(t) + 248
    facts = out.info.provenance["vae"]
    assert facts.pop("fingerprint") == toolkit_metric(synth_vae_tensors(32, "fp32", 7))
    assert facts == {"layout": "diffusers", "replaced": 0, "added": 248, "ignored": 0, "dtype": ["BF16"], "reshaped": 8}
    assert out.spec(VAE + "encoder.mid.attn_1.k.weight").shape == (16, 16, 1, 1)


def test_vae_from_a_legacy_ckpt_with_loss_keys(tmp_path):
    vae = synth_vae_tensors(32, "fp16", 7)
    vae["loss.logvar"] = torch.zeros(())
    p = write_synth_ckpt(tmp_path / "vae.pt", vae, extra={"global_step": 1})
    from mergekit_sd.formats.open import open_model

    out = build_vae([from_tensors(synth_tensors("sd1", 32, "fp16", 1)), open_model(p)], {}, OpContext(step="b"))
    assert out.info.provenance["vae"]["replaced"] == 248 and out.info.provenance["vae"]["ignored"] == 1


def test_diffusers_names_round_trip_and_legacy_attention_names():
    for k in reference_vae():
        assert diffusers_to_ldm(ldm_to_diffusers(k)) == k
    assert diffusers_to_ldm("encoder.mid_block.attentions.0.query.weight") == "encoder.mid.attn_1.q.weight"
    assert diffusers_to_ldm("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid.attn_1.proj_out.bias"
    assert diffusers_to_ldm("decoder.up_blocks.0.upsamplers.0.conv.weight") == "decoder.up.3.upsample.conv.weight"
    assert diffusers_to_ldm("encoder.down_blocks.1.resnets.0.conv_shortcut.weight") == "encoder.down.1.block.0.nin_shortcut.weight"


def toolkit_metric(vae: dict[str, torch.Tensor]) -> int:
    """The model toolkit's VAE metric, written out independently."""
    s = 0.0
    for k, v in vae.items():
        if "encoder." in k or "decoder." in k:
            s += (torch.sigmoid(v.half().double()) - 0.5).sum().item()
    n = int(abs(s / 17870.7051 - 1) * 10000)
    while n >= 10000:
        n -= 5000
    return n


def test_sd1_vae_baked_into_sdxl_is_flagged():
    """A VAE whose metric is 0 (the original kl-f8 VAE's value) baked into an SDXL model gets a warning."""
    vae = {k: torch.zeros_like(v) for k, v in synth_vae_tensors(32, "fp32", 7).items()}
    left = 35741  # 35741 values of sigmoid(20) - 0.5 = 0.5 sum to 17870.5: metric 0
    for k in sorted(vae):
        if left and ("encoder." in k or "decoder." in k):
            n = min(left, vae[k].numel())
            vae[k].view(-1)[:n] = 20.0
            left -= n
    assert left == 0 and toolkit_metric(vae) == 0
    ctx = OpContext(step="bake")
    out = build_vae([from_tensors(synth_tensors("sdxl", 32, "fp16", 1)), from_tensors(vae, label="kl-f8")], {}, ctx)
    assert out.info.provenance["vae"]["known_as"] == "SD-v1 (kl-f8)"
    assert any("made for SD1/SD2, baked into an SDXL model" in line for line in ctx.log)
