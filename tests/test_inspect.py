"""sdbuild inspect: the JSON contract, exact counts computed independently, and the terminal table."""

from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_sd.inspect import format_inspect, inspect_model
from mergekit_sd.synth.models import synth_tensors, write_synth, write_synth_ckpt

ITEM = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I32": 4}


def tally(path, pred=lambda k: True):
    out: dict[str, list[int]] = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if pred(k):
                s = f.get_slice(k)
                d = out.setdefault(s.get_dtype(), [0, 0])
                d[0] += 1
                d[1] += math.prod(s.get_shape()) * ITEM[s.get_dtype()]
    return out


def test_json_contract_and_exact_counts(tmp_path, sdbuild, model_dir):
    p = model_dir / "xl.safetensors"
    r = sdbuild("inspect", p, "--json")
    assert r.code == 0, r
    rep = json.loads(r.out)
    for key in ("architecture", "tensors", "dtypes", "bytes", "metadata", "provenance"):
        assert key in rep
    assert rep["architecture"] == "sdxl" and rep["modelspec_architecture"] == "stable-diffusion-xl-v1-base"
    t = tally(p)
    assert rep["dtypes"] == {c: {"tensors": n, "bytes": b} for c, (n, b) in t.items()}
    assert rep["tensors"] == sum(n for n, _ in t.values()) == 1680 + 197 + 390 + 248
    assert rep["bytes"] == sum(b for _, b in t.values())
    for comp, prefix, n in (("unet", "model.diffusion_model.", 1680), ("text_encoder", "conditioner.embedders.0.", 197),
                            ("text_encoder_2", "conditioner.embedders.1.", 390), ("vae", "first_stage_model.", 248)):
        c = tally(p, lambda k: k.startswith(prefix))
        assert rep["components"][comp]["tensors"] == n
        assert rep["components"][comp]["bytes"] == sum(b for _, b in c.values())
    assert rep["keys"]["missing"] == [] and rep["keys"]["unexpected"] == []
    assert rep["junk"]["bytes"] == 0 and rep["non_finite"] == []
    assert rep["metadata"]["modelspec.title"] == "xl" and rep["provenance"] is None


def test_missing_unexpected_and_non_finite(tmp_path):
    t = synth_tensors("sd1", 32, "fp16", 1)
    gone = ["model.diffusion_model.out.2.bias", "first_stage_model.quant_conv.weight"]
    for k in gone:
        del t[k]
    t["model.diffusion_model.bogus.weight"] = torch.zeros(3, dtype=torch.float16)
    t["model.diffusion_model.out.0.weight"] = t["model.diffusion_model.out.0.weight"].clone()
    t["model.diffusion_model.out.0.weight"][:2] = float("nan")
    t["model.diffusion_model.out.0.weight"][2] = float("inf")
    t["model.diffusion_model.time_embed.2.bias"] = torch.zeros(7, dtype=torch.float16)  # wrong shape
    save_file(t, str(tmp_path / "m.safetensors"))
    rep = inspect_model(tmp_path / "m.safetensors")
    assert rep["keys"]["missing"] == sorted(gone)
    assert rep["keys"]["unexpected"] == ["model.diffusion_model.bogus.weight", "model.diffusion_model.time_embed.2.bias"]
    assert rep["keys"]["shape_mismatch"] == ["model.diffusion_model.time_embed.2.bias"]
    assert rep["junk"]["categories"]["unknown"] == {"tensors": 2, "bytes": 6 + 14, "what": rep["junk"]["categories"]["unknown"]["what"],
                                                    "keys": rep["keys"]["unexpected"]}
    assert rep["non_finite"] == [{"key": "model.diffusion_model.out.0.weight", "nan": 2, "inf": 1}]
    text = format_inspect(rep)
    assert "2 missing, 2 unexpected" in text and "NON-FINITE values in 1 tensors" in text
    quick = inspect_model(tmp_path / "m.safetensors", scan=False)
    assert quick["non_finite"] is None and quick["scanned"] is False


