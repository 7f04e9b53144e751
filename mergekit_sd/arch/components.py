"""Components and junk: which part of a checkpoint every tensor belongs to, and what is safe to drop.

A key is *allowed* when it belongs to a component of the file's architecture and its (name, shape) is in the
reference key list (shapes compared after the file's shrink factor, so synthetic models qualify too). Everything
else is classified (EMA, textual-inversion trainer state, LoRA leftovers, ControlNet, SDXL alias copies, scheduler
buffers, prediction markers, unknown) so inspect can report it and prune can remove it with exact counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from mergekit_sd.lazy import TensorSpec
from mergekit_sd.arch.detect import detect, model_kind
from mergekit_sd.arch.reference import REFERENCE_FILES, reference_keys, shrink

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
# component names of the reference key lists -> the names recipes use
REFERENCE_COMPONENT = {"diffuser": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2", "vae": "vae"}

UNET = "model.diffusion_model."
VAE = "first_stage_model."
PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet": UNET, "text_encoder": "cond_stage_model.", "vae": VAE},
    "sd2": {"unet": UNET, "text_encoder": "cond_stage_model.", "vae": VAE},
    "sdxl": {"unet": UNET, "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1.", "vae": VAE},
    "sdxl-refiner": {"unet": UNET, "text_encoder_2": "conditioner.embedders.0.", "vae": VAE},
}
MARKERS = ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std")
SCHEDULER_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)

# categories that are never part of a clean model (what prune removes unconditionally)
JUNK = ("ema", "embedding_manager", "lora", "control_model", "alias", "unknown")
CATEGORY_DOC = {
    "ema": "EMA copy of the UNet and its bookkeeping (model_ema.*)",
    "embedding_manager": "textual-inversion trainer state (embedding_manager.*)",
    "lora": "LoRA tensors saved into the checkpoint (lora_*)",
    "control_model": "ControlNet saved inside the checkpoint (control_model.*)",
    "alias": "cond_stage_model.* alias copies of the SDXL text encoders",
    "scheduler": "LDM scheduler buffers (betas, alphas_cumprod, ...)",
    "marker": "prediction-type marker (v_pred, ztsnr, edm_*)",
    "unknown": "not part of the architecture's reference key list",
}

_INPUT_CONV = UNET + "input_blocks.0.0.weight"
_TIME_EMBED = UNET + "time_embed.0.weight"


@dataclass
class ArchGuess:
    """What the file is: `name` (sd1, sd2, sdxl, sdxl-refiner, vae, unknown), variant, reference list, shrink factor."""

    name: str
    variant: str | None = None
    reference: str | None = None
    factor: int = 1
    modelspec: str | None = None


def guess_arch(specs: Mapping[str, TensorSpec]) -> ArchGuess:
    """The detected architecture (arch.detect, docs/formats.md §1.3) plus what key checks need: the reference list to compare
    against and the shrink factor of synthetic models (from `time_embed`, so shrunk files check against shrunk shapes)."""
    info = detect(specs)
    if not info.known:
        return ArchGuess("vae" if model_kind(specs) == "vae" else "unknown")
    g = ArchGuess(info.arch, info.variant, reference=info.arch if info.arch in ("sd1", "sdxl") else None,
                  modelspec=info.modelspec)
    te = specs.get(_TIME_EMBED)
    full = {"sd1": 1280, "sd2": 1280, "sdxl": 1280, "sdxl-refiner": 1536}[g.name]
    if te is not None and te.shape and 0 < te.shape[0] <= full and full % te.shape[0] == 0:
        g.factor = full // te.shape[0]
    return g


@dataclass
class Classification:
    """Every key in exactly one category: a component name or one of CATEGORY_DOC's."""

    arch: ArchGuess
    category: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # required reference keys absent (components present only)
    shape_mismatch: list[str] = field(default_factory=list)  # reference names with an incompatible shape
    absent_components: list[str] = field(default_factory=list)

    def keys_in(self, *cats: str) -> list[str]:
        return sorted(k for k, c in self.category.items() if c in cats)

    def components_present(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.category.values()]


def _junk_kind(key: str, arch: str) -> str | None:
    if key.startswith("model_ema."):
        return "ema"
    if key.startswith("embedding_manager."):
        return "embedding_manager"
    if key.startswith("lora_") or re.search(r"\.(lora_up|lora_down|lora_A|lora_B)\.", key):
        return "lora"
    if key.startswith("control_model."):
        return "control_model"
    if arch in ("sdxl", "sdxl-refiner") and key.startswith("cond_stage_model."):
        return "alias"
    if key in SCHEDULER_BUFFERS:
        return "scheduler"
    if key in MARKERS:
        return "marker"
    return None


