"""Flux and SD3/3.5 LoRAs: kohya, diffusers/PEFT and XLabs bakes checked against W + strength·scale·up@down on the
exact rows of the fused tensors (the row layout restated here, not imported), a diffusers oracle for the key
mapping, extract/merge round trips and bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.synth.loras import write_synth_lora
from mergekit_sd.synth.models import write_synth

FACTOR = 64
STRENGTH = 0.75

# --- the layouts, restated independently -----------------------------------------------------------------------
# Flux (BFL): a double block's img_attn.qkv / txt_attn.qkv rows are q, k, v (h each); a single block's linear1 rows
# are q, k, v (h each) then the MLP input (4h); diffusers' norm_out.linear is final_layer.adaLN_modulation.1 with its
# two halves (shift, scale) exchanged. SD3: joint_blocks.N.{x_block,context_block}.attn.qkv rows are q, k, v.
QKV = {"q": (0, 1, 3), "k": (1, 2, 3), "v": (2, 3, 3)}
LINEAR1 = {"q": (0, 1, 7), "k": (1, 2, 7), "v": (2, 3, 7), "mlp": (3, 7, 7)}


def _flux_diffusers_site(path: str) -> tuple[str, tuple[int, int, int] | None, bool]:
    """diffusers Flux module path -> (BFL module, rows as (start, stop, of), swapped halves)."""
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", path)
    if m:
        n, rest = m.groups()
        qkv = {"attn.to_q": ("img_attn.qkv", "q"), "attn.to_k": ("img_attn.qkv", "k"), "attn.to_v": ("img_attn.qkv", "v"),
               "attn.add_q_proj": ("txt_attn.qkv", "q"), "attn.add_k_proj": ("txt_attn.qkv", "k"),
               "attn.add_v_proj": ("txt_attn.qkv", "v")}
        if rest in qkv:
            mod, part = qkv[rest]
            return f"double_blocks.{n}.{mod}", QKV[part], False
        plain = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                 "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                 "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
        return f"double_blocks.{n}.{plain[rest]}", None, False
    m = re.match(r"single_transformer_blocks\.(\d+)\.(.+)$", path)
    if m:
        n, rest = m.groups()
        parts = {"attn.to_q": "q", "attn.to_k": "k", "attn.to_v": "v", "proj_mlp": "mlp"}
        if rest in parts:
            return f"single_blocks.{n}.linear1", LINEAR1[parts[rest]], False
        return f"single_blocks.{n}." + {"proj_out": "linear2", "norm.linear": "modulation.lin"}[rest], None, False
    if path == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", None, True
    raise AssertionError(path)


def _xlabs_site(path: str) -> tuple[str, tuple[int, int, int] | None, bool]:
    m = re.match(r"(double|single)_blocks\.(\d+)\.processor\.(\w+)$", path)
    kind, n, proc = m.groups()
    if kind == "double":
        return f"double_blocks.{n}." + {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv",
                                        "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}[proc], None, False
    return ({"qkv_lora": (f"single_blocks.{n}.linear1", (0, 3, 7)), "proj_lora": (f"single_blocks.{n}.linear2", None)}[proc]
            + (False,))


def _sd3_diffusers_site(path: str, depth: int) -> tuple[str, tuple[int, int, int] | None, bool]:
    n, rest = re.match(r"transformer_blocks\.(\d+)\.(.+)$", path).groups()
    qkv = {"attn.to_q": ("x_block.attn.qkv", "q"), "attn.to_k": ("x_block.attn.qkv", "k"),
           "attn.to_v": ("x_block.attn.qkv", "v"), "attn.add_q_proj": ("context_block.attn.qkv", "q"),
           "attn.add_k_proj": ("context_block.attn.qkv", "k"), "attn.add_v_proj": ("context_block.attn.qkv", "v"),
           "attn2.to_q": ("x_block.attn2.qkv", "q"), "attn2.to_k": ("x_block.attn2.qkv", "k"),
           "attn2.to_v": ("x_block.attn2.qkv", "v")}
    if rest in qkv:
        mod, part = qkv[rest]
        return f"joint_blocks.{n}.{mod}", QKV[part], False
    plain = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "attn2.to_out.0": "x_block.attn2.proj"}
    return f"joint_blocks.{n}.{plain[rest]}", None, rest == "norm1_context.linear" and int(n) == depth - 1


def _modules(lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path as written: {down, up, alpha?}} of a kohya, PEFT (incl. older `.lora.down`) or XLabs file."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in lora.items():
        for suffix, role in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
                             (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                             (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha")):
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], {})[role] = v.float()
                break
    return out


def _rows(rows, n):
    return slice(None) if rows is None else slice(rows[0] * n // rows[2], rows[1] * n // rows[2])


def expected_bake(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], site, prefix: str,
                  strength: float = STRENGTH) -> dict[str, torch.Tensor]:
    """W + strength·(alpha/rank)·up@down on each module's rows (alpha absent: scale 1), every module from the original W."""
    out = {k: v.clone().float() for k, v in base.items()}
    for path, t in _modules(lora).items():
        module, rows, swap = site(path)
        key = prefix + module + ".weight"
        w = out[key]
        scale = float(t["alpha"]) / t["down"].shape[0] if "alpha" in t else 1.0
        d = (t["up"] @ t["down"]) * scale
        if swap:
            h = d.shape[0] // 2
            d = torch.cat([d[h:], d[:h]])
        w[_rows(rows, w.shape[0])] += strength * d
    return out


