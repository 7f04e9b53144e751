"""What an architecture module declares (arch.models.*): the seam through which a new architecture is added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from mergekit_sd.lazy import TensorSpec

# the namings a transformer checkpoint can use for its diffusion model
BARE, COMFYUI, DIFFUSERS = "bfl", "comfyui", "diffusers"


@dataclass(frozen=True)
class Architecture:
    """Everything the package needs to know about one architecture, by name only (no tensor data)."""

    id: str  # architecture id (ArchInfo.arch), e.g. "flux"
    title: str  # for messages, e.g. "Flux.1"
    reference: str  # reference key list (data/keys/<reference>.json), in ComfyUI naming
    family: str  # block family (arch.blocks), shared by architectures with one block list
    modelspec: Mapping[str | None, str]  # variant -> ModelSpec architecture id
    resolution: str
    components: Mapping[str, tuple[str, str]]  # reference component -> (component name, key prefix)
    detect: Callable[[Mapping[str, TensorSpec], str], str | None]  # (specs, naming) -> variant, or None: not this one
    markers: tuple[str, ...]  # BFL-naming path stems that only this family's diffusion model has
    factor_key: str  # a diffusion-model path (no prefix) whose first dimension is the model width
    full_width: int  # that dimension at full size (shrunk synthetic models divide it)
    blocks: tuple[str, ...]  # named blocks in positional-list order (the inputs of ComfyUI's model merge node)
    block_of: Callable[[str], str | None]  # diffusion-model path (BFL naming, no prefix) -> block
    to_diffusers: Callable[[str, tuple[int, ...]], list[tuple[str, slice | None, bool]]] | None = None
    # the block map, continued: diffusers path -> block (None: no diffusers naming), group name -> block-name prefix,
    # and the ComfyUI node whose input names and order `blocks` follows
    diffusers_block_of: Callable[[str], str | None] | None = None
    groups: Mapping[str, str] = field(default_factory=dict)
    merge_node: str = ""
    # LoRA name table: diffusion-model path (BFL naming, no `.weight`) -> [(module path another LoRA naming gives it,
    # its rows of the BFL tensor as (start, stop, of): rows [start·n/of, stop·n/of) of n, None for all, halves swapped)]; the kohya
    # name (`lora_unet_` + the BFL path) is implied
    lora_aliases: Callable[[str], list[tuple[str, tuple[int, int, int] | None, bool]]] | None = None
    # kohya text-encoder prefixes (`lora_te1`, ...) -> component (a key of `components`)
    lora_text_encoders: Mapping[str, str] = field(default_factory=dict)

    def modelspec_id(self, variant: str | None) -> str:
        return self.modelspec.get(variant) or self.modelspec[None]


