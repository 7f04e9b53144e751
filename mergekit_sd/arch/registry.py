"""The architectures described by data (one reference key list + one module each), and how the package asks them.

SD1/SD2/SDXL predate this seam and live in detect/blocks/lora_keys; every newer architecture is an `Architecture`
from a module in `arch.models`, listed in MODULES. docs/adding-an-architecture.md walks through adding one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping

from mergekit_sd.arch.architecture import BARE, COMFYUI, DIFFUSERS, Architecture
from mergekit_sd.arch.models import flux, sd3
from mergekit_sd.arch.prefixes import UNET
from mergekit_sd.arch.reference import reference_keys
from mergekit_sd.lazy import TensorSpec

MODULES = (flux, sd3)

def all_architectures() -> tuple[Architecture, ...]:
    return tuple(a for m in MODULES for a in m.ARCHITECTURES)


@lru_cache(maxsize=None)
def by_id() -> dict[str, Architecture]:
    return {a.id: a for a in all_architectures()}


def get(arch_id: str) -> Architecture | None:
    return by_id().get(arch_id)


def naming_of(specs: Mapping[str, TensorSpec], markers: tuple[str, ...]) -> str | None:
    """Which naming the diffusion model uses, told by its characteristic block stems (`markers` in BFL naming)."""
    keys = list(specs)
    if any(k.startswith(UNET) and k[len(UNET):].startswith(markers) for k in keys):
        return COMFYUI
    if any(k.startswith(markers) for k in keys):
        return BARE
    return None


def diffusers_keys(arch: Architecture, bfl: Mapping[str, dict]) -> dict[str, dict]:
    """A reference list (diffusion model, BFL naming) in diffusers naming: fused tensors become their parts."""
    out: dict[str, dict] = {}
    for key, e in bfl.items():
        for dkey, rows, _swap in arch.to_diffusers(key, tuple(e["shape"])):
            shape = list(e["shape"])
            if rows is not None:
                shape[0] = rows.stop - rows.start
            out[dkey] = dict(e, shape=shape)
    return out


@lru_cache(maxsize=None)
def named_reference(arch_id: str, naming: str) -> dict[str, dict]:
    """The reference keys of an architecture in one naming: ComfyUI (all components, prefixed), BFL (diffusion model
    only, no prefix) or diffusers (diffusion model only, diffusers module names)."""
    arch = by_id()[arch_id]
    ref = reference_keys(arch.reference)
    if naming == COMFYUI:
        return ref
    bare = {k[len(UNET):]: e for k, e in ref.items() if k.startswith(UNET)}
    if naming == BARE:
        return bare
    if naming == DIFFUSERS and arch.to_diffusers is not None:
        return diffusers_keys(arch, bare)
    raise KeyError(f"{arch.title} has no {naming} naming")
