"""Stable Diffusion 3 medium, 3.5 large and 3.5 medium (MMDiT / MMDiT-X, `joint_blocks.N.*`; docs/architectures.md#sd3).

Told apart by layout alone: 38 joint blocks is 3.5 large; 24 with a second self-attention (`attn2`) in the image
stream is 3.5 medium (MMDiT-X); 24 without is 3 medium. Files keep the diffusion model under
`model.diffusion_model.` and may carry `text_encoders.clip_l.`, `text_encoders.clip_g.`, `text_encoders.t5xxl.` and
`first_stage_model.` (the VAE).
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
)

ARCHITECTURES = (
    Architecture(id="sd3", title="SD3 medium", reference="sd3-medium.json", family="mmdit24",
                 modelspec={None: "stable-diffusion-v3-medium"}, detect=_detector("sd3"),
                 full_width=1536, blocks=blocks(24), merge_node="ModelMergeSD3_2B", **_COMMON),
    Architecture(id="sd35m", title="SD3.5 medium", reference="sd35-medium.json", family="mmdit24",
                 modelspec={None: "stable-diffusion-v3.5-medium"}, detect=_detector("sd35m"),
                 full_width=1536, blocks=blocks(24), merge_node="ModelMergeSD3_2B", **_COMMON),
    Architecture(id="sd35l", title="SD3.5 large", reference="sd35-large.json", family="mmdit38",
                 modelspec={None: "stable-diffusion-v3.5-large"}, detect=_detector("sd35l"),
                 full_width=2432, blocks=blocks(38), merge_node="ModelMergeSD35_Large", **_COMMON),
)
