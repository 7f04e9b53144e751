"""extract_lora round trips and rank behaviour; merge_loras exactness against baking one after another."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_recipe
from mergekit_sd.arch.lora_keys import default_modules
from mergekit_sd.synth.loras import write_synth_lora


def f64(p: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(p)).items() if v.dtype.is_floating_point}


def covered_keys(arch: str, conv: bool) -> set[str]:
    return {t.weight for t in default_modules(arch, conv).values()}


def extract_recipe(tmp_path: Path, model_dir: Path, ranks: list[int], base="a", tuned="b", extra="") -> Path:
    steps = "\n".join(f"          ex{r}: {{op: extract_lora, models: [A, B], rank: {r}, conv_rank: {r}, dtype: fp32{extra}}}\n"
                      f"          bk{r}: {{op: lora, model: A, loras: [{{lora: ex{r}, strength: 1}}], dtype: fp32}}" for r in ranks)
    outs = "\n".join(f"          bk{r}: out/bk{r}.safetensors\n          ex{r}: out/ex{r}.safetensors" for r in ranks)
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/{base}.safetensors, B: {model_dir}/{tuned}.safetensors}}
        steps:
{steps}
        outputs:
{outs}
        """)


def test_extract_full_rank_then_bake_reproduces_tuned(tmp_path, model_dir, sdbuild):
    r = sdbuild("build", extract_recipe(tmp_path, model_dir, [4096]), "-q")
    assert r.code == 0, r
    A, B = f64(model_dir / "a.safetensors"), f64(model_dir / "b.safetensors")
    out = f64(tmp_path / "out" / "bk4096.safetensors")
    cov = covered_keys("sd1", True)
    assert len(cov) == 350
    for k, v in out.items():
        torch.testing.assert_close(v, B[k] if k in cov else A[k], rtol=0, atol=2e-6, msg=k)
    with safe_open(str(tmp_path / "out" / "ex4096.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_alpha": "4096.0", "conv_dim": "4096"}
    assert len(keys) == 3 * 350 and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    ex = load_file(str(tmp_path / "out" / "ex4096.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1 proj_in is a 1x1 conv: kohya 4-D factors
    assert ex[f"{name}.lora_up.weight"].shape == (10, 10, 1, 1) and float(ex[f"{name}.alpha"]) == 10.0


def test_extract_error_falls_as_rank_grows(tmp_path, model_dir, sdbuild):
    ranks = [1, 2, 4, 8]
    assert sdbuild("build", extract_recipe(tmp_path, model_dir, ranks), "-q").code == 0
    B = f64(model_dir / "b.safetensors")
    cov = covered_keys("sd1", True)
    errs = []
    for r in ranks:
        out = f64(tmp_path / "out" / f"bk{r}.safetensors")
        errs.append(sum(float((out[k] - B[k]).pow(2).sum()) for k in cov))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    ex = load_file(str(tmp_path / "out" / "ex2.safetensors"))
    assert ex["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (2, 20)


def test_extract_is_deterministic_and_clamps_only_when_asked(tmp_path, model_dir, sdbuild):
    assert sdbuild("build", extract_recipe(tmp_path, model_dir, [3]), "-q").code == 0
    first = (tmp_path / "out" / "ex3.safetensors").read_bytes()
    d = tmp_path / "again"
    d.mkdir()
    assert sdbuild("build", extract_recipe(d, model_dir, [3]), "-q", "--cache-dir", str(d / "c")).code == 0
    assert (d / "out" / "ex3.safetensors").read_bytes() == first
    c = tmp_path / "clamped"
    c.mkdir()
    assert sdbuild("build", extract_recipe(c, model_dir, [3], extra=", clamp_quantile: 0.9"), "-q").code == 0
    plain, clamped = load_file(str(tmp_path / "out" / "ex3.safetensors")), load_file(str(c / "out" / "ex3.safetensors"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"
    both = torch.cat([clamped[f"{name}.lora_up.weight"].flatten(), clamped[f"{name}.lora_down.weight"].flatten()])
    raw = torch.cat([plain[f"{name}.lora_up.weight"].flatten(), plain[f"{name}.lora_down.weight"].flatten()]).double()
    hi = torch.quantile(raw, 0.9).item()
    assert both.max().item() <= hi + 1e-6 and raw.max().item() > hi
    assert both.min().item() >= -hi - 1e-6


def test_extract_sdxl_full_rank_includes_te2_rows(tmp_path, model_dir, sdbuild):
    from mergekit_sd.synth.models import write_synth

    write_synth(tmp_path / "xl2.safetensors", "sdxl", 32, "fp16", 9)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/xl.safetensors, B: {tmp_path}/xl2.safetensors}}
        steps:
          ex: {{op: extract_lora, models: [A, B], rank: 4096, dtype: fp32}}
          bk: {{op: lora, model: A, loras: [{{lora: ex, strength: 1}}], dtype: fp32}}
        outputs: {{bk: out/bk.safetensors, ex: out/ex.safetensors}}
        """)
    assert sdbuild("build", rp, "-q").code == 0
    A, B = f64(model_dir / "xl.safetensors"), f64(tmp_path / "xl2.safetensors")
    out = f64(tmp_path / "out" / "bk.safetensors")
    cov = covered_keys("sdxl", False)
    inproj = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    assert inproj in cov
    for k, v in out.items():
        torch.testing.assert_close(v, B[k] if k in cov else A[k], rtol=0, atol=2e-6, msg=k)
    ex = load_file(str(tmp_path / "out" / "ex.safetensors"))
    assert "lora_te2_text_model_encoder_layers_3_self_attn_k_proj.lora_up.weight" in ex
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in ex  # SGM names for SDXL


def merge_recipe(tmp_path: Path, model: Path, loras: list[tuple[Path, float]], mode="concat", extra="") -> Path:
    ins = "\n".join(f"          L{i}: {p}" for i, (p, _) in enumerate(loras))
    entries = ", ".join(f"{{lora: L{i}, strength: {s}}}" for i, (_, s) in enumerate(loras))
    seq = []
    prev = "base"
    for i, (_, s) in enumerate(loras):
        seq.append(f"          seq{i}: {{op: lora, model: {prev}, loras: [{{lora: L{i}, strength: {s}}}], dtype: fp32}}")
        prev = f"seq{i}"
    seq_steps = "\n".join(seq)
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          base: {model}
{ins}
        steps:
          merged: {{op: merge_loras, loras: [{entries}], mode: {mode}, dtype: fp32{extra}}}
          baked: {{op: lora, model: base, loras: [{{lora: merged, strength: 1}}], dtype: fp32}}
{seq_steps}
        outputs:
          baked: out/baked.safetensors
          merged: out/merged.safetensors
          {prev}: out/sequential.safetensors
        """)


def test_merge_concat_equals_baking_one_after_another(tmp_path, model_dir, sdbuild):
    loras = [(write_synth_lora(tmp_path / "l1.safetensors", "sd1", "lora", 32, 2, 1), 0.8),
             (write_synth_lora(tmp_path / "l2.safetensors", "sd1", "locon", 32, 3, 2, naming="sgm"), -0.5),
             (write_synth_lora(tmp_path / "l3.safetensors", "sd1", "loha", 32, 2, 3, only=["attn1"]), 1.25),
             (write_synth_lora(tmp_path / "l4.safetensors", "sd1", "peft", 32, 2, 4), 0.3)]
    r = sdbuild("build", merge_recipe(tmp_path, model_dir / "a.safetensors", loras), "-q")
    assert r.code == 0, r
    a, b = f64(tmp_path / "out" / "baked.safetensors"), f64(tmp_path / "out" / "sequential.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=k)
    merged = load_file(str(tmp_path / "out" / "merged.safetensors"))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"  # l1 + l2 + l4: ranks 2 + 3 + 2
    assert merged[f"{q}.lora_down.weight"].shape == (7, 10) and float(merged[f"{q}.alpha"]) == 7.0
    assert f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff" in merged  # LoHa layer: exact diff


def test_merge_svd_full_rank_matches_and_low_rank_is_smaller(tmp_path, model_dir, sdbuild):
    loras = [(write_synth_lora(tmp_path / "l1.safetensors", "sd1", "lora", 32, 2, 1), 0.8),
             (write_synth_lora(tmp_path / "l2.safetensors", "sd1", "lora", 32, 3, 2), 0.5)]
    r = sdbuild("build", merge_recipe(tmp_path, model_dir / "a.safetensors", loras, "svd", ", rank: 5"), "-q")
    assert r.code == 0, r
    a, b = f64(tmp_path / "out" / "baked.safetensors"), f64(tmp_path / "out" / "sequential.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=k)
    d = tmp_path / "low"
    d.mkdir()
    assert sdbuild("build", merge_recipe(d, model_dir / "a.safetensors", loras, "svd", ", rank: 1"), "-q").code == 0
    m = load_file(str(d / "out" / "merged.safetensors"))
    assert m["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (1, 24)
    with safe_open(str(d / "out" / "merged.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "1"


def test_merge_refuses_dora_and_mixed_architectures(tmp_path, model_dir, sdbuild):
    l1 = write_synth_lora(tmp_path / "l1.safetensors", "sd1", "lora", 32, 2, 1)
    dora = write_synth_lora(tmp_path / "d.safetensors", "sd1", "dora_in", 32, 2, 1)
    xl = write_synth_lora(tmp_path / "x.safetensors", "sdxl", "lora", 32, 2, 1)
    for other, word in ((dora, "DoRA"), (xl, "different architectures")):
        rp = write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{L1: {l1}, L2: {other}}}
            steps:
              m: {{op: merge_loras, loras: [{{lora: L1, strength: 1}}, {{lora: L2, strength: 1}}]}}
            outputs: {{m: out/m.safetensors}}
            """)
        r = sdbuild("build", rp, "-q")
        assert r.code == 2 and word in r.err, r
