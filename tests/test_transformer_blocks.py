"""Block weights on Flux.1 and SD3/3.5: ComfyUI's named blocks in every naming, ranges, groups, lists, errors,
`default`/`re:` on any model, provenance, and the check before anything is built."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import write_recipe
from mergekit_sd.arch.blocks import block_of, normalize_inex, parse_selector
from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.models.flux import to_diffusers
from mergekit_sd.arch.registry import named_reference
from mergekit_sd.arch.weights import compile_weight, normalize_weight
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import from_tensors
from mergekit_sd.methods import load_methods
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.merge import build_merge
from mergekit_sd.synth.models import synth_tensors

FACTOR = 64
UNET = "model.diffusion_model."

# ---------------------------------------------------------------------------------------------------------------
# the block of a tensor, restated from ComfyUI's node inputs and diffusers' conversion script

FLUX_DIFFUSERS_HEADS = [("x_embedder.", "img_in"), ("context_embedder.", "txt_in"),
                        ("time_text_embed.timestep_embedder.", "time_in"),
                        ("time_text_embed.guidance_embedder.", "guidance_in"),
                        ("time_text_embed.text_embedder.", "vector_in"), ("norm_out.", "final_layer"),
                        ("proj_out.", "final_layer")]


def flux_block(key: str) -> str | None:
    if key.startswith("text_encoders."):
        return "TE"
    if key.startswith("vae."):
        return "VAE"
    p = key[len(UNET):] if key.startswith(UNET) else key
    if m := re.match(r"(?:double_blocks|transformer_blocks)\.(\d+)\.", p):
        return f"double_blocks.{m.group(1)}"
    if m := re.match(r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.", p):
        return f"single_blocks.{m.group(1)}"
    for stem, block in FLUX_DIFFUSERS_HEADS:
        if p.startswith(stem):
            return block
    head = p.split(".")[0]
    return head if head in ("img_in", "time_in", "guidance_in", "vector_in", "txt_in", "final_layer") else None


def sd3_block(key: str) -> str | None:
    if key.startswith("text_encoders."):
        return "TE"
    if key.startswith("first_stage_model."):
        return "VAE"
    p = key[len(UNET):] if key.startswith(UNET) else key
    if m := re.match(r"joint_blocks\.(\d+)\.", p):
        return f"joint_blocks.{m.group(1)}"
    head = p.split(".")[0]
    return head if head in ("pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder", "final_layer") else None


FAMILY = {"flux": "flux", "sd3": "mmdit24", "sd35m": "mmdit24", "sd35l": "mmdit38"}
DEPTH = {"sd3": 24, "sd35m": 24, "sd35l": 38}


def expected_block(arch: str, key: str) -> str | None:
    return flux_block(key) if arch == "flux" else sd3_block(key)


def comfyui_names(arch: str) -> list[str]:
    """ComfyUI's merge node inputs (ModelMergeFlux1 / ModelMergeSD3_2B / ModelMergeSD35_Large), trailing dots dropped."""
    if arch == "flux":
        return ["img_in", "time_in", "guidance_in", "vector_in", "txt_in", *[f"double_blocks.{i}" for i in range(19)],
                *[f"single_blocks.{i}" for i in range(38)], "final_layer"]
    return ["pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder",
            *[f"joint_blocks.{i}" for i in range(DEPTH[arch])], "final_layer"]


@pytest.mark.parametrize("arch,naming", [("flux", "comfyui"), ("flux", "bfl"), ("flux", "diffusers"), ("sd3", "comfyui"),
                                         ("sd3", "bfl"), ("sd35m", "comfyui"), ("sd35l", "comfyui"), ("sd35l", "bfl")])
def test_every_reference_tensor_is_in_its_block(arch, naming):
    ref = named_reference(arch, naming)
    got = {k: block_of(k, FAMILY[arch]) for k in ref}
    want = {k: expected_block(arch, k) or "OTHER" for k in ref}
    assert got == want
    # every input of ComfyUI's node holds tensors, and nothing of the diffusion model falls outside them
    assert set(comfyui_names(arch)) <= set(got.values())
    assert {b for b in got.values() if b not in comfyui_names(arch)} <= {"TE", "VAE", "OTHER"}
    others = sorted(k for k, b in got.items() if b == "OTHER")
    assert others == (["model.model_sampling.sigmas"] if (arch, naming) == ("sd3", "comfyui") else [])


