"""`op: extract_lora` — a kohya-format LoRA of `tuned − base` (docs/formats.md §5.7).

The module set is kohya's default (transformer Linear/1x1 layers and CLIP attention/MLP; with `conv_rank` also
the ResBlock, downsample and upsample layers; Flux and SD3/3.5: every linear layer of the transformer blocks, named
by kohya as `lora_unet_double_blocks_0_img_attn_qkv`, and CLIP-L as `lora_te1_`). Per module: ΔW = tuned − base in fp64, SVD on the CPU, up = U·S
and down = Vh truncated to min(rank, out, in·kh·kw), optional kohya quantile clamp, alpha = that rank (scale 1).
Baking the result into `base` at strength 1 approximates `tuned`, exactly at full rank.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.architecture import DIFFUSERS
from mergekit_sd.arch.lora_keys import ARCH_TITLES, TRANSFORMER_ARCHES, Target, default_modules, model_table
from mergekit_sd.arch.modelspec import IMPLEMENTATION, KOHYA_BASE_VERSION, lora_modelspec, modelspec_id
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, ModelInfo, TensorSpec
from mergekit_sd.lora.svd import factor_rank, svd_factor
from mergekit_sd.formats.safetensors import DTYPE_NAMES
from mergekit_sd.ops import DTYPE_FIELD, Field, OpContext, OpSpec, register_op
from mergekit_sd.ops.merge import check_finite

VERSION = 1


def lora_metadata(arch: str, name: str, rank: int | str, conv_rank: int | None, module: str = "networks.lora",
                  extra_args: dict | None = None) -> dict[str, str]:
    """kohya `ss_*` and ModelSpec `…/lora` fields that A1111, ComfyUI and kohya tools read."""
    args: dict[str, Any] = dict(extra_args or {})
    if conv_rank is not None:
        args.update({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))})
    meta = {
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)) if isinstance(rank, int) else str(rank),
        "ss_base_model_version": KOHYA_BASE_VERSION[arch],
        "ss_v2": "True" if arch == "sd2" else "False",
        "ss_output_name": name,
        "modelspec.architecture": lora_modelspec(arch),
        "modelspec.implementation": IMPLEMENTATION[arch],
    }
    if args:
        meta["ss_network_args"] = json.dumps(args, sort_keys=True)
    return meta


def _validate_quantile(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise UserError(f"clamp_quantile must be a number in (0, 1], got {v!r}", where)
    return float(v)


def _validate_min_diff(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise UserError(f"min_diff must be a non-negative number or null, got {v!r}", where)
    return float(v)


def _validate_rank(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"a rank is a positive integer, got {v!r}", where)
    return v


def build_extract(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    if len(inputs) != 2:
        raise UserError(f"step {ctx.step!r}: extract_lora takes models: [base, tuned], got {len(inputs)} models")
    base, tuned = inputs
    labels = ctx.input_labels or [base.label, tuned.label]
    info, other_info = detect(base.specs, partial=True), detect(tuned.specs, partial=True)
    tab, other_tab = model_table(info), model_table(other_info)
    arch, other = (tab.arch if tab else None), (other_tab.arch if other_tab else None)
    if arch is None:
        raise UserError(f"step {ctx.step!r}: cannot tell the architecture of {labels[0]} "
                        "(SD1, SD2, SDXL, Flux.1 or SD3/3.5 expected)")
    if other != arch:
        raise UserError(f"step {ctx.step!r}: {labels[0]} is {ARCH_TITLES[arch]} but {labels[1]} is "
                        f"{ARCH_TITLES.get(other or '', 'of unknown architecture')}; extract from two models of one architecture")
    naming = info.naming if arch in TRANSFORMER_ARCHES else None
    if naming is not None and other_info.naming != naming:
        raise UserError(f"step {ctx.step!r}: {labels[0]} is in {naming} naming but {labels[1]} in {other_info.naming}; "
                        "extract from two models of one naming")
    if naming == DIFFUSERS:
        raise UserError(f"step {ctx.step!r}: {labels[0]} is in diffusers naming; extract_lora writes kohya names of the "
                        "BFL/MMDiT layers, so extract from the models in ComfyUI or BFL naming")
    rank, conv_rank = params["rank"], params.get("conv_rank")
    clamp = params.get("clamp_quantile")
    min_diff = params.get("min_diff")
    modules: dict[str, Target] = {}
    for name, t in default_modules(arch, conv=conv_rank is not None, naming=naming).items():
        if t.weight not in base or t.weight not in tuned:
            continue
        if base.spec(t.weight).shape != tuned.spec(t.weight).shape:
            raise UserError(f"step {ctx.step!r}: {t.weight} has shape {list(base.spec(t.weight).shape)} in {labels[0]} but "
                            f"{list(tuned.spec(t.weight).shape)} in {labels[1]}")
        modules[name] = t
    if not modules:
        raise UserError(f"step {ctx.step!r}: {labels[0]} has none of the layers a LoRA adapts")

    def rows(t: Target, w: torch.Tensor) -> torch.Tensor:
        if t.part is None:
            return w
        d = w.shape[0] // 3
        return w[t.part * d:(t.part + 1) * d]

    def diff(t: Target) -> torch.Tensor:
        return (rows(t, tuned.get(t.weight).to(torch.float64)) - rows(t, base.get(t.weight).to(torch.float64)))

    te_note = "included"
    if min_diff is not None:
        te = {n: t for n, t in modules.items() if t.component == "te"}
        biggest = max((float(diff(t).abs().max()) for t in te.values()), default=0.0)
        if te and biggest <= min_diff:
            modules = {n: t for n, t in modules.items() if t.component != "te"}
            te_note = f"dropped: largest difference {biggest:.6g} <= min_diff {min_diff}"
            ctx.warn(f"the text encoders of {labels[0]} and {labels[1]} are the same (largest difference {biggest:.3g}); "
                     "extracting the UNet only")

    out_dtype = DTYPE_NAMES[params["dtype"]] if params.get("dtype") else None
    specs: dict[str, TensorSpec] = {}
    plan: dict[str, tuple[str, str, int]] = {}
    for name, t in modules.items():
        shape = base.spec(t.weight).shape
        if t.part is not None:
            shape = (shape[0] // 3,) + tuple(shape[1:])
        dt = out_dtype or base.spec(t.weight).dtype
        big = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        r = factor_rank(tuple(shape), conv_rank if big else rank)
        if len(shape) == 4:
            specs[f"{name}.lora_up.weight"] = TensorSpec(dt, (shape[0], r, 1, 1))
            specs[f"{name}.lora_down.weight"] = TensorSpec(dt, (r,) + tuple(shape[1:]))
        else:
            specs[f"{name}.lora_up.weight"] = TensorSpec(dt, (shape[0], r))
            specs[f"{name}.lora_down.weight"] = TensorSpec(dt, (r, shape[1]))
        specs[f"{name}.alpha"] = TensorSpec(dt, ())
        for role in ("lora_up.weight", "lora_down.weight", "alpha"):
            plan[f"{name}.{role}"] = (name, role, r)

    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    lock = threading.Lock()

    def produce(key: str) -> torch.Tensor:
        name, role, r = plan[key]
        spec = specs[key]
        if role == "alpha":
            return torch.tensor(float(r), dtype=spec.dtype)
        with lock:  # tensors are produced on several threads; up and down of one module share an SVD
            if name not in last:
                last.clear()
                t = modules[name]
                shape = base.spec(t.weight).shape
                big = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
                last[name] = svd_factor(diff(t), conv_rank if big else rank, clamp)
            up, down = last[name]
        out = (up if role == "lora_up.weight" else down).to(torch.float32)
        check_finite(out, key, ctx.step)
        return out.to(spec.dtype).contiguous()

    model_info = ModelInfo(architecture=modelspec_id(arch) or info.modelspec, provenance={
        "architecture": arch, "rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp, "min_diff": min_diff,
        "modules": len(modules), "text_encoder": te_note, "factoring": "fp64 SVD on the CPU, up = U*S, down = Vh, alpha = rank"})
    meta = lora_metadata(arch, ctx.step, rank, conv_rank)
    return LazyModel(specs, produce, meta, label=ctx.step, info=model_info)


register_op(OpSpec(
    name="extract_lora",
    version=VERSION,
    doc="Extract a kohya-format LoRA of tuned − base (SVD per layer)",
    fields=(
        Field("models", "refs", doc="[base, tuned]: baking the LoRA into base at strength 1 approximates tuned"),
        Field("rank", "int", doc="rank of linear and 1x1 layers (kohya --dim)", validate=_validate_rank),
        Field("conv_rank", "int", None, doc="rank of 3x3 convolutions; when set, ResBlock/down/upsample layers are extracted too",
              validate=_validate_rank),
        Field("clamp_quantile", "number", None, doc="clamp factors to this quantile of their values (kohya uses 0.99); none by default",
              validate=_validate_quantile),
        Field("min_diff", "number", 0.01, doc="drop the text encoder when no text-encoder weight differs by more than this (kohya 0.01); null keeps it",
              validate=_validate_min_diff),
        DTYPE_FIELD,
    ),
    build=build_extract,
    input_kinds=lambda params: ["checkpoint", "checkpoint"],
    output_kind="lora",
    formula="tuned − base ≈ up @ down (truncated SVD)",
    category="lora",
))
