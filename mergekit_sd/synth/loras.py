"""Synthetic LoRA / LyCORIS files with real module names, sized for the synthetic checkpoints of `synth.py`.

Every format the bake understands can be generated (plus the refused OFT and GLoRA, for error tests). Shapes
come from `synth_specs(arch, factor)`, so a LoRA made with the same `factor` fits the synthetic model of that
factor. Values are seeded per module name: the same arguments always give the same bytes.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import COMFYUI
from mergekit_sd.arch.modelspec import KOHYA_BASE_VERSION, lora_modelspec
from mergekit_sd.arch.lora_keys import (
    TRANSFORMER_ARCHES,
    UNET,
    Target,
    default_modules,
    kohya,
    ldm_to_diffusers,
    row_count,
    table,
)
from mergekit_sd.errors import UserError
from mergekit_sd.synth.models import synth_specs
from mergekit_sd.formats.atomic import atomic_path
from mergekit_sd.formats.safetensors import DTYPE_NAMES, write_model
from mergekit_sd.lazy import from_tensors

FORMATS = ("lora", "locon", "tucker", "loha", "lokr", "full", "norm", "ia3", "dora_in", "dora_out",
           "peft", "peft_dora", "peft_raw", "diffusers_old", "oft", "glora")
NETWORK_MODULE = {"lora": "networks.lora", "peft": "networks.lora", "peft_dora": "networks.lora",
                  "peft_raw": "networks.lora", "diffusers_old": "networks.lora"}
ARCHES = ("sd1", "sdxl", *TRANSFORMER_ARCHES)
# Flux/SD3 LoRA namings: kohya (BFL/MMDiT paths), diffusers/PEFT (`transformer.` + diffusers path), XLabs (Flux only)
TRANSFORMER_NAMINGS = ("kohya", "diffusers", "xlabs")


def factorization(dim: int) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dim, m as close to √dim as possible (LyCORIS `factorization(dim, -1)`)."""
    m = int(math.isqrt(dim))
    while m > 1 and dim % m:
        m -= 1
    return m, dim // m


def _gen(name: str, seed: int):
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF)


