"""`op: vae` — bake a VAE into a checkpoint, replacing exactly its `first_stage_model.*` tensors.

The VAE may come as a standalone file (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`), as a full
checkpoint (its `first_stage_model.*`), or in diffusers layout (converted per docs/formats.md §1.7, with the 2-D mid-block
attention weights reshaped to 1x1 convolutions). Unlike A1111, which silently ignores names it cannot match, all
248 reference VAE keys must be found with the right shapes, else the step fails naming what is missing. Tensors
take the dtype of the model's existing VAE (or of its UNet when it has none); every other tensor passes through
byte-identical.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.prefixes import UNET, VAE
from mergekit_sd.arch.reference import reference_keys, shrink
from mergekit_sd.arch.vae import known_vae, vae_fingerprint
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import KeyInputs, LazyModel, TensorSpec
from mergekit_sd.formats.safetensors import dtype_code
from mergekit_sd.ops import Field, OpContext, OpSpec, register_op
from mergekit_sd.ops.convert import checked_cast

VERSION = 1
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
STANDALONE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def reference_vae() -> dict[str, tuple[int, ...]]:
    """The 248 VAE tensor names (without `first_stage_model.`) and their full-size shapes."""
    return {k[len(VAE):]: tuple(e["shape"]) for k, e in reference_keys("sd1").items() if e["component"] == "vae"}


def diffusers_to_ldm(name: str) -> str | None:
    """A diffusers AutoencoderKL tensor name in LDM naming, or None when it is not one."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", name)
    if not m:
        return name if name.split(".")[0] in ("quant_conv", "post_quant_conv") else None
    side, body, leaf = m.groups()
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    if body in simple:
        return f"{side}.{simple[body]}.{leaf}"
    if mm := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", body):
        part = _RES.get(mm.group(2))
        return f"{side}.mid.block_{int(mm.group(1)) + 1}.{part}.{leaf}" if part else None
    if mm := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", body):
        part = _ATTN.get(mm.group(1))
        return f"{side}.mid.attn_1.{part}.{leaf}" if part else None
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    if mm := re.fullmatch(rf"{blocks}\.(\d)\.resnets\.(\d)\.(\w+)", body):
        i = int(mm.group(1)) if side == "encoder" else 3 - int(mm.group(1))
        part = _RES.get(mm.group(3))
        where = "down" if side == "encoder" else "up"
        return f"{side}.{where}.{i}.block.{mm.group(2)}.{part}.{leaf}" if part else None
    if mm := re.fullmatch(rf"{blocks}\.(\d)\.(downsamplers|upsamplers)\.0\.conv", body):
        if side == "encoder":
            return f"encoder.down.{mm.group(1)}.downsample.conv.{leaf}"
        return f"decoder.up.{3 - int(mm.group(1))}.upsample.conv.{leaf}"
    return None


def ldm_to_diffusers(name: str) -> str:
    """The inverse of `diffusers_to_ldm` (current diffusers naming); used to write diffusers-layout VAEs."""
    inv_res = {v: k for k, v in _RES.items()}
    inv_attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", name)
    if not m:
        return name
    side, body, leaf = m.groups()
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    if body in simple:
        return f"{side}.{simple[body]}.{leaf}"
    if mm := re.fullmatch(r"mid\.block_([12])\.(\w+)", body):
        return f"{side}.mid_block.resnets.{int(mm.group(1)) - 1}.{inv_res[mm.group(2)]}.{leaf}"
    if mm := re.fullmatch(r"mid\.attn_1\.(\w+)", body):
        return f"{side}.mid_block.attentions.0.{inv_attn[mm.group(1)]}.{leaf}"
    if mm := re.fullmatch(r"(down|up)\.(\d)\.block\.(\d)\.(\w+)", body):
        i = int(mm.group(2)) if side == "encoder" else 3 - int(mm.group(2))
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        return f"{side}.{blocks}.{i}.resnets.{mm.group(3)}.{inv_res[mm.group(4)]}.{leaf}"
    if mm := re.fullmatch(r"down\.(\d)\.downsample\.conv", body):
        return f"encoder.down_blocks.{mm.group(1)}.downsamplers.0.conv.{leaf}"
    if mm := re.fullmatch(r"up\.(\d)\.upsample\.conv", body):
        return f"decoder.up_blocks.{3 - int(mm.group(1))}.upsamplers.0.conv.{leaf}"
    raise ValueError(f"not an LDM VAE tensor name: {name}")


def vae_source(model: LazyModel, label: str) -> tuple[str, dict[str, str], list[str]]:
    """(layout, LDM VAE name -> source tensor name, ignored source names) for any supported VAE container."""
    keys = model.keys()
    if any(k.startswith(VAE) for k in keys):
        mapping = {k[len(VAE):]: k for k in keys if k.startswith(VAE)}
        return "checkpoint", mapping, [k for k in keys if not k.startswith(VAE)]
    usable = [k for k in keys if not k.startswith("loss") and k not in ("model_ema.decay", "model_ema.num_updates")]
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in usable):
        mapping, ignored = {}, []
        for k in usable:
            ldm = diffusers_to_ldm(k)
            if ldm is None or ldm in mapping:
                ignored.append(k)
            else:
                mapping[ldm] = k
        return "diffusers", mapping, ignored
    if any(k.startswith(STANDALONE_ROOTS) for k in usable):
        mapping = {k: k for k in usable if k.startswith(STANDALONE_ROOTS)}
        return "standalone", mapping, [k for k in keys if k not in mapping]
    raise UserError(f"{label} holds no VAE tensors (expected encoder.*/decoder.*, first_stage_model.* or a diffusers VAE)")


