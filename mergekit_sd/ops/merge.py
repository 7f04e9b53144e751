"""The merge kernel: turns every registered merge method into an op of the same name.

Per tensor: non-float tensors and CLIP `position_ids` are copied from the first model, never interpolated;
keys missing from another model follow `on_missing`; shapes must agree except the inpainting/pix2pix dim-1 rule
(docs/formats.md §2.4); math runs in fp32 on the chosen device and is rounded once to the output dtype; a non-finite
result fails the step naming the tensor.

Before any tensor is read: every input's architecture is detected from its header and two different architectures
stop the step naming both files; block weights, `elemental`, `include` and `exclude` are resolved to one value (or
"not merged") per tensor with the step's `block_rule` (docs/formats.md §3), so an uncovered tensor or an out-of-range
weight is reported as a recipe error, not halfway through a build.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergekit_sd.arch.blocks import (
    DEFAULT_RULE,
    FAMILY_BLOCKS,
    RULES,
    TRANSFORMER_RULE,
    compile_elemental,
    compile_inex,
    elemental_value,
    get_rule,
    is_transformer,
    merged_by_inex,
    normalize_elemental,
    normalize_inex,
)
from mergekit_sd.arch.detect import ArchInfo, detect
from mergekit_sd.errors import StepError, UserError
from mergekit_sd.lazy import KeyInputs, LazyModel, TensorSpec
from mergekit_sd.methods import Method, load_methods
from mergekit_sd.methods import chunks
from mergekit_sd.formats.safetensors import DTYPE_NAMES, dtype_code
from mergekit_sd.arch.weights import check_weight, compile_weight, is_block_weight, normalize_weight, outside_list
from mergekit_sd.ops import DTYPE_FIELD, REQUIRED, Field, OpContext, OpSpec, register_op
from mergekit_sd.ops.transfer import fetch_inputs, host_to_device

KERNEL_VERSION = 1
ON_MISSING = ("keep_a", "take_b", "error")


def normalize_weight_list(value: Any, where: str) -> list:
    """One weight per model: a non-empty list whose items are numbers or block weights (each normalised)."""
    if not isinstance(value, list) or not value:
        raise UserError("must be a list with one weight per model (numbers or block weights)", where)
    return [normalize_weight(v, f"{where}[{i}]") for i, v in enumerate(value)]


WEIGHT_LIST_SCHEMA = {"type": "array", "minItems": 1,
                      "items": {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "array"}, {"type": "object"}]}}


def _param_field(p) -> Field:
    if p.kind == "weight":
        return Field(p.name, "weight", REQUIRED if p.required else float(p.default), doc=p.doc or "weight (number or block weights)", validate=normalize_weight)
    if p.kind == "weights":
        return Field(p.name, "list", REQUIRED, doc=p.doc or "one weight per model", validate=normalize_weight_list,
                     schema=WEIGHT_LIST_SCHEMA)
    kind = {"int": "int", "str": "choice" if p.choices else "str", "bool": "bool"}[p.kind]
    return Field(p.name, kind, REQUIRED if p.required else p.default, p.choices, p.doc)


def never_merged(key: str, dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point or key.endswith("position_ids")


def output_dtype(params: dict, first: TensorSpec) -> torch.dtype:
    """The step's `dtype:`, else the first model's; fp8 is written only when asked for (an fp8 input gives bf16).
    An fp8 result that overflows its format is NaN/Inf and fails the step, never written."""
    if not first.dtype.is_floating_point:
        return first.dtype
    if params.get("dtype"):
        return DTYPE_NAMES[params["dtype"]]
    return torch.bfloat16 if first.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else first.dtype


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


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def run_elementwise(fn, natives: list[torch.Tensor], kwargs: dict, out_dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, bool]:
    """Evaluate an elementwise method over cache-sized chunks (methods.chunks.eval_chunk(), in order): fp32 math,
    one rounding, no whole-tensor temporaries."""
    shape = natives[0].shape
    flats = [t.reshape(-1) for t in natives]
    out = torch.empty(flats[0].numel(), dtype=out_dtype, device=device)
    finite = True
    for s, e in chunks.spans(out.numel(), chunks.eval_chunk()):
        piece = out[s:e]
        res = fn(*[f[s:e].to(device=device, dtype=torch.float32) for f in flats], **kwargs)
        if out_dtype in FP8 and finite and res.numel():  # fp8 casts saturate: out of range would be silently wrong
            finite = float(res.abs().max()) <= torch.finfo(out_dtype).max
        piece.copy_(res)
        if finite and out_dtype.is_floating_point:  # while the chunk is still in cache
            finite = math.isfinite(float(piece.sum(dtype=torch.float32)))
    return out.reshape(shape), finite


def model_arch(model: LazyModel) -> ArchInfo:
    a = model.info.arch
    return a if isinstance(a, ArchInfo) else detect(model.specs)


def check_architectures(inputs: list[LazyModel], names: list[str], step: str) -> list[ArchInfo]:
    """Detect every input's architecture from its header; two different known architectures are a user error."""
    archs = [model_arch(m) for m in inputs]
    ref = next((i for i, a in enumerate(archs) if a.known), None)
    if ref is not None:
        for i, a in enumerate(archs):
            if a.known and not a.compatible(archs[ref]):
                raise UserError(f"step {step!r}: cannot merge {names[ref]} ({archs[ref].describe()}) with {names[i]} ({a.describe()}): "
                                "different model architectures" + ("" if a.arch != archs[ref].arch else
                                                    "; convert both to one naming (docs/architectures.md#namings)"))
    return archs


