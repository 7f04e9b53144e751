"""Tensor name -> named block for the architectures of `arch.models`, in every naming (docs/architectures.md#blocks).

Each architecture module declares its block map (`blocks`, `block_of`, `diffusers_block_of`, `groups`); this module
applies it to a full tensor name of any naming (BFL, ComfyUI-prefixed, diffusers) and names what lies outside the
diffusion model: the text encoders (`TE`) and the VAE (`VAE`) of all-in-one files, and `OTHER` for the rest.
Architectures that share a block list share a block family (`Architecture.family`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import Architecture
from mergekit_sd.arch.prefixes import UNET

TE, VAE, OTHER = "TE", "VAE", "OTHER"
_NUMBERED = re.compile(r"^(.+)\.(\d+)$")


@lru_cache(maxsize=None)
def families() -> dict[str, tuple[Architecture, ...]]:
    """Block family -> the architectures that use it (in registry order)."""
    out: dict[str, tuple[Architecture, ...]] = {}
    for a in registry.all_architectures():
        out[a.family] = out.get(a.family, ()) + (a,)
    return out


def _first(family: str) -> Architecture:
    return families()[family][0]


def family_blocks(family: str) -> tuple[str, ...]:
    """The named blocks of a family in positional-list order."""
    return _first(family).blocks


def family_title(family: str) -> str:
    """`Flux.1`, `SD3 medium / SD3.5 medium`: the architectures a family's block list belongs to."""
    return " / ".join(a.title for a in families()[family])


def family_groups(family: str) -> dict[str, str]:
    """Group name -> block-name prefix (`DOUBLE` -> `double_blocks.`); `TE` and `VAE` are not listed here."""
    return dict(_first(family).groups)


def family_nodes(family: str) -> str:
    """The ComfyUI merge node(s) whose inputs the family's blocks are."""
    return " / ".join(dict.fromkeys(a.merge_node for a in families()[family] if a.merge_node))


def split_numbered(block: str) -> tuple[str, int] | None:
    """`double_blocks.3` -> (`double_blocks`, 3); None for an unnumbered block (`img_in`)."""
    m = _NUMBERED.match(block)
    return (m.group(1), int(m.group(2))) if m else None


def summary(family: str) -> str:
    """The block list in short: `img_in, ..., double_blocks.0-18, single_blocks.0-37, final_layer`."""
    parts: list[str] = []
    runs: dict[str, list[int]] = {}
    for b in family_blocks(family):
        num = split_numbered(b)
        if num is None:
            parts.append(b)
        elif num[0] not in runs:
            runs[num[0]] = [num[1], num[1]]
            parts.append(num[0])
        else:
            runs[num[0]][1] = num[1]
    return ", ".join(f"{p}.{runs[p][0]}-{runs[p][1]}" if p in runs else p for p in parts)


def all_block_names() -> tuple[set[str], set[str]]:
    """Over every registered architecture: the unnumbered block names and the stems of the numbered ones."""
    heads: set[str] = set()
    stems: set[str] = set()
    for a in registry.all_architectures():
        for b in a.blocks:
            num = split_numbered(b)
            if num is None:
                heads.add(b)
            else:
                stems.add(num[0])
    return heads, stems


def key_block(arch: Architecture, key: str) -> str:
    """The block of a full tensor name in any naming; `TE`/`VAE` for text-encoder/VAE tensors of all-in-one files,
    `OTHER` for anything else (`model_sampling.sigmas`, stray tensors)."""
    path = key[len(UNET):] if key.startswith(UNET) else None
    if path is None:
        for comp, (_name, prefix) in arch.components.items():
            if comp != "diffuser" and key.startswith(prefix):
                return VAE if comp == "vae" else TE
        path = key
    block = arch.block_of(path)
    if block is None and arch.diffusers_block_of is not None:
        block = arch.diffusers_block_of(path)
    return block or OTHER


@lru_cache(maxsize=None)
def block_function(family: str) -> Callable[[str], str]:
    """Tensor name -> block for a block family (what the `comfyui-2024` block rule maps with)."""
    arch = _first(family)
    return lambda key: key_block(arch, key)
