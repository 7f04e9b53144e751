"""Block weights (docs/formats.md §3): key -> block rule sets on the full reference key lists, presets, lists, selectors,
the 26 -> SDXL conversion, elemental syntax and include/exclude."""

from __future__ import annotations

import pytest

from mergekit_sd.arch import blocks
from mergekit_sd.arch.blocks import (
    SD_BLOCKS,
    SDXL_BLOCKS,
    block_of,
    compile_elemental,
    compile_inex,
    elemental_value,
    merged_by_inex,
    normalize_elemental,
    normalize_inex,
    presets,
    sd_to_sdxl,
)
from mergekit_sd.arch.reference import reference_keys
from mergekit_sd.errors import UserError
from mergekit_sd.arch.weights import compile_weight, normalize_weight

UNET = "model.diffusion_model."


# ---------------------------------------------------------------------------------------------------------------
# §3.2, restated from the table without the implementation's regexes

SD1_TIME = {"supermerger-2025": "IN00", "supermerger-2023": "OUT11", "sd-mecha": "BASE", "mbw-classic": "IN00"}
SDXL_EMB = {"supermerger-2025": "IN00", "supermerger-2023": None, "sd-mecha": "BASE"}


def unet_part(rest: str, head: str) -> str:
    parts = rest.split(".")
    if parts[0] == "out":
        return head
    if parts[0] == "input_blocks":
        return "IN" + parts[1].zfill(2)
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return "OUT" + parts[1].zfill(2)
    return "BASE"


def expected_sd1(key: str, rule: str) -> str:
    if not key.startswith(UNET):
        return "BASE"
    rest = key[len(UNET):]
    if rest.startswith("time_embed."):
        return SD1_TIME[rule]
    return unet_part(rest, "OUT11")


