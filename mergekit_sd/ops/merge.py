"""The merge kernel: turns every registered merge method into an op of the same name.

Per tensor: non-float tensors and CLIP `position_ids` are copied from the first model, never interpolated;
keys missing from another model follow `on_missing`; shapes must agree except the inpainting/pix2pix dim-1 rule
(FORMATS.md §2.4); math runs in fp32 on the chosen device and is rounded once to the output dtype; a non-finite
result fails the step naming the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import StepError, UserError
from ..lazy import LazyModel, TensorSpec
from ..methods import Method, load_methods
from ..tensorio import DTYPE_NAMES
from ..weights import compile_weight, normalize_weight
from . import DTYPE_FIELD, REQUIRED, Field, OpContext, OpSpec, register_op

KERNEL_VERSION = 1
ON_MISSING = ("keep_a", "take_b", "error")


def _param_field(p) -> Field:
    if p.kind == "weight":
        return Field(p.name, "weight", REQUIRED if p.required else float(p.default), doc=p.doc or "weight (number or block weights)", validate=normalize_weight)
    kind = {"int": "int", "str": "choice" if p.choices else "str", "bool": "bool"}[p.kind]
    return Field(p.name, kind, REQUIRED if p.required else p.default, p.choices, p.doc)


def never_merged(key: str, dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point or key.endswith("position_ids")


def output_dtype(params: dict, first: TensorSpec) -> torch.dtype:
    if not first.dtype.is_floating_point:
        return first.dtype
    return DTYPE_NAMES[params["dtype"]] if params.get("dtype") else first.dtype


def dim1_compatible(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) >= 2 and a[0] == b[0] and a[2:] == b[2:] and a[1] != b[1]


def check_finite(t: torch.Tensor, key: str, step: str) -> None:
    """NaN/Inf anywhere makes the fp32 sum non-finite: one cheap reduction, the exact test only on suspicion."""
    if not t.dtype.is_floating_point or not t.numel():
        return
    if math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all()):
        return
    raise StepError(f"step {step!r}: tensor {key!r} has NaN or Inf values after merging (or overflows the output dtype); "
                    "check the inputs and weights")


CHUNK = 1 << 20


def run_elementwise(fn, natives: list[torch.Tensor], kwargs: dict, out_dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, bool]:
    """Evaluate an elementwise method over cache-sized chunks: fp32 math, one rounding, no whole-tensor temporaries."""
    shape = natives[0].shape
    flats = [t.reshape(-1) for t in natives]
    out = torch.empty(flats[0].numel(), dtype=out_dtype, device=device)
    finite = True
    for s in range(0, out.numel(), CHUNK):
        e = min(s + CHUNK, out.numel())
        piece = out[s:e]
        piece.copy_(fn(*[f[s:e].to(device=device, dtype=torch.float32) for f in flats], **kwargs))
        if finite and out_dtype.is_floating_point:  # while the chunk is still in cache
            finite = math.isfinite(float(piece.sum(dtype=torch.float32)))
    return out.reshape(shape), finite


def build_merge(method: Method, inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    n = len(inputs)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = str(method.min_models) if method.max_models == method.min_models else f"at least {method.min_models}"
        raise UserError(f"step {ctx.step!r}: {method.name} takes {want} models, got {n}")
    first = inputs[0]
    names = ctx.input_labels or [m.label for m in inputs]
    on_missing = params.get("on_missing") or "keep_a"
    specs: dict[str, TensorSpec] = {}
    plan: dict[str, str] = {}  # key -> "merge" | "copy:<i>" | "dim1"
    missing: dict[str, list[str]] = {}
    keys = set(first.keys())
    if on_missing == "take_b":
        for m in inputs[1:]:
            keys |= set(m.keys())
    for key in sorted(keys):
        holders = [i for i, m in enumerate(inputs) if key in m]
        src = holders[0]
        spec = inputs[src].spec(key)
        if src != 0:
            specs[key] = TensorSpec(output_dtype(params, spec), spec.shape)
            plan[key] = f"copy:{src}"
            missing.setdefault("only_in_later", []).append(key)
            continue
        absent = [names[i] for i in range(1, n) if key not in inputs[i]]
        if absent:
            if on_missing == "error":
                raise UserError(f"step {ctx.step!r}: tensor {key!r} of {names[0]} is missing from {', '.join(absent)} (on_missing: error)")
            missing.setdefault("kept_from_a", []).append(key)
            plan[key] = "copy:0"
        elif never_merged(key, spec.dtype):
            plan[key] = "copy:0"
        else:
            plan[key] = "merge"
            for i in range(1, n):
                other = inputs[i].spec(key)
                if other.shape == spec.shape:
                    continue
                if dim1_compatible(spec.shape, other.shape) and spec.shape[1] > other.shape[1]:
                    plan[key] = "dim1"
                    continue
                raise UserError(
                    f"step {ctx.step!r}: tensor {key!r} has shape {list(spec.shape)} in {names[0]} but {list(other.shape)} in {names[i]}; "
                    "these models have different architectures"
                    + (" (for an inpainting merge the inpainting model must come first)" if dim1_compatible(spec.shape, other.shape) else "")
                )
        specs[key] = TensorSpec(output_dtype(params, spec), spec.shape)
    arch = first.info.get("architecture")
    rule = params.get("block_rule")
    weight_fns = {p.name: compile_weight(params[p.name], arch=arch, rule=rule, where=f"step {ctx.step!r} field {p.name!r}")
                  for p in method.params if p.kind == "weight"}
    plain = {p.name: params[p.name] for p in method.params if p.kind != "weight"}
    context = method.prepare(inputs, params, ctx) if method.prepare else None
    device = ctx.device

    def produce(key: str) -> torch.Tensor:
        how = plan[key]
        spec = specs[key]
        if how.startswith("copy:"):
            t = inputs[int(how[5:])].get(key)
            return t if t.dtype == spec.dtype else t.to(spec.dtype)
        kwargs: dict[str, Any] = {name: fn(key) for name, fn in weight_fns.items()}
        kwargs.update(plain)
        if "key" in method.engine_kwargs:
            kwargs["key"] = key
        if "context" in method.engine_kwargs:
            kwargs["context"] = context
        if how == "merge" and method.elementwise:
            out, finite = run_elementwise(method.fn, [m.get(key) for m in inputs], kwargs, spec.dtype, device)
            if not finite:
                check_finite(out, key, ctx.step)
            return out.cpu().contiguous()
        tensors = [m.get(key).to(device=device, dtype=torch.float32) for m in inputs]
        if how == "dim1":
            base = tensors[0]
            width = min(t.shape[1] for t in tensors[1:])
            head = method.fn(*[t[:, :width] for t in tensors], **kwargs)
            out = base.clone()
            out[:, :width] = head
        else:
            out = method.fn(*tensors, **kwargs)
        out = out.to(device="cpu", dtype=spec.dtype).contiguous()
        check_finite(out, key, ctx.step)
        return out

    info = dict(first.info)
    prov: dict[str, Any] = {"method": method.name, "formula": method.formula}
    if missing:
        prov["missing_keys"] = {k: len(v) for k, v in missing.items()}
        for kind, ks in missing.items():
            what = "kept from the first model" if kind == "kept_from_a" else "taken from a later model"
            ctx.warn(f"{len(ks)} tensors {what} (missing elsewhere), e.g. {ks[0]}")
    if any(v == "dim1" for v in plan.values()):
        prov["dim1_rule"] = sorted(k for k, v in plan.items() if v == "dim1")
    info["provenance"] = prov
    return LazyModel(specs, produce, first.metadata, label=ctx.step, info=info)


def _make_op(method: Method) -> OpSpec:
    fields = [Field("models", "refs", doc=f"models in formula order: {', '.join(method.model_names)}")]
    fields += [_param_field(p) for p in method.params]
    fields += [
        DTYPE_FIELD,
        Field("on_missing", "choice", "keep_a", ON_MISSING, "a tensor missing from a later model: keep A's, take the later model's, or fail"),
    ]
    return OpSpec(
        name=method.name,
        version=KERNEL_VERSION * 1000 + method.version,
        doc=method.doc,
        fields=tuple(fields),
        build=lambda inputs, params, ctx, m=method: build_merge(m, inputs, params, ctx),
        formula=method.formula,
        category="merge",
    )


def register_merge_ops() -> None:
    for method in load_methods().values():
        register_op(_make_op(method))


register_merge_ops()
