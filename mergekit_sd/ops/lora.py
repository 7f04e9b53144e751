"""`op: lora` — bake LoRA / LyCORIS files into a checkpoint (docs/formats.md §5; Flux and SD3/3.5: docs/keys.md).

Everything that can go wrong is decided in `build` from names, shapes and metadata: a LoRA made for another
architecture fails before any tensor is read; every module must map to a key of this model and fit its shape
(else the step fails naming the module, or with `allow_unmatched` a warning lists every skipped module). Per
target tensor the producer reads W once and only the LoRA tensors of the modules touching it, computes every
network from the same original W (§5.4, DoRA with A1111 semantics) in fp32, and casts once. On Flux and SD3 a
module may write only some rows of a fused tensor (a diffusers `to_q` on `qkv`), or its ΔW may be split over the
separate tensors of a diffusers-named model (a kohya `qkv` on `to_q`, `to_k`, `to_v`): `Target` says which rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.lora_keys import (
    ARCH_TITLES,
    FAMILIES,
    TRANSFORMER_ARCHES,
    Target,
    arch_matches,
    model_table,
    row_count,
    row_slice,
    te1_prefix,
)
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import KeyInputs, LazyModel, TensorSpec
from mergekit_sd.lora.delta import (
    bias_role,
    compute_delta,
    delta_shape,
    dora_convention,
    dora_weight,
    fits,
    ia3_delta,
    module_scale,
    place,
)
from mergekit_sd.lora.formats import ALGO_TITLES, Module, declared_arch, name_arch, parse_lora
from mergekit_sd.lora.strength import compile_strength, entries_schema, validate_lora_entries
from mergekit_sd.formats.safetensors import DTYPE_NAMES, dtype_code
from mergekit_sd.ops import DTYPE_FIELD, Field, OpContext, OpSpec, register_op
from mergekit_sd.ops.merge import check_finite

VERSION = 1
KNOWN_CONTEXT = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


@dataclass
class Contribution:
    """One module of one LoRA acting on one target tensor (or its q/k/v rows)."""

    lora: int
    module: Module
    target: Target
    read: Callable[[str], torch.Tensor]
    mu: float = 1.0
    scale: float = 1.0
    dora: str | None = None
    on_input: bool = False


def lora_label(ctx: OpContext, i: int, entry: dict, model: LazyModel) -> str:
    name = entry["lora"]
    file = ctx.input_labels[i + 1] if len(ctx.input_labels) > i + 1 else model.label
    return f"{name!r} ({file})" if file and file != name else repr(name)


def check_declared_arch(parsed, metadata: dict, arch: str, label: str, model_label: str) -> str | None:
    """Fail when metadata or names say the LoRA is for another architecture; return what was declared."""
    decl, why = declared_arch(metadata)
    if decl is None:
        decl, why = name_arch(parsed.modules)
    if decl is not None and not arch_matches(decl, arch):
        raise UserError(f"LoRA {label} is for {ARCH_TITLES.get(decl, decl)} ({why}) but {model_label} is "
                        f"{ARCH_TITLES[arch]}; use a LoRA made for this architecture")
    return decl


def slice_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The shape of the rows of a tensor that `target` writes."""
    return target.slice_shape(tuple(shape))


def rows(target: Target, n: int) -> slice:
    return row_slice(target.dst, n)