def _weight_values(method: Method, params: dict) -> dict[str, Any]:
    """Every weight of a step by field name (`alpha`, `weights[1]`), as the recipe gave it (normalised)."""
    out: dict[str, Any] = {}
    for p in method.params:
        if p.kind == "weight":
            out[p.name] = params.get(p.name, None if p.required else float(p.default))
        elif p.kind == "weights":
            for i, v in enumerate(params.get(p.name) or []):
                out[f"{p.name}[{i}]"] = v
    return out


def check_merge(method: Method, params: dict, archs: list, step: str, names: list[str]) -> None:
    """What a merge step can know before anything is built: its inputs' architectures agree, and its block weights,
    block rule, elemental and include/exclude fit the first model's architecture (its block names, list length)."""
    known = [(n, a) for n, a in zip(names, archs) if a is not None and a.known]
    for n, a in known[1:]:
        if not a.compatible(known[0][1]):
            raise UserError(f"step {step!r}: cannot merge {known[0][0]} ({known[0][1].describe()}) with {n} ({a.describe()}): "
                            "different model architectures" + ("" if a.arch != known[0][1].arch else
                                                              "; convert both to one naming (docs/architectures.md#namings)"))
    first = archs[0] if archs else None
    if first is None:
        return
    family = first.family if first.family in FAMILY_BLOCKS else None
    rule = params.get("block_rule")
    try:
        for name, v in _weight_values(method, params).items():
            if is_block_weight(v):
                check_weight(v, arch=first, rule=rule, where=f"{name!r}", label=names[0])
        if rule and family is not None:
            get_rule(rule, "'block_rule'", family).map_for(family)
        compile_inex(params.get("include"), family, "'include'")
        compile_inex(params.get("exclude"), family, "'exclude'")
        compile_elemental(params.get("elemental"), family, "'elemental'")
    except UserError as e:
        raise UserError(f"step {step!r} field {e}") from None


class ResolvedWeights:
    """Per-tensor weights decided at build time: constants, per-key tables for varying weights, the rule used."""

    def __init__(self) -> None:
        self.constants: dict[str, float] = {}
        self.tables: dict[str, dict[str, float]] = {}
        self.rule: str | None = None
        self.not_merged = 0


