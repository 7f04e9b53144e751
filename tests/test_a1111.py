"""AUTOMATIC1111 / supermerger hashes, metadata and recipe recovery (docs/formats.md §4)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml

from mergekit_sd.formats import digests
from mergekit_sd.provenance import a1111
from mergekit_sd.provenance.a1111 import (
    MergeInput,
    merge_fields,
    parse_merge_metadata,
    read_webui_metadata,
)
from mergekit_sd.provenance.recover import recover_recipe
from mergekit_sd.recipe.load import parse_recipe
from mergekit_sd.synth.models import write_synth
from mergekit_sd.formats.safetensors import read_header

SHA_A = "3fe89f167db02dfba3616042e948767dcc61088373f81460fe44c8609d3a90cd"
SHA_B = "d8fd60692a589f3be4a4c205ae4fa5a1d686b44a1cc20c7953715a95ab5070cf"
SHA_C = "4726d3bab1876f5c23734c871c47901fde305115e15fbfa3f33354ac45b11c67"

# GhostXL's published metadata, verbatim
GHOSTXL = {
    "sd_merge_models": '{"3fe89f167db02dfba3616042e948767dcc61088373f81460fe44c8609d3a90cd": {"name": "SDXL_train_ghost_test2", "legacy_hash": "f61799f2"}, "d8fd60692a589f3be4a4c205ae4fa5a1d686b44a1cc20c7953715a95ab5070cf": {"name": "SDXL_LEOSAM HelloWorld u65b0u4e16u754c _ SDXLu771fu5b9eu611fu5927u6a21u578b_v5.0", "legacy_hash": "e1c7ea87"}, "4726d3bab1876f5c23734c871c47901fde305115e15fbfa3f33354ac45b11c67": {"name": "SDXL_dreamshaperXL_v2TurboDpmppSDE", "legacy_hash": "488f085e"}}',
    "format": "pt",
    "sd_merge_recipe": '{"type": "sd-webui-supermerger", "weights_alpha": null, "weights_beta": null, "weights_alpha_orig": null, "weights_beta_orig": null, "model_a": "3fe89f167db02dfba3616042e948767dcc61088373f81460fe44c8609d3a90cd", "model_b": "d8fd60692a589f3be4a4c205ae4fa5a1d686b44a1cc20c7953715a95ab5070cf", "model_c": "4726d3bab1876f5c23734c871c47901fde305115e15fbfa3f33354ac45b11c67", "base_alpha": 0.15, "base_beta": 0.15, "mode": "Triple sum", "mbw": false, "elemental_merge": "", "calcmode": "normal", "Off": [""]}',
}


# ---------------------------------------------------------------------------------------------------------------
# hashes


def test_legacy_hash_of_small_file_is_sha256_of_nothing(tmp_path: Path):
    p = tmp_path / "small.safetensors"
    p.write_bytes(b"x" * 1000)
    assert digests.legacy_hash(p) == "e3b0c442"
    assert digests.EMPTY_LEGACY == hashlib.sha256(b"").hexdigest()[:8]


def test_legacy_hash_reads_64k_at_1mib(tmp_path: Path):
    data = bytes(range(256)) * (5 * 4096)  # 5 MiB
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert digests.legacy_hash(p) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # a file ending inside the window hashes what is there
    q = tmp_path / "edge.bin"
    q.write_bytes(data[:0x100000 + 10])
    assert digests.legacy_hash(q) == hashlib.sha256(data[0x100000:0x10000A]).hexdigest()[:8]


def test_autov2_is_first_ten_hex():
    assert digests.autov2(SHA_A) == "3fe89f167d"
    assert digests.autov2(SHA_A.upper()) == "3fe89f167d"


def test_tensor_buffer_sha256_matches_what_the_writer_patched_in(tmp_path: Path):
    p = write_synth(tmp_path / "m.safetensors", "sd1", factor=32, seed=3)
    _, meta = read_header(p)
    assert meta["modelspec.hash_sha256"] == digests.tensor_buffer_sha256(p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert digests.tensor_buffer_sha256(p) == "0x" + hashlib.sha256(raw[8 + n:]).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111's reading rule


def test_values_decoded_only_when_they_start_with_brace():
    meta = {"a": '{"x": 1}', "b": "[1, 2]", "c": "{not json", "d": " {\"x\": 1}", "e": ""}
    out = read_webui_metadata(meta)
    assert out == {"a": {"x": 1}, "b": "[1, 2]", "c": "{not json", "d": " {\"x\": 1}", "e": ""}


# ---------------------------------------------------------------------------------------------------------------
# GhostXL


def test_ghostxl_parses_as_triple_sum():
    rec = parse_merge_metadata(GHOSTXL)
    assert rec is not None
    assert rec.flavour == "sd-webui-supermerger"
    assert rec.op == "triple_sum"
    assert [m.sha256 for m in rec.models] == [SHA_A, SHA_B, SHA_C]
    assert [m.legacy_hash for m in rec.models] == ["f61799f2", "e1c7ea87", "488f085e"]
    assert rec.params == {"alpha": 0.15, "beta": 0.15, "on_missing": "take_b"}
    assert rec.notes == []
    assert rec.ancestry == {}


def test_ghostxl_recovers_to_a_recipe_that_validates(tmp_path: Path):
    text = recover_recipe(GHOSTXL, "GhostXL.safetensors")
    r = parse_recipe(text, tmp_path / "ghostxl.yaml")
    assert r.name == "GhostXL"
    assert {n: (i.path, i.sha256) for n, i in r.inputs.items()} == {
        "model_a": ("SDXL_train_ghost_test2.safetensors", SHA_A),
        "model_b": ("SDXL_LEOSAM HelloWorld u65b0u4e16u754c _ SDXLu771fu5b9eu611fu5927u6a21u578b_v5.0.safetensors", SHA_B),
        "model_c": ("SDXL_dreamshaperXL_v2TurboDpmppSDE.safetensors", SHA_C),
    }
    step = r.steps["merged"]
    assert step.op == "triple_sum"
    assert step.refs == ("model_a", "model_b", "model_c")
    assert step.params["alpha"] == 0.15 and step.params["beta"] == 0.15
    assert dict(r.outputs) == {"merged": ("GhostXL-recovered.safetensors",)}
    # every input line says where it came from: web UI name and legacy hash as comments
    assert "legacy hash f61799f2" in text and "legacy hash 488f085e" in text


# ---------------------------------------------------------------------------------------------------------------
# builders and round trips


def _inputs(n: int) -> list[MergeInput]:
    shas = [SHA_A, SHA_B, SHA_C]
    return [MergeInput(shas[i], f"m{i}.safetensors", f"{i:08x}") for i in range(n)]


def test_weighted_sum_writes_webui_fields_exactly():
    fields = merge_fields("weighted_sum", {"alpha": 0.3, "dtype": "fp16", "on_missing": "keep_a"}, _inputs(2), custom_name="mix")
    assert fields["sd_merge_recipe"] == json.dumps({
        "type": "webui", "primary_model_hash": SHA_A, "secondary_model_hash": SHA_B, "tertiary_model_hash": None,
        "interp_method": "Weighted sum", "multiplier": 0.3, "save_as_half": True, "custom_name": "mix", "config_source": 3,
        "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False})
    models = json.loads(fields["sd_merge_models"])
    assert models == {SHA_A: {"name": "m0.safetensors", "legacy_hash": "00000000", "sd_merge_recipe": None},
                      SHA_B: {"name": "m1.safetensors", "legacy_hash": "00000001", "sd_merge_recipe": None}}
    # AUTOMATIC1111 decodes both (they start with `{`)
    dec = read_webui_metadata(fields)
    assert isinstance(dec["sd_merge_recipe"], dict) and isinstance(dec["sd_merge_models"], dict)


@pytest.mark.parametrize("op,params,n,flavour", [
    ("weighted_sum", {"alpha": 0.25}, 2, "webui"),
    ("add_difference", {"alpha": 0.7}, 3, "webui"),
    ("triple_sum", {"alpha": 0.2, "beta": 0.3}, 3, "sd-webui-supermerger"),
    ("sum_twice", {"alpha": 0.5, "beta": 0.5}, 3, "sd-webui-supermerger"),
    ("cosine_a", {"alpha": 0.4}, 2, "sd-webui-supermerger"),
    ("train_difference", {"alpha": 1.0}, 3, "sd-webui-supermerger"),
    ("tensor_swap", {"alpha": 0.3, "beta": 0.1}, 2, "sd-webui-supermerger"),
    ("self_scale", {"alpha": 0.9}, 1, "sd-webui-supermerger"),
    ("inverse_sigmoid", {"alpha": 0.4}, 2, "webui"),
    ("slerp", {"alpha": 0.5}, 2, "sdbuild"),
    ("add_difference_ties", {"alpha": 1.0, "k": 0.2, "sign_election": "mass"}, 3, "sdbuild"),
    ("extract_merge", {"alpha": 0.5, "beta": 0.2, "gamma": 0.7}, 3, "sdbuild"),  # supermerger cannot record gamma
])
def test_written_recipes_parse_back_to_the_same_step(op, params, n, flavour):
    fields = merge_fields(op, params, _inputs(n))
    rec = parse_merge_metadata(fields)
    assert rec.flavour == flavour
    assert rec.op == op
    assert [m.sha256 for m in rec.models] == [SHA_A, SHA_B, SHA_C][:n]
    got = {k: v for k, v in rec.params.items() if k != "on_missing"}
    assert got == params
    assert rec.notes == []


def test_sd1_block_weights_write_supermerger_mbw_lists():
    w = [0.1] + [0.0] * 12 + [0.5] + [0.0] * 5 + [0.8] + [0.0] * 6
    assert len(w) == 26
    rec = json.loads(merge_fields("weighted_sum", {"alpha": w}, _inputs(2))["sd_merge_recipe"])
    assert rec["type"] == "sd-webui-supermerger" and rec["mbw"] is True and rec["mode"] == "Weight sum"
    assert rec["base_alpha"] == 0.1
    assert rec["weights_alpha"] == w[1:]
    assert rec["weights_alpha_orig"] == ",".join(repr(x) for x in w)
    assert rec["model_c"] == SHA_A  # supermerger records A as C when no C is given
    back = parse_merge_metadata(merge_fields("weighted_sum", {"alpha": w}, _inputs(2)))
    assert back.params["alpha"] == w


def test_sdxl_block_weights_get_the_vae_slot():
    w = [0.5] * 20
    rec = json.loads(merge_fields("weighted_sum", {"alpha": w}, _inputs(2))["sd_merge_recipe"])
    assert rec["weights_alpha"] == [0.5] * 19 + [0.0]
    assert rec["weights_alpha_orig"] == ",".join(["0.5"] * 20)
    assert parse_merge_metadata({"sd_merge_recipe": json.dumps(rec)}).params["alpha"] == w


def test_a_chosen_block_rule_other_than_supermerger_s_falls_back_to_sdbuild_type():
    w = [0.5] * 25 + [0.1]
    rec = json.loads(merge_fields("weighted_sum", {"alpha": w, "block_rule": "sd-mecha"}, _inputs(2))["sd_merge_recipe"])
    assert rec["type"] == "sdbuild" and rec["params"]["block_rule"] == "sd-mecha"
    rec2 = json.loads(merge_fields("weighted_sum", {"alpha": w, "block_rule": "supermerger-2025"}, _inputs(2))["sd_merge_recipe"])
    assert rec2["type"] == "sd-webui-supermerger"


def test_selector_mapping_weights_fall_back_to_sdbuild_type():
    params = {"alpha": {"default": 0.5, "OUT": 0.8}}
    rec = json.loads(merge_fields("weighted_sum", params, _inputs(2))["sd_merge_recipe"])
    assert rec == {"type": "sdbuild", "op": "weighted_sum", "models": [SHA_A, SHA_B], "params": params}


def test_merge_models_flattens_ancestry_like_automatic1111():
    parent = merge_fields("weighted_sum", {"alpha": 0.5}, _inputs(2))
    child_in = a1111.input_from_metadata(SHA_C, "child.safetensors", "cccccccc", parent)
    models = json.loads(merge_fields("weighted_sum", {"alpha": 0.3}, [MergeInput(SHA_A, "a.safetensors", "aaaaaaaa"), child_in])["sd_merge_models"])
    assert list(models) == [SHA_A, SHA_C, SHA_B]
    assert models[SHA_C]["sd_merge_recipe"]["interp_method"] == "Weighted sum"
    assert models[SHA_B] == {"name": "m1.safetensors", "legacy_hash": "00000001", "sd_merge_recipe": None}


# ---------------------------------------------------------------------------------------------------------------
# recovery of AUTOMATIC1111's own recipes


def _webui(**over) -> dict[str, str]:
    r = {"type": "webui", "primary_model_hash": SHA_A, "secondary_model_hash": SHA_B, "tertiary_model_hash": None,
         "interp_method": "Weighted sum", "multiplier": 0.3, "save_as_half": False, "custom_name": "", "config_source": 3,
         "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    r.update(over)
    models = {SHA_A: {"name": "sub/a.safetensors", "legacy_hash": "1a2b3c4d", "sd_merge_recipe": None},
              SHA_B: {"name": "b.safetensors", "legacy_hash": "5e6f7a8b",
                      "sd_merge_recipe": {"type": "webui", "primary_model_hash": SHA_C, "secondary_model_hash": SHA_A,
                                          "interp_method": "Weighted sum", "multiplier": 0.5}},
              SHA_C: {"name": "c.safetensors", "legacy_hash": "99999999", "sd_merge_recipe": None}}
    return {"format": "pt", "sd_merge_recipe": json.dumps(r), "sd_merge_models": json.dumps(models)}


def test_webui_weighted_sum_recovers(tmp_path: Path):
    text = recover_recipe(_webui(custom_name="my mix", save_as_half=True), "x.safetensors")
    r = parse_recipe(text, tmp_path / "r.yaml")
    assert r.steps["merged"].op == "weighted_sum"
    assert r.steps["merged"].params["alpha"] == 0.3
    assert r.steps["merged"].params["dtype"] == "fp16"
    assert r.steps["merged"].params["on_missing"] == "keep_a"  # A1111 drops keys only B has
    assert r.inputs["model_a"].path == "a.safetensors" and r.inputs["model_a"].sha256 == SHA_A
    assert dict(r.outputs) == {"merged": ("my_mix.safetensors",)}
    # B was itself a merge, and C appears only as its ancestor: both are told in comments
    assert "itself a merge: weighted_sum(4726d3bab1, 3fe89f167d) alpha 0.5" in text
    assert f"#   {SHA_C} c.safetensors" in text


def test_webui_unmapped_fields_become_comments(tmp_path: Path):
    text = recover_recipe(_webui(bake_in_vae="vae-ft-mse.safetensors", discard_weights="^model_ema", config_source=1, extra_field=7))
    notes = [ln for ln in text.splitlines() if ln.startswith("# NOTE: ")]
    assert len(notes) == 4
    assert any("bake_in_vae 'vae-ft-mse.safetensors'" in n for n in notes)
    assert any("discard_weights '^model_ema'" in n for n in notes)
    assert any("config_source 1" in n for n in notes)
    assert any("field 'extra_field' = 7 is not mapped" in n for n in notes)
    parse_recipe(text, tmp_path / "r.yaml")


def test_webui_add_difference_and_legacy_sigmoid(tmp_path: Path):
    text = recover_recipe(_webui(interp_method="Add difference", tertiary_model_hash=SHA_C, multiplier=1.0))
    r = parse_recipe(text, tmp_path / "r.yaml")
    assert r.steps["merged"].op == "add_difference" and r.steps["merged"].refs == ("model_a", "model_b", "model_c")
    rec = parse_merge_metadata(_webui(interp_method="Sigmoid", multiplier=0.25))
    assert rec.op == "sigmoid" and rec.params["alpha"] == 0.25 and rec.notes == []
    inv = parse_merge_metadata(_webui(interp_method="Inverse Sigmoid", multiplier=0.25))
    assert inv.op == "inverse_sigmoid" and inv.params["alpha"] == 0.25
    parse_recipe(recover_recipe(_webui(interp_method="Sigmoid", multiplier=0.25)), tmp_path / "s.yaml")
    back = parse_merge_metadata(merge_fields("sigmoid", {"alpha": 0.25}, _inputs(2)))
    assert back.flavour == "webui" and back.op == "sigmoid" and back.params["alpha"] == 0.25


def test_legacy_sigmoid_without_its_op_is_the_same_weighted_sum(monkeypatch):
    real = a1111.op_defaults
    monkeypatch.setattr(a1111, "op_defaults", lambda op: None if op in ("sigmoid", "inverse_sigmoid") else real(op))
    rec = parse_merge_metadata(_webui(interp_method="Sigmoid", multiplier=0.25))
    assert rec.op == "weighted_sum" and rec.params["alpha"] == pytest.approx(0.25 ** 2 * (3 - 0.5))
    inv = parse_merge_metadata(_webui(interp_method="Inverse Sigmoid", multiplier=0.25))
    assert inv.op == "weighted_sum" and inv.params["alpha"] == pytest.approx(0.5 - math.sin(math.asin(0.5) / 3))


def test_webui_no_interpolation_is_a_pass_through(tmp_path: Path):
    r = parse_recipe(recover_recipe(_webui(interp_method="No interpolation")), tmp_path / "r.yaml")
    assert dict(r.steps) == {} and list(r.outputs) == ["model_a"]
    r2 = parse_recipe(recover_recipe(_webui(interp_method="No interpolation", save_as_half=True)), tmp_path / "r.yaml")
    assert r2.steps["merged"].params["dtype"] == "fp16" and r2.steps["merged"].params["alpha"] == 0.0


def test_supermerger_mbw_recovers_block_list():
    w = "0.3," + ",".join(["0.5"] * 25)
    rec = {"type": "sd-webui-supermerger", "weights_alpha": [0.5] * 25, "weights_beta": None, "weights_alpha_orig": w,
           "weights_beta_orig": None, "model_a": SHA_A, "model_b": SHA_B, "model_c": SHA_A, "base_alpha": 0.3, "base_beta": 0.25,
           "mode": "Weight sum", "mbw": True, "elemental_merge": ["OUT05:attn2:0.2"], "calcmode": "normal", "Off": [""]}
    parsed = parse_merge_metadata({"sd_merge_recipe": json.dumps(rec)})
    assert parsed.op == "weighted_sum"
    assert parsed.params["alpha"] == [0.3] + [0.5] * 25
    assert "beta" not in parsed.params
    assert parsed.params["elemental"] == ["OUT05:attn2:0.2"]
    data = yaml.safe_load(recover_recipe({"sd_merge_recipe": json.dumps(rec)}))
    assert data["steps"]["merged"]["alpha"] == [0.3] + [0.5] * 25
    assert data["steps"]["merged"]["models"] == ["model_a", "model_b"]


def test_supermerger_calcmodes_map_to_ops():
    base = {"type": "sd-webui-supermerger", "model_a": SHA_A, "model_b": SHA_B, "model_c": SHA_C, "base_alpha": 0.5,
            "base_beta": 0.2, "mbw": False, "elemental_merge": "", "Off": [""]}
    ext = parse_merge_metadata({"sd_merge_recipe": json.dumps(dict(base, calcmode="extract", mode="Add"))})
    assert ext.params["gamma"] == 0.3 and any("option(gamma)" in n for n in ext.notes)
    for calc, mode, op in [("cosineA", "Weight sum", "cosine_a"), ("trainDifference", "Add", "train_difference"),
                           ("smoothAdd MT", "Add difference", "smooth_add"), ("tensor2", "Weight sum", "tensor_swap2"),
                           ("self", "Weight sum", "self_scale"), ("extract", "Add", "extract_merge")]:
        meta = {"sd_merge_recipe": json.dumps(dict(base, calcmode=calc, mode=mode))}
        rec = parse_merge_metadata(meta)
        assert rec.op == op, calc
        assert len(rec.models) == a1111.OP_ARITY[op]
        step = parse_recipe(recover_recipe(meta), Path("r.yaml")).steps["merged"]  # the op's own fields, so it validates
        assert step.op == op and len(step.refs) == a1111.OP_ARITY[op]
    rnd = parse_merge_metadata({"sd_merge_recipe": json.dumps(dict(base, calcmode="plus random", mode="Weight sum"))})
    assert rnd.op == "weighted_sum" and any("WILL differ" in n for n in rnd.notes)


def test_no_recipe_is_an_error():
    with pytest.raises(ValueError, match="no merge recipe"):
        recover_recipe({"format": "pt", "modelspec.title": "x"})


def test_hostile_names_cannot_inject_yaml(tmp_path: Path):
    evil = "x'\nsteps:\n  pwn: {op: weighted_sum}\noutputs:\n  pwn: ../../etc/x.safetensors\n#"
    rec = {"type": "webui", "primary_model_hash": SHA_A, "secondary_model_hash": SHA_B, "interp_method": "Weighted sum",
           "multiplier": 0.5, "custom_name": evil, "config_source": 3}
    models = {SHA_A: {"name": evil, "legacy_hash": evil}, SHA_C: {"name": "\u2028outputs: {}", "legacy_hash": "x"}}
    text = recover_recipe({"sd_merge_recipe": json.dumps(rec), "sd_merge_models": json.dumps(models)}, evil)
    r = parse_recipe(text, tmp_path / "r.yaml")
    assert list(r.steps) == ["merged"] and list(r.outputs) == ["merged"]
    assert r.inputs["model_a"].path == evil.replace("\\", "/").split("/")[-1] + ".safetensors"
    out = r.outputs["merged"][0]
    assert "/" not in out and ".." not in out and out.endswith(".safetensors")
    prov = {"schema": 1, "node": "m", "recipe": {"sdbuild": 1, "name": "n", "inputs": {"a\nb": {"file": "a.safetensors"}},
                                                 "steps": {}, "outputs": {}}}
    with pytest.raises(ValueError, match="invalid input name"):
        recover_recipe({"sdbuild.provenance": json.dumps(prov)})


def test_newer_provenance_schema_is_refused():
    prov = {"schema": 2, "node": "m", "recipe": {"sdbuild": 1, "inputs": {}, "steps": {}, "outputs": {}}}
    with pytest.raises(ValueError, match="newer sdbuild"):
        recover_recipe({"sdbuild.provenance": json.dumps(prov)})


def test_supermerger_elemental_and_include_recover_to_step_fields(tmp_path: Path):
    rec = {"type": "sd-webui-supermerger", "weights_alpha": None, "weights_beta": None, "weights_alpha_orig": None,
           "weights_beta_orig": None, "model_a": SHA_A, "model_b": SHA_B, "model_c": SHA_A, "base_alpha": 0.4, "base_beta": 0.25,
           "mode": "Weight sum", "mbw": False, "elemental_merge": ["OUT06:attn:0.5", "OUT06:attn2.to_k:0.2"],
           "calcmode": "normal", "Include": ["IN04", "OUT", "attn", "print"]}
    text = recover_recipe({"sd_merge_recipe": json.dumps(rec)})
    assert "NOTE" not in text
    step = parse_recipe(text, tmp_path / "r.yaml").steps["merged"]
    assert step.params["alpha"] == 0.4
    assert step.params["elemental"] == ["OUT06:attn:0.5", "OUT06:attn2.to_k:0.2"]
    assert sorted(step.params["include"]) == ["IN04", "OUT", "attn"]
    # and written back the same way
    back = json.loads(merge_fields("weighted_sum", dict(step.params), _inputs(2))["sd_merge_recipe"])
    assert back["elemental_merge"] == rec["elemental_merge"] and sorted(back["Include"]) == ["IN04", "OUT", "attn"]
    assert "Off" not in back and back["mode"] == "Weight sum"


def test_inherited_ancestry_is_capped(monkeypatch):
    monkeypatch.setattr(a1111, "ANCESTRY_LIMIT", 600)
    table = {f"{i:064x}": {"name": f"m{i}.safetensors", "legacy_hash": "00000000", "sd_merge_recipe": None} for i in range(20)}
    parent = MergeInput(SHA_C, "parent.safetensors", "cccccccc", None, table)
    out = a1111.merge_models_object([MergeInput(SHA_A, "a.safetensors", "aaaaaaaa"), parent])
    assert list(out)[:2] == [SHA_A, SHA_C]  # the step's own inputs always
    assert 2 < len(out) < 22 and len(json.dumps(out)) <= 700


def test_vae_bake_is_written_as_automatic1111_bake_in_vae():
    rec = json.loads(merge_fields("vae", {"dtype": None}, _inputs(2), custom_name="baked")["sd_merge_recipe"])
    assert rec["interp_method"] == "No interpolation" and rec["primary_model_hash"] == SHA_A
    assert rec["bake_in_vae"] == "m1.safetensors" and rec["sdbuild_op"] == "vae"
    models = json.loads(merge_fields("vae", {}, _inputs(2))["sd_merge_models"])
    assert list(models) == [SHA_A, SHA_B]  # the VAE file is listed with its hashes


def test_missing_key_policy_picks_the_record_that_matches_it():
    ws = lambda on: json.loads(merge_fields("weighted_sum", {"alpha": 0.3, "on_missing": on}, _inputs(2))["sd_merge_recipe"])
    assert ws("keep_a")["type"] == "webui"
    assert ws("take_b")["type"] == "sd-webui-supermerger"  # supermerger copies B-only tensors, as take_b does
    assert ws("error")["type"] == "sdbuild"
