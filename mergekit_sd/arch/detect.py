"""Architecture detection from tensor names and shapes alone (no tensor data is read).

Follows the marker order of docs/formats.md §1.3. Widths are compared when they are full size and otherwise ignored, so
shrunk synthetic models (tests, benchmarks) are recognised by their key layout the same way full models are.
A UNet-only file (text encoder and VAE pruned away) is still recognised from the UNet's block layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import BARE, COMFYUI, DIFFUSERS
from mergekit_sd.arch.modelspec import modelspec_id
from mergekit_sd.arch.prefixes import SD1_TE, SD2_TE, SDXL_TE2, UNET
from mergekit_sd.lazy import TensorSpec

INPUT_CONV = UNET + "input_blocks.0.0.weight"
TIME_EMBED = UNET + "time_embed.0.weight"

SD1, SD2, SDXL, SDXL_REFINER, VAE, UNKNOWN = "sd1", "sd2", "sdxl", "sdxl-refiner", "vae", "unknown"
ARCH_IDS = (SD1, SD2, SDXL, SDXL_REFINER, VAE, UNKNOWN)
TITLES = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner"}

# which block list (docs/formats.md §3.1) an architecture's UNet follows: 12 input/output blocks -> the 26-block list
BLOCK_FAMILY = {SD1: "sd", SD2: "sd", SDXL_REFINER: "sd", SDXL: "sdxl"}
# the shipped reference key list (arch.reference) each architecture is checked against
REFERENCE = {SD1: "sd1", SDXL: "sdxl"}
# architectures with a LoRA module table (arch.lora_keys)
LORA_ARCHES = (SD1, SD2, SDXL)
# full-size width of `time_embed.0`, from which the shrink factor of synthetic models is read
_FULL_TIME_EMBED = {SD1: 1280, SD2: 1280, SDXL: 1280, SDXL_REFINER: 1536}


@dataclass(frozen=True)
class ArchInfo:
    """What a checkpoint is: `arch` id, `variant` (inpainting, instruct-pix2pix, ...), ModelSpec string, block family,
    and the shrink `factor` of synthetic models (1 for real ones; not part of equality: a shrunk SD1 is still SD1).

    `arch` is `vae` for a standalone VAE file and `unknown` when nothing matched; neither is `known`."""

    arch: str
    variant: str | None = None
    modelspec: str | None = None
    family: str | None = None  # "sd" (26 blocks) | "sdxl" (20 blocks) | None (no block map)
    factor: int = field(default=1, compare=False)
    naming: str | None = None  # transformer models: "bfl" | "comfyui" | "diffusers" (arch.architecture)

    @property
    def known(self) -> bool:
        return self.arch not in (UNKNOWN, VAE)

    @property
    def reference(self) -> str | None:
        """Name of the reference key list to check keys against (arch.reference), if one ships."""
        a = registry.get(self.arch)
        return a.reference if a is not None else REFERENCE.get(self.arch)

    @property
    def lora_arch(self) -> str | None:
        """The LoRA module table (arch.lora_keys) that fits this model, if any."""
        return self.arch if self.arch in LORA_ARCHES else None

    @property
    def title(self) -> str:
        a = registry.get(self.arch)
        return a.title if a is not None else TITLES.get(self.arch, self.arch)

    def describe(self) -> str:
        """Human name for messages, e.g. `sd1 (inpainting)`, `flux (dev, diffusers naming)`."""
        extra = [x for x in (self.variant, f"{self.naming} naming" if self.naming else None) if x]
        return self.arch + (f" ({', '.join(extra)})" if extra else "")

    def compatible(self, other: "ArchInfo") -> bool:
        """Two models can be merged tensor by tensor: same architecture (variants differ only in the input conv)
        and, for transformer models, the same naming (docs/architectures.md#namings)."""
        return not self.known or not other.known or (self.arch == other.arch and self.naming == other.naming)


def _factor(arch: str, specs: Mapping[str, TensorSpec]) -> int:
    te = specs.get(TIME_EMBED)
    full = _FULL_TIME_EMBED.get(arch)
    if full and te is not None and te.shape and 0 < te.shape[0] <= full and full % te.shape[0] == 0:
        return full // te.shape[0]
    return 1


def _info(arch: str, variant: str | None = None, specs: Mapping[str, TensorSpec] | None = None) -> ArchInfo:
    return ArchInfo(arch, variant, modelspec_id(arch, variant), BLOCK_FAMILY.get(arch), _factor(arch, specs or {}))


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


def detect(specs: Mapping[str, TensorSpec], partial: bool = False) -> ArchInfo:
    """Detect the architecture of a checkpoint from its `{name: TensorSpec}` map (docs/formats.md §1.3 order).

    `partial` also recognises files that hold only some layers (LoRA targets, partial exports) by their component
    prefixes alone, which is enough to pick a LoRA module table but not to merge by blocks."""
    info = _detect(specs)
    if info.arch == UNKNOWN and info.variant is None:
        if model_kind(specs) == "vae":
            return ArchInfo(VAE)
        if partial:
            arch = _by_prefix(specs)
            if arch is not None:
                return _info(arch, None, specs)
    return info


def _by_prefix(specs: Mapping[str, TensorSpec]) -> str | None:
    if any(k.startswith(SDXL_TE2) for k in specs):
        return SDXL
    if any(k.startswith(SD2_TE + "transformer.resblocks.") for k in specs):
        return SD2
    if any(k.startswith((UNET, SD1_TE)) for k in specs):
        return SD1
    return None


def _registered(specs: Mapping[str, TensorSpec]) -> ArchInfo | None:
    """The architectures of arch.models, each in any of its namings."""
    for arch in registry.all_architectures():
        found = registry.naming_of(specs, arch.markers)
        for naming in ([found] if found else []) + ([DIFFUSERS] if arch.to_diffusers is not None else []):
            variant = arch.detect(specs, naming)
            if variant is None:
                continue
            variant = variant or None
            key = {COMFYUI: UNET + arch.factor_key, BARE: arch.factor_key}.get(naming)
            if naming == DIFFUSERS:
                key = arch.to_diffusers(arch.factor_key, (arch.full_width,))[0][0]
            s = specs.get(key or "")
            width = s.shape[0] if s is not None and s.shape else 0
            factor = arch.full_width // width if width and arch.full_width % width == 0 else 1
            return ArchInfo(arch.id, variant, arch.modelspec_id(variant), arch.family, factor, naming)
    return None


def _detect(specs: Mapping[str, TensorSpec]) -> ArchInfo:
    keys = specs.keys()
    found = _registered(specs)
    if found is not None:
        return found
    if "conditioner.embedders.1.model.ln_final.weight" in keys or any(
            k.startswith("conditioner.embedders.1.model.") for k in keys):
        return _info(SDXL, _conv_variant(specs), specs)
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        width = _width(specs, "conditioner.embedders.0.model.ln_final.weight")
        if width == 1024 or (width != 1280 and not any(k.startswith(UNET + "label_emb.") for k in keys)):
            # SD 2.1-Turbo in SGM naming: an SD2 model whose text encoder sits at conditioner.embedders.0
            return _info(SD2, _conv_variant(specs), specs)
        return _info(SDXL_REFINER, None, specs)
    if "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in keys:
        return _info(SD2, "depth", specs)
    if "embedder.model.ln_final.weight" in keys:
        width = _width(specs, "embedder.model.ln_final.weight")
        return _info(SD2, "unclip-l" if width == 768 else "unclip-h", specs)
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return _info(SD2, _conv_variant(specs), specs)
    if any(k.startswith("cond_stage_model.roberta.") for k in keys):
        return _info(UNKNOWN, "altdiffusion")
    has_unet = any(k.startswith(UNET) for k in keys)
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return _info(SD1, _conv_variant(specs), specs)
    if has_unet:
        arch = _unet_only(specs)
        if arch is not None:
            return _info(arch, _conv_variant(specs) if arch != SDXL_REFINER else None, specs)
    return ArchInfo(UNKNOWN)


# ---------------------------------------------------------------------------------------------------------------
# what kind of file it is

_LORA_RE = re.compile(
    r"(^lora_(unet|te\d?|te_text_model)_)|(\.lora_(up|down|mid|A|B)\.weight$)|(\.(hada|lokr)_w\d)|(\.lokr_t\d)|"
    r"(\.hada_t\d)|(\.oft_(blocks|diag))|(\.dora_scale$)|(\.diff(_b)?$)|(^lycoris_)|(\.lora\.(up|down)\.weight$)|"
    r"((_lora\d?|\.lora_linear_layer)\.(up|down)\.weight$)|(\.lora_magnitude_vector)|(^lora_transformer_)"
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