def test_inspect_a_legacy_ckpt_and_variants(tmp_path, sdbuild):
    t = synth_tensors("sd1", 32, "fp32", 1, inpainting=True, ema=True)
    p = write_synth_ckpt(tmp_path / "inp.ckpt", t, extra={"epoch": 1})
    rep = json.loads(sdbuild("inspect", p, "--json").out)
    assert rep["format"] == "ckpt" and rep["architecture"] == "sd1" and rep["variant"] == "inpainting"
    assert rep["training_state"] == ["epoch"]
    assert rep["junk"]["categories"]["ema"]["tensors"] == 688
    # fp16 would halve every fp32 tensor: the waste is exactly half their bytes
    assert rep["precision_waste_bytes"] == sum(v.numel() * 2 for v in t.values() if v.dtype == torch.float32)


def test_sdxl_aliases_and_leftovers_are_junk(tmp_path):
    t = synth_tensors("sdxl", 32, "fp16", 2, lora_leftovers=True, markers=True)
    t["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(24, dtype=torch.float16)
    save_file(t, str(tmp_path / "x.safetensors"))
    rep = inspect_model(tmp_path / "x.safetensors", scan=False)
    cats = rep["junk"]["categories"]
    assert cats["alias"]["tensors"] == 1 and cats["alias"]["bytes"] == 48
    assert cats["lora"]["tensors"] == 6
    assert rep["prediction_type"] == "v" and rep["markers"]["edm_vpred.sigma_max"]["dtype"] == "F16"


def test_table_for_a_terminal(tmp_path, sdbuild):
    p = write_synth(tmp_path / "d.safetensors", "sd1", 32, "fp16", 1, ema=True, broken_position_ids=True)
    r = sdbuild("inspect", p)
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[1].startswith("architecture  sd1")
    assert any(line.startswith("unet") and " 686 " in line for line in lines)
    assert any(line.startswith("JUNK: 688 tensors") for line in lines)
    assert any(line.startswith("BROKEN position_ids cond_stage_model.") for line in lines)


def test_provenance_of_a_built_file_is_parsed(tmp_path, sdbuild, model_dir):
    from conftest import write_recipe

    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs: {{a: {model_dir / 'a.safetensors'}}}\nsteps: {{p: {{op: prune, model: a}}}}\noutputs: {{p: p.safetensors}}\n")
    assert sdbuild("build", rec, "-q").code == 0
    rep = json.loads(sdbuild("inspect", tmp_path / "p.safetensors", "--json").out)
    assert isinstance(rep["provenance"], dict) and rep["provenance"]["facts"]["p"]["prune"]["removed_total"] == {"tensors": 0, "bytes": 0}


def test_a_lora_file_is_not_called_junk(tmp_path):
    from mergekit_sd.synth.loras import write_synth_lora

    p = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora")
    rep = inspect_model(p, scan=False)
    assert rep["kind"] == "lora" and rep["architecture"] == "unknown"
    assert rep["junk"]["tensors"] == 0 and rep["keys"]["unexpected"] == []


def test_standalone_vae_files(tmp_path):
    from mergekit_sd.synth.models import synth_vae_tensors

    v = synth_vae_tensors(32, "fp32", 7)
    del v["decoder.conv_out.bias"]
    v["model_ema.decay"] = torch.tensor(0.999)
    save_file(v, str(tmp_path / "v.safetensors"))
    rep = inspect_model(tmp_path / "v.safetensors")
    assert rep["kind"] == "vae" and rep["components"]["vae"]["tensors"] == 247
    assert rep["keys"]["missing"] == ["decoder.conv_out.bias"]
    assert rep["junk"]["categories"]["ema"]["bytes"] == 4
    save_file(synth_vae_tensors(32, "fp16", 7, "diffusers"), str(tmp_path / "d.safetensors"))
    rep = inspect_model(tmp_path / "d.safetensors", scan=False)
    assert rep["variant"] == "diffusers" and rep["components"]["vae"]["tensors"] == 248 and rep["junk"]["tensors"] == 0
