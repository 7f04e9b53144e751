"""The AUTOMATIC1111 and supermerger merge-metadata codec: `sd_merge_recipe` / `sd_merge_models` read and written.

Most merged models on the web carry AUTOMATIC1111's `sd_merge_recipe` / `sd_merge_models` metadata (or
supermerger's variant of it). This module reads those fields exactly as AUTOMATIC1111 does (a value is
JSON-decoded only when it starts with `{`) into a `MergeRecord` mapped onto our ops, and writes the same fields
for our outputs so those tools can display and propagate them (docs/formats.md §4). Their file hashes live in
`mergekit_sd.formats.digests`; turning a record back into a recipe is `provenance.recover`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mergekit_sd.ops import op_defaults

# our ops that AUTOMATIC1111's merger can express (`interp_method`), with a scalar multiplier
WEBUI_METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "sigmoid": "Sigmoid",
                 "inverse_sigmoid": "Inverse Sigmoid"}
# our ops that supermerger can express: op -> (mode, calcmode)
SUPERMERGER_OPS: dict[str, tuple[str, str]] = {
    "weighted_sum": ("Weight sum", "normal"),
    "add_difference": ("Add difference", "normal"),
    "triple_sum": ("Triple sum", "normal"),
    "sum_twice": ("sum Twice", "normal"),
    "cosine_a": ("Weight sum", "cosineA"),
    "cosine_b": ("Weight sum", "cosineB"),
    "train_difference": ("Add", "trainDifference"),
    "smooth_add": ("Add difference", "smoothAdd"),
    "extract_merge": ("Add", "extract"),
    "tensor_swap": ("Weight sum", "tensor"),
    "tensor_swap2": ("Weight sum", "tensor2"),
    "self_scale": ("Weight sum", "self"),
}
# supermerger calcmode -> our op (modes "normal" map by mode instead)
CALCMODE_OPS = {
    "cosineA": "cosine_a",
    "cosineB": "cosine_b",
    "trainDifference": "train_difference",
    "smoothAdd": "smooth_add",
    "smoothAdd MT": "smooth_add",
    "extract": "extract_merge",
    "tensor": "tensor_swap",
    "tensor2": "tensor_swap2",
    "self": "self_scale",
}
# how many models each op reads (formula order A, B, C)
OP_ARITY = {"weighted_sum": 2, "add_difference": 3, "sigmoid": 2, "inverse_sigmoid": 2, "triple_sum": 3, "sum_twice": 3, "cosine_a": 2, "cosine_b": 2,
            "train_difference": 3, "smooth_add": 3, "extract_merge": 3, "tensor_swap": 2, "tensor_swap2": 2,
            "self_scale": 1}
# ops with one model that AUTOMATIC1111 would record as "No interpolation"
PASS_THROUGH_OPS = ("prune", "convert")
BLOCK_COUNTS = {26: "sd1", 20: "sdxl", 21: "sdxl"}
ANCESTRY_LIMIT = 2_000_000  # characters of inherited sd_merge_models entries carried forward
SUPERMERGER_RULE = "supermerger-2025"  # the block rule current supermerger applies (recipes recovered from it use it)
EXTRACT_GAMMA = 0.3  # supermerger's default option(gamma), which its recipes do not record


# ----------------------------------------------------------------------------------------------------------------
# reading metadata the way AUTOMATIC1111 does


def read_webui_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """AUTOMATIC1111's `read_metadata_from_safetensors`: decode a value as JSON only when it starts with `{`."""
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        out[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


@dataclass(frozen=True)
class ModelRef:
    """One model a merge read: its file sha256, display name, legacy hash and (when it was a merge) its recipe."""

    sha256: str | None
    name: str | None = None
    legacy_hash: str | None = None
    recipe: Mapping[str, Any] | None = None


@dataclass
class MergeRecord:
    """A foreign merge recipe mapped onto our ops, with everything that could not be mapped spelt out."""

    flavour: str  # "webui" | "sd-webui-supermerger" | "sdbuild" | whatever `type` said
    op: str | None
    models: list[ModelRef]
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line per field or value that could not be mapped
    ancestry: dict[str, ModelRef] = field(default_factory=dict)  # sd_merge_models entries beyond the direct inputs
    custom_name: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


def _models_table(decoded: Mapping[str, Any]) -> dict[str, ModelRef]:
    table = decoded.get("sd_merge_models")
    out: dict[str, ModelRef] = {}
    if isinstance(table, dict):
        for sha, entry in table.items():
            if not isinstance(entry, dict):
                entry = {}
            rec = entry.get("sd_merge_recipe")
            out[str(sha).lower()] = ModelRef(str(sha).lower(), _str_or_none(entry.get("name")), _str_or_none(entry.get("legacy_hash")),
                                             rec if isinstance(rec, dict) else None)
    return out


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _ref(sha: Any, table: Mapping[str, ModelRef]) -> ModelRef | None:
    if not isinstance(sha, str) or not sha:
        return None
    s = sha.lower()
    return table.get(s) or ModelRef(s if re.fullmatch(r"[0-9a-f]{64}", s) else None, None if re.fullmatch(r"[0-9a-f]{64}", s) else sha)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def parse_merge_metadata(metadata: Mapping[str, str]) -> MergeRecord | None:
    """The merge described by `sd_merge_recipe` (+ `sd_merge_models`), or None when the file has none."""
    decoded = read_webui_metadata(metadata)
    recipe = decoded.get("sd_merge_recipe")
    if not isinstance(recipe, dict):
        return None
    table = _models_table(decoded)
    return parse_recipe_object(recipe, table)


def parse_recipe_object(recipe: Mapping[str, Any], table: Mapping[str, ModelRef]) -> MergeRecord:
    """Map one decoded `sd_merge_recipe` object onto our ops; `table` is the decoded `sd_merge_models`."""
    kind = str(recipe.get("type", ""))
    if kind == "webui" or ("interp_method" in recipe and "primary_model_hash" in recipe):
        rec = _parse_webui(recipe, table)
    elif kind == "sd-webui-supermerger" or ("calcmode" in recipe and "model_a" in recipe):
        rec = _parse_supermerger(recipe, table)
    elif kind == "sdbuild":
        rec = _parse_sdbuild(recipe, table)
    else:
        rec = MergeRecord(kind or "unknown", None, [], notes=[f"sd_merge_recipe of type {kind or '(none)'!r} is not understood: {json.dumps(recipe, sort_keys=True)[:300]}"])
    direct = {m.sha256 for m in rec.models if m.sha256}
    rec.ancestry = {sha: ref for sha, ref in table.items() if sha not in direct}
    rec.raw = dict(recipe)
    return rec


def _parse_webui(r: Mapping[str, Any], table: Mapping[str, ModelRef]) -> MergeRecord:
    method = str(r.get("interp_method") or "")
    m = _number(r.get("multiplier"))
    shas = [r.get("primary_model_hash"), r.get("secondary_model_hash"), r.get("tertiary_model_hash")]
    refs = [_ref(s, table) for s in shas]
    notes: list[str] = []
    params: dict[str, Any] = {}
    if m is None:
        notes.append(f"multiplier {r.get('multiplier')!r} is not a number; 0.3 (the web UI default) used")
        m = 0.3
    if method == "Weighted sum":
        op, want = "weighted_sum", 2
        params["alpha"] = m
    elif method == "Add difference":
        op, want = "add_difference", 3
        params["alpha"] = m
    elif method in ("Sigmoid", "Inverse Sigmoid"):  # early A1111: A + (B - A) * M'
        want = 2
        op = "sigmoid" if method == "Sigmoid" else "inverse_sigmoid"
        params["alpha"] = m
        if op_defaults(op) is None:  # without the legacy ops, the same formula as a weighted sum with alpha M'
            if method == "Sigmoid":
                params["alpha"] = m * m * (3 - 2 * m)
            else:
                params["alpha"] = 0.5 - math.sin(math.asin(max(-1.0, min(1.0, 1 - 2 * m))) / 3)
            notes.append(f"interp_method {method!r} with multiplier {m} is a weighted sum with alpha M' = {params['alpha']!r}")
            op = "weighted_sum"
    elif method == "No interpolation":
        op, want = None, 1
    else:
        op, want = None, 1
        notes.append(f"interp_method {method!r} is not known; the primary model is passed through")
    models = [x for x in refs[:want] if x is not None]
    if len(models) < want:
        notes.append(f"interp_method {method!r} needs {want} models but the recipe names {len(models)}")
    if r.get("save_as_half") is True:
        params["dtype"] = "fp16"
    vae = r.get("bake_in_vae")
    if vae not in (None, "", "None"):
        notes.append(f"bake_in_vae {vae!r}: the VAE is named but not hashed, so it cannot be pinned; bake it with a VAE step")
    dw = r.get("discard_weights")
    if dw:
        notes.append(f"discard_weights {dw!r}: tensors matching this regex were deleted after merging")
    cs = r.get("config_source")
    if cs not in (None, 3):
        notes.append(f"config_source {cs!r}: the web UI copied an input's .yaml config next to the output; sdbuild does not copy configs")
    if r.get("is_inpainting") is True or r.get("is_instruct_pix2pix") is True:
        notes.append("the first model is an inpainting/instruct-pix2pix model: the dim-1 rule applies automatically")
    if r.get("sdbuild_op"):
        notes.append(f"sdbuild_op {r['sdbuild_op']!r}: sdbuild's {r['sdbuild_op']} op made this file; its sdbuild provenance replays it exactly")
    known = {"type", "primary_model_hash", "secondary_model_hash", "tertiary_model_hash", "interp_method", "multiplier", "save_as_half",
             "custom_name", "config_source", "bake_in_vae", "discard_weights", "is_inpainting", "is_instruct_pix2pix", "sdbuild_op"}
    for k in sorted(set(r) - known):
        notes.append(f"field {k!r} = {json.dumps(r[k], sort_keys=True)[:200]} is not mapped")
    return MergeRecord("webui", op, models, params, notes, custom_name=str(r.get("custom_name") or ""))


def _weights_from(r: Mapping[str, Any], which: str, base: float | None, notes: list[str]) -> list[float] | None:
    """A RECIPE block-weight list (BASE first) from supermerger's `weights_<which>_orig` / `weights_<which>`."""
    orig = r.get(f"weights_{which}_orig")
    if isinstance(orig, str) and orig.strip():
        vals = [_number(x) for x in orig.split(",")]
        if all(v is not None for v in vals) and len(vals) in BLOCK_COUNTS:
            return [float(v) for v in vals]  # type: ignore[arg-type]
        if "," not in orig:
            notes.append(f"weights_{which}_orig {orig!r} names a preset or random tokens; the resolved weights_{which} list is used")
    lst = r.get(f"weights_{which}")
    if isinstance(lst, list) and lst:
        vals = [_number(x) for x in lst]
        if all(v is not None for v in vals):
            head = [float(base if base is not None else 0.0)]
            tail = [float(v) for v in vals]  # type: ignore[arg-type]
            if len(tail) == 25:
                return head + tail
            if len(tail) in (19, 20):
                return head + tail  # SDXL: a 20th tail value is the VAE slot
        notes.append(f"weights_{which} {json.dumps(lst)[:200]} has {len(lst)} values, which match no known block list")
    return None


def _parse_supermerger(r: Mapping[str, Any], table: Mapping[str, ModelRef]) -> MergeRecord:
    notes: list[str] = []
    mode = str(r.get("mode") or "")
    calc = str(r.get("calcmode") or "normal")
    if calc == "normal":
        if "Twice" in mode:
            op = "sum_twice"
        elif "Triple" in mode:
            op = "triple_sum"
        elif "Add" in mode:
            op = "add_difference"
        elif "Weight" in mode:
            op = "weighted_sum"
        else:
            op = "weighted_sum"
            notes.append(f"mode {mode!r} is not known; a weighted sum is used")
    elif calc in CALCMODE_OPS:
        op = CALCMODE_OPS[calc]
        if calc == "smoothAdd MT":
            notes.append("calcmode 'smoothAdd MT' is smoothAdd computed in threads: same result")
    else:
        op = {"Twice": "sum_twice", "Triple": "triple_sum", "Add": "add_difference"}.get(
            next((w for w in ("Twice", "Triple", "Add") if w in mode), ""), "weighted_sum")
        notes.append(f"calcmode {calc!r} has no sdbuild op (it is random or unknown); plain {op} used, so the result WILL differ")
    arity = OP_ARITY.get(op, 2)
    refs = [_ref(r.get(k), table) for k in ("model_a", "model_b", "model_c")]
    models = [x for x in refs[:arity] if x is not None]
    if len(models) < arity:
        notes.append(f"{op} needs {arity} models but the recipe names {len(models)}")
    params: dict[str, Any] = {}
    a = _number(r.get("base_alpha"))
    b = _number(r.get("base_beta"))
    uses_beta = op in ("triple_sum", "sum_twice", "tensor_swap", "tensor_swap2", "extract_merge")
    if r.get("mbw") is True:
        wa = _weights_from(r, "alpha", a, notes)
        if wa is not None:
            params["alpha"] = wa
        elif a is not None:
            params["alpha"] = a
        if uses_beta:
            wb = _weights_from(r, "beta", b, notes)
            if wb is not None:
                params["beta"] = wb
            elif b is not None:
                params["beta"] = b
    else:
        if a is not None:
            params["alpha"] = a
        if uses_beta and b is not None:
            params["beta"] = b
    if "alpha" not in params:
        notes.append(f"base_alpha {r.get('base_alpha')!r} is not a number; the op's default alpha is used")
    if op == "extract_merge":
        notes.append(f"supermerger does not record option(gamma) for calcmode 'extract'; its default {EXTRACT_GAMMA} is used")
        params["gamma"] = EXTRACT_GAMMA
    elem = r.get("elemental_merge")
    if elem and elem != [""]:
        entries = elem if isinstance(elem, list) else [str(elem)]
        params["elemental"] = [str(e) for e in entries if str(e).strip()]
    for inex in ("Include", "Exclude"):
        v = r.get(inex)
        if isinstance(v, list):
            items = [str(x).strip() for x in v if str(x).strip() and str(x).strip() != "print"]  # `print` is a debug switch
            if items:
                params[inex.lower()] = items
    # supermerger copies keys present in B but missing from A into the output (docs/formats.md §2.2 stage 2)
    if arity >= 2:
        params["on_missing"] = "take_b"
    known = {"type", "weights_alpha", "weights_beta", "weights_alpha_orig", "weights_beta_orig", "model_a", "model_b", "model_c",
             "base_alpha", "base_beta", "mode", "mbw", "elemental_merge", "calcmode", "Off", "Include", "Exclude"}
    for k in sorted(set(r) - known):
        notes.append(f"field {k!r} = {json.dumps(r[k], sort_keys=True)[:200]} is not mapped")
    return MergeRecord("sd-webui-supermerger", op, models, params, notes)


def _parse_sdbuild(r: Mapping[str, Any], table: Mapping[str, ModelRef]) -> MergeRecord:
    shas = r.get("models") or []
    models = [x for x in (_ref(s, table) for s in shas) if x is not None]
    params = dict(r.get("params") or {})
    return MergeRecord("sdbuild", str(r.get("op") or "") or None, models, params)


# ----------------------------------------------------------------------------------------------------------------
# writing the fields AUTOMATIC1111-family tools read


@dataclass(frozen=True)
class MergeInput:
    """A model a step read, as AUTOMATIC1111's fields describe it."""

    sha256: str | None
    name: str  # file name (with extension)
    legacy_hash: str | None = None
    recipe: Mapping[str, Any] | None = None  # the input's own decoded sd_merge_recipe, if it was a merge
    models: Mapping[str, Any] | None = None  # the input's own decoded sd_merge_models (flattened into ours)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _block_list(v: Any) -> list[float] | None:
    if isinstance(v, (list, tuple)) and len(v) in BLOCK_COUNTS and all(_is_scalar(x) for x in v):
        return [float(x) for x in v]
    return None


def _webui_record(shas: Sequence[str | None], interp: str, multiplier: float, half: bool, custom_name: str,
                  bake_in_vae: str = "None") -> dict[str, Any]:
    """AUTOMATIC1111's `sd_merge_recipe`, field for field in its order (docs/formats.md §4.2)."""
    return {
        "type": "webui",
        "primary_model_hash": shas[0],
        "secondary_model_hash": shas[1] if len(shas) > 1 else None,
        "tertiary_model_hash": shas[2] if len(shas) > 2 else None,
        "interp_method": interp,
        "multiplier": multiplier,
        "save_as_half": half,
        "custom_name": custom_name,
        "config_source": 3,  # "Don't": sdbuild copies no .yaml configs
        "bake_in_vae": bake_in_vae,
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
    }


def merge_recipe_object(op: str, params: Mapping[str, Any], inputs: Sequence[MergeInput], custom_name: str = "") -> dict[str, Any]:
    """The `sd_merge_recipe` object for a step: AUTOMATIC1111's when it can express it, else supermerger's, else ours."""
    shas = [i.sha256 for i in inputs]
    alpha = params.get("alpha")
    extras = {k for k, v in params.items() if k not in ("alpha", "beta", "dtype", "on_missing", "models", "model", "block_rule") and v not in (None, "", [], {})}
    # AUTOMATIC1111 keeps A's tensors where B has none and drops B-only tensors: only `on_missing: keep_a` is its merge
    webui_keys = params.get("on_missing") in (None, "keep_a")
    half = params.get("dtype") == "fp16"
    if op in WEBUI_METHODS and _is_scalar(alpha) and not extras and webui_keys and len(inputs) == OP_ARITY[op]:
        return _webui_record(shas, WEBUI_METHODS[op], float(alpha), half, custom_name)
    if op == "vae" and len(inputs) == 2:  # AUTOMATIC1111 bakes a VAE during a "No interpolation" merge
        return dict(_webui_record(shas[:1], "No interpolation", 0.0, half, custom_name, bake_in_vae=inputs[1].name), sdbuild_op=op)
    if op in PASS_THROUGH_OPS and len(inputs) == 1:
        return dict(_webui_record(shas, "No interpolation", 0.0, half, custom_name), sdbuild_op=op)
    sm = _supermerger_object(op, params, shas, extras)
    if sm is not None:
        return sm
    clean = {k: v for k, v in params.items() if k not in ("models", "model") and v is not None}
    return {"type": "sdbuild", "op": op, "models": shas, "params": _jsonable(clean)}


def _supermerger_object(op: str, params: Mapping[str, Any], shas: list[str | None], extras: set[str]) -> dict[str, Any] | None:
    if op not in SUPERMERGER_OPS or extras - {"elemental", "include", "exclude", "gamma"}:
        return None
    if params.get("on_missing") == "error":
        return None
    if params.get("block_rule") not in (None, SUPERMERGER_RULE):
        return None  # supermerger's record cannot say which key->block rule mapped the weights
    if "gamma" in extras and params.get("gamma") != EXTRACT_GAMMA:
        return None  # supermerger does not record option(gamma); only its default replays
    arity = OP_ARITY[op]
    if len(shas) != arity:
        return None
    mode, calc = SUPERMERGER_OPS[op]
    weights: dict[str, Any] = {}
    for which in ("alpha", "beta"):
        v = params.get(which, 0.0 if which == "beta" else None)
        if v is None:
            return None
        if _is_scalar(v):
            weights[which] = (float(v), None)
            continue
        blocks = _block_list(v)
        if blocks is None:
            return None  # selector mappings cannot be written as supermerger lists without the block map
        weights[which] = (blocks[0], blocks)
    mbw = any(w[1] is not None for w in weights.values())
    out: dict[str, Any] = {"type": "sd-webui-supermerger"}
    for which in ("alpha", "beta"):
        base, blocks = weights[which]
        if blocks is None and mbw:
            blocks = [base] * (len(weights["alpha"][1] or weights["beta"][1]))
        if blocks is None:
            out[f"weights_{which}"] = None
        else:
            tail = blocks[1:]
            if len(blocks) == 20:
                tail = tail + [0.0]  # supermerger's SDXL lists end with a VAE slot
            out[f"weights_{which}"] = tail
    for which in ("alpha", "beta"):
        base, blocks = weights[which]
        if blocks is None and mbw:
            blocks = [base] * (len(weights["alpha"][1] or weights["beta"][1]))
        out[f"weights_{which}_orig"] = None if blocks is None else ",".join(repr(float(x)) for x in blocks[:20 if len(blocks) == 21 else None])
    a, b, c = (shas + [None, None, None])[:3]
    if op == "self_scale":
        b = a
    out.update({
        "model_a": a,
        "model_b": b,
        "model_c": c if c is not None else a,
        "base_alpha": weights["alpha"][0],
        "base_beta": weights["beta"][0],
        "mode": mode,
        "mbw": mbw,
        "elemental_merge": list(params.get("elemental") or []) or "",
        "calcmode": calc,
    })
    inc, exc = params.get("include"), params.get("exclude")
    if inc:
        out["Include"] = list(inc)
    elif exc:
        out["Exclude"] = list(exc)
    else:
        out["Off"] = [""]
    return out


def _jsonable(v: Any) -> Any:
    """JSON-ready with mapping keys sorted: the record must not depend on the order fields were written in."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def merge_models_object(inputs: Sequence[MergeInput]) -> dict[str, Any]:
    """`sd_merge_models`: sha256 -> name, legacy hash and nested recipe; inputs' own tables flattened in."""
    out: dict[str, Any] = {}
    for i in inputs:
        if not i.sha256:
            continue
        out[i.sha256] = {"name": i.name, "legacy_hash": i.legacy_hash or "", "sd_merge_recipe": dict(i.recipe) if i.recipe else None}
    size = len(json.dumps(out))
    for i in inputs:
        for sha, entry in (i.models or {}).items():
            if sha not in out and isinstance(entry, dict):
                n = len(json.dumps(entry)) + len(sha) + 6
                if size + n > ANCESTRY_LIMIT:
                    continue  # a hostile or absurd ancestry table must not push the header towards 100 MB
                size += n
                out[sha] = entry
    return out


def merge_fields(op: str, params: Mapping[str, Any], inputs: Sequence[MergeInput], custom_name: str = "") -> dict[str, str]:
    """The AUTOMATIC1111-compatible metadata pair, serialised as AUTOMATIC1111 does (json.dumps defaults)."""
    return {
        "sd_merge_recipe": json.dumps(merge_recipe_object(op, params, inputs, custom_name)),
        "sd_merge_models": json.dumps(merge_models_object(inputs)),
    }


def input_from_metadata(sha256: str | None, name: str, legacy: str | None, metadata: Mapping[str, str] | None) -> MergeInput:
    """A MergeInput for a file, carrying its own merge recipe and model table when it has them."""
    decoded = read_webui_metadata(metadata or {})
    rec = decoded.get("sd_merge_recipe")
    models = decoded.get("sd_merge_models")
    return MergeInput(sha256, name, legacy, rec if isinstance(rec, dict) else None, models if isinstance(models, dict) else None)


def describe(rec: MergeRecord) -> str:
    """A one-line human description of a merge, for comments."""
    ps = ", ".join(f"{k} {json.dumps(v)}" for k, v in rec.params.items() if k in ("alpha", "beta") and _is_scalar(v))
    ms = ", ".join((m.sha256 or m.name or "?")[:10] for m in rec.models)
    return f"{rec.op or 'no interpolation'}({ms}){' ' + ps if ps else ''}"
