"""Flux.1 (dev, schnell): 19 double-stream and 38 single-stream blocks (docs/architectures.md#flux).

Namings of the diffusion model: BFL (`double_blocks.N.*`), ComfyUI (the same under `model.diffusion_model.`, also
in all-in-one files with `text_encoders.clip_l.`, `text_encoders.t5xxl.` and `vae.`), and diffusers
(`transformer_blocks.N.*`, q/k/v as separate tensors). The diffusers mapping below follows diffusers'
`convert_flux_to_diffusers.py`: fused qkv rows are q, k, v in that order; a single block's `linear1` rows are
q, k, v (hidden each) then the MLP input (4 x hidden); `norm_out.linear` holds BFL's final modulation with its
shift and scale halves swapped.

LoRA names (`lora_aliases`, docs/keys.md#flux-loras): kohya names modules by BFL path (`lora_unet_double_blocks_0_img_attn_qkv`,
CLIP-L `lora_te1_`, T5 `lora_te3_`); diffusers/PEFT by the diffusers path above, so its q, k, v (and a single
block's MLP input) land on rows of the fused tensors; XLabs (x-flux `DoubleStreamBlockLoraProcessor`) names
`double_blocks.N.processor.qkv_lora1` (image stream qkv), `qkv_lora2` (text stream), `proj_lora1` / `proj_lora2`
(the output projections), and for single blocks `qkv_lora` (the q, k, v rows of `linear1`) and `proj_lora` (`linear2`),
as diffusers' `_convert_xlabs_flux_lora_to_diffusers` reads them.
"""

from __future__ import annotations

import re
from typing import Mapping

from mergekit_sd.arch.architecture import Architecture
from mergekit_sd.lazy import TensorSpec

DOUBLE, SINGLE = 19, 38
BLOCKS = ("img_in", "time_in", "guidance_in", "vector_in", "txt_in", *(f"double_blocks.{i}" for i in range(DOUBLE)),
          *(f"single_blocks.{i}" for i in range(SINGLE)), "final_layer")
MARKERS = ("double_blocks.", "single_blocks.")
DIFFUSERS_MARKERS = ("single_transformer_blocks.",)


def block_of(path: str) -> str | None:
    """BFL path -> ComfyUI ModelMergeFlux1 block (`double_blocks.3`, `img_in`, ...)."""
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.", path)
    if m:
        return f"{m.group(1)}.{int(m.group(2))}"
    head = path.split(".", 1)[0]
    return head if head in BLOCKS else None


# diffusers module stems -> BFL blocks, the inverse of `module_map` below at block level
_DIFFUSERS_HEADS = {"x_embedder": "img_in", "context_embedder": "txt_in", "time_text_embed.timestep_embedder": "time_in",
                    "time_text_embed.guidance_embedder": "guidance_in", "time_text_embed.text_embedder": "vector_in",
                    "norm_out": "final_layer", "proj_out": "final_layer"}


