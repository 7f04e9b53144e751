"""Architecture detection from tensor names and shapes alone (no tensor data is read).

Follows the marker order of docs/formats.md §1.3. Widths are compared when they are full size and otherwise ignored, so
shrunk synthetic models (tests, benchmarks) are recognised by their key layout the same way full models are.
A UNet-only file (text encoder and VAE pruned away) is still recognised from the UNet's block layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from mergekit_sd.lazy import TensorSpec

UNET = "model.diffusion_model."
INPUT_CONV = UNET + "input_blocks.0.0.weight"

SD1, SD2, SDXL, SDXL_REFINER, UNKNOWN = "sd1", "sd2", "sdxl", "sdxl-refiner", "unknown"
ARCH_IDS = (SD1, SD2, SDXL, SDXL_REFINER, UNKNOWN)

# ModelSpec `architecture` strings (docs/formats.md §4.5); variants use the spelling of the ModelSpec list where it has one
_MODELSPEC = {
    (SD1, None): "stable-diffusion-v1",
    (SD1, "inpainting"): "stable-diffusion-v1-inpainting",
    (SD1, "instruct-pix2pix"): "stable-diffusion-v1-instruct-pix2pix",
    (SD2, None): "stable-diffusion-v2",
    (SD2, "inpainting"): "stable-diffusion-v2-inpainting",
    (SD2, "depth"): "stable-diffusion-v2-depth",
    (SD2, "unclip-l"): "stable-diffusion-v2-unclip-l",
    (SD2, "unclip-h"): "stable-diffusion-v2-unclip-h",
    (SDXL, None): "stable-diffusion-xl-v1-base",
    (SDXL, "inpainting"): "stable-diffusion-xl-v1-base-inpainting",
    (SDXL, "instruct-pix2pix"): "stable-diffusion-xl-v1-edit",
    (SDXL_REFINER, None): "stable-diffusion-xl-v1-refiner",
}

# which block list (docs/formats.md §3.1) an architecture's UNet follows: 12 input/output blocks -> the 26-block list
BLOCK_FAMILY = {SD1: "sd", SD2: "sd", SDXL_REFINER: "sd", SDXL: "sdxl"}


@dataclass(frozen=True)
class ArchInfo:
    """What a checkpoint is: `arch` id, `variant` (inpainting, instruct-pix2pix, ...), ModelSpec string, block family."""

    arch: str
    variant: str | None = None
    modelspec: str | None = None
    family: str | None = None  # "sd" (26 blocks) | "sdxl" (20 blocks) | None (no block map)

    @property
    def known(self) -> bool:
        return self.arch != UNKNOWN

    def describe(self) -> str:
        """Human name for messages, e.g. `sd1 (inpainting)`."""
        return self.arch + (f" ({self.variant})" if self.variant else "")

    def compatible(self, other: "ArchInfo") -> bool:
        """Two models can be merged tensor by tensor: same architecture (variants differ only in the input conv)."""
        return not self.known or not other.known or self.arch == other.arch


def _info(arch: str, variant: str | None = None) -> ArchInfo:
    return ArchInfo(arch, variant, _MODELSPEC.get((arch, variant)) or _MODELSPEC.get((arch, None)), BLOCK_FAMILY.get(arch))


def _in_channels(specs: Mapping[str, TensorSpec]) -> int | None:
    s = specs.get(INPUT_CONV)
    return s.shape[1] if s is not None and len(s.shape) == 4 else None


def _conv_variant(specs: Mapping[str, TensorSpec]) -> str | None:
    return {9: "inpainting", 8: "instruct-pix2pix"}.get(_in_channels(specs) or 4)


def _width(specs: Mapping[str, TensorSpec], key: str) -> int | None:
    s = specs.get(key)
    return s.shape[0] if s is not None and s.shape else None


_BLOCK_RE = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")


def _unet_only(specs: Mapping[str, TensorSpec]) -> str | None:
    """Guess from the UNet layout alone (§1.3 shape table): block count, label_emb and the attention context width."""
    blocks = {int(m.group(1)) for k in specs if (m := _BLOCK_RE.match(k))}
    if not blocks:
        return None
    has_label = any(k.startswith(UNET + "label_emb.") for k in specs)
    if max(blocks) == 8:
        return SDXL if has_label else None
    if max(blocks) != 11:
        return None
    if has_label:
        return SDXL_REFINER
    ctx = specs.get(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj = specs.get(UNET + "input_blocks.1.1.proj_in.weight")
    if (ctx is not None and len(ctx.shape) == 2 and ctx.shape[1] == 1024) or (proj is not None and len(proj.shape) == 2):
        return SD2
    return SD1


def detect(specs: Mapping[str, TensorSpec]) -> ArchInfo:
    """Detect the architecture of a checkpoint from its `{name: TensorSpec}` map (docs/formats.md §1.3 order)."""
    keys = specs.keys()
    if "conditioner.embedders.1.model.ln_final.weight" in keys or any(
            k.startswith("conditioner.embedders.1.model.") for k in keys):
        return _info(SDXL, _conv_variant(specs))
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        width = _width(specs, "conditioner.embedders.0.model.ln_final.weight")
        if width == 1024 or (width != 1280 and not any(k.startswith(UNET + "label_emb.") for k in keys)):
            # SD 2.1-Turbo in SGM naming: an SD2 model whose text encoder sits at conditioner.embedders.0
            return _info(SD2, _conv_variant(specs))
        return _info(SDXL_REFINER)
    if "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in keys:
        return _info(SD2, "depth")
    if "embedder.model.ln_final.weight" in keys:
        width = _width(specs, "embedder.model.ln_final.weight")
        return _info(SD2, "unclip-l" if width == 768 else "unclip-h")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return _info(SD2, _conv_variant(specs))
    if any(k.startswith("cond_stage_model.roberta.") for k in keys):
        return _info(UNKNOWN, "altdiffusion")
    has_unet = any(k.startswith(UNET) for k in keys)
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return _info(SD1, _conv_variant(specs))
    if has_unet:
        arch = _unet_only(specs)
        if arch is not None:
            return _info(arch, _conv_variant(specs) if arch != SDXL_REFINER else None)
    return ArchInfo(UNKNOWN)


# ---------------------------------------------------------------------------------------------------------------
# what kind of file it is

_LORA_RE = re.compile(
    r"(^lora_(unet|te\d?|te_text_model)_)|(\.lora_(up|down|mid|A|B)\.weight$)|(\.(hada|lokr)_w\d)|(\.lokr_t\d)|"
    r"(\.hada_t\d)|(\.oft_(blocks|diag))|(\.dora_scale$)|(\.diff(_b)?$)|(^lycoris_)|(\.lora\.(up|down)\.weight$)|"
    r"((_lora|\.lora_linear_layer)\.(up|down)\.weight$)|(\.lora_magnitude_vector)"
)


def model_kind(specs: Mapping[str, TensorSpec]) -> str:
    """"checkpoint" | "lora" | "vae" | "unknown", from the names alone.

    A LoRA has LoRA/LyCORIS module keys (kohya `lora_unet_*`/`lora_te*`, PEFT `*.lora_A.weight`, LoHa `hada_w1_a`,
    LoKr `lokr_w1`, ...) and no plain UNet weights; a VAE has bare `encoder.*`/`decoder.*` keys; a checkpoint has
    UNet or known component prefixes.
    """
    keys = list(specs.keys())
    if not keys:
        return "unknown"
    n_lora = sum(1 for k in keys if _LORA_RE.search(k))
    has_unet = any(k.startswith(UNET) for k in keys)
    if n_lora and (not has_unet or n_lora * 2 > len(keys)):
        return "lora"
    if has_unet or any(k.startswith(("cond_stage_model.", "conditioner.embedders.")) for k in keys):
        return "checkpoint"
    if any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in keys) and any(
            k.startswith(("decoder.", "first_stage_model.decoder.")) for k in keys):
        return "vae"
    return "unknown"
