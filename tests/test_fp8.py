"""fp8 inputs: plain float8 (e4m3fn, e5m2) and ComfyUI scaled fp8 merge to the values of their dequantised fp32 forms."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_recipe
from mergekit_sd.synth.models import synth_tensors

KEY = "double_blocks.1.img_attn.qkv.weight"


def _flux(seed):
    return {k: v for k, v in synth_tensors("flux", 64, "fp32", seed=seed, naming="bfl").items()}


def _plain(t, dtype):
    return {k: v.to(dtype) for k, v in t.items()}


def _scaled(t):
    """ComfyUI layout: fp8 weight, fp32 per-layer scale_weight (the real weight is their product), a marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in t.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).to(torch.float32)
            out[k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
        else:
            out[k] = v
    return out


def _dequantised(s):
    out = {}
    for k, v in s.items():
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8":
            continue
        sk = k[: -len(".weight")] + ".scale_weight"
        out[k] = v.to(torch.float32) * s[sk].to(torch.float32) if sk in s else v.to(torch.float32)
    return out


def _build(tmp_path, sdbuild, a, b, extra=""):
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{a: a.safetensors, b: b.safetensors}}
        steps:
          m: {{op: weighted_sum, models: [a, b], alpha: 0.3{extra}}}
        outputs: {{m: m.safetensors}}
        """)
    return sdbuild("build", rp, "-q")


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_plain_fp8_merges_in_fp32_and_defaults_to_bf16(tmp_path, sdbuild):
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = _plain(_flux(1), dtype), _plain(_flux(2), dtype)
        r = _build(tmp_path, sdbuild, a, b, ", dtype: fp32")
        assert r.code == 0, r.err
        out = _read(tmp_path / "m.safetensors")
        want = a[KEY].float() * 0.7 + b[KEY].float() * 0.3
        assert torch.allclose(out[KEY], want, rtol=0, atol=1e-7)
        # without dtype: the output is bf16, never silently fp8
        r = _build(tmp_path, sdbuild, a, b)
        assert r.code == 0 and _read(tmp_path / "m.safetensors")[KEY].dtype == torch.bfloat16


def test_fp8_output_only_when_asked(tmp_path, sdbuild):
    a, b = _plain(_flux(1), torch.float8_e4m3fn), _plain(_flux(2), torch.float8_e4m3fn)
    assert _build(tmp_path, sdbuild, a, b, ", dtype: fp32").code == 0
    exact = _read(tmp_path / "m.safetensors")[KEY]
    assert torch.allclose(exact, a[KEY].float() * 0.7 + b[KEY].float() * 0.3, rtol=0, atol=1e-7)
    assert _build(tmp_path, sdbuild, a, b, ", dtype: fp8_e4m3").code == 0
    out = _read(tmp_path / "m.safetensors")[KEY]
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.float(), exact.to(torch.float8_e4m3fn).float())  # the fp32 result rounded once


def test_scaled_fp8_is_dequantised_on_read(tmp_path, sdbuild):
    sa, sb = _scaled(_flux(1)), _scaled(_flux(2))
    r = _build(tmp_path, sdbuild, sa, sb)
    assert r.code == 0, r.err
    out = _read(tmp_path / "m.safetensors")
    da, db = _dequantised(sa), _dequantised(sb)
    assert not any(k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8" for k in out)
    assert set(out) == set(da)
    for k in (KEY, "single_blocks.3.linear1.weight", "img_in.bias"):
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k], da[k] * 0.7 + db[k] * 0.3, rtol=0, atol=1e-7), k
    # the fp8 values alone are not the weights: the scale was applied
    assert not torch.allclose(out[KEY], sa[KEY].float() * 0.7 + sb[KEY].float() * 0.3)


def test_fp8_overflow_fails_instead_of_writing_wrong_values(tmp_path, sdbuild):
    a = {k: v * 1e5 for k, v in _flux(1).items()}
    r = _build(tmp_path, sdbuild, a, a, ", dtype: fp8_e4m3")
    assert r.code == 2 and "dtype: bf16" in r.err and not (tmp_path / "m.safetensors").exists()
