"""`op: convert` — change the storage dtype of float tensors, refusing casts that would damage values.

A value that is NaN/Inf, or whose magnitude exceeds the target's largest finite value (fp16: 65504), fails the step
naming the tensor: a silent overflow becomes Inf and black images later. `allow_overflow: true` saturates such
values to the target's finite range instead (non-finite inputs pass through unchanged). Integer tensors (position
ids, counters) and prediction markers are never cast.
"""

from __future__ import annotations

import torch

from mergekit_sd.arch.prefixes import MARKERS
from mergekit_sd.errors import StepError
from mergekit_sd.lazy import KeyInputs, LazyModel, TensorSpec
from mergekit_sd.formats.safetensors import CODE_OF, DTYPE_NAMES
from mergekit_sd.ops import REQUIRED, Field, OpContext, OpSpec, register_op

CONVERT_DTYPES = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
VERSION = 1


def castable(key: str, spec: TensorSpec) -> bool:
    """Float tensors that belong to the model (markers are configuration values and keep their dtype)."""
    return spec.dtype.is_floating_point and key not in MARKERS


def checked_cast(t: torch.Tensor, key: str, dtype: torch.dtype, step: str, allow_overflow: bool = False) -> torch.Tensor:
    """Cast one tensor; fail naming it when a value is non-finite or out of the target's range."""
    if t.dtype == dtype:
        return t
    if t.numel() == 0:
        return t.to(dtype)
    if not allow_overflow:
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise StepError(f"step {step!r}: tensor {key!r} holds {bad} NaN/Inf value(s); it cannot be converted safely "
                            "(fix the input, or set allow_overflow: true to keep them)")
    fmax = torch.finfo(dtype).max
    if torch.finfo(t.dtype).max > fmax:
        peak = float(t.detach().abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max())
        if peak > fmax:
            if not allow_overflow:
                raise StepError(f"step {step!r}: tensor {key!r} holds a value of magnitude {peak:.6g}, beyond the "
                                f"{CODE_OF[dtype]} range (max {fmax:.6g}); keep a wider dtype or set allow_overflow: true to saturate")
            x = t.to(torch.float32) if t.dtype.itemsize < 4 else t
            x = torch.where(torch.isfinite(x), x.clamp(-fmax, fmax), x)
            return x.to(dtype).contiguous()
    return t.to(dtype).contiguous()


def cast_model(model: LazyModel, dtype: torch.dtype | None, step: str, allow_overflow: bool = False,
               keys: set[str] | None = None, source: int | None = None) -> tuple[LazyModel, int, int]:
    """A lazy model with castable tensors (all, or those in `keys`) cast to `dtype`; returns (model, tensors cast, bytes saved).
    `source`: when `model` is the op's input of that index as given, each tensor declares it reads that input's
    tensor of the same name; otherwise each tensor extends what `model` declares for it (tensor-level reuse)."""
    if dtype is None:
        return model, 0, 0
    specs: dict[str, TensorSpec] = {}
    cast: set[str] = set()
    before = after = 0
    for k, s in model.specs.items():
        if castable(k, s) and s.dtype != dtype and (keys is None or k in keys):
            specs[k] = TensorSpec(dtype, s.shape)
            cast.add(k)
            before += s.nbytes
            after += specs[k].nbytes
        else:
            specs[k] = s

    def produce(k: str) -> torch.Tensor:
        t = model.get(k)
        return checked_cast(t, k, dtype, step, allow_overflow) if k in cast else t

    def key_inputs(k: str) -> KeyInputs | None:
        inner = KeyInputs(None, ((source, k),)) if source is not None else model.key_inputs(k)
        if inner is None:
            return None
        return KeyInputs({"of": inner.params, "cast": k in cast, "dtype": CODE_OF[specs[k].dtype],
                          "allow_overflow": allow_overflow}, inner.reads)

    return (LazyModel(specs, produce, model.metadata, model.label, model.info.derive(), key_inputs=key_inputs),
            len(cast), before - after)


def build_convert(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    model = inputs[0]
    dtype = DTYPE_NAMES[params["dtype"]]
    allow = bool(params.get("allow_overflow"))
    out, n, saved = cast_model(model, dtype, ctx.step, allow, source=0)
    facts = {"dtype": params["dtype"], "tensors_cast": n, "bytes_before": model.nbytes(), "bytes_after": out.nbytes(),
             "allow_overflow": allow}
    ctx.warn(f"converted {n} float tensors to {params['dtype']} ({model.nbytes()} -> {out.nbytes()} bytes)")
    out.info = model.info.derive(provenance={"convert": facts})
    return out


register_op(OpSpec(
    name="convert",
    version=VERSION,
    doc="Store float tensors in another dtype; values out of the target range or non-finite fail the step.",
    fields=(
        Field("model", "ref", doc="the model to convert"),
        Field("dtype", "dtype", REQUIRED, CONVERT_DTYPES, "target dtype of float tensors"),
        Field("allow_overflow", "bool", False, doc="saturate out-of-range values and keep NaN/Inf instead of failing"),
    ),
    build=build_convert,
    formula="cast(A, dtype)",
    category="convert",
))