def classify(specs: Mapping[str, TensorSpec], arch: ArchGuess | None = None) -> Classification:
    arch = arch or guess_arch(specs)
    out = Classification(arch)
    if arch.name == "unknown":  # not a checkpoint (a LoRA, an embedding, ...): nothing to call junk
        out.category = {k: "unknown" for k in specs}
        return out
    if arch.name == "vae":
        return _classify_vae(specs, out)
    prefixes = PREFIXES.get(arch.name, {})
    ref = reference_keys(arch.reference) if arch.reference in REFERENCE_FILES else None
    for key, spec in specs.items():
        kind = _junk_kind(key, arch.name)
        if kind is not None:
            out.category[key] = kind
            continue
        comp = next((c for c, p in prefixes.items() if key.startswith(p)), None)
        if arch.name == "vae":
            comp = "vae"
        if comp is None:
            out.category[key] = "unknown"
            continue
        if ref is not None:
            entry = ref.get(key)
            if entry is None:
                out.category[key] = "unknown"
                continue
            if not shape_compatible(key, spec.shape, entry["shape"], arch):
                out.category[key] = "unknown"
                out.shape_mismatch.append(key)
                continue
        out.category[key] = comp
    if ref is not None:
        present = set(out.category.values())
        for comp in COMPONENTS:
            if comp in prefixes and comp not in present:
                out.absent_components.append(comp)
        for key, entry in ref.items():
            comp = REFERENCE_COMPONENT.get(entry["component"], entry["component"])
            if key not in specs and not entry.get("optional") and comp in present:
                out.missing.append(key)
    elif prefixes:
        present = set(out.category.values())
        out.absent_components = [c for c in prefixes if c not in present]
    out.missing.sort()
    out.shape_mismatch.sort()
    return out


def _classify_vae(specs: Mapping[str, TensorSpec], out: Classification) -> Classification:
    """A standalone VAE file in LDM naming is checked against the reference VAE list (diffusers layout by prefix only)."""
    ref = {k[len(VAE):]: e for k, e in reference_keys("sd1").items() if e["component"] == "vae"}
    diffusers = any(".down_blocks." in k or ".up_blocks." in k for k in specs)
    if diffusers:
        out.arch.variant = "diffusers"
    conv = specs.get("encoder.conv_in.weight")
    if conv is not None and len(conv.shape) == 4 and conv.shape[0] and 128 % conv.shape[0] == 0:
        out.arch.factor = 128 // conv.shape[0]
    for key, spec in specs.items():
        if key.startswith("model_ema."):
            out.category[key] = "ema"
        elif diffusers:
            out.category[key] = "vae" if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) else "unknown"
        elif key in ref and shape_compatible(key, spec.shape, ref[key]["shape"], out.arch):
            out.category[key] = "vae"
        else:
            out.category[key] = "unknown"
            if key in ref:
                out.shape_mismatch.append(key)
    if not diffusers:
        out.missing = sorted(k for k in ref if k not in specs)
    out.shape_mismatch.sort()
    return out


def shape_compatible(key: str, shape: tuple, ref_shape, arch: ArchGuess) -> bool:
    want = shrink(ref_shape, arch.factor)
    if tuple(shape) == want:
        return True
    # the input conv of inpainting (9) and instruct-pix2pix (8) models
    return key == _INPUT_CONV and len(shape) == 4 and shape[0] == want[0] and shape[2:] == want[2:] and shape[1] in (4, 8, 9)


def component_of(key: str, arch_name: str) -> str | None:
    """The component a key belongs to by prefix alone (no reference check)."""
    for comp, p in PREFIXES.get(arch_name, {}).items():
        if key.startswith(p):
            return comp
    return None


def is_position_ids(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def broken_position_ids(t: torch.Tensor) -> list[int]:
    """Indices whose id, read as int64 the way loaders do, is not its own position (docs/formats.md §1.9)."""
    flat = t.reshape(-1)
    ids = flat.to(torch.int64) if not flat.dtype.is_floating_point else flat.to(torch.float64).trunc().to(torch.int64)
    want = torch.arange(flat.numel(), dtype=torch.int64)
    return [int(i) for i in torch.nonzero(ids != want).reshape(-1)]
