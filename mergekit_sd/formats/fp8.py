"""ComfyUI "scaled fp8" checkpoints: dequantised on read, so every op sees plain fp32 weights (docs/architectures.md#fp8).

Such a file stores a weight `X.weight` in float8 with a per-layer `X.scale_weight` (the real weight is the product),
a `scaled_fp8` marker and sometimes `X.scale_input` (for fp8 matmuls at inference). Reading it as if the fp8 values
were the weights would be silently wrong, so the scaled weights are read as `fp8 * scale` in fp32 and the scale,
input-scale and marker tensors are dropped. Plain fp8 files (no scales) need nothing: their values are the weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergekit_sd.lazy import LazyModel, TensorSpec

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_scaled_fp8(specs) -> bool:
    return any(k.endswith(".scale_weight") and k[: -len(".scale_weight")] + ".weight" in specs
               and specs[k[: -len(".scale_weight")] + ".weight"].dtype in FP8 for k in specs)


def dequantise_scaled_fp8(model: LazyModel) -> LazyModel:
    """A lazy view of a scaled-fp8 model with dequantised fp32 weights; other models are returned unchanged."""
    specs = model.specs
    if not is_scaled_fp8(specs):
        return model
    scales = {k[: -len(".scale_weight")] + ".weight": k for k in specs if k.endswith(".scale_weight")}
    out: dict[str, TensorSpec] = {}
    for k, s in specs.items():
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8":
            continue
        out[k] = TensorSpec(torch.float32, s.shape) if k in scales and s.dtype in FP8 else s

    def get(name: str) -> torch.Tensor:
        t = model.get(name)
        if name in scales and t.dtype in FP8:
            return t.to(torch.float32) * model.get(scales[name]).to(torch.float32)
        return t

    info = replace(model.info, provenance={**model.info.provenance, "dequantised_scaled_fp8": len(scales)})
    return LazyModel(out, get, model.metadata, model.label, info)
