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
    kohya_base: str  # ss_base_model_version of LoRAs
    components: Mapping[str, tuple[str, str]]  # reference component -> (component name, key prefix)
    detect: Callable[[Mapping[str, TensorSpec], str], str | None]  # (specs, naming) -> variant, or None: not this one
    markers: tuple[str, ...]  # BFL-naming path stems that only this family's diffusion model has
    factor_key: str  # a diffusion-model path (no prefix) whose first dimension is the model width
    full_width: int  # that dimension at full size (shrunk synthetic models divide it)
    blocks: tuple[str, ...]  # named blocks in positional-list order (ComfyUI's model merge node)
    block_of: Callable[[str], str | None]  # diffusion-model path (BFL naming, no prefix) -> block
    to_diffusers: Callable[[str, tuple[int, ...]], list[tuple[str, slice | None, bool]]] | None = None
    # module path (BFL naming) -> [(diffusers module path, row split, part, swap halves)]: diffusers/PEFT LoRA names
    lora_names: Callable[[str], list[tuple[str, tuple[int, ...] | None, int | None, bool]]] = field(default=lambda p: [])
    # extra LoRA module names (e.g. XLabs) -> (module path, row split, part)
    extra_lora_names: Callable[[list[str]], dict[str, tuple[str, tuple[int, ...] | None, int | None]]] = field(
        default=lambda paths: {})

    def modelspec_id(self, variant: str | None) -> str:
        return self.modelspec.get(variant) or self.modelspec[None]


