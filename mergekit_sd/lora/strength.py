"""LoRA strengths as written in recipes: a number, LoRA block-weight (LBW) lists, or block-weight mappings.

LBW lists (FORMATS.md §3.1) are expanded here to block mappings; blocks a short list does not name get 1, as in
kohya's and the A1111 LBW extension's expansion. Mappings resolve through `weights.compile_weight`; a small local
resolver (default / group / range / block / `re:` keys, most specific wins) covers them where that does not.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..arch.lora_keys import lbw_block
from ..errors import UserError
from ..weights import compile_weight, normalize_weight

SD1_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
LBW_LISTS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
    20: SDXL_BLOCKS,
    26: SD1_BLOCKS,
}
GROUPS = ("BASE", "IN", "M", "OUT", "VAE")
_BLOCK = re.compile(r"^(BASE|VAE|M00|IN\d\d|OUT\d\d)$")


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
    out.update({n: _number(v, f"{where}[{i}]") for i, (n, v) in enumerate(zip(names, values))})
    return out


def _order(arch: str | None) -> list[str]:
    return SDXL_BLOCKS if arch == "sdxl" else SD1_BLOCKS


def _check_selector(sel: str, where: str) -> None:
    if sel == "default" or sel in GROUPS or _BLOCK.match(sel):
        return
    if sel.startswith("re:"):
        try:
            re.compile(sel[3:])
        except re.error as e:
            raise UserError(f"bad regular expression {sel[3:]!r}: {e}", where) from None
        return
    a, dash, b = sel.partition("-")
    if dash and _BLOCK.match(a) and _BLOCK.match(b):
        return
    raise UserError(f"unknown block selector {sel!r}; use default, BASE, IN, M, OUT, a block like IN04, a range like "
                    "IN00-IN05, or re:<regex>", where)


def normalize_strength(value: Any, where: str) -> Any:
    """Canonical form of a strength (what the step key hashes): a float or a block mapping."""
    if isinstance(value, list):
        value = lbw_mapping(value, where)
    if isinstance(value, dict):
        try:
            return normalize_weight(value, where)
        except UserError:
            pass
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"block selector {k!r} must be a string", where)
            _check_selector(k, where)
            out[k] = _number(v, f"{where}: {k}")
        return dict(sorted(out.items()))
    return normalize_weight(value, where)


def local_compile(mapping: dict, arch: str | None) -> Callable[[str], float]:
    """Resolve a block mapping per tensor name: regex, then block, then range, then group, then default."""
    order = _order(arch)
    regexes = [(re.compile(k[3:]), float(v)) for k, v in mapping.items() if k.startswith("re:")]
    ranges = []
    for k, v in mapping.items():
        a, dash, b = k.partition("-")
        if dash and not k.startswith("re:") and a in order and b in order:
            i, j = sorted((order.index(a), order.index(b)))
            ranges.append((set(order[i:j + 1]), float(v)))
    default = float(mapping.get("default", 1.0))

    def weight(key: str) -> float:
        for rx, v in regexes:
            if rx.search(key):
                return v
        block = lbw_block(key, arch or "sd1")
        if block in mapping:
            return float(mapping[block])
        for blocks, v in ranges:
            if block in blocks:
                return v
        group = "M" if block == "M00" else re.sub(r"\d+$", "", block)
        if group in mapping:
            return float(mapping[group])
        return default

    return weight


def compile_strength(value: Any, arch: str | None, modelspec_arch: str | None, where: str) -> Callable[[str], float]:
    """Tensor name -> multiplier for one LoRA."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return lambda _key: v
    try:
        return compile_weight(value, arch=modelspec_arch, rule=None, where=where)
    except (UserError, TypeError, ValueError, KeyError):
        if isinstance(value, dict):
            return local_compile(value, arch)
        raise


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
                from ..errors import did_you_mean

                raise UserError(f"unknown field {k!r}{did_you_mean(k, allowed)}; fields: {', '.join(allowed)}", w)
        if not isinstance(e.get("lora"), str):
            raise UserError("lora must name an input or step", w)
        entry: dict[str, Any] = {"lora": e["lora"], "strength": normalize_strength(e.get("strength", 1.0), f"{w}: strength")}
        if e.get("te_strength") is not None:
            entry["te_strength"] = _number(e["te_strength"], f"{w}: te_strength")
        out.append(entry)
    return out
