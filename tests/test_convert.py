"""op: convert: exact casts, and values a cast would damage fail the step naming the tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.errors import StepError
from mergekit_sd.lazy import from_tensors
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.convert import build_convert, checked_cast
from mergekit_sd.synth.models import synth_tensors

HOT = "model.diffusion_model.out.2.weight"


def test_fp16_of_a_tensor_holding_1e6_fails_naming_it(tmp_path, sdbuild):
    t = synth_tensors("sd1", 32, "fp32", 1)
    t[HOT] = t[HOT].clone()
    t[HOT][0, 0, 0, 0] = 1e6
    save_file(t, str(tmp_path / "m.safetensors"))
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {tmp_path / 'm.safetensors'}}}
        steps: {{half: {{op: convert, model: m, dtype: fp16}}}}
        outputs: {{half: half.safetensors}}
        """)
    r = sdbuild("build", rec, "-q")
    assert r.code == 1, r
    assert HOT in r.err and "1e+06" in r.err and "65504" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (tmp_path / "half.safetensors").exists()


def test_allow_overflow_saturates(tmp_path):
    x = torch.tensor([1e6, -1e6, 1.5, float("nan")], dtype=torch.float32)
    y = checked_cast(x, "k", torch.float16, "s", allow_overflow=True)
    assert y.dtype == torch.float16
    assert y[:3].tolist() == [65504.0, -65504.0, 1.5] and torch.isnan(y[3])
    with pytest.raises(StepError, match=r"'k' holds 1 NaN/Inf"):
        checked_cast(x, "k", torch.float16, "s")


def test_non_finite_fails_even_when_widening():
    x = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    with pytest.raises(StepError, match="'w' holds 1 NaN/Inf"):
        checked_cast(x, "w", torch.float32, "s")


def test_convert_casts_floats_only_and_exactly(tmp_path):
    t = synth_tensors("sd1", 32, "fp32", 4)
    ctx = OpContext(step="c")
    out = build_convert([from_tensors(t)], {"dtype": "bf16"}, ctx)
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert out.spec(pos).dtype == torch.int64 and torch.equal(out.get(pos), t[pos])
    assert torch.equal(out.get(HOT), t[HOT].to(torch.bfloat16))
    floats = sum(1 for v in t.values() if v.dtype.is_floating_point)
    facts = out.info.provenance["convert"]
    assert facts["tensors_cast"] == floats == 1130
    assert facts["bytes_before"] == sum(v.numel() * v.element_size() for v in t.values())
    assert facts["bytes_after"] == sum(v.numel() * (2 if v.dtype.is_floating_point else v.element_size()) for v in t.values())


def test_fp8_range_is_checked():
    x = torch.tensor([500.0], dtype=torch.float32)
    with pytest.raises(StepError, match="F8_E4M3 range"):
        checked_cast(x, "k", torch.float8_e4m3fn, "s")
    assert checked_cast(torch.tensor([0.5]), "k", torch.float8_e4m3fn, "s").float().item() == 0.5


def test_convert_end_to_end(tmp_path, sdbuild, model_dir):
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{a: {model_dir / 'a.safetensors'}}}
        steps: {{full: {{op: convert, model: a, dtype: fp32}}}}
        outputs: {{full: full.safetensors}}
        """)
    assert sdbuild("build", rec, "-q").code == 0
    got, src = load_file(str(tmp_path / "full.safetensors")), load_file(str(model_dir / "a.safetensors"))
    assert sorted(got) == sorted(src)
    for k, v in src.items():
        assert torch.equal(got[k], v.float() if v.dtype.is_floating_point else v)
