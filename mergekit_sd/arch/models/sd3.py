"""Stable Diffusion 3 medium, 3.5 large and 3.5 medium (MMDiT / MMDiT-X, `joint_blocks.N.*`; docs/architectures.md#sd3).

Told apart by layout alone: 38 joint blocks is 3.5 large; 24 with a second self-attention (`attn2`) in the image
stream is 3.5 medium (MMDiT-X); 24 without is 3 medium. Files keep the diffusion model under
`model.diffusion_model.` and may carry `text_encoders.clip_l.`, `text_encoders.clip_g.`, `text_encoders.t5xxl.` and
`first_stage_model.` (the VAE).

LoRA names (`lora_aliases`, docs/keys.md#sd3-loras): kohya names modules by MMDiT path
(`lora_unet_joint_blocks_0_x_block_attn_qkv`; text encoders `lora_te1_` CLIP-L, `lora_te2_` CLIP-G, `lora_te3_` T5);
diffusers/PEFT by the diffusers path, following diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: a
block's `attn.to_q/to_k/to_v` are rows q, k, v of `x_block.attn.qkv`, `attn.add_q_proj/...` those of
`context_block.attn.qkv` (`attn2.*` of MMDiT-X likewise for `x_block.attn2.qkv`); `norm_out.linear` and the last
block's `norm1_context.linear` hold their MMDiT tensors with the shift and scale halves swapped.
"""

from __future__ import annotations

import re
from typing import Mapping

from mergekit_sd.arch.architecture import Architecture
from mergekit_sd.lazy import TensorSpec

MARKERS = ("joint_blocks.",)
HEAD = ("pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder")


def blocks(depth: int) -> tuple[str, ...]:
    """ComfyUI ModelMergeSD3_2B / ModelMergeSD35_Large input order (SD3.5 medium has no node of its own: its 24
    joint blocks are ModelMergeSD3_2B's)."""
    return (*HEAD, *(f"joint_blocks.{i}" for i in range(depth)), "final_layer")


def block_of(path: str) -> str | None:
    m = re.match(r"joint_blocks\.(\d+)\.", path)
    if m:
        return f"joint_blocks.{int(m.group(1))}"
    head = path.split(".", 1)[0]
    return head if head in HEAD or head == "final_layer" else None


_TOP = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
_X = {"attn.proj": "attn.to_out.0", "attn2.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
      "adaLN_modulation.1": "norm1.linear"}
_CONTEXT = {"attn.proj": "attn.to_add_out", "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2",
            "adaLN_modulation.1": "norm1_context.linear"}
_QKV = {("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
        ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def lora_aliases_for(depth: int):
    """The LoRA alias function of a model with `depth` joint blocks (its last context block is swapped in diffusers)."""

    def lora_aliases(module: str) -> list[tuple[str, tuple[int, int, int] | None, bool]]:
        """MMDiT module path -> [(diffusers module path, rows of the MMDiT tensor as (start, stop, of), swap halves)]."""
        m = re.match(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$", module)
        if m is None:
            if module == "final_layer.adaLN_modulation.1":
                return [("norm_out.linear", None, True)]
            d = _TOP.get(module)
            return [(d, None, False)] if d else []
        n, stream, rest = m.groups()
        base = f"transformer_blocks.{n}."
        if (stream, rest) in _QKV:
            return [(base + p, (i, i + 1, 3), False) for i, p in enumerate(_QKV[(stream, rest)])]
        d = (_X if stream == "x_block" else _CONTEXT).get(rest)
        if d is None:
            return []
        swap = stream == "context_block" and rest == "adaLN_modulation.1" and int(n) == depth - 1
        return [(base + d, None, swap)]

    return lora_aliases


def depth_of(specs: Mapping[str, TensorSpec]) -> int:
    found = {int(m.group(1)) for k in specs if (m := re.search(r"(?:^|\.)joint_blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _detector(want: str):
    def detect(specs: Mapping[str, TensorSpec], naming: str) -> str | None:
        if naming == "diffusers":
            return None
        depth = depth_of(specs)
        if depth == 0:
            return None
        attn2 = any(".x_block.attn2." in k for k in specs)
        kind = "sd35l" if depth == 38 else "sd35m" if attn2 else "sd3" if depth == 24 else None
        return "" if kind == want else None

    return detect


_COMMON = dict(
    resolution="1024x1024",
    components={"diffuser": ("transformer", "model.diffusion_model."), "clip_l": ("text_encoder", "text_encoders.clip_l."),
                "clip_g": ("text_encoder_2", "text_encoders.clip_g."), "t5xxl": ("text_encoder_3", "text_encoders.t5xxl."),
                "vae": ("vae", "first_stage_model.")},
    markers=MARKERS, factor_key="x_embedder.proj.weight", block_of=block_of, groups={"JOINT": "joint_blocks."},
    lora_text_encoders={"lora_te1": "clip_l", "lora_te": "clip_l", "lora_te2": "clip_g", "lora_te3": "t5xxl"},
)

ARCHITECTURES = (
    Architecture(id="sd3", title="SD3 medium", reference="sd3-medium.json", family="mmdit24",
                 modelspec={None: "stable-diffusion-v3-medium"}, detect=_detector("sd3"),
                 full_width=1536, blocks=blocks(24), merge_node="ModelMergeSD3_2B", lora_aliases=lora_aliases_for(24), **_COMMON),
    Architecture(id="sd35m", title="SD3.5 medium", reference="sd35-medium.json", family="mmdit24",
                 modelspec={None: "stable-diffusion-v3.5-medium"}, detect=_detector("sd35m"),
                 full_width=1536, blocks=blocks(24), merge_node="ModelMergeSD3_2B", lora_aliases=lora_aliases_for(24), **_COMMON),
    Architecture(id="sd35l", title="SD3.5 large", reference="sd35-large.json", family="mmdit38",
                 modelspec={None: "stable-diffusion-v3.5-large"}, detect=_detector("sd35l"),
                 full_width=2432, blocks=blocks(38), merge_node="ModelMergeSD35_Large",
                 lora_aliases=lora_aliases_for(38), **_COMMON),
)
