"""ModelSpec architecture ids and resolutions: one table, and every id detection can emit has a resolution."""

from __future__ import annotations

from safetensors.torch import save_file
from safetensors import safe_open

from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.modelspec import MODELSPEC, RESOLUTION, resolution
from mergekit_sd.synth.models import synth_tensors
from conftest import write_recipe


def test_every_detected_id_has_a_resolution():
    missing = sorted(v for v in MODELSPEC.values() if v not in RESOLUTION)
    assert missing == []


def _sd2_checkpoint(path, seed):
    """SD1's UNet and VAE (the same layout as SD2's) with an OpenCLIP text encoder at cond_stage_model.model."""
    t = {k: v for k, v in synth_tensors("sd1", 32, "fp16", seed).items() if not k.startswith("cond_stage_model.")}
    t["cond_stage_model.model.ln_final.weight"] = t["model.diffusion_model.out.0.weight"][:32].clone()
    t["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = t["model.diffusion_model.time_embed.0.weight"][:96, :32].clone()
    save_file(t, str(path))
    return path


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_sd2_merge_gets_a_resolution(tmp_path, sdbuild):
    a, b = _sd2_checkpoint(tmp_path / "a.safetensors", 1), _sd2_checkpoint(tmp_path / "b.safetensors", 2)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A: {a}
          B: {b}
          E: {{path: {a}, prediction_type: epsilon}}
          F: {{path: {b}, prediction_type: epsilon}}
        steps:
          m: {{op: weighted_sum, models: [A, B], alpha: 0.5}}
          eps: {{op: weighted_sum, models: [E, F], alpha: 0.5}}
        outputs:
          m: m.safetensors
          eps: eps.safetensors
        """)
    r = sdbuild("build", rp, "-q")
    assert r.code == 0, r.err
    meta = _meta(tmp_path / "m.safetensors")
    # no prediction type declared: the 768 v-prediction models are what SD2 merges are made of
    assert meta["modelspec.architecture"] == "stable-diffusion-v2"
    assert meta["modelspec.resolution"] == "768x768" == resolution("stable-diffusion-v2")
    eps = _meta(tmp_path / "eps.safetensors")
    assert eps["modelspec.resolution"] == "512x512" and eps["modelspec.prediction_type"] == "epsilon"
