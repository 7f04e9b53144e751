"""ModelSpec architecture ids, their default resolutions and kohya's base-version names, in one table.

ModelSpec 1.0.1 (docs/formats: ModelSpec keys). Detection cannot see whether an SD2 model predicts epsilon (the
512 base) or v (the 768 models), so it writes `stable-diffusion-v2`; its resolution follows the declared prediction
type and is 768x768 when none is declared, because the SD 2.x models people merge (2.0-v, 2.1 and their
fine-tunes) are the 768 v-prediction ones, and a 512 model sampled at 768 degrades far less than the reverse.
"""

from __future__ import annotations

from mergekit_sd.arch import registry

# (architecture id, variant) -> ModelSpec `architecture`
MODELSPEC: dict[tuple[str, str | None], str] = {
    ("sd1", None): "stable-diffusion-v1",
    ("sd1", "inpainting"): "stable-diffusion-v1-inpainting",
    ("sd1", "instruct-pix2pix"): "stable-diffusion-v1-instruct-pix2pix",
    ("sd2", None): "stable-diffusion-v2",
    ("sd2", "inpainting"): "stable-diffusion-v2-inpainting",
    ("sd2", "depth"): "stable-diffusion-v2-depth",
    ("sd2", "unclip-l"): "stable-diffusion-v2-unclip-l",
    ("sd2", "unclip-h"): "stable-diffusion-v2-unclip-h",
    ("sdxl", None): "stable-diffusion-xl-v1-base",
    ("sdxl", "inpainting"): "stable-diffusion-xl-v1-base-inpainting",
    ("sdxl", "instruct-pix2pix"): "stable-diffusion-xl-v1-edit",
    ("sdxl-refiner", None): "stable-diffusion-xl-v1-refiner",
}

# ModelSpec `architecture` -> default `resolution`
RESOLUTION: dict[str, str] = {
    "stable-diffusion-v1": "512x512",
    "stable-diffusion-v1-inpainting": "512x512",
    "stable-diffusion-v1-instruct-pix2pix": "512x512",
    "stable-diffusion-v2": "768x768",
    "stable-diffusion-v2-512": "512x512",
    "stable-diffusion-v2-768-v": "768x768",
    "stable-diffusion-v2-inpainting": "512x512",
    "stable-diffusion-v2-depth": "512x512",
    "stable-diffusion-v2-unclip-l": "768x768",
    "stable-diffusion-v2-unclip-h": "768x768",
    "stable-diffusion-xl-v1-base": "1024x1024",
    "stable-diffusion-xl-v1-base-inpainting": "1024x1024",
    "stable-diffusion-xl-v1-edit": "1024x1024",
    "stable-diffusion-xl-v1-refiner": "1024x1024",
}

# kohya `ss_base_model_version` written into LoRAs of an architecture
KOHYA_BASE_VERSION: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1",
                                      "sd3": "sd3", "sd35m": "sd3", "sd35l": "sd3"}


def modelspec_id(arch: str, variant: str | None = None) -> str | None:
    """The ModelSpec architecture of a detected (arch, variant); a variant without its own id falls back to the base."""
    return MODELSPEC.get((arch, variant)) or MODELSPEC.get((arch, None))


def lora_modelspec(arch: str) -> str:
    """`modelspec.architecture` of a LoRA for `arch`, e.g. `stable-diffusion-v1/lora`, `flux-1-dev/lora`."""
    a = registry.get(arch)
    return f"{modelspec_id(arch) or (a.modelspec_id(None) if a is not None else arch)}/lora"


def resolution(modelspec: str | None, prediction_type: str | None = None) -> str | None:
    """Default `modelspec.resolution` for an output; SD2 follows its declared prediction type (module docstring)."""
    if modelspec == "stable-diffusion-v2" and prediction_type in ("epsilon", "eps"):
        return "512x512"
    if modelspec in RESOLUTION:
        return RESOLUTION[modelspec]
    return next((a.resolution for a in registry.all_architectures() if modelspec in a.modelspec.values()), None)

# `modelspec.implementation` of LoRAs written for an architecture
IMPLEMENTATION: dict[str, str] = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models",
                                  "flux": "https://github.com/black-forest-labs/flux",
                                  "sd3": "https://github.com/Stability-AI/sd3.5", "sd35m": "https://github.com/Stability-AI/sd3.5",
                                  "sd35l": "https://github.com/Stability-AI/sd3.5"}
