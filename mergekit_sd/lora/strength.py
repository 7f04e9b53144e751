"""LoRA strengths as written in recipes: a number, LoRA block-weight (LBW) lists, or block-weight mappings.

LBW lists (docs/formats.md §3.1) are expanded here to block mappings; blocks a short list does not name get 1, as in
kohya's and the A1111 LBW extension's expansion. Mappings, presets and numbers are weights like any other and
resolve through `weights.compile_weight`.
"""

from __future__ import annotations

from typing import Any, Callable

from mergekit_sd.arch.blocks import parse_number, parse_weight_string
from mergekit_sd.errors import UserError, did_you_mean
from mergekit_sd.arch.weights import compile_weight, normalize_weight

SD1_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
LBW_LISTS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
    20: SDXL_BLOCKS,
    26: SD1_BLOCKS,
}


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise UserError(f"expected a number, got {v!r}", where)
    return float(v)


def lbw_mapping(values: list, where: str) -> dict[str, float]:
    """An LBW list (17 / 12 / 20 / 26 values, BASE first) -> {block: weight}, unnamed blocks 1."""
    names = LBW_LISTS.get(len(values))
    if names is None:
        raise UserError(f"a block-weight list has 17 or 26 values (SD1/SD2) or 12 or 20 (SDXL), got {len(values)}", where)
    out = {"default": 1.0}
    for i, (n, v) in enumerate(zip(names, values)):
        out[n] = parse_number(v, f"{where}[{i}]") if isinstance(v, str) else _number(v, f"{where}[{i}]")
    return out


def normalize_strength(value: Any, where: str) -> Any:
    """Canonical form of a strength (what the step key hashes): a float or a block mapping. LBW lists and
    comma strings become mappings here; everything else is a weight like any other (`weights.normalize_weight`)."""
    if isinstance(value, str) and ("," in value or "\n" in value):
        value = parse_weight_string(value.strip(), where)
    if isinstance(value, list):
        value = lbw_mapping(value, where)
    return normalize_weight(value, where)


def compile_strength(value: Any, arch: str, where: str) -> Callable[[str], float]:
    """Tensor name -> multiplier for one LoRA (blocks by the default block rule: TE -> BASE, input block n -> INnn,
    middle -> M00, output n -> OUTnn)."""
    return compile_weight(value, arch=arch, rule=None, where=where)


def validate_lora_entries(value: Any, where: str, *, te: bool = True) -> list[dict]:
    """`loras: [{lora: NAME, strength: S, te_strength: T?}]` -> canonical entries (strength defaults to 1)."""
    if not isinstance(value, list) or not value:
        raise UserError("loras must be a non-empty list of {lora: NAME, strength: S}", where)
    allowed = ("lora", "strength", "te_strength") if te else ("lora", "strength")
    out = []
    for i, e in enumerate(value):
        w = f"{where}[{i}]"
        if isinstance(e, str):
            e = {"lora": e}
        if not isinstance(e, dict):
            raise UserError("each entry is a mapping {lora: NAME, strength: S}", w)
        for k in e:
            if k not in allowed:
                raise UserError(f"unknown field {k!r}{did_you_mean(k, allowed)}; fields: {', '.join(allowed)}", w)
        if not isinstance(e.get("lora"), str):
            raise UserError("lora must name an input or step", w)
        entry: dict[str, Any] = {"lora": e["lora"], "strength": normalize_strength(e.get("strength", 1.0), f"{w}: strength")}
        if e.get("te_strength") is not None:
            entry["te_strength"] = _number(e["te_strength"], f"{w}: te_strength")
        out.append(entry)
    return out


def entries_schema(te: bool = True) -> dict:
    """JSON Schema of a `loras:` list (for `sdbuild schema`)."""
    props: dict[str, Any] = {"lora": {"type": "string"},
                             "strength": {"description": "number, block weights mapping, or an LBW list/string (17/26 SD1/SD2, 12/20 SDXL)"}}
    if te:
        props["te_strength"] = {"type": "number", "description": "multiplier of text-encoder modules (default: strength)"}
    return {"type": "array", "minItems": 1,
            "items": {"oneOf": [{"type": "string"},
                                {"type": "object", "required": ["lora"], "additionalProperties": False, "properties": props}]}}