def test_diffusers_tensors_share_the_block_of_their_bfl_tensor():
    for key, e in named_reference("flux", "bfl").items():
        for dkey, _rows, _swap in to_diffusers(key, tuple(e["shape"])):
            assert block_of(dkey, "flux") == block_of(key, "flux") == flux_block(key), dkey


# ---------------------------------------------------------------------------------------------------------------
# merges checked against the formula, with the weight chosen from the tensor name by the test


def merge(tensors_a, tensors_b, alpha, **params):
    m = load_methods()["weighted_sum"]
    full = {"alpha": alpha, **params}
    out = build_merge(m, [from_tensors(tensors_a, label="a"), from_tensors(tensors_b, label="b")], full,
                      OpContext(step="s", input_labels=["a", "b"]))
    return out


SHARED_WEIGHTS = {"VAE": 0.9, "TE": 0.05, "final_layer": 1.0}  # the same in both architectures' test mappings


def flux_weight(block: str | None) -> float:
    if block in SHARED_WEIGHTS:
        return SHARED_WEIGHTS[block]
    if block == "guidance_in":
        return 0.2
    if block and block.startswith("single_blocks."):
        n = int(block.split(".")[1])
        return 0.8 if n == 37 else 0.7 if n >= 30 else 0.45
    if block and block.startswith("double_blocks.") and int(block.split(".")[1]) <= 9:
        return 0.6
    return 0.3


FLUX_ALPHA = {"default": 0.3, "double_blocks.0-9": 0.6, "final_layer": 1, "SINGLE": 0.45, "single_blocks.30-37": 0.7,
              "single_blocks.37": 0.8, "TE": 0.05, "VAE": 0.9, "guidance_in.": 0.2}


def sd3_weight(block: str | None) -> float:
    if block in SHARED_WEIGHTS:
        return SHARED_WEIGHTS[block]
    if block == "pos_embed":
        return 0.1
    if block and block.startswith("joint_blocks."):
        n = int(block.split(".")[1])
        return 0.9 if n == 4 else 0.6 if n <= 9 else 0.5
    return 0.3


SD3_ALPHA = {"default": 0.3, "joint_blocks.0-9": 0.6, "JOINT": 0.5, "joint_blocks.4": 0.9, "final_layer": 1,
             "pos_embed": 0.1, "TE": 0.05, "VAE": 0.9}


def check_formula(out, a, b, weight_of) -> set[float]:
    seen = set()
    for k in out.keys():
        w = weight_of(k)
        seen.add(w)
        want = a[k].double() * (1 - w) + b[k].double() * w
        got = out.get(k).double()
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (k, w)
    return seen


@pytest.mark.parametrize("arch,naming", [("flux", "bfl"), ("flux", "diffusers"), ("flux", "comfyui"), ("sd3", "bfl"),
                                         ("sd35l", "comfyui")])
def test_named_blocks_ranges_and_groups(arch, naming):
    a = synth_tensors(arch, FACTOR, "fp32", seed=1, naming=naming)
    b = synth_tensors(arch, FACTOR, "fp32", seed=2, naming=naming)
    alpha = normalize_weight(FLUX_ALPHA if arch == "flux" else SD3_ALPHA, "alpha")
    out = merge(a, b, alpha)
    weight = flux_weight if arch == "flux" else sd3_weight
    seen = check_formula(out, a, b, lambda k: weight(expected_block(arch, k)))
    want = {0.3, 0.6, 1.0, 0.45, 0.7, 0.8, 0.2} if arch == "flux" else {0.3, 0.6, 0.5, 0.9, 1.0, 0.1}
    if naming == "comfyui":
        want |= {0.05, 0.9}
    assert seen == want  # every selector decided some tensor
    assert out.info.provenance["block_rule"] == "comfyui-2024"


def test_a_list_is_the_node_inputs_in_order_and_keeps_the_rest_from_the_first_model():
    a = synth_tensors("flux", FACTOR, "fp32", seed=1, naming="comfyui")
    b = synth_tensors("flux", FACTOR, "fp32", seed=2, naming="comfyui")
    names = comfyui_names("flux")
    values = [round(0.01 * (i + 1), 2) for i in range(len(names))]  # 63 distinct weights
    table = dict(zip(names, values))
    out = merge(a, b, normalize_weight(values, "alpha"))
    outside = [k for k in a if flux_block(k) in ("TE", "VAE")]
    for k in outside:
        assert torch.equal(out.get(k), a[k])
    for k in out.keys():
        if k not in outside:
            w = table[flux_block(k)]
            assert torch.allclose(out.get(k).double(), a[k].double() * (1 - w) + b[k].double() * w, rtol=0, atol=1e-6), k
    assert out.info.provenance["not_merged"] == len(outside) > 0