def target_shape(specs, target: Target) -> tuple[int, ...]:
    shape = specs[target.weight].shape
    return shape if target.part is None else (shape[0] // 3,) + tuple(shape[1:])


def _modules(arch: str, fmt: str, specs) -> dict[str, Target]:
    tab = table(arch)
    if fmt == "norm":
        out = {}
        for t, name in tab.preferred.items():
            if t.weight in specs and len(specs[t.weight].shape) == 1 and t.part is None:
                out[name] = t
        return dict(sorted(out.items()))
    conv = fmt in ("locon", "tucker", "loha", "lokr")
    mods = default_modules(arch, conv=conv)
    if fmt in ("oft", "glora"):
        mods = dict(list(mods.items())[:2])
    return {n: t for n, t in mods.items() if t.weight in specs}


def _rename(arch: str, name: str, target: Target, naming: str | None) -> str:
    if naming is None or target.component != "unet":
        return name
    path = target.base[len(UNET):]
    if naming == "sgm":
        return kohya("lora_unet", path)
    diff = ldm_to_diffusers(path)
    return kohya("lora_unet", diff) if diff else name


def synth_lora(arch: str = "sd1", format: str = "lora", factor: int = 32, rank: int = 4, seed: int = 0, *,
               alpha: float | None = None, dtype: str = "fp16", naming: str | None = None, metadata: bool = True,
               te: bool = True, only: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one synthetic LoRA.

    `naming` forces `sgm` or `diffusers` UNet module names (default: kohya's, diffusers for SD1, SGM for SDXL);
    `alpha` defaults to rank/2 (scale 0.5); `only` keeps modules whose name contains one of the substrings.
    """
    if format not in FORMATS:
        raise UserError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    if arch not in ARCHES:
        raise UserError(f"synthetic LoRAs exist for {', '.join(ARCHES)}, not {arch!r}")
    if arch in TRANSFORMER_ARCHES:
        return synth_transformer_lora(arch, format, factor, rank, seed, alpha=alpha, dtype=dtype, naming=naming,
                                      metadata=metadata, te=te, only=only)
    specs = synth_specs(arch, factor, "fp32")
    tab = table(arch)
    mods = _modules(arch, format, specs)
    if not te:
        mods = {n: t for n, t in mods.items() if t.component == "unet"}
    if only:
        mods = {n: t for n, t in mods.items() if any(s in n for s in only)}
    a = float(rank) / 2 if alpha is None else float(alpha)
    fdt = DTYPE_NAMES[dtype]
    out: dict[str, torch.Tensor] = {}
    for idx, (name, target) in enumerate(mods.items()):
        g = _gen(name, seed)
        shape = target_shape(specs, target)
        o, i = shape[0], (shape[1] if len(shape) > 1 else 1)
        k = tuple(shape[2:])
        conv = len(shape) == 4
        big = conv and k != (1, 1)
        r = max(1, min(rank, o, i * (math.prod(k) if k else 1)))

        def rnd(*s, std=0.1):
            return torch.randn(s, generator=g) * std

        mname = _rename(arch, name, target, naming)
        t: dict[str, torch.Tensor] = {}
        if format in ("lora", "locon", "dora_in", "dora_out"):
            t["lora_down.weight"] = rnd(r, i, *k) if conv else rnd(r, i)
            t["lora_up.weight"] = rnd(o, r, 1, 1) if conv else rnd(o, r)
            t["alpha"] = torch.tensor(a)
            if format == "dora_in":
                t["dora_scale"] = (0.2 + 0.1 * torch.rand((1, i) + ((1, 1) if conv else ()), generator=g))
            elif format == "dora_out":
                t["dora_scale"] = (0.2 + 0.1 * torch.rand((o, 1) + ((1, 1) if conv else ()), generator=g))
        elif format == "tucker":
            if big:
                t["lora_down.weight"] = rnd(r, i, 1, 1)
                t["lora_mid.weight"] = rnd(r, r, *k)
                t["lora_up.weight"] = rnd(o, r, 1, 1)
            else:
                t["lora_down.weight"] = rnd(r, i, *k) if conv else rnd(r, i)
                t["lora_up.weight"] = rnd(o, r, 1, 1) if conv else rnd(o, r)
            t["alpha"] = torch.tensor(a)
        elif format == "loha":
            if big:
                for n in ("1", "2"):
                    t[f"hada_t{n}"] = rnd(r, r, *k)
                    t[f"hada_w{n}_a"] = rnd(r, o)
                    t[f"hada_w{n}_b"] = rnd(r, i)
            else:
                flat = i * (math.prod(k) if k else 1)
                for n in ("1", "2"):
                    t[f"hada_w{n}_a"] = rnd(o, r)
                    t[f"hada_w{n}_b"] = rnd(r, flat)
            t["alpha"] = torch.tensor(a)
        elif format == "lokr":
            (a1, c1), (b1, d1) = factorization(o), factorization(i)
            variant = idx % 4  # every factorisation: full/full, full/ab, ab/ab, ab/full; Tucker w2 on k x k convs
            if variant in (0, 1):
                t["lokr_w1"] = rnd(a1, b1)
            else:
                t["lokr_w1_a"], t["lokr_w1_b"] = rnd(a1, r), rnd(r, b1)
            if variant in (0, 3):
                t["lokr_w2"] = rnd(c1, d1, *k) if conv else rnd(c1, d1)
            elif big:
                t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = rnd(r, r, *k), rnd(r, c1), rnd(r, d1)
            else:
                flat = d1 * (math.prod(k) if k else 1)
                t["lokr_w2_a"], t["lokr_w2_b"] = rnd(c1, r), rnd(r, flat)
            t["alpha"] = torch.tensor(a)
        elif format == "full":
            t["diff"] = rnd(*shape, std=0.01)
            if target.bias in specs:
                t["diff_b"] = rnd(o, std=0.01)
        elif format == "norm":
            t["w_norm"] = rnd(*shape, std=0.01)
            if target.bias in specs:
                t["b_norm"] = rnd(*shape, std=0.01)
        elif format == "ia3":
            on_input = idx % 2 == 1
            t["weight"] = rnd(i if on_input else o, std=0.5)
            t["on_input"] = torch.tensor(int(on_input), dtype=torch.int64)
        elif format == "oft":
            t["oft_blocks"] = rnd(4, o // 4 or 1, o // 4 or 1)
            t["alpha"] = torch.tensor(a)
        elif format == "glora":
            for n in ("a1", "a2", "b1", "b2"):
                t[f"{n}.weight"] = rnd(r, r)
        if format in ("peft", "peft_dora", "peft_raw", "diffusers_old"):
            path = tab.paths[target]
            down, up = (rnd(r, i, *k), rnd(o, r, 1, 1)) if conv else (rnd(r, i), rnd(o, r))
            if format == "peft_raw":
                if target.component != "unet":
                    continue
                path = "base_model.model." + path[len("unet."):]
            if format == "diffusers_old":
                old = _old_diffusers(path)
                if old is None:
                    continue
                out[f"{old}.down.weight"], out[f"{old}.up.weight"] = down.to(fdt), up.to(fdt)
                continue
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = down.to(fdt), up.to(fdt)
            out[f"{path}.alpha"] = torch.tensor(a).to(fdt)
            if format == "peft_dora":
                out[f"{path}.lora_magnitude_vector"] = (0.2 + 0.1 * torch.rand(o, generator=g)).to(fdt)
            continue
        for suffix, v in t.items():
            out[f"{mname}.{suffix}"] = v if not v.dtype.is_floating_point else v.to(fdt)
    meta: dict[str, str] = {}
    if metadata:
        meta = {"ss_base_model_version": KOHYA_BASE_VERSION[arch], "ss_network_dim": str(rank), "ss_network_alpha": str(a),
                "ss_network_module": NETWORK_MODULE.get(format, "lycoris.kohya"), "ss_output_name": f"synth-{format}",
                "ss_v2": "False", "modelspec.architecture": lora_modelspec(arch),
                "modelspec.sai_model_spec": "1.0.1", "modelspec.title": f"synthetic {format} LoRA",
                "sdbuild.synthetic": f"{arch} {format} factor={factor} rank={rank} seed={seed}"}
        if format not in NETWORK_MODULE:
            meta["ss_network_args"] = '{"algo": "%s"}' % format
    return dict(sorted(out.items())), meta


def synth_transformer_lora(arch: str, format: str = "lora", factor: int = 32, rank: int = 4, seed: int = 0, *,
                           alpha: float | None = None, dtype: str = "fp16", naming: str | None = None,
                           metadata: bool = True, te: bool = True,
                           only: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A plain LoRA on every linear layer of a Flux/SD3 model's blocks (and CLIP-L, kohya and diffusers namings).

    `naming` kohya (default) writes `lora_unet_…` modules of the fused BFL/MMDiT layers with `alpha` (default
    rank/2); diffusers writes `transformer.….lora_A/lora_B` of the diffusers layers (q, k, v, MLP input apart) with no
    alpha (scale 1); xlabs writes Flux `…processor.qkv_lora1.down/up` with no alpha (scale 1)."""
    from mergekit_sd.synth.transformers import transformer_specs

    naming = "diffusers" if format == "peft" else (naming or "kohya")
    if format not in ("lora", "peft"):
        raise UserError(f"synthetic {arch} LoRAs are plain LoRAs (--lora lora or peft), not {format!r}")
    if naming not in TRANSFORMER_NAMINGS or (naming == "xlabs" and arch != "flux"):
        have = TRANSFORMER_NAMINGS if arch == "flux" else TRANSFORMER_NAMINGS[:2]
        raise UserError(f"{arch} LoRA naming {naming!r} is unknown; choose one of {', '.join(have)}")
    a = registry.get(arch)
    specs = transformer_specs(arch, factor, torch.float32, COMFYUI)
    mods = default_modules(arch, naming=COMFYUI)
    if not te:
        mods = {n: t for n, t in mods.items() if t.component == "unet"}
    fdt = DTYPE_NAMES[dtype]
    scale_alpha = float(rank) / 2 if alpha is None else float(alpha)
    # (module path as written, tensor roles, out rows, in features)
    layers: list[tuple[str, int, int]] = []
    for name, target in mods.items():
        out_rows, in_features = specs[target.weight].shape
        if naming == "kohya":
            layers.append((name, out_rows, in_features))
            continue
        if target.component == "te":
            if naming == "diffusers":
                layers.append(("text_encoder." + target.base.split(".transformer.", 1)[1], out_rows, in_features))
            continue
        path = target.base[len(UNET):]
        for alias, rows, _swap in a.lora_aliases(path):
            if (".processor." in alias) == (naming == "xlabs"):
                layers.append(((alias if naming == "xlabs" else "transformer." + alias), row_count(rows, out_rows),
                               in_features))
    if only:
        layers = [x for x in layers if any(s in x[0] for s in only)]
    out: dict[str, torch.Tensor] = {}
    for path, o, i in sorted(layers):
        g = _gen(path, seed)
        r = max(1, min(rank, o, i))
        down, up = torch.randn((r, i), generator=g) * 0.1, torch.randn((o, r), generator=g) * 0.1
        if naming == "kohya":
            out[f"{path}.lora_down.weight"], out[f"{path}.lora_up.weight"] = down.to(fdt), up.to(fdt)
            out[f"{path}.alpha"] = torch.tensor(scale_alpha).to(fdt)
        elif naming == "diffusers":
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = down.to(fdt), up.to(fdt)
        else:
            out[f"{path}.down.weight"], out[f"{path}.up.weight"] = down.to(fdt), up.to(fdt)
    meta: dict[str, str] = {}
    if metadata:
        meta = {"ss_network_module": "networks.lora_flux" if arch == "flux" else "networks.lora_sd3",
                "ss_network_dim": str(rank), "ss_base_model_version": KOHYA_BASE_VERSION[arch],
                "ss_output_name": f"synth-{arch}-{naming}", "modelspec.architecture": lora_modelspec(arch),
                "modelspec.sai_model_spec": "1.0.1", "modelspec.title": f"synthetic {arch} {naming} LoRA",
                "sdbuild.synthetic": f"{arch} {naming} factor={factor} rank={rank} seed={seed}"}
        if naming == "kohya":
            meta["ss_network_alpha"] = str(scale_alpha)
    return dict(sorted(out.items())), meta


def _old_diffusers(path: str) -> str | None:
    """Attention-processor names of the older diffusers format (attention and CLIP MLP layers only)."""
    for proj, new in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora")):
        if path.startswith("unet.") and path.endswith(f".{proj}"):
            return f"{path[: -len(proj) - 1]}.processor.{new}"
    for proj, new in (("q_proj", "to_q_lora"), ("k_proj", "to_k_lora"), ("v_proj", "to_v_lora"), ("out_proj", "to_out_lora")):
        if path.endswith(f".self_attn.{proj}"):
            return f"{path[: -len(proj) - 1]}.{new}"
    if path.endswith((".mlp.fc1", ".mlp.fc2")):
        return f"{path}.lora_linear_layer"
    return None


def write_synth_lora(path: str | os.PathLike, arch: str = "sd1", format: str = "lora", factor: int = 32, rank: int = 4,
                     seed: int = 0, **options: Any) -> Path:
    """Write a synthetic LoRA file (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trained_on = options.pop("trained_on", None)
    tensors, meta = synth_lora(arch, format, factor, rank, seed, **options)
    if trained_on is not None:
        meta.update(training_base(trained_on))
    with atomic_path(path) as tmp:
        write_model(tmp, from_tensors(tensors), meta)
    return path


def training_base(path: str | os.PathLike) -> dict[str, str]:
    """The metadata kohya's trainer writes about the checkpoint a LoRA was trained on (docs/formats.md §4.6)."""
    from mergekit_sd.formats.digests import legacy_hash, sha256_file

    p = Path(path)
    if not p.is_file():
        raise UserError("training base not found", str(p))
    return {"ss_sd_model_name": p.name, "ss_new_sd_model_hash": sha256_file(p), "ss_sd_model_hash": legacy_hash(p)}


DEMO_LORAS = {"detail-lora": ("lora", 1), "style-locon": ("locon", 2)}


def make_demo_loras(folder: str | os.PathLike, factor: int) -> list[Path]:
    """The LoRA inputs of `recipes/lora-demo.yaml` (skipping files already there), sized for demo models of `factor`."""
    folder = Path(folder)
    out = []
    for name, (fmt, seed) in DEMO_LORAS.items():
        p = folder / f"{name}.safetensors"
        if not p.exists():
            write_synth_lora(p, "sd1", fmt, factor, rank=4, seed=seed)
        out.append(p)
    return out