def _bake(tmp_path: Path, sdbuild, model: str, lora: str, strength: float = STRENGTH, extra: str = "") -> Path:
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {model}, l: {lora}}}
        steps:
          b: {{op: lora, model: m, loras: [{{lora: l, strength: {strength}}}]{extra}}}
        outputs: {{b: baked.safetensors}}
        """)
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    return tmp_path / "baked.safetensors"


def _assert_baked(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    assert set(out) == set(base)
    changed = 0
    for k, v in out.items():
        if torch.equal(want[k], base[k].float()):
            assert torch.equal(v, base[k]), k
        else:
            changed += 1
            torch.testing.assert_close(v.float(), want[k], rtol=1e-6, atol=1e-6, msg=k)
    return changed


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flux")
    write_synth(d / "flux.safetensors", "flux", FACTOR, "fp32", 1, naming="comfyui")
    write_synth(d / "flux-bfl.safetensors", "flux", FACTOR, "fp32", 1, naming="bfl")
    write_synth(d / "flux-diffusers.safetensors", "flux", FACTOR, "fp32", 1, naming="diffusers")
    for naming in ("kohya", "diffusers", "xlabs"):
        write_synth_lora(d / f"{naming}.safetensors", "flux", "lora", FACTOR, rank=4, seed=2, naming=naming, dtype="fp32")
    return d


def test_kohya_flux_lora_lands_on_fused_tensors_and_clip(flux, tmp_path, sdbuild):
    base = load_file(flux / "flux.safetensors")
    lora = load_file(flux / "kohya.safetensors")
    assert any(k.startswith("lora_te1_") for k in lora) and "lora_unet_single_blocks_3_linear1.alpha" in lora

    # kohya names are the model path with every dot an underscore, under lora_unet_ (BFL) and lora_te1_ (CLIP-L)
    roots = {"lora_unet_": "model.diffusion_model.", "lora_te1_": "text_encoders.clip_l.transformer."}
    paths = {prefix + k[len(root):-len(".weight")].replace(".", "_"): k[:-len(".weight")]
             for prefix, root in roots.items() for k in base if k.startswith(root) and k.endswith(".weight")}

    def site(name):
        return paths[name], None, False

    out = load_file(_bake(tmp_path, sdbuild, flux / "flux.safetensors", flux / "kohya.safetensors"))
    want = expected_bake(base, lora, site, "")
    n = _assert_baked(out, want, base)
    assert n == len(_modules(lora))


@pytest.mark.parametrize("prefixed", [True, False])
def test_diffusers_flux_lora_writes_exactly_its_rows(flux, tmp_path, sdbuild, prefixed):
    base = load_file(flux / "flux-bfl.safetensors")
    lora = {k: v for k, v in load_file(flux / "diffusers.safetensors").items() if k.startswith("transformer.")}
    # a norm_out LoRA too, whose halves diffusers stores the other way round
    g = torch.Generator().manual_seed(5)
    width = base["final_layer.adaLN_modulation.1.weight"].shape
    lora["transformer.norm_out.linear.lora_A.weight"] = torch.randn(2, width[1], generator=g)
    lora["transformer.norm_out.linear.lora_B.weight"] = torch.randn(width[0], 2, generator=g)
    if not prefixed:
        lora = {k[len("transformer."):]: v for k, v in lora.items()}
    save_file(lora, tmp_path / "d.safetensors")
    out = load_file(_bake(tmp_path, sdbuild, flux / "flux-bfl.safetensors", tmp_path / "d.safetensors"))
    want = expected_bake(base, lora, lambda p: _flux_diffusers_site(p.removeprefix("transformer.")), "")
    # every q/k/v/mlp slice of every fused tensor moved, and exactly as the formula says
    assert _assert_baked(out, want, base) == 19 * 10 + 38 * 3 + 1
    qkv = "double_blocks.4.img_attn.qkv.weight"
    h = base[qkv].shape[0] // 3
    t = _modules(lora)[("transformer." if prefixed else "") + "transformer_blocks.4.attn.to_k"]
    torch.testing.assert_close(out[qkv][h:2 * h], base[qkv][h:2 * h] + STRENGTH * t["up"] @ t["down"], rtol=1e-6, atol=1e-6)


def test_older_diffusers_lora_names(flux, tmp_path, sdbuild):
    base = load_file(flux / "flux-bfl.safetensors")
    lora = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
            for k, v in load_file(flux / "diffusers.safetensors").items()
            if k.startswith("transformer.single_transformer_blocks.7.")}
    save_file(lora, tmp_path / "old.safetensors")
    out = load_file(_bake(tmp_path, sdbuild, flux / "flux-bfl.safetensors", tmp_path / "old.safetensors"))
    want = expected_bake(base, lora, lambda p: _flux_diffusers_site(p.removeprefix("transformer.")), "")
    assert _assert_baked(out, want, base) == 3  # linear1 (q, k, v, mlp), linear2 and modulation.lin


def test_xlabs_flux_lora_scale_one(flux, tmp_path, sdbuild):
    base = load_file(flux / "flux.safetensors")
    lora = load_file(flux / "xlabs.safetensors")
    assert "double_blocks.0.processor.qkv_lora1.down.weight" in lora and not any(k.endswith("alpha") for k in lora)
    out = load_file(_bake(tmp_path, sdbuild, flux / "flux.safetensors", flux / "xlabs.safetensors"))
    want = expected_bake(base, lora, _xlabs_site, "model.diffusion_model.")
    assert _assert_baked(out, want, base) == 19 * 4 + 38 * 2


@pytest.mark.parametrize("fmt", ["kohya", "xlabs", "diffusers"])
def test_any_flux_lora_into_a_diffusers_named_model(flux, tmp_path, sdbuild, fmt):
    """Baked into a diffusers-named model, every part equals the same rows of the BFL bake."""
    (tmp_path / "a").mkdir()
    bfl = load_file(_bake(tmp_path / "a", sdbuild, flux / "flux-bfl.safetensors", flux / f"{fmt}.safetensors"))
    out = load_file(_bake(tmp_path, sdbuild, flux / "flux-diffusers.safetensors", flux / f"{fmt}.safetensors"))
    base = load_file(flux / "flux-diffusers.safetensors")
    for k, v in out.items():
        site = re.sub(r"\.weight$", "", k)
        try:
            module, rows, swap = _flux_diffusers_site(site)
        except (AssertionError, KeyError):
            assert torch.equal(v, base[k]), k
            continue
        w = bfl[module + ".weight"][_rows(rows, bfl[module + ".weight"].shape[0])]
        if swap:
            w = torch.cat([w[w.shape[0] // 2:], w[:w.shape[0] // 2]])
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6, msg=k)


def _full_size_lora(modules: dict[str, tuple[int, int]], rank: int, names: tuple[str, str], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in modules.items():
        out[f"{m}{names[0]}"] = torch.randn(rank, i, generator=g)
        out[f"{m}{names[1]}"] = torch.randn(o, rank, generator=g)
    return out


def test_diffusers_oracle_agrees_on_the_key_mapping():
    """diffusers' own converters (kohya -> diffusers, XLabs -> diffusers) split full-size Flux LoRAs; each diffusers
    module they write must act as our table's rows of the fused module (checked on a random input, ΔW·x)."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    from mergekit_sd.arch.lora_keys import table
    from mergekit_sd.arch.registry import named_reference

    tab = table("flux", "bfl")
    ref = named_reference("flux", "bfl")
    shape = {k[:-len(".weight")]: tuple(e["shape"]) for k, e in ref.items() if k.endswith(".weight")}
    # block 0 of each kind and every layer outside the blocks (embedders, final layer with its swapped halves)
    bfl = [m for m in shape if len(shape[m]) == 2 and (re.match(r"(double_blocks|single_blocks)\.0\.", m) or "blocks." not in m)]
    kohya = _full_size_lora({"lora_unet_" + m.replace(".", "_"): shape[m] for m in bfl}, 2, (".lora_down.weight", ".lora_up.weight"), 1)
    for m in bfl:  # alpha 1 (scale 1/2) in the blocks; the converter copies layers outside them unscaled, so alpha = rank
        kohya[f"lora_unet_{m.replace('.', '_')}.alpha"] = torch.tensor(1.0 if "blocks." in m else 2.0)
    xl = {"double_blocks.0.processor.qkv_lora1": shape["double_blocks.0.img_attn.qkv"],
          "double_blocks.0.processor.qkv_lora2": shape["double_blocks.0.txt_attn.qkv"],
          "double_blocks.0.processor.proj_lora1": shape["double_blocks.0.img_attn.proj"],
          "double_blocks.0.processor.proj_lora2": shape["double_blocks.0.txt_attn.proj"],
          "single_blocks.0.processor.qkv_lora": (shape["single_blocks.0.linear1"][0] * 3 // 7, shape["single_blocks.0.linear1"][1]),
          "single_blocks.0.processor.proj_lora": shape["single_blocks.0.linear2"]}
    xlabs = _full_size_lora(xl, 2, (".down.weight", ".up.weight"), 2)
    cases = [("kohya", kohya, conv._convert_kohya_flux_lora_to_diffusers, ".lora_down.weight", ".lora_up.weight", ".alpha"),
             ("xlabs", xlabs, conv._convert_xlabs_flux_lora_to_diffusers, ".down.weight", ".up.weight", None)]
    from fractions import Fraction as F

    for label, sd, fn, dn, up, al in cases:
        converted = fn(dict(sd))
        mods = sorted({k[:-len(".lora_A.weight")] for k in converted if k.endswith(".lora_A.weight")})
        assert mods
        by_base = {}
        for name in {k[: -len(dn)] for k in sd if k.endswith(dn)}:
            src = name if label == "kohya" else "lora_unet_" + name.replace(".", "_")
            (t,) = tab.targets(src)
            assert not t.swap
            by_base[t.base] = (name, t.rows)
        covered = 0
        for m in mods:
            (t,) = tab.targets("lora_unet_" + m.removeprefix("transformer.").replace(".", "_"))
            name, rows = by_base[t.base]
            x = torch.randn(sd[name + dn].shape[1], dtype=torch.float64)
            scale = float(sd[name + al]) / sd[name + dn].shape[0] if al else 1.0
            ours = sd[name + up].double() @ (sd[name + dn].double() @ x) * scale
            # rows of the diffusers module inside the source module's rows, as fractions of the whole tensor
            a, b = (F(t.rows[0], t.rows[2]), F(t.rows[1], t.rows[2])) if t.rows else (F(0), F(1))
            c, d = (F(rows[0], rows[2]), F(rows[1], rows[2])) if rows else (F(0), F(1))
            n = ours.shape[0]
            lo, hi = (a - c) / (d - c) * n, (b - c) / (d - c) * n
            ours = ours[int(lo):int(hi)]
            if t.swap:
                ours = torch.cat([ours[ours.shape[0] // 2:], ours[:ours.shape[0] // 2]])
            theirs = converted[m + ".lora_B.weight"].double() @ (converted[m + ".lora_A.weight"].double() @ x)
            torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6, msg=f"{label}: {m}")
            covered += 1
        assert covered == len(mods) >= len(by_base)


# --- SD3 -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sd3")
    write_synth(d / "sd3.safetensors", "sd3", FACTOR, "fp32", 1, naming="comfyui", diffusion_only=True)
    for naming in ("kohya", "diffusers"):
        write_synth_lora(d / f"{naming}.safetensors", "sd3", "lora", FACTOR, rank=4, seed=3, naming=naming, dtype="fp32",
                         te=False)
    return d


def test_sd3_kohya_and_diffusers_bakes(sd3, tmp_path, sdbuild):
    base = load_file(sd3 / "sd3.safetensors")
    kohya = load_file(sd3 / "kohya.safetensors")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    paths = {k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k[len("model.diffusion_model."):-len(".weight")]
             for k in base if k.endswith(".weight")}
    out = load_file(_bake(tmp_path, sdbuild, sd3 / "sd3.safetensors", sd3 / "kohya.safetensors"))
    want = expected_bake(base, kohya, lambda n: (paths[n[len("lora_unet_"):]], None, False), "model.diffusion_model.")
    assert _assert_baked(out, want, base) == len(_modules(kohya))

    dif = load_file(sd3 / "diffusers.safetensors")
    # the last block's norm1_context (swapped halves) too
    w = base["model.diffusion_model.joint_blocks.23.context_block.adaLN_modulation.1.weight"]
    g = torch.Generator().manual_seed(9)
    dif["transformer.transformer_blocks.23.norm1_context.linear.lora_A.weight"] = torch.randn(3, w.shape[1], generator=g)
    dif["transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight"] = torch.randn(w.shape[0], 3, generator=g)
    save_file(dif, tmp_path / "d.safetensors")
    (tmp_path / "d").mkdir()
    out = load_file(_bake(tmp_path / "d", sdbuild, sd3 / "sd3.safetensors", tmp_path / "d.safetensors"))
    want = expected_bake(base, dif, lambda p: _sd3_diffusers_site(p.removeprefix("transformer."), 24), "model.diffusion_model.")
    assert _assert_baked(out, want, base) == len({_sd3_diffusers_site(p[len("transformer."):], 24)[0] for p in _modules(dif)})


# --- extract and merge -----------------------------------------------------------------------------------------

def test_flux_extract_at_full_rank_reproduces_the_difference(flux, tmp_path, sdbuild):
    from mergekit_sd.synth.models import write_like

    write_like(tmp_path / "tuned.safetensors", flux / "flux.safetensors", 0.05, seed=4)
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {base: %s, tuned: tuned.safetensors}
        steps:
          x: {op: extract_lora, models: [base, tuned], rank: 100000, min_diff: null, dtype: fp32}
          b: {op: lora, model: base, loras: [{lora: x, strength: 1}]}
        outputs: {x: x.safetensors, b: b.safetensors}
        """ % (flux / "flux.safetensors"))
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    lora = load_file(tmp_path / "x.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora
    assert "lora_unet_single_blocks_37_linear1.lora_up.weight" in lora
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in lora
    base, tuned, baked = (load_file(p) for p in (flux / "flux.safetensors", tmp_path / "tuned.safetensors",
                                                 tmp_path / "b.safetensors"))
    touched = {k for k in base if torch.is_floating_point(base[k]) and not torch.equal(baked[k], base[k])}
    # every linear layer of every block, and CLIP-L's attention and MLP
    assert len([k for k in touched if ".double_blocks." in k]) == 19 * 10
    assert len([k for k in touched if ".single_blocks." in k]) == 38 * 3
    assert len([k for k in touched if k.startswith("text_encoders.clip_l.")]) == 6 * len(
        {k.split(".layers.")[1].split(".")[0] for k in base if ".clip_l." in k and ".layers." in k})
    for k in touched:
        torch.testing.assert_close(baked[k], tuned[k], rtol=1e-4, atol=1e-5, msg=k)


def test_flux_merge_concat_equals_baking_each(flux, tmp_path, sdbuild):
    """kohya, diffusers and XLabs LoRAs merged into one kohya-named LoRA bake to what the three bake to in turn."""
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {m: %s, k: %s, d: %s, x: %s}
        steps:
          merged: {op: merge_loras, loras: [{lora: k, strength: 0.5}, {lora: d, strength: -0.7}, {lora: x, strength: 1.2}]}
          one: {op: lora, model: m, loras: [{lora: merged, strength: 1}]}
          three: {op: lora, model: m, loras: [{lora: k, strength: 0.5}, {lora: d, strength: -0.7}, {lora: x, strength: 1.2}]}
          svd: {op: merge_loras, loras: [{lora: d, strength: 1}, {lora: x, strength: 1}], mode: svd, rank: 64}
          svd_bake: {op: lora, model: m, loras: [{lora: svd, strength: 1}]}
          two: {op: lora, model: m, loras: [{lora: d, strength: 1}, {lora: x, strength: 1}]}
        outputs: {merged: merged.safetensors, one: one.safetensors, three: three.safetensors, svd: svd.safetensors,
                  svd_bake: svd_bake.safetensors, two: two.safetensors}
        """ % (flux / "flux.safetensors", flux / "kohya.safetensors", flux / "diffusers.safetensors",
               flux / "xlabs.safetensors"))
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    merged = load_file(tmp_path / "merged.safetensors")
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")) for k in merged)
    # q, k, v (4 each) of diffusers, 4 of kohya and 4 of XLabs on one fused qkv: rank 4 + 3*4 + 4
    assert merged["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"].shape[0] == 20
    one, three = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "three.safetensors")
    for k in one:
        torch.testing.assert_close(one[k], three[k], rtol=1e-5, atol=1e-6, msg=k)
    # mode svd at a rank above the layers' (48 wide at this size) is exact too
    svd = load_file(tmp_path / "svd.safetensors")
    assert svd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 48
    a, b = load_file(tmp_path / "svd_bake.safetensors"), load_file(tmp_path / "two.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sd3_extract_and_merge(sd3, tmp_path, sdbuild):
    from mergekit_sd.synth.models import write_like

    write_like(tmp_path / "tuned.safetensors", sd3 / "sd3.safetensors", 0.05, seed=6)
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {base: %s, tuned: tuned.safetensors, k: %s, d: %s}
        steps:
          x: {op: extract_lora, models: [base, tuned], rank: 100000, dtype: fp32}
          b: {op: lora, model: base, loras: [{lora: x, strength: 1}]}
          merged: {op: merge_loras, loras: [{lora: k, strength: 0.3}, {lora: d, strength: 0.6}]}
          one: {op: lora, model: base, loras: [{lora: merged, strength: 1}]}
          two: {op: lora, model: base, loras: [{lora: k, strength: 0.3}, {lora: d, strength: 0.6}]}
        outputs: {b: b.safetensors, merged: merged.safetensors, one: one.safetensors, two: two.safetensors}
        """ % (sd3 / "sd3.safetensors", sd3 / "kohya.safetensors", sd3 / "diffusers.safetensors"))
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    base, tuned, baked = (load_file(p) for p in (sd3 / "sd3.safetensors", tmp_path / "tuned.safetensors", tmp_path / "b.safetensors"))
    touched = [k for k in base if not torch.equal(baked[k], base[k])]
    assert "model.diffusion_model.joint_blocks.5.context_block.attn.qkv.weight" in touched
    for k in touched:
        torch.testing.assert_close(baked[k], tuned[k], rtol=1e-4, atol=1e-5, msg=k)
    merged = load_file(tmp_path / "merged.safetensors")
    assert all(k.startswith("lora_unet_joint_blocks_") for k in merged)
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)


# --- bad inputs --------------------------------------------------------------------------------------------------

def _fail(tmp_path: Path, sdbuild, model: Path, lora: Path, extra: str = "") -> str:
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {model}, l: {lora}}}
        steps:
          b: {{op: lora, model: m, loras: [{{lora: l, strength: 1}}]{extra}}}
        outputs: {{b: baked.safetensors}}
        """)
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r
    assert not (tmp_path / "baked.safetensors").exists()
    return r.err


def test_sd1_lora_without_metadata_on_flux(flux, tmp_path, sdbuild):
    write_synth_lora(tmp_path / "sd1.safetensors", "sd1", "lora", FACTOR, 4, 0, metadata=False)
    err = _fail(tmp_path, sdbuild, flux / "flux.safetensors", tmp_path / "sd1.safetensors")
    assert "SD1/SD2/SDXL" in err and "Flux.1" in err and "names a UNet block" in err


def test_flux_lora_on_a_block_the_model_lacks(flux, tmp_path, sdbuild):
    lora = load_file(flux / "kohya.safetensors")
    lora = {k.replace("lora_unet_double_blocks_3_", "lora_unet_double_blocks_25_"): v for k, v in lora.items()}
    save_file(lora, tmp_path / "deep.safetensors")
    err = _fail(tmp_path, sdbuild, flux / "flux.safetensors", tmp_path / "deep.safetensors")
    assert "lora_unet_double_blocks_25_" in err and "maps to no key" in err
    # schnell has no guidance embedder
    write_synth(tmp_path / "schnell.safetensors", "flux", FACTOR, "fp32", 1, variant="schnell", diffusion_only=True)
    g = torch.Generator().manual_seed(0)
    w = load_file(flux / "flux.safetensors")["model.diffusion_model.guidance_in.in_layer.weight"]
    save_file({"lora_unet_guidance_in_in_layer.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
               "lora_unet_guidance_in_in_layer.lora_up.weight": torch.randn(w.shape[0], 2, generator=g)},
              tmp_path / "g.safetensors")
    (tmp_path / "s").mkdir()
    err = _fail(tmp_path / "s", sdbuild, tmp_path / "schnell.safetensors", tmp_path / "g.safetensors")
    assert "guidance_in.in_layer.weight" in err and "missing" in err


def test_flux_lora_on_sd3_and_shape_mismatch(flux, sd3, tmp_path, sdbuild):
    err = _fail(tmp_path, sdbuild, sd3 / "sd3.safetensors", flux / "kohya.safetensors")
    assert "Flux.1" in err and "SD3" in err
    # a Flux LoRA for another width (factor 32 against a factor-64 model) names the module and both shapes
    write_synth_lora(tmp_path / "wide.safetensors", "flux", "lora", 32, rank=4, seed=1, naming="diffusers", te=False,
                     only=["transformer.transformer_blocks.2.attn.to_k"])
    (tmp_path / "w").mkdir()
    err = _fail(tmp_path / "w", sdbuild, flux / "flux-bfl.safetensors", tmp_path / "wide.safetensors")
    assert "transformer.transformer_blocks.2.attn.to_k" in err and "double_blocks.2.img_attn.qkv.weight" in err


def test_text_encoder_modules_skipped_with_a_warning_on_a_diffusion_only_model(flux, tmp_path, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {flux / "flux-bfl.safetensors"}, l: {flux / "kohya.safetensors"}}}
        steps:
          b: {{op: lora, model: m, loras: [{{lora: l, strength: 1}}]}}
        outputs: {{b: baked.safetensors}}
        """)
    r = sdbuild("build", rp, "--cache-dir", tmp_path / "cache")
    assert r.code == 0 and "text-encoder LoRA modules" in r.err and "lora_te1_" in r.err


def test_flux_lora_files_are_loras_not_models(flux, sdbuild):
    from mergekit_sd.arch.detect import detect, model_kind
    from mergekit_sd.formats.open import open_model

    for naming in ("kohya", "diffusers", "xlabs"):
        specs = open_model(flux / f"{naming}.safetensors").specs
        assert model_kind(specs) == "lora" and detect(specs).arch == "unknown", naming
    assert detect(open_model(flux / "flux-bfl.safetensors").specs).arch == "flux"


def test_comfyui_and_lycoris_prefixes_name_the_same_layers(flux, tmp_path, sdbuild):
    """`diffusion_model.` PEFT names (BFL paths) and `lycoris_` kohya names bake like the kohya file."""
    kohya = {k: v for k, v in load_file(flux / "kohya.safetensors").items() if k.startswith("lora_unet_double_blocks_1_")}
    save_file(kohya, tmp_path / "k.safetensors")
    bfl = {m.removeprefix("model.diffusion_model."): m for m in load_file(flux / "flux.safetensors")}
    paths = {k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): k[len("model.diffusion_model."):-len(".weight")]
             for k in bfl.values() if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    comfy, lyco = {}, {}
    for k, v in kohya.items():
        module, role = k.split(".", 1)
        path = paths[module[len("lora_unet_"):]]
        role2 = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[role]
        comfy[f"diffusion_model.{path}.{role2}"] = v
        lyco[f"lycoris_{module[len('lora_unet_'):]}.{role}"] = v
    save_file(comfy, tmp_path / "c.safetensors")
    save_file(lyco, tmp_path / "y.safetensors")
    results = []
    for name in ("k", "c", "y"):
        (tmp_path / name).mkdir()
        results.append(load_file(_bake(tmp_path / name, sdbuild, flux / "flux.safetensors", tmp_path / f"{name}.safetensors")))
    base = load_file(flux / "flux.safetensors")
    assert sum(not torch.equal(results[0][k], base[k]) for k in base) == 10
    for k in base:
        assert torch.equal(results[0][k], results[1][k]) and torch.equal(results[0][k], results[2][k]), k


def test_sd_block_weight_strength_on_flux_is_refused_clearly(flux, tmp_path, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{m: {flux / "flux.safetensors"}, l: {flux / "kohya.safetensors"}}}
        steps:
          b: {{op: lora, model: m, loras: [{{lora: l, strength: {{default: 1, IN00: 0}}}}]}}
          c: {{op: merge_loras, loras: [{{lora: l, strength: {{default: 1, IN00: 0}}}}]}}
        outputs: {{b: baked.safetensors, c: merged.safetensors}}
        """)
    r = sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "cache")
    # SD block names mean nothing on Flux (and, while Flux has no block map, any mapping is refused)
    assert r.code == 2 and r.err.count("\n") == 1 and "loras[0] strength" in r.err, r


