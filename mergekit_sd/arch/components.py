"""Components and junk: which part of a checkpoint every tensor belongs to, and what is safe to drop.

A key is *allowed* when it belongs to a component of the file's architecture and its (name, shape) is in the
reference key list (shapes compared after the file's shrink factor, so synthetic models qualify too). Everything
else is classified (EMA, textual-inversion trainer state, LoRA leftovers, ControlNet, SDXL alias copies, scheduler
buffers, prediction markers, unknown) so inspect can report it and prune can remove it with exact counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import COMFYUI
from mergekit_sd.arch.detect import INPUT_CONV, ArchInfo, detect
from mergekit_sd.arch.prefixes import COMPONENT_PREFIXES, MARKERS, SCHEDULER_BUFFERS, VAE
from mergekit_sd.arch.reference import REFERENCE_FILES, reference_keys, shrink
from mergekit_sd.lazy import TensorSpec

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
# component names of the reference key lists -> the names recipes use
REFERENCE_COMPONENT = {"diffuser": "unet", "clip_l": "text_encoder", "clip_g": "text_encoder_2", "vae": "vae"}

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

@dataclass
class Classification:
    """Every key in exactly one category: a component name or one of CATEGORY_DOC's."""

    arch: ArchInfo
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


def classify(specs: Mapping[str, TensorSpec], arch: ArchInfo | None = None) -> Classification:
    arch = arch or detect(specs)
    out = Classification(arch)
    if arch.arch == "unknown":  # not a checkpoint (a LoRA, an embedding, ...): nothing to call junk
        out.category = {k: "unknown" for k in specs}
        return out
    if arch.arch == "vae":
        return _classify_vae(specs, out)
    prefixes = COMPONENT_PREFIXES.get(arch.arch, {})
    ref = reference_keys(arch.reference) if arch.reference in REFERENCE_FILES else None
    ref_component = REFERENCE_COMPONENT
    registered = registry.get(arch.arch)
    if registered is not None:
        # transformer models: the file's naming decides prefixes and key names (arch.registry)
        ref = registry.named_reference(registered.id, arch.naming or COMFYUI)
        ref_component = {c: name for c, (name, _) in registered.components.items()}
        if arch.naming == COMFYUI:
            prefixes = {name: prefix for name, prefix in registered.components.values()}
        else:
            prefixes = {"transformer": ""}
    for key, spec in specs.items():
        kind = _junk_kind(key, arch.arch)
        if kind is not None:
            out.category[key] = kind
            continue
        comp = next((c for c, p in prefixes.items() if key.startswith(p)), None)
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
            comp = ref_component.get(entry["component"], entry["component"])
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
    conv = specs.get("encoder.conv_in.weight")
    factor = 128 // conv.shape[0] if conv is not None and len(conv.shape) == 4 and conv.shape[0] and 128 % conv.shape[0] == 0 else 1
    out.arch = replace(out.arch, variant="diffusers" if diffusers else None, factor=factor)
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


def shape_compatible(key: str, shape: tuple, ref_shape, arch: ArchInfo) -> bool:
    want = shrink(ref_shape, arch.factor)
    if tuple(shape) == want:
        return True
    # the input conv of inpainting (9) and instruct-pix2pix (8) models
    return key == INPUT_CONV and len(shape) == 4 and shape[0] == want[0] and shape[2:] == want[2:] and shape[1] in (4, 8, 9)


def is_position_ids(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def broken_position_ids(t: torch.Tensor) -> list[int]:
    """Indices whose id, read as int64 the way loaders do, is not its own position (docs/formats.md §1.9)."""
    flat = t.reshape(-1)
    ids = flat.to(torch.int64) if not flat.dtype.is_floating_point else flat.to(torch.float64).trunc().to(torch.int64)
    want = torch.arange(flat.numel(), dtype=torch.int64)
    return [int(i) for i in torch.nonzero(ids != want).reshape(-1)]