def test_sd35_large_list_and_sd3_medium_list():
    for arch in ("sd35l", "sd3"):
        a = synth_tensors(arch, FACTOR, "fp32", seed=1, naming="bfl")
        b = synth_tensors(arch, FACTOR, "fp32", seed=2, naming="bfl")
        names = comfyui_names(arch)
        values = [0.5 + 0.01 * i for i in range(len(names))]
        assert len(values) == {"sd35l": 44, "sd3": 30}[arch]
        table = dict(zip(names, values))
        out = merge(a, b, normalize_weight(values, "alpha"))
        check_formula(out, a, b, lambda k: table[sd3_block(k)])


def test_include_exclude_and_elemental_with_named_blocks():
    a = synth_tensors("flux", FACTOR, "fp32", seed=1, naming="bfl")
    b = synth_tensors("flux", FACTOR, "fp32", seed=2, naming="bfl")
    out = merge(a, b, 0.5, include=normalize_inex(["DOUBLE", "final_layer"], "include"),
                exclude=normalize_inex(["double_blocks.3-5"], "exclude"), elemental=["double_blocks.7:img_mlp:0.25"])
    for k in out.keys():
        blk = flux_block(k)
        merged = blk == "final_layer" or (blk.startswith("double_blocks.") and int(blk.split(".")[1]) not in (3, 4, 5))
        w = 0.25 if blk == "double_blocks.7" and "img_mlp" in k else 0.5
        want = a[k].double() * (1 - w) + b[k].double() * w if merged else a[k].double()
        assert torch.allclose(out.get(k).double(), want, rtol=0, atol=1e-6), k


# ---------------------------------------------------------------------------------------------------------------
# default and re: on any model; named blocks need a block map


