"""`op: lora` against an independent reference: every format, both architectures, worked examples, errors.

The reference below maps module names by repairing dotted paths (the way diffusers converts kohya names) and
converting diffusers paths to LDM paths by the formulas of docs/formats.md §5.2 — a different route from the lookup
tables the op uses — and computes ΔW with its own einsum/kron expressions.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from mergekit_sd.lazy import from_tensors
from mergekit_sd.synth.loras import write_synth_lora
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.lora import build_lora

COMPOUNDS = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
             "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
             "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
             "final_layer_norm", "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers",
             "emb_layers", "skip_connection", "time_embed", "label_emb", "time_embedding", "linear_1", "linear_2",
             "add_embedding"]
RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
       "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def dotted(rest: str) -> str:
    s = rest.replace("_", ".")
    for c in sorted(COMPOUNDS, key=len, reverse=True):
        s = s.replace(c.replace("_", "."), c)
    return s


def diffusers_to_ldm(p: str, xl: bool) -> str:
    stem = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if p in stem:
        return stem[p]
    m = re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)$", p)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}.{RES[rest] if kind == 'resnets' else rest}"
    m = re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv$", p)
    if m:
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)$", p)
    if m:
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{RES[m[3]] if m[1] == 'resnets' else m[3]}"
    m = re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)$", p)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}.{RES[rest] if kind == 'resnets' else rest}"
    m = re.match(r"up_blocks\.(\d)\.upsamplers\.0\.conv$", p)
    if m:
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{2 if (xl or i > 0) else 1}.conv"
    raise AssertionError(p)


def ref_target(name: str, xl: bool) -> tuple[str, int | None]:
    """Module name -> (checkpoint weight key, q/k/v part or None)."""
    if name.startswith("lora_unet_"):
        p = dotted(name[len("lora_unet_"):])
        if not p.startswith(("input_blocks", "middle_block", "output_blocks")):
            p = diffusers_to_ldm(p, xl)
        return f"model.diffusion_model.{p}.weight", None
    if name.startswith("lora_te2_"):
        p = dotted(name[len("lora_te2_"):])
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", p)
        n, inner = m[1], m[2]
        pre = f"conditioner.embedders.1.model.transformer.resblocks.{n}."
        if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return pre + "attn.in_proj_weight", "qkv".index(inner[10])
        return pre + {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                      "layer_norm1": "ln_1", "layer_norm2": "ln_2"}[inner] + ".weight", None
    prefix, te = ("lora_te1_", "conditioner.embedders.0.transformer.") if xl else ("lora_te_", "cond_stage_model.transformer.")
    return te + dotted(name[len(prefix):]) + ".weight", None


def ref_delta(t: dict[str, torch.Tensor], mod: str, W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(ΔW laid out as W, scale) for one module, written independently of the op's code."""
    g = {k[len(mod) + 1:]: v.double() for k, v in t.items() if k.startswith(mod + ".")}
    alpha = g.get("alpha")
    if "lora_up.weight" in g:
        up, down = g["lora_up.weight"], g["lora_down.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in g:
            d = torch.einsum("ap,pqyx,qb->abyx", up[:, :, 0, 0], g["lora_mid.weight"], down[:, :, 0, 0])
        else:
            d = (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
    elif "hada_w1_a" in g:
        r = g["hada_w1_b"].shape[0]
        if "hada_t1" in g:
            w1 = torch.einsum("pqyx,po,qi->oiyx", g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"])
            w2 = torch.einsum("pqyx,po,qi->oiyx", g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"])
            d = w1 * w2
        else:
            d = ((g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])).reshape(W.shape)
    elif any(k.startswith("lokr") for k in g):
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
        if "lokr_t2" in g:
            w2 = torch.einsum("pqyx,pc,qd->cdyx", g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
        elif "lokr_w2" in g:
            w2 = g["lokr_w2"]
        else:
            w2 = (g["lokr_w2_a"] @ g["lokr_w2_b"])
        full = "lokr_w1" in g and "lokr_w2" in g
        r = None if full else (g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else g["lokr_w1_b"].shape[0])
        a, b = w1.shape
        c = w2.shape[0]
        w2 = w2.reshape(c, -1, *W.shape[2:]) if W.dim() == 4 else w2
        dd = w2.shape[1]
        # kron by index arithmetic: ΔW[i*c + k, j*dd + l, ...] = w1[i, j] * w2[k, l, ...]
        d = torch.einsum("ij,kl...->ikjl...", w1, w2).reshape(a * c, b * dd, *w2.shape[2:])
        scale = 1.0 if full else float(alpha) / r
        return d.reshape(W.shape), scale
    elif "diff" in g:
        return g["diff"].reshape(W.shape), 1.0
    elif "w_norm" in g:
        return g["w_norm"], 1.0
    elif "weight" in g:
        vec = g["weight"]
        return (W * vec.reshape(1, -1, *[1] * (W.dim() - 2)) if int(g["on_input"]) else W * vec.reshape(-1, *[1] * (W.dim() - 1))), 1.0
    else:
        raise AssertionError(mod)
    return d.reshape(W.shape), (float(alpha) / r if alpha is not None else 1.0)


def ref_bake(W: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], mu: float, xl: bool) -> dict[str, torch.Tensor]:
    out = {k: v.double() if v.dtype.is_floating_point else v for k, v in W.items()}
    orig = dict(out)
    for mod in sorted({k.split(".")[0] for k in lora}):
        key, part = ref_target(mod, xl)
        Wfull = orig[key]
        rows = slice(None) if part is None else slice(part * Wfull.shape[0] // 3, (part + 1) * Wfull.shape[0] // 3)
        W0 = Wfull[rows]
        d, s = ref_delta(lora, mod, W0)
        ds = lora.get(mod + ".dora_scale")
        if ds is not None:
            wp = W0 + s * d
            if ds.shape[0] == 1:  # per input column
                n = wp.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (W0.dim() - 2))
            else:
                n = wp.flatten(1).norm(dim=1).reshape(-1, *[1] * (W0.dim() - 1))
            new = W0 + mu * (ds.double().reshape(n.shape) * wp / n - W0)
        else:
            new = W0 + mu * s * d
        out[key] = out[key].clone()
        out[key][rows] = out[key][rows] + (new - W0)
        for bname in ("diff_b", "b_norm"):
            if f"{mod}.{bname}" in lora:
                bkey = key[: -len("weight")] + "bias" if part is None else key.replace("in_proj_weight", "in_proj_bias")
                out[bkey] = out[bkey].clone()
                out[bkey][rows] += mu * lora[f"{mod}.{bname}"].double()
    return out


def bake_recipe(tmp_path: Path, model: Path, loras: list[tuple[Path, str]], extra: str = "") -> Path:
    ins = "\n".join(f"          L{i}: {p}" for i, (p, _) in enumerate(loras))
    entries = ", ".join(f"{{lora: L{i}, strength: {s}}}" for i, (_, s) in enumerate(loras))
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          base: {model}
{ins}
        steps:
          baked: {{op: lora, model: base, loras: [{entries}], dtype: fp32{extra}}}
        outputs:
          baked: out/baked.safetensors
        """)


def assert_matches(out_path: Path, expect: dict[str, torch.Tensor]) -> None:
    out = load_file(str(out_path))
    assert set(out) == set(expect)
    changed = 0
    for k, v in out.items():
        e = expect[k]
        if not v.dtype.is_floating_point:
            assert torch.equal(v, e), k
            continue
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), e, rtol=1e-5, atol=2e-6, msg=k)
    return changed


FORMATS = ["lora", "locon", "tucker", "loha", "lokr", "full", "norm", "ia3", "dora_in", "dora_out",
           "peft", "peft_dora", "peft_raw", "diffusers_old"]


def _kohya_names(lora: dict[str, torch.Tensor], xl: bool) -> dict[str, torch.Tensor]:
    """PEFT / older diffusers keys -> kohya keys, by plain string rules (for the reference only)."""
    out = {}
    te1 = "lora_te1_" if xl else "lora_te_"
    for k, v in lora.items():
        if k.startswith("lora_"):
            out[k] = v
            continue
        m = re.match(r"(.+?)\.(lora_A\.weight|lora_B\.weight|alpha|lora_magnitude_vector|"
                     r"(?:processor\.)?(to_[qkvo][a-z]*)_lora\.(down|up)\.weight|lora_linear_layer\.(down|up)\.weight)$", k)
        path, role = m[1], m[2]
        if m[3]:
            proj = m[3]
            if ".self_attn" in path:
                proj = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}[proj]
            elif proj == "to_out":
                proj = "to_out.0"
            path = f"{path}.{proj}"
            role = f"lora_{m[4]}.weight"
        elif m[5]:
            role = f"lora_{m[5]}.weight"
        role = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}.get(role, role)
        for pre, new in (("unet.", "lora_unet_"), ("base_model.model.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"),
                         ("text_encoder.", te1)):
            if path.startswith(pre):
                path = new + path[len(pre):].replace(".", "_")
                break
        if role == "dora_scale":
            v = v.reshape(-1, 1)
        out[f"{path}.{role}"] = v
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_sd1_every_format_matches_reference(fmt, tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / f"{fmt}.safetensors", "sd1", fmt, 32, rank=4, seed=5)
    r = sdbuild("build", bake_recipe(tmp_path, model_dir / "a.safetensors", [(lp, 0.7)]), "-q")
    assert r.code == 0, r
    W = load_file(str(model_dir / "a.safetensors"))
    lora = _kohya_names(load_file(str(lp)), xl=False)
    assert_matches(tmp_path / "out" / "baked.safetensors", ref_bake(W, lora, 0.7, xl=False))


# a slice of SDXL's modules: both text encoders (TE2 q/k/v rows), attention levels 1 and 2, the middle block,
# ResBlocks and the up/down samplers
XL_ONLY = ["te1_text_model_encoder_layers_1_", "te2_text_model_encoder_layers_2_", "input_blocks_4_", "input_blocks_3_0_op",
           "middle_block_1_transformer_blocks_9", "middle_block_2_", "output_blocks_2_", "output_blocks_5_1_transformer_blocks_1"]


@pytest.mark.parametrize("fmt,naming", [("lora", None), ("lora", "diffusers"), ("locon", "diffusers"), ("loha", None),
                                        ("lokr", None), ("full", None), ("ia3", None), ("dora_out", None),
                                        ("peft_dora", None), ("diffusers_old", None)])
def test_sdxl_formats_match_reference(fmt, naming, tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / f"{fmt}.safetensors", "sdxl", fmt, 32, rank=3, seed=6, naming=naming, only=XL_ONLY)
    r = sdbuild("build", bake_recipe(tmp_path, model_dir / "xl.safetensors", [(lp, -0.4)]), "-q")
    assert r.code == 0, r
    W = load_file(str(model_dir / "xl.safetensors"))
    lora = _kohya_names(load_file(str(lp)), xl=True)
    assert_matches(tmp_path / "out" / "baked.safetensors", ref_bake(W, lora, -0.4, xl=True))


def test_sd1_sgm_names_and_two_loras_from_the_same_weights(tmp_path, model_dir, sdbuild):
    """Two LoRAs in one step: both computed from the original W (DoRA included), order does not matter."""
    l1 = write_synth_lora(tmp_path / "l1.safetensors", "sd1", "lora", 32, rank=2, seed=1, naming="sgm")
    l2 = write_synth_lora(tmp_path / "l2.safetensors", "sd1", "dora_in", 32, rank=2, seed=2)
    W = load_file(str(model_dir / "a.safetensors"))
    e1 = ref_bake(W, load_file(str(l1)), 0.5, False)
    e2 = ref_bake(W, load_file(str(l2)), 1.5, False)
    base = {k: v.double() if v.dtype.is_floating_point else v for k, v in W.items()}
    expect = {k: (e1[k] + e2[k] - base[k]) if base[k].dtype.is_floating_point else base[k] for k in base}
    for order in ([(l1, 0.5), (l2, 1.5)], [(l2, 1.5), (l1, 0.5)]):
        d = tmp_path / f"o{order[0][1]}"
        d.mkdir()
        assert sdbuild("build", bake_recipe(d, model_dir / "a.safetensors", order), "-q").code == 0
        assert_matches(d / "out" / "baked.safetensors", expect)


def test_te_strength_and_lbw_list(tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", 32, rank=2, seed=3)
    # LBW 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11
    lbw = [0.0, 1, 1, 0.5, 0.5, 0.25, 0.25, 2.0, 0, 0, 0, 1, 1, 1, 0.75, 0.75, 0.75]
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{base: {model_dir}/a.safetensors, L: {lp}}}
        steps:
          baked: {{op: lora, model: base, loras: [{{lora: L, strength: {lbw}, te_strength: 0.3}}], dtype: fp32}}
        outputs: {{baked: out/b.safetensors}}
        """)
    assert sdbuild("build", rp, "-q").code == 0
    W = load_file(str(model_dir / "a.safetensors"))
    lora = load_file(str(lp))
    names = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
    weights = dict(zip(names, lbw))
    out = load_file(str(tmp_path / "out" / "b.safetensors"))
    seen = set()
    for mod in sorted({k.split(".")[0] for k in lora}):
        key, _ = ref_target(mod, False)
        m = re.search(r"\.(input_blocks|middle_block|output_blocks)\.(\d+)", key)
        if key.startswith("cond_stage_model."):
            mu = 0.3
        elif m[1] == "middle_block":
            mu = weights["M00"]
        else:
            mu = weights[("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}"]
        seen.add(mu)
        sub = {k: v for k, v in lora.items() if k.startswith(mod + ".")}
        expect = ref_bake({key: W[key]}, sub, mu, False)[key]
        torch.testing.assert_close(out[key].double(), expect, rtol=1e-5, atol=2e-6, msg=key)
    assert {0.3, 0.5, 0.25, 2.0, 0.0, 1.0, 0.75} <= seen


# --- docs/formats.md §5.4 worked examples on one tensor --------------------------------------------------------------

Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
Q_MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
CONV_MOD = "lora_unet_down_blocks_0_resnets_0_conv1"


def bake_one(W: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], mu: float) -> dict[str, torch.Tensor]:
    model = from_tensors(W, label="model")
    lm = from_tensors(lora, label="lora")
    ctx = OpContext(step="t", input_labels=["model", "lora"])
    out = build_lora([model, lm], {"model": "m", "loras": [{"lora": "l", "strength": mu}], "dtype": "fp32"}, ctx)
    return {k: out.get(k) for k in out.keys()}


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_worked_example_lora():
    got = bake_one({Q: torch.zeros(2, 2)}, {f"{Q_MOD}.lora_up.weight": t([[1], [2]]), f"{Q_MOD}.lora_down.weight": t([[3, 4]]),
                                            f"{Q_MOD}.alpha": t(0.5)}, 0.8)
    torch.testing.assert_close(got[Q], t([[1.2, 1.6], [2.4, 3.2]]))


def test_worked_example_locon():
    down = t([[[[1, 2], [3, 4]]]])  # [r=1, in=1, 2, 2]
    got = bake_one({CONV: torch.zeros(2, 1, 2, 2)}, {f"{CONV_MOD}.lora_down.weight": down,
                                                     f"{CONV_MOD}.lora_up.weight": t([1, -1]).reshape(2, 1, 1, 1)}, 1.0)
    torch.testing.assert_close(got[CONV], t([[[[1, 2], [3, 4]]], [[[-1, -2], [-3, -4]]]]))


def test_worked_example_loha():
    lora = {f"{Q_MOD}.hada_w1_a": t([[1], [1]]), f"{Q_MOD}.hada_w1_b": t([[1, 2]]), f"{Q_MOD}.hada_w2_a": t([[2], [0]]),
            f"{Q_MOD}.hada_w2_b": t([[1, 1]]), f"{Q_MOD}.alpha": t(1)}
    torch.testing.assert_close(bake_one({Q: torch.zeros(2, 2)}, lora, 1.0)[Q], t([[2, 4], [0, 0]]))


def test_worked_example_lokr_full_factors_ignore_alpha():
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = {f"{mod}.lokr_w1": t([[1, 0], [0, 2]]), f"{mod}.lokr_w2": t([[1, 1]]), f"{mod}.alpha": t(7)}
    torch.testing.assert_close(bake_one({key: torch.zeros(2, 4)}, lora, 1.0)[key], t([[1, 1, 0, 0], [0, 0, 2, 2]]))


def test_worked_example_ia3():
    lora = {f"{Q_MOD}.weight": t([0.5, -1]), f"{Q_MOD}.on_input": torch.tensor(0)}
    torch.testing.assert_close(bake_one({Q: t([[1, 2], [3, 4]])}, lora, 1.0)[Q], t([[1.5, 3], [0, 0]]))


def test_worked_example_dora_both_conventions():
    base = {f"{Q_MOD}.lora_up.weight": t([[1], [1]]), f"{Q_MOD}.lora_down.weight": t([[1, 0]]), f"{Q_MOD}.alpha": t(1)}
    per_in = bake_one({Q: torch.eye(2)}, {**base, f"{Q_MOD}.dora_scale": t([[1, 1]])}, 1.0)[Q]
    torch.testing.assert_close(per_in, t([[2 / 5 ** 0.5, 0], [1 / 5 ** 0.5, 1]]))
    per_out = bake_one({Q: torch.eye(2)}, {**base, f"{Q_MOD}.dora_scale": t([[1], [1]])}, 1.0)[Q]
    torch.testing.assert_close(per_out, t([[1, 0], [0.5 ** 0.5, 0.5 ** 0.5]]))
    # A1111 semantics at μ = 0.5: W + μ·(W_d − W)
    half = bake_one({Q: torch.eye(2)}, {**base, f"{Q_MOD}.dora_scale": t([[1], [1]])}, 0.5)[Q]
    torch.testing.assert_close(half, torch.eye(2) + 0.5 * (t([[1, 0], [0.5 ** 0.5, 0.5 ** 0.5]]) - torch.eye(2)))


def test_ambiguous_dora_is_refused():
    from mergekit_sd.errors import UserError

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    lora = {f"{Q_MOD}.lora_up.weight": t([[1]]), f"{Q_MOD}.lora_down.weight": t([[1]]), f"{Q_MOD}.dora_scale": t([[1]])}
    with pytest.raises(UserError, match="cannot tell per-input from per-output"):
        bake_one({key: torch.eye(1)}, lora, 1.0)


def _check_per_module(out_path: Path, W, lora, mu_of, xl: bool) -> set[float]:
    out = load_file(str(out_path))
    seen = set()
    for mod in sorted({k.split(".")[0] for k in lora}):
        key, part = ref_target(mod, xl)
        mu = mu_of(key)
        seen.add(mu)
        sub = {k: v for k, v in lora.items() if k.startswith(mod + ".")}
        expect = ref_bake({key: W[key]}, sub, mu, xl)[key]
        if part is None:
            torch.testing.assert_close(out[key].double(), expect, rtol=1e-5, atol=2e-6, msg=key)
    return seen


def test_block_weight_mapping_strength(tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", 32, rank=2, seed=4, te=False)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{base: {model_dir}/a.safetensors, L: {lp}}}
        steps:
          baked:
            op: lora
            model: base
            loras: [{{lora: L, strength: {{default: 0.5, OUT: 2, IN04-IN05: -1, "re:attn2\\\\.to_k": 0}}}}]
            dtype: fp32
        outputs: {{baked: out/b.safetensors}}
        """)
    assert sdbuild("build", rp, "-q").code == 0

    def mu(key: str) -> float:
        if "attn2.to_k" in key:
            return 0.0
        if ".output_blocks." in key:
            return 2.0
        if ".input_blocks.4." in key or ".input_blocks.5." in key:
            return -1.0
        return 0.5

    seen = _check_per_module(tmp_path / "out" / "b.safetensors", load_file(str(model_dir / "a.safetensors")),
                             load_file(str(lp)), mu, False)
    assert seen == {0.0, 2.0, -1.0, 0.5}


def test_sdxl_lbw_12_list(tmp_path, model_dir, sdbuild):
    lp = write_synth_lora(tmp_path / "l.safetensors", "sdxl", "lora", 32, rank=2, seed=4, only=XL_ONLY + ["input_blocks_7_1_transformer_blocks_0_attn1",
                                                                                          "input_blocks_8_1_transformer_blocks_3_ff", "output_blocks_0_1_transformer_blocks_0_attn2",
                                                                                          "output_blocks_4_1_transformer_blocks_0_attn2", "output_blocks_3_1_proj_in"])
    # LBW 12: BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05
    lbw = "0.5,1,0,1,0,1.5,0.25,0.25,0.25,0.75,0.75,0.75"
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{base: {model_dir}/xl.safetensors, L: {lp}}}
        steps:
          baked: {{op: lora, model: base, loras: [{{lora: L, strength: "{lbw}"}}], dtype: fp32}}
        outputs: {{baked: out/b.safetensors}}
        """)
    assert sdbuild("build", rp, "-q").code == 0, "build"
    names = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]
    w = dict(zip(names, [float(x) for x in lbw.split(",")]))

    def mu(key: str) -> float:
        m = re.search(r"\.(input_blocks|middle_block|output_blocks)\.(\d+)", key)
        if not key.startswith("model."):
            return w["BASE"]
        if m[1] == "middle_block":
            return w["M00"]
        return w.get(("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}", 1.0)

    seen = _check_per_module(tmp_path / "out" / "b.safetensors", load_file(str(model_dir / "xl.safetensors")),
                             load_file(str(lp)), mu, True)
    assert {0.5, 0.0, 1.5, 0.25, 0.75, 1.0} <= seen


def test_reads_each_weight_and_lora_tensor_once_and_records_provenance(tmp_path, model_dir, sdbuild):
    from collections import Counter

    from mergekit_sd.lazy import LazyModel
    from mergekit_sd.formats.safetensors import SafetensorsFile

    lp = write_synth_lora(tmp_path / "l.safetensors", "sd1", "locon", 32, rank=2, seed=8)
    reads: Counter = Counter()

    def counted(path, tag):
        m = SafetensorsFile(path).lazy()

        def get(name):
            reads[(tag, name)] += 1
            return m.get(name)

        return LazyModel(m.specs, get, m.metadata, label=path.name)

    model, lora = counted(model_dir / "a.safetensors", "m"), counted(lp, "l")
    ctx = OpContext(step="s", input_labels=["a.safetensors", "l.safetensors"])
    out = build_lora([model, lora], {"model": "a", "loras": [{"lora": "L", "strength": 0.5}], "dtype": None}, ctx)
    assert not [k for k in reads if k[0] == "m"] and all(k[1].endswith(".alpha") for k in reads)  # build reads only alphas
    for k in out.keys():
        out.get(k)
    assert all(n == 1 for (tag, _), n in reads.items()), [k for k, n in reads.items() if n > 1][:3]
    assert {k for t, k in reads if t == "m"} == set(model.keys()) and {k for t, k in reads if t == "l"} == set(lora.keys())
    prov = out.info.provenance
    assert prov["loras"][0]["modules"] == 350 and prov["loras"][0]["algorithms"] == {"LoCon": 96, "LoRA": 254}
    assert prov["loras"][0]["title"] == "synth-locon" and prov["loras"][0]["declared_architecture"] == "sd1"
    # through the CLI the same facts land in the output's metadata
    assert sdbuild("build", bake_recipe(tmp_path, model_dir / "a.safetensors", [(lp, 0.5)]), "-q").code == 0
    from safetensors import safe_open
    import json

    with safe_open(str(tmp_path / "out" / "baked.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["sdbuild.provenance"])
    assert meta["facts"]["baked"]["loras"][0]["algorithms"] == {"LoCon": 96, "LoRA": 254}


@pytest.mark.parametrize("arch,naming", [("sd1", "sgm"), ("sdxl", "diffusers")])  # each unlike kohya's default
def test_synth_cli_writes_the_chosen_lora_naming(arch, naming, tmp_path, sdbuild):
    out = tmp_path / f"cli-{naming}.safetensors"
    r = sdbuild("synth", out, "--arch", arch, "--lora", "lora", "--naming", naming, "--factor", "64", "--rank", "2", "--seed", "3", "-q")
    assert r.code == 0, r
    same = write_synth_lora(tmp_path / f"api-{naming}.safetensors", arch, "lora", 64, rank=2, seed=3, naming=naming)
    assert out.read_bytes() == same.read_bytes()
    kohya = write_synth_lora(tmp_path / "kohya.safetensors", arch, "lora", 64, rank=2, seed=3)
    assert set(load_file(str(out))) != set(load_file(str(kohya)))
    assert sdbuild("synth", tmp_path / "x.safetensors", "--lora", "lora", "--naming", "ldm").code == 2