def diffusers_block_of(path: str) -> str | None:
    """diffusers path -> the same ModelMergeFlux1 block its BFL tensor has (`transformer_blocks.3.attn.to_q.weight`
    -> `double_blocks.3`)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", path)
    if m:
        return f"{'double_blocks' if m.group(1) == 'transformer_blocks' else 'single_blocks'}.{int(m.group(2))}"
    for stem, block in _DIFFUSERS_HEADS.items():
        if path.startswith(stem + "."):
            return block
    return None


_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
           "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
           "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
LINEAR1_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
LINEAR1_SPLIT = (1, 1, 1, 4)


def _split_rows(n: int, split: tuple[int, ...]) -> list[slice]:
    unit = n // sum(split)
    out, start = [], 0
    for s in split:
        out.append(slice(start, start + s * unit))
        start += s * unit
    return out


def module_map(module: str) -> list[tuple[str, tuple[int, ...] | None, int | None, bool]]:
    """BFL module path (no `.weight`) -> [(diffusers module path, row split, part, swap halves)]."""
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", module)
    if m is None:
        if module == "final_layer.adaLN_modulation.1":
            return [("norm_out.linear", None, None, True)]
        d = _TOP.get(module)
        return [(d, None, None, False)] if d else []
    kind, n, rest = m.groups()
    if kind == "double_blocks":
        base = f"transformer_blocks.{n}."
        if rest in _DOUBLE_FUSED:
            return [(base + p, (1, 1, 1), i, False) for i, p in enumerate(_DOUBLE_FUSED[rest])]
        d = _DOUBLE.get(rest)
        return [(base + d, None, None, False)] if d else []
    base = f"single_transformer_blocks.{n}."
    if rest == "linear1":
        return [(base + p, LINEAR1_SPLIT, i, False) for i, p in enumerate(LINEAR1_PARTS)]
    d = _SINGLE.get(rest)
    return [(base + d, None, None, False)] if d else []


_XLABS_DOUBLE = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
                 "txt_attn.proj": "proj_lora2"}


def lora_aliases(module: str) -> list[tuple[str, tuple[int, int, int] | None, bool]]:
    """BFL module path -> [(diffusers or XLabs module path, rows of the BFL tensor as (start, stop, of), swap halves)]."""
    out: list[tuple[str, tuple[int, int, int] | None, bool]] = []
    for dmod, split, part, swap in module_map(module):
        if split is None:
            out.append((dmod, None, swap))
        else:
            start = sum(split[:part])
            out.append((dmod, (start, start + split[part], sum(split)), swap))
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", module)
    if m is not None:
        kind, n, rest = m.groups()
        if kind == "double_blocks" and rest in _XLABS_DOUBLE:
            out.append((f"{kind}.{n}.processor.{_XLABS_DOUBLE[rest]}", None, False))
        elif kind == "single_blocks" and rest == "linear1":
            out.append((f"{kind}.{n}.processor.qkv_lora", (0, 3, sum(LINEAR1_SPLIT)), False))
        elif kind == "single_blocks" and rest == "linear2":
            out.append((f"{kind}.{n}.processor.proj_lora", None, False))
    return out


def to_diffusers(key: str, shape: tuple[int, ...]) -> list[tuple[str, slice | None, bool]]:
    """BFL tensor name -> [(diffusers tensor name, rows of the BFL tensor, swap halves)]."""
    module, _, leaf = key.rpartition(".")
    if leaf == "scale":  # RMSNorm scales are `.weight` in diffusers
        leaf = "weight"
    out = []
    for dmod, split, part, swap in module_map(module):
        rows = None if split is None else _split_rows(shape[0], split)[part]
        out.append((f"{dmod}.{leaf}", rows, swap))
    return out


def detect(specs: Mapping[str, TensorSpec], naming: str) -> str | None:
    """dev or schnell (schnell has no guidance embedder); None when not Flux."""
    if naming == "diffusers":
        if not any(k.startswith(DIFFUSERS_MARKERS) for k in specs) or any(k.startswith("joint_blocks.") for k in specs):
            return None
        return "dev" if any(".guidance_embedder." in k for k in specs) else "schnell"
    if not any(".double_blocks." in f".{k}" for k in specs) or not any(".single_blocks." in f".{k}" for k in specs):
        return None
    if not any(k.endswith(".img_attn.qkv.weight") for k in specs):  # XLabs LoRAs name blocks too, but no such weight
        return None
    return "dev" if any("guidance_in." in k for k in specs) else "schnell"


ARCHITECTURES = (Architecture(
    id="flux", title="Flux.1", reference="flux.json", family="flux",
    modelspec={"dev": "flux-1-dev", "schnell": "flux-1-schnell", None: "flux-1-dev"}, resolution="1024x1024",
    components={"diffuser": ("transformer", "model.diffusion_model."), "clip_l": ("text_encoder", "text_encoders.clip_l."),
                "t5xxl": ("text_encoder_2", "text_encoders.t5xxl."), "vae": ("vae", "vae.")},
    detect=detect, markers=MARKERS, factor_key="img_in.weight", full_width=3072, blocks=BLOCKS, block_of=block_of,
    to_diffusers=to_diffusers, diffusers_block_of=diffusers_block_of,
    groups={"DOUBLE": "double_blocks.", "SINGLE": "single_blocks."}, merge_node="ModelMergeFlux1", lora_aliases=lora_aliases,
    lora_text_encoders={"lora_te1": "clip_l", "lora_te": "clip_l", "lora_te2": "t5xxl", "lora_te3": "t5xxl"}),)
