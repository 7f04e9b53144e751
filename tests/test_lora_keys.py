"""LoRA module-name lookup tables: docs/formats.md §5.1 counts and §5.2 worked mappings."""

from __future__ import annotations

import pytest

from mergekit_sd.arch.lora_keys import Target, default_modules, table
from mergekit_sd.lora.formats import split_key


@pytest.mark.parametrize("arch,unet,te", [("sd1", 192, 72), ("sd2", 192, 144), ("sdxl", 722, 72 + 192)])
def test_default_module_counts(arch, unet, te):
    mods = default_modules(arch)
    assert sum(t.component == "unet" for t in mods.values()) == unet
    assert sum(t.component == "te" for t in mods.values()) == te


@pytest.mark.parametrize("arch,name,key,part", [
    ("sd1", "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
     "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", None),
    ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.1.conv.weight", None),
    ("sdxl", "lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.2.conv.weight", None),
    ("sd1", "lora_unet_down_blocks_1_resnets_0_time_emb_proj", "model.diffusion_model.input_blocks.4.0.emb_layers.1.weight", None),
    ("sd1", "lora_unet_mid_block_attentions_0_proj_in", "model.diffusion_model.middle_block.1.proj_in.weight", None),
    ("sd1", "lora_unet_middle_block_2_out_layers_3", "model.diffusion_model.middle_block.2.out_layers.3.weight", None),
    ("sd1", "lora_unet_down_blocks_2_downsamplers_0_conv", "model.diffusion_model.input_blocks.9.0.op.weight", None),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None),
    ("sdxl", "lora_unet_add_embedding_linear_1", "model.diffusion_model.label_emb.0.0.weight", None),
    ("sd1", "lora_te_text_model_encoder_layers_5_self_attn_q_proj",
     "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.q_proj.weight", None),
    ("sdxl", "lora_te1_text_model_encoder_layers_11_mlp_fc2",
     "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight", None),
    ("sdxl", "lora_te2_text_model_encoder_layers_5_self_attn_k_proj",
     "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight", 1),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc1", "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight", None),
    ("sd2", "lora_te_text_model_encoder_layers_23_self_attn_v_proj", "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", 2),
    ("sd2", "lora_te_text_model_encoder_layers_0_self_attn_out_proj", "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight", None),
])
def test_worked_mappings(arch, name, key, part):
    t = table(arch).lookup(name)
    assert t is not None and t.weight == key and t.part == part


def test_every_target_has_one_preferred_name_and_names_are_distinct():
    for arch in ("sd1", "sd2", "sdxl"):
        tab = table(arch)
        assert len(set(tab.preferred.values())) == len(tab.preferred)
        assert all(tab.lookup(n) == t for t, n in tab.preferred.items())
    assert table("sd1").lookup("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None
    assert table("sdxl").lookup("lora_unet_input_blocks_9_1_proj_in") is None


@pytest.mark.parametrize("key,expect", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_down.weight")),
    ("text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_B.weight", ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "lora_up.weight")),
    ("base_model.model.mid_block.attentions.0.proj_out.lora_magnitude_vector", ("lora_unet_mid_block_attentions_0_proj_out", "dora_scale")),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
     ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0", "lora_up.weight")),
    ("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight",
     ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_down.weight")),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.down.weight",
     ("lora_te1_text_model_encoder_layers_0_mlp_fc2", "lora_down.weight")),
    ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", ("lora_unet_input_blocks_4_1_proj_in", "hada_w1_a")),
])
def test_diffusers_and_peft_names(key, expect):
    name, _, role = split_key(key, "lora_te1")
    assert (name, role) == expect
    assert isinstance(table("sdxl").lookup(name) or table("sd1").lookup(name), Target)