def _flux_block(module: str) -> str:
    """ComfyUI ModelMergeFlux1 block of a BFL module path (restated here: `double_blocks.N`, `single_blocks.N`, or the
    first path element for the embedders and the final layer)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else parts[0]


def test_named_block_strengths_on_a_flux_lora(flux, tmp_path, sdbuild):
    base = load_file(flux / "flux.safetensors")
    lora = {k: v for k, v in load_file(flux / "kohya.safetensors").items() if k.startswith("lora_unet_")}
    save_file(lora, tmp_path / "unet-only.safetensors")
    root = "model.diffusion_model."
    paths = {"lora_unet_" + k[len(root):-len(".weight")].replace(".", "_"): k[:-len(".weight")]
             for k in base if k.startswith(root) and k.endswith(".weight")}
    weights = {"double_blocks.0-9": 0.6, "single_blocks.5": -1.0, "final_layer": 2.0}

    def strength_of(module: str) -> float:
        b = _flux_block(module[len(root):])
        if b == "single_blocks.5":
            return -1.0
        if b == "final_layer":
            return 2.0
        if b.startswith("double_blocks.") and int(b.split(".")[1]) <= 9:
            return 0.6
        return 0.3

    want = {k: v.clone().float() for k, v in base.items()}
    for path, t in _modules(lora).items():
        module = paths[path]
        scale = float(t["alpha"]) / t["down"].shape[0] if "alpha" in t else 1.0
        want[module + ".weight"] += strength_of(module) * scale * (t["up"] @ t["down"])
    mapping = "{default: 0.3, " + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}"
    out = load_file(_bake(tmp_path, sdbuild, flux / "flux.safetensors", tmp_path / "unet-only.safetensors", mapping))
    assert _assert_baked(out, want, base) == len(_modules(lora))


def test_bake_provenance_names_the_format(flux, tmp_path, sdbuild):
    import json

    from safetensors import safe_open

    for fmt in ("kohya", "diffusers", "xlabs"):
        (tmp_path / fmt).mkdir()
        out = _bake(tmp_path / fmt, sdbuild, flux / "flux.safetensors", flux / f"{fmt}.safetensors")
        with safe_open(out, "pt") as f:
            prov = json.loads(f.metadata()["sdbuild.provenance"])
        step = json.dumps(prov)
        assert f'"naming": "{fmt}"' in step and '"architecture": "flux"' in step, step[:400]


def test_sd35_medium_second_attention_and_large(tmp_path, sdbuild):
    """MMDiT-X's attn2 q, k, v land on x_block.attn2.qkv rows; 3.5 large (38 blocks) takes kohya names."""
    for arch, depth in (("sd35m", 24), ("sd35l", 38)):
        d = tmp_path / arch
        d.mkdir()
        write_synth(d / "m.safetensors", arch, FACTOR, "fp32", 1, diffusion_only=True)
        write_synth_lora(d / "l.safetensors", arch, "lora", FACTOR, rank=2, seed=4, naming="diffusers", te=False)
        base, lora = load_file(d / "m.safetensors"), load_file(d / "l.safetensors")
        if arch == "sd35m":
            assert "transformer.transformer_blocks.3.attn2.to_k.lora_A.weight" in lora
        out = load_file(_bake(d, sdbuild, d / "m.safetensors", d / "l.safetensors"))
        want = expected_bake(base, lora, lambda p: _sd3_diffusers_site(p.removeprefix("transformer."), depth),
                             "model.diffusion_model.")
        touched = {_sd3_diffusers_site(p.removeprefix("transformer."), depth)[0] for p in _modules(lora)}
        assert _assert_baked(out, want, base) == len(touched)
        assert (arch == "sd35m") == any(".attn2." in t for t in touched)
