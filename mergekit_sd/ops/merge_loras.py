"""`op: merge_loras` — several LoRAs into one, linearly in each strength (docs/formats.md §5.6 c).

`mode: concat` is exact: plain LoRA modules are concatenated along the rank (strength·scale folded into the up
factor, alpha = total rank), so baking the result equals baking the inputs one after another; a layer that any
input adapts with another algorithm (LoHa, LoKr, Tucker, full, norm) becomes the exact summed `diff` (`w_norm`
for norm layers). `mode: svd` sums the exact ΔW per layer and re-factors it to `rank` (`conv_rank` for kxk
convolutions) by fp64 SVD. DoRA and IA3 depend on the base weights and cannot be merged without a model.
The naive kohya merge (summing up/down factors, which squares the strength and adds cross terms) is not offered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_sd.arch.blocks import family_of
from mergekit_sd.arch.lora_keys import (
    ARCH_TITLES,
    ARCHES,
    FAMILIES,
    TRANSFORMER_ARCHES,
    Rows,
    Target,
    arch_matches,
    row_slice,
    table,
)
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, ModelInfo, TensorSpec
from mergekit_sd.lora.delta import bias_role, compute_delta, delta_shape, fits, module_scale
from mergekit_sd.lora.formats import Module, declared_arch, name_arch, parse_lora
from mergekit_sd.lora.strength import compile_strength, entries_schema, validate_lora_entries
from mergekit_sd.lora.svd import factor_rank, svd_factor
from mergekit_sd.formats.safetensors import DTYPE_NAMES
from mergekit_sd.ops import DTYPE_FIELD, Field, OpContext, OpSpec, register_op
from mergekit_sd.arch.modelspec import modelspec_id
from mergekit_sd.ops.extract_lora import _validate_quantile, _validate_rank, lora_metadata
from mergekit_sd.ops.merge import check_finite

VERSION = 1


@dataclass
class Part:
    lora: int
    module: Module
    shape: tuple[int, ...] | None  # ΔW shape of the whole layer (None: bias-only)
    mu: float = 1.0
    scale: float = 1.0
    rows: Rows | None = None  # the module writes only these rows of the layer (diffusers q/k/v of a fused qkv)
    swap: bool = False  # ... with its two halves exchanged (diffusers' shift/scale order)


def _lift(d: torch.Tensor, q: Part, whole: tuple[int, ...]) -> torch.Tensor:
    """A module's ΔW (or bias, or up factor) laid onto zeros of the whole layer's rows: exact for fused layers."""
    if q.rows is None and not q.swap:
        return d.reshape(whole)
    out = torch.zeros(whole, dtype=d.dtype)
    sl = row_slice(q.rows, whole[0])
    part = d.reshape(out[sl].shape)
    if q.swap:
        half = part.shape[0] // 2
        part = torch.cat([part[half:], part[:half]])
    out[sl] = part
    return out


def _whole_shape(shape: tuple[int, ...] | None, rows: Rows | None) -> tuple[int, ...] | None:
    if shape is None or rows is None:
        return shape
    start, stop, of = rows
    if shape[0] * of % (stop - start):
        return None
    return (shape[0] * of // (stop - start),) + tuple(shape[1:])


def _arch_of(parsed, models, labels) -> str:
    """The one architecture all LoRAs are for: metadata, then names, then which table maps every module."""
    found: list[tuple[str, str]] = []
    for p, m, label in zip(parsed, models, labels):
        a, why = declared_arch(m.metadata)
        if a is None:
            a, why = name_arch(p.modules)
        if a is not None:
            found.append((a, f"{label} ({why})"))
    for a, who in found:
        if a not in ARCH_TITLES:
            raise UserError(f"{who} is for {a}, which sdbuild does not handle (SD1, SD2, SDXL, Flux.1, SD3/3.5)")
    for (a, who_a), (b, who_b) in zip(found, found[1:]):
        if not (arch_matches(a, b) or arch_matches(b, a) or (a in FAMILIES and b in FAMILIES and
                                                              set(FAMILIES[a]) & set(FAMILIES[b]))):
            raise UserError(f"LoRAs for different architectures: {who_a} is {ARCH_TITLES.get(a, a)}, "
                            f"{who_b} is {ARCH_TITLES.get(b, b)}")
    candidates = [c for c in (*ARCHES, *TRANSFORMER_ARCHES) if all(arch_matches(a, c) for a, _ in found)]
    exact = [a for a, _ in found if a not in FAMILIES]
    if exact:
        return exact[0]
    for arch in candidates:
        tab = table(arch)
        if all(tab.lookup(n) is not None for p in parsed for n in p.modules):
            return arch
    return candidates[0] if candidates else "sd1"


def _overlap(a: Rows, b: Rows) -> bool:
    return a[0] * b[2] < b[1] * a[2] and b[0] * a[2] < a[1] * b[2]


def build_merge_loras(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    entries = params["loras"]
    mode = params.get("mode") or "concat"
    rank, conv_rank, clamp = params.get("rank"), params.get("conv_rank"), params.get("clamp_quantile")
    if mode == "svd" and rank is None:
        raise UserError(f"step {ctx.step!r}: mode svd needs a rank")
    if mode == "concat" and (rank is not None or conv_rank is not None or clamp is not None):
        raise UserError(f"step {ctx.step!r}: rank, conv_rank and clamp_quantile apply to mode svd only")
    labels = [f"{e['lora']!r}" for e in entries]
    xl = any(declared_arch(m.metadata)[0] == "sdxl" for m in inputs) or any(
        k.startswith(("text_encoder_2.", "lora_te2_", "lora_te1_")) for m in inputs for k in m.specs)
    te1_guess = "lora_te1" if xl else "lora_te"
    parsed = [parse_lora(m.specs, label, te1_guess) for m, label in zip(inputs, labels)]
    arch = _arch_of(parsed, inputs, labels)
    tab = table(arch)

    groups: dict[Target, list[Part]] = {}
    for i, (p, m, label) in enumerate(zip(parsed, inputs, labels)):
        for name, mod in sorted(p.modules.items()):
            t = tab.lookup(name)
            if t is None:
                raise UserError(f"LoRA {label}: module {mod.source!r} maps to no {ARCH_TITLES[arch]} layer")
            if "dora_scale" in mod.keys or mod.algo == "ia3":
                what = "DoRA" if "dora_scale" in mod.keys else "IA3"
                raise UserError(f"LoRA {label}: module {mod.source!r} is {what}, whose effect depends on the model's weights; "
                                "bake it into a checkpoint instead (then extract_lora if a LoRA is needed)")
            whole = Target(t.base, t.part, t.weight_suffix, comp=t.comp) if t.rows is not None or t.swap else t
            parts = groups.setdefault(whole, [])
            if any(q.lora == i and (q.rows is None or t.rows is None or _overlap(q.rows, t.rows)) for q in parts):
                raise UserError(f"LoRA {label}: two modules adapt {t.describe()}")
            shape = delta_shape(mod, m.specs)
            lifted = _whole_shape(shape, t.rows)
            if shape is not None and lifted is None:
                raise UserError(f"LoRA {label}: module {mod.source!r} has ΔW {list(shape)}, which is not its share "
                                f"of {t.describe()}")
            parts.append(Part(i, mod, lifted, rows=t.rows, swap=t.swap))

    # one reference shape per layer; every input must fit it
    shapes: dict[Target, tuple[int, ...]] = {}
    for t, parts in groups.items():
        ref = max((q.shape for q in parts if q.shape is not None), key=len, default=None)
        for q in parts:
            if q.shape is not None and ref is not None and not fits(q.shape, ref) and not fits(ref, q.shape):
                raise UserError(f"LoRA {labels[q.lora]}: module {q.module.source!r} has ΔW {list(q.shape)}, but another LoRA "
                                f"adapts {t.describe()} with {list(ref)}")
            if mode == "svd" and bias_role(q.module) is not None and len(ref or ()) != 1:
                raise UserError(f"LoRA {labels[q.lora]}: module {q.module.source!r} changes a bias, which a re-factored LoRA "
                                "cannot hold; use mode: concat")
        if ref is None:
            raise UserError(f"LoRA {labels[parts[0].lora]}: module {parts[0].module.source!r} changes only a bias; "
                            "use mode: concat with a full-diff LoRA")
        shapes[t] = ref

    for i, e in enumerate(entries):
        if arch in TRANSFORMER_ARCHES and not isinstance(e["strength"], (int, float)) and family_of(arch) is None:
            raise UserError(f"step {ctx.step!r} loras[{i}] strength: block weights are not available for "
                            f"{ARCH_TITLES[arch]} LoRAs; use a number")
    strengths = [(compile_strength(e["strength"], arch, f"step {ctx.step!r} loras[{i}] strength"),
                  e.get("te_strength")) for i, e in enumerate(entries)]
    for t, parts in groups.items():
        for q in parts:
            fn, te = strengths[q.lora]
            q.mu = te if (te is not None and t.component == "te") else fn(t.weight)
            q.scale = module_scale(q.module, inputs[q.lora].specs, inputs[q.lora].get)

    first_float = next((s.dtype for m in inputs for s in m.specs.values() if s.dtype.is_floating_point), torch.float32)
    dt = DTYPE_NAMES[params["dtype"]] if params.get("dtype") else first_float
    specs: dict[str, TensorSpec] = {}
    plan: dict[str, tuple[Target, str]] = {}
    kinds: dict[Target, str] = {}
    for t, parts in sorted(groups.items(), key=lambda kv: tab.preferred[kv[0]]):
        name = tab.preferred[t]
        ref = shapes[t]
        conv = len(ref) == 4
        plain = all(q.module.algo == "lora" and "lora_mid.weight" not in q.module.keys and "bias" not in q.module.keys for q in parts)
        if len(ref) == 1:
            kinds[t] = "norm"
            roles = {"w_norm": ref}
            if any(bias_role(q.module) for q in parts):
                roles["b_norm"] = ref
        elif mode == "concat" and plain:
            kinds[t] = "concat"
            r = sum(inputs[q.lora].specs[q.module.keys["lora_down.weight"]].shape[0] for q in parts)
            roles = {"lora_up.weight": (ref[0], r, 1, 1) if conv else (ref[0], r),
                     "lora_down.weight": (r,) + tuple(ref[1:]), "alpha": ()}
        elif mode == "concat":
            kinds[t] = "diff"
            roles = {"diff": ref}
            if any(bias_role(q.module) for q in parts):
                roles["diff_b"] = (ref[0],)
        else:
            kinds[t] = "svd"
            big = conv and tuple(ref[2:]) != (1, 1)
            r = factor_rank(ref, (conv_rank or rank) if big else rank)
            roles = {"lora_up.weight": (ref[0], r, 1, 1) if conv else (ref[0], r),
                     "lora_down.weight": (r,) + tuple(ref[1:]), "alpha": ()}
        for role, shape in roles.items():
            specs[f"{name}.{role}"] = TensorSpec(dt, tuple(shape))
            plan[f"{name}.{role}"] = (t, role)

    cache: dict[Target, dict[str, torch.Tensor]] = {}

    def exact(t: Target) -> torch.Tensor:
        parts, ref = groups[t], shapes[t]
        acc = torch.zeros(ref, dtype=torch.float64)
        for q in parts:
            d = compute_delta(q.module, inputs[q.lora].get)
            if d is not None:
                acc += (q.mu * q.scale) * _lift(d.to(torch.float64), q, ref)
        return acc

    def bias_sum(t: Target, shape) -> torch.Tensor:
        acc = torch.zeros(shape, dtype=torch.float64)
        for q in groups[t]:
            br = bias_role(q.module)
            if br:
                acc += q.mu * _lift(inputs[q.lora].get(q.module.keys[br]).to(torch.float64), q, tuple(shape))
        return acc

    lock = threading.Lock()  # tensors are produced on several threads; the roles of one target share a result

    def tensors_of(t: Target) -> dict[str, torch.Tensor]:
        with lock:
            return cache[t] if t in cache else _tensors_of(t)

    def _tensors_of(t: Target) -> dict[str, torch.Tensor]:
        cache.clear()
        ref, kind = shapes[t], kinds[t]
        out: dict[str, torch.Tensor] = {}
        if kind == "norm":
            out["w_norm"] = exact(t)
            out["b_norm"] = bias_sum(t, ref)
        elif kind == "diff":
            out["diff"] = exact(t)
            out["diff_b"] = bias_sum(t, (ref[0],))
        elif kind == "concat":
            ups, downs = [], []
            for q in groups[t]:
                get = inputs[q.lora].get
                u = get(q.module.keys["lora_up.weight"]).to(torch.float32)
                d = get(q.module.keys["lora_down.weight"]).to(torch.float32)
                r = d.shape[0]
                ups.append((q.mu * q.scale) * _lift(u, q, (ref[0], r)))
                downs.append(d.reshape((r,) + tuple(ref[1:])))
            up = torch.cat(ups, dim=1)
            out["lora_up.weight"] = up.reshape(up.shape + ((1, 1) if len(ref) == 4 else ()))
            out["lora_down.weight"] = torch.cat(downs, dim=0)
            out["alpha"] = torch.tensor(float(up.shape[1]))
        else:
            big = len(ref) == 4 and tuple(ref[2:]) != (1, 1)
            up, down = svd_factor(exact(t), (conv_rank or rank) if big else rank, clamp)
            out = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(down.shape[0]))}
        cache[t] = out
        return out

    def produce(key: str) -> torch.Tensor:
        t, role = plan[key]
        v = tensors_of(t)[role].to(torch.float32)
        check_finite(v, key, ctx.step)
        return v.to(specs[key].dtype).contiguous()

    counts: dict[str, int] = {}
    for k in kinds.values():
        counts[k] = counts.get(k, 0) + 1
    lycoris = any(k in ("diff", "norm") for k in kinds.values())
    if mode == "svd":
        meta = lora_metadata(arch, ctx.step, rank, conv_rank)
    else:
        ranks = {specs[f"{tab.preferred[t]}.lora_down.weight"].shape[0] for t, k in kinds.items() if k == "concat"}
        meta = lora_metadata(arch, ctx.step, ranks.pop() if len(ranks) == 1 else "Dynamic", None,
                             module="lycoris.kohya" if lycoris else "networks.lora",
                             extra_args={"algo": "full"} if lycoris and not ranks else None)
    prov: dict[str, Any] = {"architecture": arch, "mode": mode, "layers": dict(sorted(counts.items())),
                            "loras": [{"lora": e["lora"], "strength": e["strength"], "modules": len(p.modules),
                                       **({"te_strength": e["te_strength"]} if "te_strength" in e else {})}
                                      for e, p in zip(entries, parsed)]}
    if mode == "svd":
        prov.update({"rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp})
    return LazyModel(specs, produce, meta, label=ctx.step, info=ModelInfo(architecture=modelspec_id(arch), provenance=prov))


register_op(OpSpec(
    name="merge_loras",
    version=VERSION,
    doc="Combine LoRAs into one LoRA: exactly (concatenated ranks) or re-factored to a rank by SVD",
    fields=(
        Field("loras", "list", doc="[{lora: NAME, strength: S, te_strength: T}] (strength: number or block weights)",
              validate=lambda v, where: validate_lora_entries(v, where), schema=entries_schema()),
        Field("mode", "choice", "concat", ("concat", "svd"), doc="concat: exact; svd: re-factor the summed ΔW to `rank`"),
        Field("rank", "int", None, doc="target rank (mode svd)", validate=_validate_rank),
        Field("conv_rank", "int", None, doc="target rank of 3x3 convolutions (mode svd; default: rank)", validate=_validate_rank),
        Field("clamp_quantile", "number", None, doc="kohya quantile clamp of the factors (mode svd); none by default",
              validate=_validate_quantile),
        DTYPE_FIELD,
    ),
    build=build_merge_loras,
    references=lambda params: [e["lora"] for e in params.get("loras", [])],
    # LoRA inputs are checked by the parser, which knows more layouts than a kind test
    input_kinds=lambda params: ["lora"] * len(params.get("loras", [])),
    output_kind="lora",
    formula="Σ strength·scale·ΔW as one LoRA",
    category="lora",
))