def expected_sdxl(key: str, rule: str) -> str | None:
    if not key.startswith(UNET):
        return "BASE"
    rest = key[len(UNET):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return SDXL_EMB[rule]
    return unet_part(rest, "OUT08")


@pytest.mark.parametrize("rule", list(SD1_TIME))
def test_every_sd1_reference_key(rule):
    keys = reference_keys("sd1")
    got = {k: block_of(k, "sd", rule) for k in keys}
    for k in keys:
        assert got[k] == expected_sd1(k, rule), k
    assert set(got.values()) == set(SD_BLOCKS)  # every one of the 26 blocks holds tensors
    assert got[UNET + "out.2.weight"] == "OUT11"
    assert got["first_stage_model.decoder.conv_out.weight"] == "BASE"
    assert got[UNET + "output_blocks.2.1.conv.weight"] == "OUT02"


@pytest.mark.parametrize("rule", list(SDXL_EMB))
def test_every_sdxl_reference_key(rule):
    keys = reference_keys("sdxl")
    for k in keys:
        assert block_of(k, "sdxl", rule) == expected_sdxl(k, rule), k
    got = {block_of(k, "sdxl", rule) for k in keys} - {None}
    assert got == set(SDXL_BLOCKS)


def test_rule_without_sdxl_map_and_unknown_rule():
    with pytest.raises(UserError, match="no SDXL block map"):
        block_of(UNET + "out.0.weight", "sdxl", "mbw-classic")
    with pytest.raises(UserError, match="unknown block rule 'supermerger-2024'.*did you mean"):
        block_of("x", "sd", "supermerger-2024")


# ---------------------------------------------------------------------------------------------------------------
# §3.3 worked example

S33 = "0.1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,0,0,0,0,0,0.8,0,0,0,0,0,0"


def test_worked_example_sd1():
    w = normalize_weight(S33, "alpha")
    f = compile_weight(w, arch="sd1", where="alpha")
    assert f(UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight") == 0.8
    assert f("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight") == 0.1
    assert f(UNET + "input_blocks.7.1.proj_in.weight") == 0.0
    assert f(UNET + "middle_block.1.proj_in.weight") == 0.5


def test_worked_example_on_sdxl():
    w = [float(x) for x in S33.split(",")]
    assert sd_to_sdxl(w) == [0.1] + [0.0] * 9 + [0.5] + [0, 0, 0, 0, 0, 0.8, 0, 0, 0]
    f = compile_weight(normalize_weight(S33, "alpha"), arch="sdxl", where="alpha")
    assert f(UNET + "output_blocks.5.1.transformer_blocks.3.attn2.to_k.weight") == 0.8
    assert f(UNET + "middle_block.1.proj_in.weight") == 0.5
    assert f("conditioner.embedders.1.model.ln_final.weight") == 0.1
    assert f("first_stage_model.decoder.conv_out.weight") == 0.1  # the appended VAE slot is not a weight


# ---------------------------------------------------------------------------------------------------------------
# presets and canonical forms (§3.4)


def test_presets_restated():
    p = presets()
    assert p["ALL_A"] == (0.0,) * 26 and p["ALL_B"] == (1.0,) * 26
    assert p["FLAT_25"] == (0.0,) + (0.25,) * 25
    assert p["WRAP08"] == (0, 1, 1, 1, 1) + (0,) * 17 + (1, 1, 1, 1)
    gv = p["GRAD_V"]
    assert gv[0] == 0 and gv[1] == 1.0 and gv[2] == 0.9166666667 and gv[13] == 0 and gv[14] == 0.0833333333 and gv[25] == 1.0
    for name, ws in p.items():
        assert len(ws) == 26, name


def test_canonical_forms():
    assert normalize_weight("ALL_A", "a") == 0.0
    assert normalize_weight("ALL_B", "a") == 1.0
    assert normalize_weight(" WRAP08 ", "a") == list(presets()["WRAP08"])
    as_list = [float(x) for x in S33.split(",")]
    assert normalize_weight(S33, "a") == as_list == normalize_weight(as_list, "a")
    assert normalize_weight([0.3] * 26, "a") == 0.3
    assert normalize_weight("0.25", "a") == 0.25 and normalize_weight(1, "a") == 1.0
    assert normalize_weight({"default": 0.4}, "a") == 0.4
    m1 = normalize_weight({"IN4": 1, "in00-in05".upper(): 0.2, "default": 0, "MID": 0.3}, "a")
    m2 = normalize_weight({"M00": 0.3, "IN05-IN00": 0.2, "IN04": 1.0, "default": 0.0}, "a")
    assert m1 == m2 == {"IN00-IN05": 0.2, "IN04": 1.0, "M00": 0.3, "default": 0.0}
    assert normalize_weight([0.5] * 20, "a") == [0.5] * 20  # SDXL-only lists stay lists (they are errors on SD1)


@pytest.mark.parametrize("value, message", [
    (True, "expected a number"),
    ("GRAD_W", "unknown block weight preset 'GRAD_W' \\(did you mean 'GRAD_V'\\?\\)"),
    ([0.1] * 25, "25 values"),
    ("0.1,R,0.3", "random weight token 'R'"),
    ({"in4": 1}, "unknown block selector 'in4' \\(did you mean 'IN04'\\?\\)"),
    ({"IN4": 1, "IN04": 2}, "repeats IN04"),
    ({"re:(": 1}, "bad regular expression"),
    ({}, "empty"),
    (float("nan"), "finite"),
    ({"default": "x"}, "expected a number"),
    (None, "expected a number or block weights"),
])
def test_weight_errors(value, message):
    with pytest.raises(UserError, match=message) as e:
        normalize_weight(value, "steps.mix.alpha")
    assert str(e.value).startswith("steps.mix.alpha") and "\n" not in str(e.value)


def test_lists_per_family():
    xl = [0.0] * 20
    xl[11] = 0.7  # OUT00
    f = compile_weight(xl, arch="sdxl")
    assert f(UNET + "output_blocks.0.0.in_layers.2.weight") == 0.7
    xl21 = xl + [0.9]
    g = compile_weight(xl21, arch="sdxl")
    assert g("first_stage_model.encoder.conv_in.weight") == 0.9 and g("conditioner.embedders.0.x.weight") == 0.0
    with pytest.raises(UserError, match="SD1/SD2 model, which takes 26"):
        compile_weight(xl, arch="sd1")
    with pytest.raises(UserError, match="unknown"):
        compile_weight(xl, arch="unknown")
    with pytest.raises(UserError, match="known architecture"):
        compile_weight({"default": 0.1, "IN00": 0.2}, arch=None)
    sd27 = [0.0] * 26 + [0.6]
    h = compile_weight(sd27, arch="stable-diffusion-v1")
    assert h("first_stage_model.encoder.conv_in.weight") == 0.6 and h("cond_stage_model.x") == 0.0


def test_selector_precedence():
    w = normalize_weight({"default": 0.1, "IN": 0.2, "IN00-IN11": 0.3, "IN03-IN05": 0.4, "IN04": 0.5,
                          "re:attn2": 0.6, "VAE": 0.7, "BASE": 0.8}, "alpha")
    f = compile_weight(w, arch="sd1")
    assert f(UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight") == 0.6  # regex
    assert f(UNET + "input_blocks.4.1.proj_in.weight") == 0.5  # block
    assert f(UNET + "input_blocks.5.1.proj_in.weight") == 0.4  # narrowest range
    assert f(UNET + "input_blocks.1.1.proj_in.weight") == 0.3  # range
    assert f("first_stage_model.decoder.conv_in.weight") == 0.7  # VAE beats BASE
    assert f("cond_stage_model.transformer.text_model.final_layer_norm.weight") == 0.8
    assert f(UNET + "output_blocks.1.0.skip_connection.weight") == 0.1  # default
    g = compile_weight(normalize_weight({"IN": 0.2, "M": 0.5, "OUT": 0.8, "BASE": 0}, "a"), arch="sd1")
    assert g(UNET + "middle_block.2.out_layers.3.weight") == 0.5
    assert g(UNET + "time_embed.0.weight") == 0.2  # IN00 under supermerger-2025
    assert compile_weight(normalize_weight({"IN": 0.2, "OUT": 0.8, "default": 0}, "a"), arch="sd1",
                          rule="supermerger-2023")(UNET + "time_embed.0.weight") == 0.8


def test_selector_errors():
    f = compile_weight({"IN": 0.2}, arch="sd1", where="steps.m.alpha")
    with pytest.raises(UserError, match="do not cover tensor 'cond_stage_model.x' \\(block BASE\\); add `default:`"):
        f("cond_stage_model.x")
    g = compile_weight({"re:attn": 0.2, "re:to_k": 0.3, "default": 0}, arch="sd1")
    with pytest.raises(UserError, match="matches both"):
        g(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    with pytest.raises(UserError, match="SDXL has no block IN09"):
        compile_weight({"IN09": 0.2, "default": 0}, arch="sdxl")
    with pytest.raises(UserError, match="SDXL has no block IN11"):
        compile_weight({"IN00-IN11": 0.2, "default": 0}, arch="sdxl")


# ---------------------------------------------------------------------------------------------------------------
# §3.5 elemental


def el_alpha(text: str, key: str, alpha: float = 0.0, family: str = "sd") -> float:
    entries = compile_elemental(normalize_elemental(text, "e"), family, "e")
    return elemental_value(entries, key, block_of(key, family), family, alpha)


def test_elemental_examples():
    k_attn1 = UNET + "output_blocks.6.1.transformer_blocks.0.attn1.to_q.weight"
    k_tok = UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight"
    k_ff = UNET + "output_blocks.6.1.transformer_blocks.0.ff.net.2.weight"
    text = "OUT06:attn:0.5, OUT06:attn2.to_k:0.2"
    assert el_alpha(text, k_attn1) == 0.5 and el_alpha(text, k_tok) == 0.2 and el_alpha(text, k_ff, 0.9) == 0.9
    # NOT on blocks
    assert el_alpha("NOT OUT04:attn:1", UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == 1
    assert el_alpha("NOT OUT04:attn:1", UNET + "output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 0.3) == 0.3
    # NOT on elements
    k5 = UNET + "output_blocks.5.0.in_layers.2.weight"
    assert el_alpha("OUT05:NOT attn proj:0.2", k5) == 0.2
    assert el_alpha("OUT05:NOT attn proj:0.2", UNET + "output_blocks.5.1.proj_in.weight", 0.7) == 0.7
    # whole blocks, ranges either way round, newlines as separators
    assert el_alpha("IN04-IN08 M00::0", UNET + "input_blocks.6.0.op.weight", 1.0) == 0
    assert el_alpha("IN08-IN04 M00::0", UNET + "middle_block.0.in_layers.2.weight", 1.0) == 0
    assert el_alpha("IN04-IN08 M00::0", UNET + "input_blocks.9.0.op.weight", 1.0) == 1.0
    assert el_alpha("::0.4\nBASE::0.1", "cond_stage_model.transformer.text_model.final_layer_norm.weight") == 0.1


def test_elemental_canonical_and_errors():
    a = normalize_elemental("OUT6:attn:0.50,  IN8-IN4 M00 ::0", "e")
    b = normalize_elemental(["OUT06:attn:0.5", "IN04-IN08 M00::0.0"], "e")
    assert a == b == ["OUT06:attn:0.5", "IN04-IN08 M00::0.0"]
    assert normalize_elemental("", "e") is None
    with pytest.raises(UserError, match="two colons"):
        normalize_elemental("OUT06:attn", "steps.m.elemental")
    with pytest.raises(UserError, match="not a number"):
        normalize_elemental("OUT06:attn:half", "e")
    with pytest.raises(UserError, match="random"):
        normalize_elemental("OUT06:attn:R", "e")
    with pytest.raises(UserError, match="unknown block selector 'OUT6x'"):
        normalize_elemental("OUT6x:attn:0.1", "e")
    with pytest.raises(UserError, match="SDXL has no block OUT10"):
        compile_elemental(["OUT10:attn:0.1"], "sdxl", "e")


# ---------------------------------------------------------------------------------------------------------------
# §3.6 include / exclude


def test_include_exclude():
    assert normalize_inex("OUT, attn2 ,IN4, VAE, re:to_k$", "x") == ["IN04", "OUT", "VAE", "attn2", "re:to_k$"]
    inc = compile_inex(["IN04", "VAE"], "sd")
    exc = compile_inex(["attn2", "Adjust"], "sd")
    k_in4 = UNET + "input_blocks.4.0.in_layers.2.weight"
    k_in4_attn2 = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    k_vae = "first_stage_model.decoder.conv_in.weight"
    k_out = UNET + "output_blocks.4.0.in_layers.2.weight"
    b = lambda k: block_of(k, "sd")  # noqa: E731
    assert merged_by_inex(inc, None, k_in4, b(k_in4), "sd")
    assert merged_by_inex(inc, None, k_vae, b(k_vae), "sd")
    assert not merged_by_inex(inc, None, k_out, b(k_out), "sd")
    assert not merged_by_inex(inc, exc, k_in4_attn2, b(k_in4_attn2), "sd")
    assert not merged_by_inex(None, exc, UNET + "out.2.bias", "OUT11", "sd")
    assert merged_by_inex(None, exc, k_out, b(k_out), "sd")
    # substrings work without a known architecture; blocks do not
    assert compile_inex(["attn2"], None) is not None
    with pytest.raises(UserError, match="known architecture"):
        compile_inex(["IN04"], None, "x")
    with pytest.raises(UserError, match="list of blocks"):
        normalize_inex(3, "x")


def test_block_lists():
    assert len(SD_BLOCKS) == 26 and SD_BLOCKS[0] == "BASE" and SD_BLOCKS[13] == "M00" and SD_BLOCKS[-1] == "OUT11"
    assert len(SDXL_BLOCKS) == 20 and SDXL_BLOCKS[10] == "M00" and SDXL_BLOCKS[-1] == "OUT08"
    assert blocks.family_of("stable-diffusion-xl-v1-base") == "sdxl"
    assert blocks.family_of("stable-diffusion-xl-v1-refiner") == "sd"
    assert blocks.family_of("sd2") == "sd" and blocks.family_of("unknown") is None