def _placed_shape(dshape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """ΔW's shape once only the rows landing on `target` are kept."""
    if target.src is None or not dshape:
        return dshape
    return (row_count(target.src, dshape[0]),) + tuple(dshape[1:])


def _misfit(m: Module, lspecs, wshape: tuple[int, ...], bshape: tuple[int, ...] | None, target: Target) -> str | None:
    """Why module `m` cannot act on this target, or None when it fits."""
    if m.algo == "ia3":
        n = 1
        for d in lspecs[m.keys["weight"]].shape:
            n *= d
        if n not in (wshape[0], wshape[1] if len(wshape) > 1 else -1):
            return f"IA3 vector of {n} values for weight {list(wshape)}"
        return None
    if (target.src is not None or target.swap) and "dora_scale" in m.keys:
        return "DoRA on a layer split across tensors (its magnitude is the whole layer's)"
    dshape = delta_shape(m, lspecs)
    if dshape is not None and not fits(_placed_shape(tuple(dshape), target), wshape):
        return f"ΔW {list(_placed_shape(tuple(dshape), target))} for weight {list(wshape)}"
    if dshape is not None and "bias" in m.keys:
        n = lspecs[m.keys["bias"]].numel
        if n != TensorSpec(torch.float32, dshape).numel:
            return f"bias of {n} values for ΔW {list(dshape)}"
    br = bias_role(m)
    if br is not None:
        if bshape is None:
            return f"{br} for a layer without bias"
        n = lspecs[m.keys[br]].numel
        if (row_count(target.src, n) if target.src is not None else n) != TensorSpec(torch.float32, bshape).numel:
            return f"{br} {list(lspecs[m.keys[br]].shape)} for bias {list(bshape)}"
    return None


def _context_hint(m: Module, lspecs, wshape) -> str | None:
    """A misfit cross-attention key/value projection means another text encoder, i.e. another architecture."""
    if not (m.name.endswith(("attn2_to_k", "attn2_to_v")) and len(wshape) == 2):
        return None
    dshape = delta_shape(m, lspecs)
    if dshape is None or len(dshape) != 2 or dshape[1] == wshape[1]:
        return None
    theirs, ours = dshape[1], wshape[1]
    guess = KNOWN_CONTEXT.get(theirs)
    return (f"its cross-attention takes context width {theirs}{f' ({guess})' if guess else ''} but the model's takes "
            f"{ours}{f' ({KNOWN_CONTEXT[ours]})' if ours in KNOWN_CONTEXT else ''}")


def build_lora(inputs: list[LazyModel], params: dict, ctx: OpContext) -> LazyModel:
    model, lora_models = inputs[0], inputs[1:]
    entries = params["loras"]
    model_label = ctx.input_labels[0] if ctx.input_labels else (model.label or "the model")
    found = detect(model.specs, partial=True)
    tab = model_table(found)
    if tab is None:
        what = f"is {found.describe()}" if found.known else "has an architecture sdbuild cannot tell"
        raise UserError(f"step {ctx.step!r}: {model_label} {what}; LoRAs bake into SD1, SD2, SDXL, Flux.1 and SD3/3.5 "
                        "base models")
    arch = tab.arch
    transformer = arch in TRANSFORMER_ARCHES
    te1 = te1_prefix(arch)
    labels = [lora_label(ctx, i, e, lm) for i, (e, lm) in enumerate(zip(entries, lora_models))]

    # 1. every LoRA's declared architecture, from metadata and names only
    parsed = []
    declared = []
    for lm, label in zip(lora_models, labels):
        p = parse_lora(lm.specs, label, te1)
        declared.append(check_declared_arch(p, lm.metadata, arch, label, model_label))
        parsed.append(p)

    # 2. map every module and check its shapes, still from specs only
    by_key: dict[str, list[Contribution]] = {}
    by_bias: dict[str, list[Contribution]] = {}
    skipped: list[str] = []
    no_te: list[str] = []  # text-encoder modules of a transformer LoRA for an encoder the file does not hold
    for i, (p, lm, label) in enumerate(zip(parsed, lora_models, labels)):
        seen: dict[tuple[str, Any], str] = {}
        for name, m in sorted(p.modules.items()):
            targets = tab.targets(name)
            missing = [t for t in targets if t.weight not in model]
            if transformer and targets and missing and all(t.component == "te" for t in targets):
                no_te.append(m.source)
                continue
            if not targets or missing:
                why = "maps to no key of" if not targets else f"maps to {missing[0].weight}, which is missing from"
                skipped.append(f"{label}: module {m.source!r} {why} {model_label}")
                continue
            misfits = []
            for target in targets:
                wshape = slice_shape(model.spec(target.weight).shape, target)
                bkey = target.bias if target.bias in model else None
                bshape = slice_shape(model.spec(bkey).shape, target) if bkey else None
                hint = None if transformer else _context_hint(m, lm.specs, wshape)
                if hint:
                    raise UserError(f"LoRA {label} was made for another architecture than {model_label} "
                                    f"({ARCH_TITLES[arch]}): module {m.source!r}: {hint}")
                why = _misfit(m, lm.specs, wshape, bshape, target)
                if why:
                    misfits.append(f"{label}: module {m.source!r} does not fit {target.describe()}: {why}")
            if misfits:
                skipped.append(misfits[0])
                continue
            for target in targets:
                wshape = slice_shape(model.spec(target.weight).shape, target)
                bkey = target.bias if target.bias in model else None
                ident = (target.weight, target.dst)
                if ident in seen:
                    raise UserError(f"LoRA {label}: modules {seen[ident]!r} and {m.source!r} both adapt {target.describe()}")
                seen[ident] = m.source
                dora = None
                if "dora_scale" in m.keys:
                    ds = lm.specs[m.keys["dora_scale"]].shape
                    dora = dora_convention(ds, wshape[0], wshape[1] if len(wshape) > 1 else 1)
                    if dora is None:
                        raise UserError(f"LoRA {label}: DoRA module {m.source!r} has a magnitude of shape {list(ds)} for "
                                        f"weight {list(wshape)}; cannot tell per-input from per-output, refusing to guess")
                c = Contribution(i, m, target, lm.get, dora=dora)
                if m.algo != "full" or "diff" in m.keys:
                    if m.algo != "norm" or "w_norm" in m.keys:
                        by_key.setdefault(target.weight, []).append(c)
                if bias_role(m) is not None and bkey:
                    by_bias.setdefault(bkey, []).append(c)
    if no_te:
        ctx.warn(f"skipped {len(no_te)} text-encoder LoRA modules: {model_label} holds no such text encoder "
                 f"(first: {no_te[0]!r})")
    if skipped:
        if not params.get("allow_unmatched"):
            first = skipped[0]
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise UserError(f"step {ctx.step!r}: LoRA {first}{more}; set allow_unmatched: true to skip such modules")
        ctx.warn(f"skipped {len(skipped)} LoRA modules (allow_unmatched): " + "; ".join(skipped))

    # 3. small per-module scalars (alpha, scale, on_input) and multipliers
    strengths = []
    for i, e in enumerate(entries):
        fn = compile_strength(e["strength"], arch, f"step {ctx.step!r} loras[{i}] strength")
        te = e.get("te_strength")
        strengths.append((fn, te))
    scale_cache: dict[tuple[int, str], float] = {}
    for contribs in list(by_key.values()) + list(by_bias.values()):
        for c in contribs:
            ck = (c.lora, c.module.name)
            if ck not in scale_cache:
                scale_cache[ck] = module_scale(c.module, lora_models[c.lora].specs, c.read)
            c.scale = scale_cache[ck]
            fn, te = strengths[c.lora]
            c.mu = te if (te is not None and c.target.component == "te") else fn(c.target.weight)
            if c.module.algo == "ia3" and "on_input" in c.module.keys:
                c.on_input = bool(int(c.read(c.module.keys["on_input"]).reshape(-1)[0]))

    want = DTYPE_NAMES[params["dtype"]] if params.get("dtype") else None
    specs = {k: TensorSpec(want if (want is not None and s.dtype.is_floating_point) else s.dtype, s.shape)
             for k, s in model.specs.items()}
    device = ctx.device

    def produce(key: str) -> torch.Tensor:
        spec = specs[key]
        contribs = by_key.get(key) or by_bias.get(key)
        if not contribs:
            t = model.get(key)
            return t if t.dtype == spec.dtype else t.to(spec.dtype)
        w = model.get(key).to(device=device, dtype=torch.float32)
        out = w.clone()
        is_bias = key in by_bias
        for c in contribs:
            sl = rows(c.target, w.shape[0])
            w0 = w[sl]
            if is_bias:
                d = c.read(c.module.keys[bias_role(c.module)]).to(device=device, dtype=torch.float32)
                out[sl] += c.mu * place(d.reshape(-1), c.target.src, c.target.swap).reshape(w0.shape)
                continue
            if c.module.algo == "ia3":
                vec = c.read(c.module.keys["weight"]).to(device=device, dtype=torch.float32)
                out[sl] += c.mu * ia3_delta(w0, vec.reshape(-1), c.on_input)
                continue
            d = compute_delta(c.module, lambda k, r=c.read: r(k).to(device))
            d = place(d, c.target.src, c.target.swap).reshape(w0.shape) * c.scale
            if c.dora is not None:
                mag = c.read(c.module.keys["dora_scale"]).to(device=device, dtype=torch.float32)
                out[sl] += c.mu * (dora_weight(w0, d, mag, c.dora) - w0)
            else:
                out[sl] += c.mu * d
        check_finite(out, key, ctx.step)
        return out.to(device="cpu", dtype=spec.dtype).contiguous()

    def key_inputs(key: str) -> KeyInputs:
        """An untouched tensor depends on the base tensor alone; a touched one also on every tensor of the modules
        acting on it and on each module's resolved strength and scale."""
        out: dict[str, Any] = {"dtype": dtype_code(specs[key].dtype)}
        contribs = by_key.get(key) or by_bias.get(key)
        if not contribs:
            return KeyInputs(out, ((0, key),))
        out["bias"] = key in by_bias
        out["modules"] = [{"algo": c.module.algo, "roles": sorted(c.module.keys), "part": c.target.part,
                           "rows": c.target.rows, "src": c.target.src, "swap": c.target.swap, "mu": c.mu,
                           "scale": c.scale, "dora": c.dora, "on_input": c.on_input} for c in contribs]
        reads = [(0, key)] + [(1 + c.lora, c.module.keys[r]) for c in contribs for r in sorted(c.module.keys)]
        return KeyInputs(out, tuple(reads))

    report = []
    for i, (e, p, lm) in enumerate(zip(entries, parsed, lora_models)):
        used = [m for m in p.modules.values()
                if any(c.lora == i and c.module is m for cs in list(by_key.values()) + list(by_bias.values()) for c in cs)]
        algos = Counter(ALGO_TITLES[m.kind(lm.specs)] for m in used)
        r: dict[str, Any] = {"lora": e["lora"], "strength": e["strength"], "modules": len(used),
                             "algorithms": dict(sorted(algos.items())), "naming": p.style}
        if "te_strength" in e:
            r["te_strength"] = e["te_strength"]
        dora = Counter(c.dora for cs in by_key.values() for c in cs if c.lora == i and c.dora)
        if dora:
            r["dora"] = {f"per-{k}": v for k, v in sorted(dora.items())}
        title = lm.metadata.get("ss_output_name") or lm.metadata.get("modelspec.title")
        if title:
            r["title"] = title
        if declared[i] and declared[i] not in FAMILIES:
            r["declared_architecture"] = declared[i]
        if p.skipped:
            r["ignored_tensors"] = len(p.skipped)
            ctx.warn(f"LoRA {labels[i]}: ignored {len(p.skipped)} bundled embedding tensors (bundle_emb.*)")
        report.append(r)
    prov: dict[str, Any] = {"architecture": arch, "loras": report, "targets": len(by_key) + len(by_bias),
                            "application": "W + sum of strength*scale*dW, every network from the original W; DoRA as A1111"}
    if skipped:
        prov["skipped_modules"] = skipped
    if no_te:
        prov["skipped_text_encoder_modules"] = len(no_te)
    return LazyModel(specs, produce, model.metadata, label=ctx.step, info=model.info.derive(provenance=prov),
                     key_inputs=key_inputs)


def _refs(params: dict) -> list[str]:
    return [params["model"]] + [e["lora"] for e in params.get("loras", [])]


register_op(OpSpec(
    name="lora",
    version=VERSION,
    doc="Bake LoRA / LyCORIS files into a checkpoint (kohya, LyCORIS, diffusers/PEFT and XLabs formats)",
    fields=(
        Field("model", "ref", doc="the checkpoint to bake into"),
        Field("loras", "list", doc="[{lora: NAME, strength: S, te_strength: T}]; strength is a number, block weights or "
                                   "an LBW list (17/26 values SD1/SD2, 12/20 SDXL); te_strength (default: strength) "
                                   "replaces it for text-encoder modules",
              validate=lambda v, where: validate_lora_entries(v, where), schema=entries_schema()),
        Field("allow_unmatched", "bool", False, doc="skip (with a warning listing them) modules that map to no key or do not fit"),
        DTYPE_FIELD,
    ),
    build=build_lora,
    references=_refs,
    # LoRA inputs are checked by the parser, which knows more layouts than a kind test
    input_kinds=lambda params: ["checkpoint"] + ["lora"] * len(params.get("loras", [])),
    output_kind="checkpoint",
    formula="W + Σ strength·scale·ΔW (DoRA: W + strength·(W_d − W))",
    category="lora",
))