def resolve_weights(method: Method, params: dict, plan: dict[str, str], arch: ArchInfo, label: str, step: str) -> ResolvedWeights:
    """Resolve block weights, elemental, include/exclude and the rule's unmerged keys; demotes skipped keys in `plan`."""
    out = ResolvedWeights()
    wparams = [p for p in method.params if p.kind == "weight"]
    values = {p.name: params.get(p.name, None if p.required else float(p.default)) for p in wparams}
    # a list of weights (one per model) resolves item by item under the names NAME[i], then is put back together
    lists = {p.name: list(params.get(p.name) or []) for p in method.params if p.kind == "weights"}
    for name, items in lists.items():
        for i, v in enumerate(items):
            values[f"{name}[{i}]"] = v
    elemental = params.get("elemental")
    include, exclude = params.get("include"), params.get("exclude")
    explicit_rule = params.get("block_rule")
    varying = [n for n, v in values.items() if is_block_weight(v)]
    blocky = bool(varying or elemental or include or exclude or explicit_rule)
    family = arch.family if arch.family in FAMILY_BLOCKS else None
    if elemental and "alpha" not in values:
        raise UserError(f"step {step!r}: elemental sets alpha, but {method.name} has no alpha")
    rule = get_rule(explicit_rule, f"step {step!r} field 'block_rule'", family)
    if blocky and (family is not None or explicit_rule):
        out.rule = rule.id
    merged = [k for k, how in plan.items() if how in ("merge", "dim1")]
    if family is not None and blocky:
        rule.map_for(family)  # a rule without a map for this family fails here
    inc = compile_inex(include, family, f"step {step!r} field 'include'")
    exc = compile_inex(exclude, family, f"step {step!r} field 'exclude'")
    # a block list on Flux/SD3 covers the named blocks only: the rest is kept from the first model (ComfyUI's nodes)
    outside = [f for f in (outside_list(values[n], arch=arch) for n in varying) if f is not None]
    blocks: dict[str, str | None] = {}
    for k in merged:
        block = rule.block(k, family) if family is not None else None
        if (explicit_rule and family is not None and block is None) or any(f(k) for f in outside):
            plan[k] = "copy:0"
            out.not_merged += 1
            continue
        if (inc or exc) and not merged_by_inex(inc, exc, k, (block or "BASE") if family else None, family):
            plan[k] = "copy:0"
            out.not_merged += 1
            continue
        blocks[k] = (block or "BASE") if family is not None else None
    fns = {n: compile_weight(values[n], arch=arch, rule=rule.id, where=f"step {step!r} field {n!r}", label=label)
           for n in varying}
    for n, v in values.items():
        if n not in fns:
            out.constants[n] = v
    for n, fn in fns.items():
        out.tables[n] = {k: fn(k) for k in blocks}
    for name, items in lists.items():
        parts = [f"{name}[{i}]" for i in range(len(items))]
        if any(p in out.tables for p in parts):
            out.tables[name] = {k: tuple(out.tables[p][k] if p in out.tables else out.constants[p] for p in parts) for k in blocks}
        else:
            out.constants[name] = tuple(out.constants[p] for p in parts)
        for p in parts:
            out.tables.pop(p, None)
            out.constants.pop(p, None)
    if elemental:
        entries = compile_elemental(elemental, family, f"step {step!r} field 'elemental'")
        base = out.tables.get("alpha")
        const = out.constants.pop("alpha", None)
        out.tables["alpha"] = {k: elemental_value(entries, k, blocks[k], family, base[k] if base else const) for k in blocks}
    check = getattr(method.fn, "weight_check", None)
    if check is not None:
        if out.tables:
            for k in blocks:
                err = check(**out.constants, **{n: t[k] for n, t in out.tables.items()})
                if err:
                    raise UserError(f"step {step!r}: {err} (tensor {k})")
        else:
            err = check(**out.constants)
            if err:
                raise UserError(f"step {step!r}: {err}")
    return out