def test_default_and_regex_work_on_an_unknown_architecture():
    torch.manual_seed(0)
    a = {"layer.weight": torch.randn(4, 4), "layer.bias": torch.randn(4), "head.weight": torch.randn(2, 4)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    assert not detect({k: from_tensors(a).spec(k) for k in a}).known
    out = merge(a, b, normalize_weight({"default": 0.3, "re:^layer\\.": 0.9}, "alpha"))
    check_formula(out, a, b, lambda k: 0.9 if k.startswith("layer.") else 0.3)
    f = compile_weight({"re:bias$": 0.1}, arch=None)
    assert f("x.bias") == 0.1
    with pytest.raises(UserError, match="do not cover tensor 'x.weight'; add `default:`"):
        f("x.weight")
    with pytest.raises(UserError, match=r"named blocks \(DOUBLE\) need a known architecture.*but a is unknown.*re:<regex>"):
        merge(a, b, normalize_weight({"default": 0.3, "DOUBLE": 0.5}, "alpha"))
    with pytest.raises(UserError, match="lists need a known architecture.*re:<regex>"):
        merge(a, b, normalize_weight([0.5] * 63, "alpha"))


@pytest.mark.parametrize("arch,value,message", [
    ("flux", {"default": 0, "IN05": 1}, "Flux.1 has no block IN05 \\(its blocks: img_in, .*double_blocks.0-18, single_blocks.0-37, final_layer; groups DOUBLE, SINGLE, TE, VAE\\)"),
    ("flux", {"default": 0, "double_blocks.25": 1}, "Flux.1 has no block double_blocks.25"),
    ("flux", {"default": 0, "single_blocks.30-40": 1}, "Flux.1 has no block single_blocks.40"),
    ("flux", {"default": 0, "JOINT": 1}, "Flux.1 has no group JOINT"),
    ("flux", {"default": 0, "OUT": 1}, "Flux.1 has no group OUT"),
    ("sd3", {"default": 0, "joint_blocks.30": 1}, "SD3 medium / SD3.5 medium has no block joint_blocks.30 \\(its blocks: pos_embed, .*joint_blocks.0-23"),
    ("sd35l", {"default": 0, "double_blocks.0": 1}, "SD3.5 large has no block double_blocks.0"),
    ("sd1", {"default": 0, "TE": 1}, "SD1/SD2 has no group TE"),
    ("sd1", {"default": 0, "double_blocks.1": 1}, "SD1/SD2 has no block double_blocks.1"),
    ("flux", [0.5] * 30, "30 values \\(SD3 medium / SD3.5 medium blocks\\) but this is a Flux.1 model, which takes 63"),
    ("flux", "GRAD_V", "26 values \\(SD1/SD2 blocks\\) but this is a Flux.1 model, which takes 63"),
    ("sdxl", [0.5] * 63, "63 values \\(Flux.1 blocks\\) but this is a SDXL model, which takes 20"),
])
def test_wrong_blocks_for_the_architecture(arch, value, message):
    with pytest.raises(UserError, match=message) as e:
        compile_weight(normalize_weight(value, "alpha"), arch=arch, where="steps.m.alpha")
    assert "\n" not in str(e.value)


def test_rules_per_family():
    with pytest.raises(UserError, match="block rule 'supermerger-2025' has no Flux.1 block map; Flux.1 blocks follow comfyui-2024"):
        compile_weight({"default": 0, "double_blocks.1": 1}, arch="flux", rule="supermerger-2025")
    with pytest.raises(UserError, match="block rule 'comfyui-2024' has no SD1/SD2 block map"):
        compile_weight({"default": 0, "IN01": 1}, arch="sd1", rule="comfyui-2024")
    assert compile_weight({"default": 0, "double_blocks.1": 1}, arch="flux-1-schnell")("double_blocks.1.img_mod.lin.weight") == 1


def test_canonical_spellings():
    one = normalize_weight({"default": 0, "double_blocks.0-9": 0.6}, "a")
    assert one == normalize_weight({"default": 0, "double_blocks.9-0": 0.6}, "a")
    assert one == normalize_weight({"default": 0, "double_blocks.0-double_blocks.09": 0.6}, "a")
    assert normalize_weight({"double_blocks.03.": 1, "img_in.": 2, "guidance_in": 3}, "a") == {
        "double_blocks.3": 1.0, "guidance_in": 3.0, "img_in": 2.0}
    assert parse_selector("JOINT").kind == "group" and parse_selector("TE").kind == "group"
    with pytest.raises(UserError, match="must stay within one kind of numbered block"):
        parse_selector("double_blocks.15-single_blocks.3")
    with pytest.raises(UserError, match="did you mean 'double_blocks.3'"):
        normalize_weight({"double_block.3": 1}, "a")
    with pytest.raises(UserError, match="transformer_blocks.3 is Flux.1's double_blocks.3 in ComfyUI's block names"):
        normalize_weight({"transformer_blocks.3": 1}, "a")
    with pytest.raises(UserError, match="63 \\(ModelMergeFlux1 inputs\\).*30 \\(ModelMergeSD3_2B inputs\\).*44 \\(ModelMergeSD35_Large inputs\\)"):
        normalize_weight([0.1] * 62, "a")


# ---------------------------------------------------------------------------------------------------------------
# through the command line: checked before building, recorded in provenance, reproducible


def _synth(sdbuild, folder, arch="flux", naming="bfl", seeds=(1, 2)):
    for s in seeds:
        assert sdbuild("synth", folder / f"{arch}{s}.safetensors", "--arch", arch, "--factor", str(FACTOR), "--dtype", "fp32",
                       "--seed", str(s), "--naming", naming, "-q").code == 0


def _objects(cache):
    return sorted(p.name for p in (cache / "objects").rglob("*.safetensors")) if (cache / "objects").exists() else []


@pytest.mark.parametrize("bad", ["double_blocks.25", "IN05", "joint_blocks.0"])
def test_a_bad_block_name_in_step_two_fails_before_step_one_is_built(tmp_path, sdbuild, bad):
    _synth(sdbuild, tmp_path)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{a: flux1.safetensors, b: flux2.safetensors}}
        steps:
          first: {{op: weighted_sum, models: [a, b], alpha: 0.5}}
          second: {{op: weighted_sum, models: [first, b], alpha: {{default: 0.3, {bad}: 0.6}}}}
        outputs: {{first: first.safetensors, second: second.safetensors}}
        """)
    cache = tmp_path / "cache"
    r = sdbuild("build", rp, "-q", "--cache-dir", cache)
    assert r.code == 2
    assert "recipe.yaml:" in r.err and "'second'" in r.err and f"Flux.1 has no {'group' if bad == 'JOINT' else 'block'} {bad}" in r.err
    assert "Traceback" not in r.err
    assert _objects(cache) == [] and not (tmp_path / "first.safetensors").exists()


def test_flux_times_sdxl_fails_before_anything_is_built(tmp_path, sdbuild):
    from mergekit_sd.synth.models import write_synth

    _synth(sdbuild, tmp_path)
    write_synth(tmp_path / "x.safetensors", "sdxl", 64, "fp16", 1)
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {a: flux1.safetensors, b: flux2.safetensors, x: x.safetensors}
        steps:
          first: {op: weighted_sum, models: [a, b], alpha: {default: 0.3, DOUBLE: 0.6}}
          second: {op: weighted_sum, models: [first, x], alpha: {default: 0.3, "re:attn": 0.6}}
        outputs: {first: first.safetensors, second: second.safetensors}
        """)
    cache = tmp_path / "cache"
    r = sdbuild("build", rp, "-q", "--cache-dir", cache)
    assert r.code == 2 and "different model architectures" in r.err and "'second'" in r.err
    assert _objects(cache) == [] and not (tmp_path / "first.safetensors").exists()


