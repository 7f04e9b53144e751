"""Architecture detection (docs/formats.md §1.3) and file kinds, from tensor names and shapes only."""

from __future__ import annotations

import torch

from mergekit_sd.arch.detect import ArchInfo, detect, model_kind
from mergekit_sd.lazy import TensorSpec
from mergekit_sd.synth.models import synth_specs

F16 = torch.float16
UNET = "model.diffusion_model."


def spec(*shape: int) -> TensorSpec:
    return TensorSpec(F16, tuple(shape))


def with_conv(specs: dict, channels: int) -> dict:
    s = dict(specs)
    k = UNET + "input_blocks.0.0.weight"
    old = s[k].shape
    s[k] = spec(old[0], channels, *old[2:])
    return s


def test_sd1_and_sdxl_synthetic_models():
    a = detect(synth_specs("sd1"))
    assert a == ArchInfo("sd1", None, "stable-diffusion-v1", "sd")
    x = detect(synth_specs("sdxl"))
    assert x == ArchInfo("sdxl", None, "stable-diffusion-xl-v1-base", "sdxl")
    assert detect(synth_specs("sd1", factor=1)).arch == "sd1"  # full-size shapes too


def test_variants_from_the_input_conv():
    inp = detect(synth_specs("sd1", inpainting=True))
    assert (inp.arch, inp.variant, inp.modelspec) == ("sd1", "inpainting", "stable-diffusion-v1-inpainting")
    p2p = detect(with_conv(synth_specs("sd1"), 8))
    assert (p2p.arch, p2p.variant) == ("sd1", "instruct-pix2pix")
    xl = detect(with_conv(synth_specs("sdxl"), 9))
    assert (xl.arch, xl.variant, xl.family) == ("sdxl", "inpainting", "sdxl")


def sd2_specs() -> dict:
    s = {k: v for k, v in synth_specs("sd1").items() if not k.startswith("cond_stage_model.")}
    s["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = spec(3072, 1024)
    s["cond_stage_model.model.ln_final.weight"] = spec(1024)
    return s


def test_sd2_depth_unclip_turbo():
    assert detect(sd2_specs()) == ArchInfo("sd2", None, "stable-diffusion-v2", "sd")
    assert detect(with_conv(sd2_specs(), 9)).variant == "inpainting"
    depth = dict(sd2_specs(), **{"depth_model.model.pretrained.act_postprocess3.0.project.0.bias": spec(256)})
    assert detect(depth).variant == "depth"
    unclip = dict(synth_specs("sd1"), **{"embedder.model.ln_final.weight": spec(768)})
    assert (detect(unclip).arch, detect(unclip).variant) == ("sd2", "unclip-l")
    # SD 2.1-Turbo in SGM naming: OpenCLIP-H (width 1024) at conditioner.embedders.0
    turbo = {k: v for k, v in synth_specs("sd1").items() if not k.startswith("cond_stage_model.")}
    turbo["conditioner.embedders.0.model.ln_final.weight"] = spec(1024)
    assert detect(turbo).arch == "sd2"


def test_sdxl_refiner():
    s = {k: v for k, v in synth_specs("sd1").items() if not k.startswith("cond_stage_model.")}
    s["conditioner.embedders.0.model.ln_final.weight"] = spec(1280)
    s[UNET + "label_emb.0.0.weight"] = spec(1536, 2560)
    r = detect(s)
    assert (r.arch, r.modelspec, r.family) == ("sdxl-refiner", "stable-diffusion-xl-v1-refiner", "sd")


def test_unet_only_files():
    sd1 = {k: v for k, v in synth_specs("sd1").items() if k.startswith(UNET)}
    xl = {k: v for k, v in synth_specs("sdxl").items() if k.startswith(UNET)}
    assert detect(sd1).arch == "sd1"
    assert detect(xl).arch == "sdxl"


def test_unknown_state_dicts():
    assert detect({"layer.weight": spec(4, 4)}) == ArchInfo("unknown")
    assert not detect({}).known
    assert detect({"cond_stage_model.roberta.embeddings.word_embeddings.weight": spec(4, 4), UNET + "x": spec(1)}).arch == "unknown"


def test_compatible():
    sd1, xl, unk = detect(synth_specs("sd1")), detect(synth_specs("sdxl")), detect({"w": spec(1)})
    assert sd1.compatible(detect(synth_specs("sd1", inpainting=True)))
    assert not sd1.compatible(xl)
    assert sd1.compatible(unk) and unk.compatible(xl)


def test_model_kind():
    assert model_kind(synth_specs("sd1")) == "checkpoint"
    assert model_kind(synth_specs("sdxl")) == "checkpoint"
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": spec(4, 320),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": spec(320, 4),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": TensorSpec(torch.float32, ())}
    assert model_kind(kohya) == "lora"
    assert model_kind({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": spec(4, 768)}) == "lora"
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": spec(4, 320),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": spec(320, 4)}
    assert model_kind(peft) == "lora"
    loha = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": spec(320, 4),
            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": spec(4, 320)}
    assert model_kind(loha) == "lora"
    lokr = {"lycoris_mid_block_attentions_0_proj_in.lokr_w1": spec(8, 8)}
    assert model_kind(lokr) == "lora"
    vae = {"encoder.conv_in.weight": spec(128, 3, 3, 3), "decoder.conv_out.weight": spec(3, 128, 3, 3)}
    assert model_kind(vae) == "vae"
    assert model_kind({"layer.weight": spec(2)}) == "unknown"
    assert model_kind({}) == "unknown"
    # a checkpoint with a few LoRA leftovers inside is still a checkpoint
    junk = dict(synth_specs("sd1"), **kohya)
    assert model_kind(junk) == "checkpoint"
