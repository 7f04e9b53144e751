"""op: prune end to end: junk and EMA out with exact counts, everything else byte-identical, ids repaired, markers kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_recipe
from mergekit_sd.lazy import from_tensors
from mergekit_sd.ops import OpContext
from mergekit_sd.arch.components import broken_position_ids
from mergekit_sd.arch.prefixes import ema_key
from mergekit_sd.ops.prune import build_prune
from mergekit_sd.synth.models import synth_tensors, write_synth

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
POS_XL = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
ITEM = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
BROKEN = [6, 13, 20, 27, 34, 41, 48, 55, 62, 69, 76]


def header_bytes(path: Path, pred) -> tuple[int, int]:
    """(tensors, bytes) of the keys matching `pred`, computed from the file header with the safetensors library."""
    n = total = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if pred(k):
                s = f.get_slice(k)
                n += 1
                total += math.prod(s.get_shape()) * ITEM[s.get_dtype()]
    return n, total


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def build(tmp_path, sdbuild, steps: str, inputs: str, outputs: str):
    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs:\n{inputs}\nsteps:\n{steps}\noutputs:\n{outputs}\n")
    return sdbuild("build", rec, "-q", "--json")


@pytest.fixture
def dirty(tmp_path) -> tuple[Path, Path]:
    """The same SD1 model twice: with the junk a typical "8 GB" release carries, and without."""
    d = write_synth(tmp_path / "dirty.safetensors", "sd1", 16, "fp16", 5, ema=True, junk=True)
    c = write_synth(tmp_path / "clean.safetensors", "sd1", 16, "fp16", 5)
    return d, c


def test_junk_reported_with_wasted_bytes_and_pruned_byte_identical(tmp_path, dirty, sdbuild):
    d, c = dirty
    r = sdbuild("inspect", d, "--json")
    assert r.code == 0, r
    rep = json.loads(r.out)
    ema_n, ema_b = header_bytes(d, lambda k: k.startswith("model_ema."))
    em_n, em_b = header_bytes(d, lambda k: k.startswith("embedding_manager.embedder.transformer.text_model."))
    assert (ema_n, em_n) == (686 + 2, 196)
    cats = rep["junk"]["categories"]
    assert (cats["ema"]["tensors"], cats["ema"]["bytes"]) == (ema_n, ema_b)
    assert (cats["embedding_manager"]["tensors"], cats["embedding_manager"]["bytes"]) == (em_n, em_b)
    assert (rep["junk"]["tensors"], rep["junk"]["bytes"]) == (ema_n + em_n, ema_b + em_b)
    assert set(cats) == {"ema", "embedding_manager"}
    assert "JUNK: 884 tensors" in sdbuild("inspect", d).out

    r = build(tmp_path, sdbuild, "  clean: {op: prune, model: dirty}", f"  dirty: {d}", "  clean: out/clean.safetensors")
    assert r.code == 0, r
    out = tmp_path / "out/clean.safetensors"
    got, want = load_file(str(out)), load_file(str(c))
    assert sorted(got) == sorted(want) and len(got) == 1131
    for k in want:
        assert got[k].dtype == want[k].dtype and raw(got[k]) == raw(want[k]), k
    prov = json.loads(sdbuild("inspect", out, "--json").out)["provenance"]
    facts = prov["facts"]["clean"]["prune"]
    assert facts["removed"] == {"ema": {"tensors": ema_n, "bytes": ema_b}, "embedding_manager": {"tensors": em_n, "bytes": em_b}}
    assert facts["removed_total"] == {"tensors": ema_n + em_n, "bytes": ema_b + em_b}
    assert any(f"removed {ema_n} ema tensors ({ema_b} bytes)" in line for line in prov["log"]["clean"])
    again = json.loads(sdbuild("inspect", out, "--json").out)
    assert again["junk"] == {"tensors": 0, "bytes": 0, "categories": {}}


def test_broken_position_ids_reported_and_repaired(tmp_path, sdbuild):
    m = write_synth(tmp_path / "m.safetensors", "sd1", 32, "fp16", 1, broken_position_ids=True)
    rep = json.loads(sdbuild("inspect", m, "--json").out)
    assert rep["position_ids"][POS] == {"dtype": "F32", "broken": BROKEN, "ok": False}
    assert "BROKEN position_ids" in sdbuild("inspect", m).out
    r = build(tmp_path, sdbuild, "  fixed: {op: prune, model: m}\n  asis: {op: prune, model: m, fix_position_ids: false}",
              f"  m: {m}", "  fixed: fixed.safetensors\n  asis: asis.safetensors")
    assert r.code == 0, r
    fixed = load_file(str(tmp_path / "fixed.safetensors"))[POS]
    assert fixed.dtype == torch.int64 and fixed.tolist() == [list(range(77))]
    asis = load_file(str(tmp_path / "asis.safetensors"))[POS]
    assert raw(asis) == raw(load_file(str(m))[POS])
    rep = json.loads(sdbuild("inspect", tmp_path / "fixed.safetensors", "--json").out)
    assert rep["position_ids"][POS] == {"dtype": "I64", "broken": [], "ok": True}
    facts = rep["provenance"]["facts"]["fixed"]["prune"]["position_ids"][POS]
    assert facts == {"dtype": "F32", "broken": BROKEN, "fixed": True}


def test_broken_ids_detection_truncates_like_loaders():
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 76] = 75.9975
    ids[0, 3] = 3.4
    assert broken_position_ids(ids) == [76]
    assert broken_position_ids(torch.arange(77).reshape(1, 77)) == []


def test_markers_survive_prune_and_can_be_dropped(tmp_path, sdbuild):
    m = write_synth(tmp_path / "xl.safetensors", "sdxl", 32, "fp16", 3, markers=True, ema=True)
    r = build(tmp_path, sdbuild, "  keep: {op: prune, model: xl}\n  nomark: {op: prune, model: xl, keep_prediction_markers: false}",
              f"  xl: {m}", "  keep: keep.safetensors\n  nomark: nomark.safetensors")
    assert r.code == 0, r
    src = load_file(str(m))
    keep = load_file(str(tmp_path / "keep.safetensors"))
    markers = ["edm_vpred.sigma_max", "edm_vpred.sigma_min", "v_pred", "ztsnr"]
    for k in markers:
        assert k in keep and keep[k].dtype == src[k].dtype and raw(keep[k]) == raw(src[k])
    assert not any(k.startswith("model_ema.") for k in keep)
    nomark = load_file(str(tmp_path / "nomark.safetensors"))
    assert sorted(set(keep) - set(nomark)) == markers
    rep = json.loads(sdbuild("inspect", tmp_path / "keep.safetensors", "--json").out)
    assert rep["prediction_type"] == "v" and rep["ztsnr"] is True and sorted(rep["markers"]) == markers


def test_markers_kept_even_when_converting(tmp_path):
    t = synth_tensors("sdxl", 32, "fp32", 3, markers=True)
    out = build_prune([from_tensors(t)], {"dtype": "fp16"}, OpContext(step="p"))
    assert out.spec("edm_vpred.sigma_max").dtype == torch.float32
    assert out.spec("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert out.get("v_pred").dtype == t["v_pred"].dtype


def test_use_ema_promotes_ema_weights(tmp_path):
    t = synth_tensors("sd1", 32, "fp16", 2, ema=True)
    for flag in ({"ema": "use"}, {"use_ema": True}):
        ctx = OpContext(step="p")
        out = build_prune([from_tensors(t)], flag, ctx)
        unet = [k for k in out.keys() if k.startswith("model.diffusion_model.")]
        assert len(unet) == 686 and len(out) == 1131
        for k in unet:
            assert raw(out.get(k)) == raw(t[ema_key(k)])
        assert out.info.provenance["prune"]["ema_promoted"] == 686


def test_use_ema_without_ema_is_a_user_error(tmp_path, sdbuild):
    m = write_synth(tmp_path / "m.safetensors", "sd1", 32, "fp16", 1)
    r = build(tmp_path, sdbuild, "  p: {op: prune, model: m, use_ema: true}", f"  m: {m}", "  p: p.safetensors")
    assert r.code == 2 and "no EMA weights" in r.err and len(r.err.strip().splitlines()) == 1


def test_components_keep_list_and_drop_list(tmp_path):
    t = synth_tensors("sdxl", 32, "fp16", 2)
    m = from_tensors(t)
    keep = build_prune([m], {"components": ["unet", "vae"]}, OpContext(step="p"))
    assert {k.split(".")[0] for k in keep.keys()} == {"model", "first_stage_model"}
    assert len(keep) == 1680 + 248
    drop = build_prune([m], {"drop_components": ["text_encoder_2"]}, OpContext(step="p"))
    gone = sorted(set(t) - set(drop.keys()))
    assert len(gone) == 390 and all(k.startswith("conditioner.embedders.1.") for k in gone)
    removed = drop.info.provenance["prune"]["removed"]["component:text_encoder_2"]
    assert removed == {"tensors": 390, "bytes": sum(t[k].numel() * 2 for k in gone)}


def test_leftovers_aliases_scheduler_and_unknown(tmp_path):
    t = synth_tensors("sdxl", 32, "fp16", 2, lora_leftovers=True, scheduler=True)
    t["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = t["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]
    t["control_model.input_blocks.0.0.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    t["something_else"] = torch.zeros(3, dtype=torch.float32)
    m = from_tensors(t)
    out = build_prune([m], {}, OpContext(step="p"))
    assert sorted(out.keys()) == sorted(synth_tensors("sdxl", 32, "fp16", 2).keys())
    rem = out.info.provenance["prune"]["removed"]
    assert rem["lora"] == {"tensors": 6, "bytes": 2 * (4 * 8 + 8 * 4 + 1) * 2}  # two modules, fp16
    assert rem["scheduler"] == {"tensors": 13, "bytes": 13 * 4000}
    assert rem["alias"]["tensors"] == 1 and rem["control_model"] == {"tensors": 1, "bytes": 8}
    assert rem["unknown"] == {"tensors": 1, "bytes": 12}
    kept = build_prune([m], {"keep_scheduler_buffers": True, "drop_unknown": False}, OpContext(step="p"))
    assert "alphas_cumprod" in kept and "something_else" in kept and "control_model.input_blocks.0.0.weight" not in kept


def test_prune_with_dtype_and_conflicting_options(tmp_path):
    t = synth_tensors("sd1", 32, "fp32", 2)
    out = build_prune([from_tensors(t)], {"dtype": "fp16"}, OpContext(step="p"))
    assert out.spec(POS).dtype == torch.int64
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(out.get(k), t[k].half())
    from mergekit_sd.errors import UserError

    with pytest.raises(UserError, match="contradicts"):
        build_prune([from_tensors(t)], {"ema": "drop", "use_ema": True}, OpContext(step="p"))
    with pytest.raises(UserError, match="not both"):
        build_prune([from_tensors(t)], {"components": ["unet"], "drop_components": ["vae"]}, OpContext(step="p"))


def test_prune_refuses_unknown_architecture(tmp_path, sdbuild):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    r = build(tmp_path, sdbuild, "  p: {op: prune, model: odd}", f"  odd: {tmp_path / 'odd.safetensors'}", "  p: p.safetensors")
    assert r.code == 2 and "architecture" in r.err


def test_bad_component_name_is_reported_with_suggestion(tmp_path, sdbuild):
    m = write_synth(tmp_path / "m.safetensors", "sd1", 32, "fp16", 1)
    r = build(tmp_path, sdbuild, "  p: {op: prune, model: m, components: [unet, vea]}", f"  m: {m}", "  p: p.safetensors")
    assert r.code == 2 and "did you mean 'vae'" in r.err


def test_nai_alias_names_are_renamed_not_dropped(tmp_path):
    t = synth_tensors("sd1", 32, "fp16", 3)
    pre = "cond_stage_model.transformer.text_model."
    nai = {("cond_stage_model.transformer." + k[len(pre):] if k.startswith(pre) else k): v for k, v in t.items()}
    ctx = OpContext(step="p")
    out = build_prune([from_tensors(nai)], {}, ctx)
    assert sorted(out.keys()) == sorted(t)
    assert out.info.provenance["prune"]["renamed"] == 197
    assert out.info.provenance["prune"]["removed_total"] == {"tensors": 0, "bytes": 0}
    assert torch.equal(out.get(pre + "final_layer_norm.weight"), t[pre + "final_layer_norm.weight"])


def test_missing_reference_tensors_are_reported(tmp_path):
    t = synth_tensors("sd1", 32, "fp16", 3)
    del t["model.diffusion_model.out.2.bias"]
    ctx = OpContext(step="p")
    out = build_prune([from_tensors(t)], {}, ctx)
    assert out.info.provenance["prune"]["missing_reference_tensors"] == 1
    assert any("lacks 1 tensors" in line and "out.2.bias" in line for line in ctx.log)