def test_provenance_records_the_rule_and_rebuilds_are_identical(tmp_path, sdbuild):
    from safetensors import safe_open

    _synth(sdbuild, tmp_path, naming="diffusers")
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {a: flux1.safetensors, b: flux2.safetensors}
        steps:
          m: {op: weighted_sum, models: [a, b], alpha: {default: 0.3, double_blocks.0-9: 0.6, final_layer: 1}}
        outputs: {m: m.safetensors}
        """)
    assert sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "c1").code == 0
    first = (tmp_path / "m.safetensors").read_bytes()
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
        a = synth_tensors("flux", FACTOR, "fp32", seed=1, naming="diffusers")
        b = synth_tensors("flux", FACTOR, "fp32", seed=2, naming="diffusers")
        for k in f.keys():
            blk = flux_block(k)
            w = 1.0 if blk == "final_layer" else 0.6 if blk.startswith("double_blocks.") and int(blk.split(".")[1]) <= 9 else 0.3
            assert torch.allclose(f.get_tensor(k).double(), a[k].double() * (1 - w) + b[k].double() * w, rtol=0, atol=1e-6), k
    prov = json.loads(meta["sdbuild.provenance"])
    assert prov["nodes"]["m"]["block_rule"] == "comfyui-2024"
    assert prov["recipe"]["steps"]["m"]["alpha"] == {"default": 0.3, "double_blocks.0-9": 0.6, "final_layer": 1.0}
    assert json.loads(meta["sd_merge_recipe"])["type"] == "sdbuild"
    (tmp_path / "m.safetensors").unlink()
    assert sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "c2").code == 0
    assert (tmp_path / "m.safetensors").read_bytes() == first


def test_fit_recovers_a_flux_block_merge_as_a_runnable_recipe(tmp_path, sdbuild):
    """`sdbuild fit --blocks` on a Flux merge: per-block weights come back as a mapping (a Flux list has no slot for
    the text encoders and VAE) that rebuilds the same tensors."""
    from safetensors import safe_open

    _synth(sdbuild, tmp_path, naming="comfyui")
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {a: flux1.safetensors, b: flux2.safetensors}
        steps:
          m: {op: weighted_sum, models: [a, b], alpha: {default: 0.25, DOUBLE: 0.5, final_layer: 1, TE: 0, VAE: 0.75}}
        outputs: {m: m.safetensors}
        """)
    assert sdbuild("build", rp, "-q").code == 0
    r = sdbuild("fit", tmp_path / "m.safetensors", "--candidates", tmp_path / "flux1.safetensors",
                tmp_path / "flux2.safetensors", "--blocks", "-o", tmp_path / "refit.yaml", "-q")
    assert r.code == 0
    text = (tmp_path / "refit.yaml").read_text()
    assert "double_blocks.18: 0.5" in text and "VAE: 0.75" in text and "[" not in text.split("alpha:")[1].split("\n")[0]
    assert sdbuild("build", tmp_path / "refit.yaml", "-q").code == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f, safe_open(str(tmp_path / "m-fit.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k


def test_an_op_without_a_reported_rule_is_recorded_with_its_architectures_default():
    from mergekit_sd.provenance.record import NodeFacts, _node_entry

    step = NodeFacts("bake", "step", "d", op="lora", version=1, params={"strength": {"default": 1.0, "DOUBLE": 0.5}})
    assert _node_entry(step, "out", "comfyui-2024")["block_rule"] == "comfyui-2024"
    assert _node_entry(step, "out")["block_rule"] == "supermerger-2025"
    scalar = NodeFacts("bake", "step", "d", op="lora", version=1, params={"strength": 1.0})
    assert "block_rule" not in _node_entry(scalar, "out", "comfyui-2024")