def build_vae(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    model, vae = inputs
    labels = ctx.input_labels or [model.label, vae.label]
    layout, mapping, ignored = vae_source(vae, labels[1])
    ref = reference_vae()
    missing = sorted(k for k in ref if k not in mapping)
    if missing:
        raise UserError(f"step {ctx.step!r}: {labels[1]} ({layout} layout) lacks {len(missing)} of the {len(ref)} VAE tensors, "
                        f"e.g. {', '.join(missing[:3])}; nothing was baked")
    target_specs = model.specs
    arch = detect(target_specs)
    existing = [k for k in target_specs if k.startswith(VAE)]
    fallback = next((s.dtype for k, s in sorted(target_specs.items()) if k.startswith(UNET) and s.dtype.is_floating_point), None)
    specs = dict(target_specs)
    plan: dict[str, tuple[str, bool]] = {}  # output key -> (source key, reshape 2-D attn to 1x1 conv)
    for name, full_shape in sorted(ref.items()):
        src = mapping[name]
        sspec = vae.spec(src)
        out_key = VAE + name
        if out_key in target_specs:
            want = target_specs[out_key].shape
            dtype = target_specs[out_key].dtype
        else:
            want = shrink(full_shape, arch.factor) if arch.arch != "unknown" else sspec.shape
            if len(want) == 4 and len(sspec.shape) == 2 and want[2:] == (1, 1):
                want = sspec.shape + (1, 1)
            dtype = fallback or sspec.dtype
        reshape = len(sspec.shape) == 2 and len(want) == 4 and want[2:] == (1, 1) and sspec.shape == want[:2]
        if sspec.shape != want and not reshape:
            raise UserError(f"step {ctx.step!r}: VAE tensor {src!r} of {labels[1]} has shape {list(sspec.shape)} but "
                            f"{out_key!r} needs {list(want)}; this VAE does not fit the model")
        if not sspec.dtype.is_floating_point:
            raise UserError(f"step {ctx.step!r}: VAE tensor {src!r} of {labels[1]} is {dtype_code(sspec.dtype)}, not a float tensor")
        specs[out_key] = TensorSpec(dtype, tuple(want))
        plan[out_key] = (src, reshape)
    extra = sorted(k for k in existing if k not in plan)
    if extra:
        raise UserError(f"step {ctx.step!r}: {labels[0]} has {len(extra)} VAE tensors that are not in the reference list "
                        f"(e.g. {extra[0]!r}); prune it first")
    step = ctx.step

    def produce(k: str) -> torch.Tensor:
        if k not in plan:
            return model.get(k)
        src, reshape = plan[k]
        t = vae.get(src)
        if reshape:
            t = t.reshape(specs[k].shape)
        return checked_cast(t, k, specs[k].dtype, step).contiguous()

    def key_inputs(k: str) -> KeyInputs:
        """A model tensor reads itself; a baked one reads its source tensor of the VAE."""
        if k not in plan:
            return KeyInputs({"dtype": dtype_code(specs[k].dtype)}, ((0, k),))
        src, reshape = plan[k]
        return KeyInputs({"dtype": dtype_code(specs[k].dtype), "src": src, "reshape": reshape}, ((1, src),))

    replaced = sum(1 for k in plan if k in target_specs)
    facts: dict[str, Any] = {"layout": layout, "replaced": replaced, "added": len(plan) - replaced,
                             "ignored": len(ignored), "dtype": sorted({dtype_code(specs[k].dtype) for k in plan})}
    if layout == "diffusers":
        facts["reshaped"] = sum(1 for _, r in plan.values() if r)
    fp = vae_fingerprint(vae, sorted(src for src, _ in plan.values()))
    facts["fingerprint"] = fp
    known = known_vae(fp)
    if known:
        facts["known_as"] = known
        if arch.arch.startswith("sdxl"):
            ctx.warn(f"the VAE of {labels[1]} looks like the {known} VAE (fingerprint {fp}), made for SD1/SD2, baked into an SDXL model")
    ctx.warn(f"baked {len(plan)} VAE tensors from {labels[1]} ({layout} layout): {replaced} replaced, {len(plan) - replaced} added"
             + (f"; {len(ignored)} other tensors of the VAE file ignored" if ignored else ""))
    return LazyModel(specs, produce, model.metadata, label=ctx.step, info=model.info.derive(provenance={"vae": facts}),
                     key_inputs=key_inputs)


register_op(OpSpec(
    name="vae",
    version=VERSION,
    doc="Bake a VAE (standalone, from a checkpoint, or diffusers layout) into a model; all 248 VAE tensors must match.",
    fields=(
        Field("model", "ref", doc="the model that receives the VAE"),
        Field("vae", "ref", doc="a VAE file or a checkpoint whose VAE to take"),
    ),
    build=build_vae,
    references=lambda p: [p["model"], p["vae"]],
    input_kinds=lambda p: ["checkpoint", "any"],
    formula="A with B's VAE",
    category="vae",
))
