"""Synthetic Flux and SD3/3.5 checkpoints in any naming (BFL, ComfyUI, diffusers), alone or all-in-one.

Values are seeded by the ComfyUI-naming tensor name, so one seed gives the same weights in every naming: a diffusers
file's `attn.to_k` is exactly the k rows of the BFL file's fused `qkv` (what LoRA and naming tests rely on).
"""

from __future__ import annotations

import torch

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import BARE, COMFYUI, DIFFUSERS
from mergekit_sd.arch.prefixes import UNET
from mergekit_sd.arch.reference import shrink
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, TensorSpec
from mergekit_sd.synth.values import synth_value

NAMINGS = (COMFYUI, BARE, DIFFUSERS)


def _arch(arch: str) -> registry.Architecture:
    a = registry.get(arch)
    if a is None:
        raise UserError(f"unknown transformer architecture {arch!r}; choose one of {', '.join(registry.by_id())}")
    return a


def transformer_specs(arch: str, factor: int, dtype: torch.dtype, naming: str = COMFYUI, diffusion_only: bool = False,
                      variant: str | None = None) -> dict[str, TensorSpec]:
    """{name: spec} of a synthetic model; `variant` "schnell" drops Flux's guidance embedder."""
    a = _arch(arch)
    if naming not in NAMINGS or (naming == DIFFUSERS and a.to_diffusers is None):
        have = [n for n in NAMINGS if n != DIFFUSERS or a.to_diffusers is not None]
        raise UserError(f"{a.title} has no {naming!r} naming; choose one of {', '.join(have)}")
    ref = registry.named_reference(a.id, naming)
    out = {}
    for name, e in ref.items():
        if variant == "schnell" and "guidance_in." in name or variant == "schnell" and ".guidance_embedder." in name:
            continue
        if naming == COMFYUI and diffusion_only and not name.startswith(UNET):
            continue
        if name.endswith("model_sampling.sigmas"):
            continue
        out[name] = TensorSpec(torch.int64 if e["dtype"] == "int64" else dtype, shrink(e["shape"], factor))
    return out


def transformer_model(arch: str, factor: int, dtype: torch.dtype, seed: int, naming: str = COMFYUI,
                      diffusion_only: bool = False, variant: str | None = None) -> LazyModel:
    a = _arch(arch)
    specs = transformer_specs(arch, factor, dtype, naming, diffusion_only, variant)
    sources: dict[str, tuple[str, slice | None, bool]] = {}
    if naming == DIFFUSERS:
        bare = registry.named_reference(a.id, BARE)
        for key, e in bare.items():
            shape = shrink(e["shape"], factor)
            for dkey, rows, swap in a.to_diffusers(key, shape):
                sources[dkey] = (key, rows, swap)

    def value(name: str) -> torch.Tensor:
        spec = specs[name]
        if naming == COMFYUI:
            return synth_value(name, spec, seed)
        if naming == BARE:
            return synth_value(UNET + name, spec, seed)
        key, rows, swap = sources[name]
        whole_shape = shrink(registry.named_reference(a.id, BARE)[key]["shape"], factor)
        whole = synth_value(UNET + key, TensorSpec(torch.float32, whole_shape), seed)
        if swap:
            half = whole.shape[0] // 2
            whole = torch.cat([whole[half:], whole[:half]])
        part = whole[rows] if rows is not None else whole
        return part.to(spec.dtype).contiguous()

    return LazyModel(specs, value, {}, label=f"synth-{arch}")
