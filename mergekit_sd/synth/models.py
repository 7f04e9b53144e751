"""Synthetic checkpoints with real tensor names and shrunk shapes, for tests, the demo and benchmarks.

Every dimension that is a multiple of 32 and at least 64 is divided by `factor`, so products of shapes stay
consistent (q/k/v splits and LoRA factors still fit); factor 1 gives full-size models. Values are seeded per
tensor name, so adding or removing keys never changes the other tensors.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

from mergekit_sd.arch.prefixes import MARKERS, SCHEDULER_BUFFERS, UNET, ema_key
from mergekit_sd.arch.reference import reference_keys, shrink
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, TensorSpec
from mergekit_sd.formats.atomic import atomic_path
from mergekit_sd.formats.safetensors import DTYPE_NAMES, write_model
from mergekit_sd.synth.transformers import transformer_model
from mergekit_sd.synth.values import broken_ids, synth_value  # noqa: F401  (re-exported: tests and loras use them)
from mergekit_sd.ops.vae import ldm_to_diffusers

ARCHES = ("sd1", "sdxl")
TRANSFORMER_ARCHES = ("flux", "sd3", "sd35l", "sd35m")


def synth_specs(arch: str = "sd1", factor: int = 32, dtype: str = "fp16", *, ema: bool = False, junk: bool = False,
                markers: bool = False, inpainting: bool = False, position_ids: bool = True,
                broken_position_ids: bool = False, lora_leftovers: bool = False,
                scheduler: bool = False) -> dict[str, TensorSpec]:
    if arch not in ARCHES:
        raise UserError(f"unknown architecture {arch!r} for synth; choose one of {', '.join(ARCHES)}")
    if dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if factor < 1:
        raise UserError("factor must be a positive integer")
    fdt = DTYPE_NAMES[dtype]
    specs: dict[str, TensorSpec] = {}
    for name, e in reference_keys(arch).items():
        if name in MARKERS and not markers:
            continue
        if name.endswith("position_ids") and not position_ids:
            continue
        shape = shrink(e["shape"], factor)
        if inpainting and name == UNET + "input_blocks.0.0.weight":
            shape = (shape[0], 9) + shape[2:]
        specs[name] = TensorSpec(torch.int64 if e["dtype"] == "int64" else fdt, shape)
        if broken_position_ids and name.endswith("position_ids"):
            specs[name] = TensorSpec(torch.float32, shape)  # what naive merges leave behind (docs/formats.md §1.9)
    if ema:
        for name in [n for n in specs if n.startswith(UNET)]:
            specs[ema_key(name)] = specs[name]
        specs["model_ema.decay"] = TensorSpec(torch.float32, ())
        specs["model_ema.num_updates"] = TensorSpec(torch.int32, ())
    if junk:
        te = "cond_stage_model.transformer." if arch == "sd1" else "conditioner.embedders.0.transformer."
        for name in [n for n in specs if n.startswith(te + "text_model.")]:
            if specs[name].dtype.is_floating_point:
                specs["embedding_manager.embedder.transformer." + name[len(te):]] = specs[name]
    if lora_leftovers:
        for mod in ("lora_unet_input_blocks_1_1_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
            specs[f"{mod}.lora_down.weight"] = TensorSpec(fdt, (4, 8))
            specs[f"{mod}.lora_up.weight"] = TensorSpec(fdt, (8, 4))
            specs[f"{mod}.alpha"] = TensorSpec(fdt, ())
    if scheduler:
        for name in SCHEDULER_BUFFERS:
            specs[name] = TensorSpec(torch.float32, (1000,))
    return specs


def synth_model(arch: str = "sd1", factor: int = 32, dtype: str = "fp16", seed: int = 0, **options) -> LazyModel:
    """A synthetic model; Flux and SD3/3.5 (synth.transformers) take `naming`, `diffusion_only` and `variant`."""
    if arch in TRANSFORMER_ARCHES:
        if dtype not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        if factor < 1:
            raise UserError("factor must be a positive integer")
        return transformer_model(arch, factor, DTYPE_NAMES[dtype], seed, **options)
    specs = synth_specs(arch, factor, dtype, **options)
    return LazyModel(specs, lambda n: synth_value(n, specs[n], seed), {}, label=f"synth-{arch}")


def synth_tensors(arch: str = "sd1", factor: int = 32, dtype: str = "fp16", seed: int = 0, **options) -> dict[str, torch.Tensor]:
    m = synth_model(arch, factor, dtype, seed, **options)
    return {k: m.get(k) for k in m.keys()}


def write_synth(path: str | os.PathLike, arch: str = "sd1", factor: int = 32, dtype: str = "fp16", seed: int = 0,
                title: str | None = None, **options) -> Path:
    """Stream a synthetic checkpoint to `path` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = synth_model(arch, factor, dtype, seed, **options)
    meta = {"modelspec.title": title or path.stem, "sdbuild.synthetic": f"{arch} factor={factor} seed={seed}"}
    with atomic_path(path) as tmp:
        write_model(tmp, model, meta)
    return path