def build_merge(method: Method, inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    n = len(inputs)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = str(method.min_models) if method.max_models == method.min_models else f"at least {method.min_models}"
        raise UserError(f"step {ctx.step!r}: {method.name} takes {want} models, got {n}")
    for p in method.params:
        if p.kind == "weights" and len(params.get(p.name) or []) != n:
            raise UserError(f"step {ctx.step!r}: {method.name} has {n} models but {len(params.get(p.name) or [])} {p.name}; "
                            f"give one weight per model")
    first = inputs[0]
    names = ctx.input_labels or [m.label for m in inputs]
    archs = check_architectures(inputs, names, ctx.step)
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
    resolved = resolve_weights(method, params, plan, archs[0], names[0], ctx.step)
    weights, tables = resolved.constants, resolved.tables
    plain = {p.name: params.get(p.name, p.default) for p in method.params if p.kind not in ("weight", "weights")}
    context = method.prepare(inputs, params, ctx) if method.prepare else None
    device = ctx.device
    move = ctx.to_device or host_to_device(device)

    def produce(key: str) -> torch.Tensor:
        how = plan[key]
        spec = specs[key]
        if how.startswith("copy:"):
            t = inputs[int(how[5:])].get(key)
            return t if t.dtype == spec.dtype else t.to(spec.dtype)
        kwargs: dict[str, Any] = dict(weights)
        for name, table in tables.items():
            kwargs[name] = table[key]
        kwargs.update(plain)
        if "key" in method.engine_kwargs:
            kwargs["key"] = key
        if "context" in method.engine_kwargs:
            kwargs["context"] = context
        natives = fetch_inputs([lambda m=m: m.get(key) for m in inputs], move)  # stored dtype on the device
        if how == "merge" and (method.elementwise or method.stats is not None):
            if method.stats is not None:  # whole-tensor statistics first, over chunks (methods.chunks)
                kwargs["stats"] = method.stats([t.reshape(-1) for t in natives], device, shape=tuple(spec.shape), **kwargs)
            out, finite = run_elementwise(method.fn, natives, kwargs, spec.dtype, device)
            if not finite and spec.dtype in FP8 and bool(torch.isfinite(out.float()).all()):
                raise UserError(f"step {ctx.step!r}: tensor {key!r} exceeds the range of {spec.dtype} "
                                f"(±{torch.finfo(spec.dtype).max:g}); fp8 without per-layer scales cannot hold it, use dtype: bf16")
            if not finite:
                check_finite(out, key, ctx.step)
            return out.cpu().contiguous()
        if how == "merge" and method.streamed is not None:
            res = method.streamed([t.reshape(-1) for t in natives], device, shape=tuple(spec.shape), **kwargs)
            out = res.reshape(spec.shape).to(device="cpu", dtype=spec.dtype).contiguous()
            check_finite(out, key, ctx.step)
            return out
        tensors = [t.to(dtype=torch.float32) for t in natives]
        del natives
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

    def key_inputs(key: str) -> KeyInputs | None:
        """A tensor depends on its plan, output dtype, its own resolved weights and the same tensor of each input
        it reads; a method with whole-model statistics (`prepare`) declares nothing."""
        how = plan[key]
        out = {"how": how, "dtype": dtype_code(specs[key].dtype)}
        if how.startswith("copy:"):
            return KeyInputs(out, ((int(how[5:]), key),))
        if method.prepare is not None:
            return None
        out["weights"] = {**weights, **{name: table[key] for name, table in tables.items()}}
        out["plain"] = plain
        return KeyInputs(out, tuple((i, key) for i in range(n)))

    def cost(key: str) -> int:
        """Peak bytes of producing `key` (what the memory budget reserves): the inputs as stored, the result, and
        the fp32 working memory: chunks for chunked formulas, whole copies otherwise."""
        how, spec = plan[key], specs[key]
        if how.startswith("copy:"):
            return inputs[int(how[5:])].spec(key).nbytes + spec.nbytes
        stored = sum(m.spec(key).nbytes for m in inputs)
        stored += context.pending_bytes() if hasattr(context, "pending_bytes") else 0  # a whole-model pass still to run
        piece = min(spec.numel, chunks.CHUNK)
        work = piece * 4 * (len(inputs) + 3)  # fp32 pieces of each input, the result's and a temporary
        if method.stats is not None or method.streamed is not None:
            work += piece * 8 * (len(inputs) + 3)  # fp64 pieces while the statistics are summed
        if how == "merge" and (method.elementwise or method.stats is not None):
            return stored + spec.nbytes + work
        if how == "merge" and method.streamed is not None:
            # one fp32 copy (the result being refined), and the fp32 points of a small tensor kept between passes
            return stored + spec.nbytes + 4 * spec.numel + work + min(4 * len(inputs) * spec.numel, 32 << 20)
        return stored + spec.nbytes + 4 * spec.numel * (len(inputs) + 3)

    prov: dict[str, Any] = {"method": method.name, "formula": method.formula}
    if archs[0].known:
        prov["architecture"] = archs[0].describe()
    if resolved.rule is not None:
        prov["block_rule"] = resolved.rule
    if resolved.not_merged:
        prov["not_merged"] = resolved.not_merged
        ctx.warn(f"{resolved.not_merged} tensors kept from the first model by block_rule/include/exclude"
                 + (" or outside the named blocks of a block list" if is_transformer(archs[0].family) else ""))
    if missing:
        prov["missing_keys"] = {k: len(v) for k, v in missing.items()}
        for kind, ks in missing.items():
            what = "kept from the first model" if kind == "kept_from_a" else "taken from a later model"
            ctx.warn(f"{len(ks)} tensors {what} (missing elsewhere), e.g. {ks[0]}")
    if any(v == "dim1" for v in plan.values()):
        prov["dim1_rule"] = sorted(k for k, v in plan.items() if v == "dim1")
    info = first.info.derive(arch=first.info.arch or archs[0], architecture=first.info.architecture or archs[0].modelspec,
                             provenance=prov)
    return LazyModel(specs, produce, first.metadata, label=ctx.step, info=info, key_inputs=key_inputs, coster=cost)


BLOCK_FIELDS = (
    Field("block_rule", "choice", None, tuple(RULES),
          f"which tool's key-to-block mapping block weights follow (default {DEFAULT_RULE}; {TRANSFORMER_RULE} on Flux "
          "and SD3/3.5); recorded in provenance"),
    Field("elemental", "any", None, doc="supermerger elemental merge: BLOCKS:ELEMENTS:RATIO entries overriding alpha per tensor",
          validate=normalize_elemental,
          schema={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    Field("include", "list", None, doc="merge only these blocks (IN04, IN00-IN05, OUT, double_blocks.0-9, DOUBLE, TE, VAE), "
          "re:<regex> or key substrings",
          validate=normalize_inex,
          schema={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    Field("exclude", "list", None, doc="keep the first model's tensors for these blocks, re:<regex> or key substrings",
          validate=normalize_inex,
          schema={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
)


def _make_op(method: Method) -> OpSpec:
    if method.max_models == 1:
        fields = [Field("model", "ref", doc=f"the model ({method.model_names[0]})")]
    else:
        fields = [Field("models", "refs", doc=f"models in formula order: {', '.join(method.model_names)}")]
    fields += [_param_field(p) for p in method.params]
    fields += [
        DTYPE_FIELD,
        Field("on_missing", "choice", "keep_a", ON_MISSING, "a tensor missing from a later model: keep A's, take the later model's, or fail"),
        *BLOCK_FIELDS,
    ]
    return OpSpec(
        name=method.name,
        version=KERNEL_VERSION * 1000 + method.version,
        doc=method.doc,
        fields=tuple(fields),
        build=lambda inputs, params, ctx, m=method: build_merge(m, inputs, params, ctx),
        formula=method.formula,
        category="merge",
        check=lambda params, archs, step, labels, m=method: check_merge(m, params, archs, step, labels),
    )


def register_merge_ops() -> None:
    for method in load_methods().values():
        register_op(_make_op(method))


register_merge_ops()
