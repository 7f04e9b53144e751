"""Legacy pickle inputs: weights-only loading, refusal of code, state_dict unwrapping, alias renames."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_recipe
from mergekit_sd.formats.ckpt import legacy_renames, open_ckpt, turbo_renames
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import TensorSpec
from mergekit_sd.formats.open import open_model
from mergekit_sd.synth.models import synth_tensors, write_synth_ckpt


class _Canary:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _CanaryEval:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').write('x')",))


@pytest.mark.parametrize("evil", [_Canary, _CanaryEval])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, sdbuild, evil):
    canary = tmp_path / "canary"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": evil(str(canary))}, p)
    assert not canary.exists()
    r = sdbuild("inspect", p)
    assert r.code == 2 and "refused to load this pickle" in r.err and "nothing was executed" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs: {{e: {p}}}\nsteps: {{p: {{op: prune, model: e}}}}\noutputs: {{p: p.safetensors}}\n")
    r = sdbuild("build", rec, "-q")
    assert r.code == 2 and "refused" in r.err
    assert not canary.exists()


def test_malicious_pickle_in_a_fresh_process(tmp_path):
    """The canary check again where no test module is importable, as for a real user."""
    canary = tmp_path / "canary"
    p = tmp_path / "evil.pt"
    torch.save(_Canary(str(canary)), p)
    r = subprocess.run([sys.executable, "-m", "mergekit_sd", "inspect", str(p)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "refused" in r.stderr and "posix.system" in r.stderr
    assert not canary.exists()


@pytest.mark.parametrize("legacy_format", [False, True])
def test_lightning_checkpoint_unwrapped_and_training_state_dropped(tmp_path, sdbuild, legacy_format):
    t = synth_tensors("sd1", 32, "fp32", 3)
    extra = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
             "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}], "lr_schedulers": []}
    p = write_synth_ckpt(tmp_path / "m.ckpt", t, extra=extra, legacy_format=legacy_format)
    m = open_model(p)
    assert sorted(m.keys()) == sorted(t)
    for k in t:
        assert torch.equal(m.get(k), t[k])
    assert m.info.provenance["training_state_dropped"] == sorted(extra)
    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs: {{m: {p}}}\nsteps: {{p: {{op: prune, model: m}}}}\noutputs: {{p: p.safetensors}}\n")
    r = sdbuild("build", rec, "-q")
    assert r.code == 0, r
    out = load_file(str(tmp_path / "p.safetensors"))
    assert sorted(out) == sorted(t) and all(torch.equal(out[k], t[k]) for k in t)


def test_lightning_callback_objects_load_inert(tmp_path, monkeypatch):
    """Published SD checkpoints pickle a ModelCheckpoint callback; it must load without importing Lightning."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mods[names[-1]].ModelCheckpoint = ModelCheckpoint
    for n, mod in mods.items():
        monkeypatch.setitem(sys.modules, n, mod)
    p = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "callbacks": {ModelCheckpoint: {"x": ModelCheckpoint()}}}, p)
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    m = open_ckpt(p)
    assert m.keys() == ["a"] and m.info.provenance["training_state_dropped"] == ["callbacks"]
    assert "pytorch_lightning" not in sys.modules


def test_bare_state_dict_and_nai_alias_rename(tmp_path):
    t = synth_tensors("sd1", 32, "fp16", 3)
    pre = "cond_stage_model.transformer.text_model."
    nai = {("cond_stage_model.transformer." + k[len(pre):] if k.startswith(pre) else k): v for k, v in t.items()}
    assert sum(k.startswith(pre) for k in nai) == 0
    p = write_synth_ckpt(tmp_path / "nai.ckpt", nai, wrap=False, extra={"global_step": 5})
    m = open_model(p)
    assert sorted(m.keys()) == sorted(t)
    assert m.info.provenance["renamed"] == 197
    assert m.info.provenance["training_state_dropped"] == ["global_step"]
    k = pre + "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(m.get(k), t[k])


def test_rename_rules():
    assert legacy_renames(["cond_stage_model.transformer.final_layer_norm.weight", "cond_stage_model.transformer.text_model.x",
                           "cond_stage_model.transformer.other"]) == {
        "cond_stage_model.transformer.final_layer_norm.weight": "cond_stage_model.transformer.text_model.final_layer_norm.weight"}
    turbo = {"conditioner.embedders.0.model.ln_final.weight": TensorSpec(torch.float16, (1024,)),
             "conditioner.embedders.0.model.token_embedding.weight": TensorSpec(torch.float16, (49408, 1024))}
    assert turbo_renames(turbo) == {k: "cond_stage_model." + k[len("conditioner.embedders.0."):] for k in turbo}
    refiner = {"conditioner.embedders.0.model.ln_final.weight": TensorSpec(torch.float16, (1280,))}
    assert turbo_renames(refiner) == {}


@pytest.mark.parametrize("case", ["truncated", "not_a_dict", "no_tensors", "garbage"])
def test_broken_pickles_are_user_errors(tmp_path, sdbuild, case):
    p = tmp_path / "bad.ckpt"
    if case == "truncated":
        write_synth_ckpt(p, synth_tensors("sd1", 32, "fp16", 1))
        p.write_bytes(p.read_bytes()[:5000])
    elif case == "not_a_dict":
        torch.save([torch.zeros(1)], p)
    elif case == "no_tensors":
        torch.save({"epoch": 1}, p)
    else:
        p.write_bytes(b"\x80\x02not really a pickle" * 10)
    r = sdbuild("inspect", p)
    assert r.code == 2, r
    assert len(r.err.strip().splitlines()) == 1 and "internal failure" not in r.err and str(p) in r.err
    with pytest.raises(UserError):
        open_ckpt(p)


def test_plain_pickles_and_misnamed_safetensors(tmp_path, sdbuild):
    import pickle

    from safetensors.torch import save_file

    p = tmp_path / "plain.ckpt"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    r = sdbuild("inspect", p)
    assert r.code == 2 and "not a readable PyTorch checkpoint" in r.err and "nothing was executed" in r.err
    assert len(r.err.strip().splitlines()) == 1
    t = synth_tensors("sd1", 32, "fp16", 1)
    save_file(t, str(tmp_path / "really.ckpt"))
    m = open_model(tmp_path / "really.ckpt")
    assert sorted(m.keys()) == sorted(t)
