"""`op: prune` — a clean release: drop EMA (or promote it), junk and leftovers, unwanted components; repair CLIP ids.

What stays is decided from the key classification of `arch.components` (docs/formats.md §1.8, §1.11). Every removal is
counted (tensors and exact bytes) per category in the step's log and provenance. Prediction markers are kept by
default (they carry v-prediction / zero-terminal-SNR, which no shape reveals); scheduler buffers are dropped by
default (loaders rebuild them from the config). Tensors that stay are passed through untouched, byte for byte,
unless `dtype` asks for a conversion (checked like `op: convert`).
"""

from __future__ import annotations

from typing import Any

import torch

from mergekit_sd.arch.components import COMPONENTS, broken_position_ids, classify, is_position_ids
from mergekit_sd.arch.prefixes import ema_key
from mergekit_sd.formats.ckpt import rename_model
from mergekit_sd.errors import UserError, did_you_mean
from mergekit_sd.lazy import KeyInputs, LazyModel, TensorSpec
from mergekit_sd.formats.safetensors import DTYPE_NAMES, dtype_code
from mergekit_sd.ops import DTYPE_FIELD, Field, OpContext, OpSpec, register_op
from mergekit_sd.ops.convert import cast_model

VERSION = 1




def _components(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError("must be a list of components: " + ", ".join(COMPONENTS), where)
    for v in value:
        if v not in COMPONENTS:
            raise UserError(f"unknown component {v!r}{did_you_mean(v, COMPONENTS)}; components are {', '.join(COMPONENTS)}", where)
    return sorted(set(value), key=COMPONENTS.index)


def _count(specs: dict[str, TensorSpec], keys: list[str]) -> dict[str, int]:
    return {"tensors": len(keys), "bytes": sum(specs[k].nbytes for k in keys)}


def build_prune(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    model = rename_model(inputs[0])  # NovelAI / SD2.1-Turbo names would otherwise look unknown and be dropped
    label = (ctx.input_labels or [model.label])[0] or model.label
    specs = model.specs
    cls = classify(specs)
    if not cls.arch.known:
        raise UserError(f"step {ctx.step!r}: cannot tell which model architecture {label} is "
                        f"({'a standalone VAE' if cls.arch.arch == 'vae' else 'no SD1/SD2/SDXL keys found'}); prune needs it to know what to keep")
    use_ema = _use_ema(params, ctx.step)
    keep = params.get("components")
    drop = params.get("drop_components")
    if keep is not None and drop is not None:
        raise UserError(f"step {ctx.step!r}: give either components (what to keep) or drop_components, not both")
    present = cls.components_present()
    wanted = set(keep) if keep is not None else set(COMPONENTS) - set(drop or ())
    for c in sorted((set(keep or ()) | set(drop or ())) - set(present), key=COMPONENTS.index):
        ctx.warn(f"{label} has no {c} component")
    keep_markers = params.get("keep_prediction_markers", True)
    keep_sched = params.get("keep_scheduler_buffers", False)
    drop_unknown = params.get("drop_unknown", True)

    removed: dict[str, list[str]] = {}
    kept: dict[str, str] = {}  # output key -> source key
    for key in sorted(specs):
        cat = cls.category[key]
        if cat in COMPONENTS:
            ok = cat in wanted
        elif cat == "marker":
            ok = keep_markers
        elif cat == "scheduler":
            ok = keep_sched
        elif cat == "unknown":
            ok = not drop_unknown
        else:  # ema, embedding_manager, lora, control_model, alias
            ok = False
        if ok:
            kept[key] = key
        else:
            removed.setdefault(cat if cat not in COMPONENTS else f"component:{cat}", []).append(key)

    out_specs = {k: specs[k] for k in kept}
    facts: dict[str, Any] = {"architecture": cls.arch.arch, "ema": "use" if use_ema else "drop"}
    renamed = model.info.provenance.get("renamed")
    if renamed:
        facts["renamed"] = renamed
        ctx.warn(f"renamed {renamed} legacy text-encoder tensors to the standard layout")
    if cls.missing:
        facts["missing_reference_tensors"] = len(cls.missing)
        ctx.warn(f"{label} lacks {len(cls.missing)} tensors of the {cls.arch.arch} key list, e.g. {cls.missing[0]}")
    if use_ema:
        unet = [k for k in kept if cls.category[k] == "unet"]
        absent = [k for k in unet if ema_key(k) not in specs]
        if len(absent) == len(unet):
            raise UserError(f"step {ctx.step!r}: {label} has no EMA weights (model_ema.*) to use; set ema: drop")
        if absent:
            raise UserError(f"step {ctx.step!r}: {label} has EMA weights for only {len(unet) - len(absent)} of {len(unet)} UNet tensors "
                            f"(e.g. none for {absent[0]!r}); set ema: drop")
        for k in unet:
            e = ema_key(k)
            if specs[e].shape != specs[k].shape:
                raise UserError(f"step {ctx.step!r}: EMA tensor {e!r} has shape {list(specs[e].shape)} but {k!r} has {list(specs[k].shape)}")
            kept[k] = e
            out_specs[k] = specs[e]
        facts["ema_promoted"] = len(unet)
        ctx.warn(f"UNet weights replaced by their EMA copies ({len(unet)} tensors)")

    fix = params.get("fix_position_ids", True)
    pos_facts: dict[str, Any] = {}
    fixed: set[str] = set()
    for k in [k for k in kept if is_position_ids(k)]:
        t = model.get(kept[k])
        broken = broken_position_ids(t)
        wrong_dtype = t.dtype != torch.int64
        entry: dict[str, Any] = {"dtype": dtype_code(t.dtype), "broken": broken}
        if broken or wrong_dtype:
            if fix:
                fixed.add(k)
                out_specs[k] = TensorSpec(torch.int64, specs[k].shape)
                entry["fixed"] = True
                ctx.warn(f"repaired {k}: {len(broken)} wrong position(s) {broken[:10]}{' ...' if len(broken) > 10 else ''}"
                         f"{', was ' + dtype_code(t.dtype) if wrong_dtype else ''}")
            else:
                entry["fixed"] = False
                ctx.warn(f"{k} is broken ({len(broken)} wrong position(s)); kept as is (fix_position_ids: false)")
        pos_facts[k] = entry
    if pos_facts:
        facts["position_ids"] = pos_facts

    total = {"tensors": 0, "bytes": 0}
    rem_facts: dict[str, dict[str, int]] = {}
    for cat in sorted(removed):
        c = _count(specs, removed[cat])
        rem_facts[cat] = c
        total["tensors"] += c["tensors"]
        total["bytes"] += c["bytes"]
        what = f"{cat[10:]} component" if cat.startswith("component:") else cat
        ctx.warn(f"removed {c['tensors']} {what} tensors ({c['bytes']} bytes), e.g. {removed[cat][0]}")
    facts["removed"] = rem_facts
    facts["removed_total"] = total
    unknown = removed.get("unknown", [])
    if unknown:
        facts["unknown_removed"] = unknown[:50]
    if not drop_unknown and (kept_unknown := [k for k in kept if cls.category[k] == "unknown"]):
        ctx.warn(f"kept {len(kept_unknown)} tensors not in the {cls.arch.arch} key list (drop_unknown: false), e.g. {kept_unknown[0]}")
    if not kept:
        raise UserError(f"step {ctx.step!r}: prune would remove every tensor of {label}")

    def produce(k: str) -> torch.Tensor:
        if k in fixed:
            return torch.arange(out_specs[k].numel, dtype=torch.int64).reshape(out_specs[k].shape)
        return model.get(kept[k])

    as_given = model is inputs[0]  # no legacy names were renamed: `kept` names the input's own tensors

    def key_inputs(k: str) -> KeyInputs | None:
        """A kept tensor reads one tensor of the input (its EMA copy with ema: use); a repaired one reads none."""
        if k in fixed:
            return KeyInputs({"position_ids": "arange"}, ())
        return KeyInputs({"from": kept[k]}, ((0, kept[k]),)) if as_given else None

    out = LazyModel(out_specs, produce, model.metadata, label=ctx.step, key_inputs=key_inputs)
    dtype = params.get("dtype")
    if dtype:
        comp_keys = {k for k in kept if cls.category[k] in COMPONENTS}
        before = out.nbytes()
        out, n, _ = cast_model(out, DTYPE_NAMES[dtype], ctx.step, bool(params.get("allow_overflow")), comp_keys)
        facts["dtype"] = {"to": dtype, "tensors_cast": n, "bytes_before": before, "bytes_after": out.nbytes()}
        if n:
            ctx.warn(f"converted {n} float tensors to {dtype} ({before} -> {out.nbytes()} bytes)")
    facts["kept"] = {"tensors": len(out.specs), "bytes": out.nbytes()}
    upstream = model.info.provenance.get("training_state_dropped")
    if upstream:
        facts["training_state_dropped"] = upstream
    out.info = model.info.derive(provenance={"prune": facts})
    return out


def _use_ema(params: dict, step: str) -> bool:
    ema = params.get("ema")
    flag = params.get("use_ema")
    if ema is not None and flag is not None and (ema == "use") != bool(flag):
        raise UserError(f"step {step!r}: ema: {ema} contradicts use_ema: {str(flag).lower()}; give one of them")
    if flag is not None:
        return bool(flag)
    return ema == "use"


register_op(OpSpec(
    name="prune",
    version=VERSION,
    doc="Remove EMA (or promote it with ema: use), junk, leftovers and unwanted components; repair CLIP position ids.",
    fields=(
        Field("model", "ref", doc="the model to prune"),
        Field("ema", "choice", None, ("drop", "use"), "drop the EMA copy (default) or use it as the UNet weights"),
        Field("use_ema", "bool", None, doc="same as ema: use (true) or ema: drop (false)"),
        Field("components", "list", None, doc="components to keep (default all): unet, text_encoder, text_encoder_2, vae",
              validate=_components, schema={"type": "array", "items": {"enum": list(COMPONENTS)}}),
        Field("drop_components", "list", None, doc="components to remove instead of listing those to keep",
              validate=_components, schema={"type": "array", "items": {"enum": list(COMPONENTS)}}),
        Field("fix_position_ids", "bool", True, doc="rewrite broken CLIP position_ids as int64 0..76"),
        Field("keep_scheduler_buffers", "bool", False, doc="keep LDM scheduler buffers (betas, alphas_cumprod, ...)"),
        Field("keep_prediction_markers", "bool", True, doc="keep v_pred / ztsnr / edm_* marker tensors"),
        Field("drop_unknown", "bool", True, doc="remove tensors that are not in the architecture's key list"),
        DTYPE_FIELD,
        Field("allow_overflow", "bool", False, doc="with dtype: saturate out-of-range values instead of failing"),
    ),
    build=build_prune,
    formula="A without junk",
    category="prune",
))