def noisy_like(base: LazyModel, noise: float, seed: int) -> LazyModel:
    """A "fine-tune" of `base`: every float tensor plus seeded Gaussian noise of `noise` times the tensor's RMS.

    Integer tensors and CLIP position ids are kept. The noise is seeded per tensor name, so two files made with
    different seeds are siblings (same base, independent changes) and the same seed always gives the same bytes.
    """
    if not math.isfinite(noise) or noise < 0:
        raise UserError(f"--noise must be a finite number >= 0, got {noise!r}")

    def produce(name: str) -> torch.Tensor:
        t = base.get(name)
        if not t.dtype.is_floating_point or name.endswith("position_ids") or noise == 0 or t.numel() == 0:
            return t
        x = t.to(torch.float32)
        rms = float(x.square().mean().sqrt())
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF)
        return (x + torch.randn(x.shape, generator=g, dtype=torch.float32) * (noise * rms)).to(t.dtype)

    return LazyModel(base.specs, produce, {}, label=f"like-{base.label}")


def write_like(path: str | os.PathLike, base: str | os.PathLike, noise: float, seed: int = 0, title: str | None = None) -> Path:
    """Write a noisy copy of the checkpoint `base` (a synthetic fine-tune, see `noisy_like`) atomically."""
    from mergekit_sd.formats.open import open_model

    path = Path(path)
    if Path(base).resolve() == path.resolve():
        raise UserError("--like names the output file itself; write the fine-tune to another file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    model = noisy_like(open_model(base), noise, seed)
    meta = {"modelspec.title": title or path.stem, "sdbuild.synthetic": f"like {Path(base).name} noise={noise!r} seed={seed}"}
    with atomic_path(path) as tmp:
        write_model(tmp, model, meta)
    return path


def synth_vae_tensors(factor: int = 32, dtype: str = "fp32", seed: int = 7, layout: str = "standalone") -> dict[str, torch.Tensor]:
    """A VAE alone: `standalone` (encoder.*/decoder.*), `checkpoint` (first_stage_model.*) or `diffusers` layout."""
    full = synth_tensors("sd1", factor, dtype, seed)
    vae = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    if layout == "standalone":
        return vae
    if layout == "checkpoint":
        return {"first_stage_model." + k: v for k, v in vae.items()}
    if layout == "diffusers":
        out = {}
        for k, v in vae.items():
            if ".mid.attn_1." in k and v.dim() == 4:
                v = v.reshape(v.shape[:2])  # diffusers stores these 1x1 convs as linear weights
            out[ldm_to_diffusers(k)] = v
        return out
    raise UserError(f"unknown VAE layout {layout!r}; choose standalone, checkpoint or diffusers")


def write_synth_ckpt(path: str | os.PathLike, tensors: dict[str, torch.Tensor], wrap: bool = True, extra: dict | None = None,
                     legacy_format: bool = False) -> Path:
    """A legacy pickle checkpoint (for tests of the weights-only reader); `wrap` nests the weights under `state_dict`."""
    path = Path(path)
    obj: dict = {"state_dict": dict(tensors)} if wrap else dict(tensors)
    obj.update(extra or {})
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy_format)
    return path
