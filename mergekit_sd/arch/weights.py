"""Weight parameters (alpha, beta, LoRA strength): a number, or block weights resolved per tensor name.

A weight is written as a number, a list of every block in order (26 for SD1/SD2, 20 or 21 for SDXL, the inputs of
ComfyUI's merge node for Flux and SD3/3.5), a supermerger comma string or preset name (`GRAD_V`), or a mapping of
selectors: `default`, a block (`IN04`, `double_blocks.3`), a range (`IN00-IN05`, `double_blocks.0-9`), a group
(`BASE`, `IN`, `M`, `OUT`; `DOUBLE`, `SINGLE`, `JOINT`, `TE`; `VAE`) or `re:<regex>` on tensor names. The most
specific selector wins: regex, then VAE, then block, then the narrowest range, then group, then default. `default`
and `re:` work on every model; named blocks and lists need an architecture with a block map.

`normalize_weight` runs when the recipe is loaded and returns the canonical form the step key hashes, so spellings
with one meaning share one cache entry (a preset, its 26-number string and the same list; `IN4` and `IN04`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from mergekit_sd.arch.blocks import (
    FAMILY_BLOCKS,
    FAMILY_NAME,
    LIST_LENGTHS,
    Selector,
    family_of,
    get_rule,
    is_transformer,
    is_vae_key,
    list_lengths_text,
    list_to_blocks,
    parse_number,
    parse_selector,
    parse_weight_string,
    presets,
)
from mergekit_sd.errors import UserError, did_you_mean


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"expected a number, got {v!r}", where)
    if not math.isfinite(v):
        raise UserError(f"weight {v!r} must be finite", where)
    return float(v)


def _canonical_list(values: list[float], where: str) -> Any:
    if len(values) not in LIST_LENGTHS:
        raise UserError(f"block weights list has {len(values)} values; {list_lengths_text()}", where)
    # a list valid on both families whose values are all equal is the number itself
    if len(values) in (26, 27) and len(set(values)) == 1:
        return values[0]
    return values


def normalize_weight(value: Any, where: str) -> Any:
    """Validate a weight as written in a recipe and return its canonical form (what the step key hashes)."""
    if isinstance(value, bool):
        raise UserError(f"expected a number or block weights, got {value!r}", where)
    if isinstance(value, (int, float)):
        return _number(value, where)
    if isinstance(value, str):
        text = value.strip()
        if "," in text or "\n" in text:
            return _canonical_list(parse_weight_string(text, where), where)
        try:
            return _number(float(text), where)
        except ValueError:
            pass
        table = presets()
        if text not in table:
            raise UserError(f"unknown block weight preset {text!r}{did_you_mean(text, table)}; known presets: {', '.join(table)}", where)
        return _canonical_list(list(table[text]), where)
    if isinstance(value, list):
        vals = []
        for i, v in enumerate(value):
            if isinstance(v, str):
                vals.append(parse_number(v, f"{where}[{i}]"))
            else:
                vals.append(_number(v, f"{where}[{i}]"))
        return _canonical_list(vals, where)
    if isinstance(value, dict):
        if not value:
            raise UserError("block weights mapping is empty; give at least `default`", where)
        out: dict[str, float] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"block selector {k!r} must be a string", where)
            sel = parse_selector(k, f"{where}.{k}")
            if sel.text in out:
                raise UserError(f"block selector {k!r} repeats {sel.text}", where)
            out[sel.text] = _number(v, f"{where}.{k}")
        if list(out) == ["default"]:
            return out["default"]
        return dict(sorted(out.items()))
    raise UserError(f"expected a number or block weights, got {type(value).__name__}", where)


def is_block_weight(value: Any) -> bool:
    """True when a normalised weight varies by tensor (a list or a mapping)."""
    return isinstance(value, (list, dict))


def _arch_text(arch: Any) -> str:
    """How messages name the model's architecture."""
    describe = getattr(arch, "describe", None)
    return describe() if callable(describe) else str(arch if arch is not None else "unknown")


def _need_family(family: str | None, arch: Any, what: str, where: str, label: str | None) -> str:
    if family is None:
        raise UserError(f"{what} need a known architecture with a block map (SD1, SD2, SDXL, Flux.1, SD3/SD3.5), but "
                        f"{label or 'this model'} is {_arch_text(arch)}; use a number, or a mapping of `default` and "
                        "`re:<regex>` selectors", where)
    return family


def _selectors(value: dict, family: str | None, arch: Any, where: str, label: str | None) -> list[tuple[Selector, float]]:
    out = []
    for text, v in value.items():
        sel = parse_selector(text, where)
        if sel.named:
            _need_family(family, arch, f"named blocks ({sel.text})", where, label)
            sel.check_family(family, where)
        out.append((sel, float(v)))
    return out


def check_weight(value: Any, *, arch: Any = None, rule: str | None = None, where: str = "", label: str | None = None) -> None:
    """Everything `compile_weight` can refuse without tensor names: an architecture without a block map, a block,
    range or group the architecture lacks, a list of the wrong length, a rule without a map for the family."""
    compile_weight(value, arch=arch, rule=rule, where=where, label=label)


def outside_list(value: Any, *, arch: Any = None) -> Callable[[str], bool] | None:
    """For a block list on a transformer model: tensor name -> True when the tensor lies outside the named blocks
    (text encoders, VAE, others), which a merge keeps from its first model as ComfyUI's merge nodes do; else None."""
    family = family_of(arch)
    if not isinstance(value, list) or not is_transformer(family):
        return None
    fn = get_rule(None, family=family).map_for(family)
    named = set(FAMILY_BLOCKS[family])
    return lambda key: fn(key) not in named


def compile_weight(value: Any, *, arch: Any = None, rule: str | None = None, where: str = "",
                   label: str | None = None) -> Callable[[str], float]:
    """A function from tensor name to the float weight for that tensor.

    `arch` is an ArchInfo, an architecture id (`sd1`, `sdxl`, `flux`), a ModelSpec string or a block family; `rule`
    a block rule id (default: supermerger-2025 for SD1/SD2/SDXL, comfyui-2024 for Flux and SD3/3.5). `default` and
    `re:` selectors work on any model; named blocks and lists on a model without a block map are a UserError. The
    function raises UserError for a tensor that no selector covers (a mapping without `default`, a list on a tensor
    outside the named blocks). `label` names the model in messages.
    """
    if isinstance(value, bool):
        raise UserError(f"unsupported weight {value!r}", where)
    if isinstance(value, (int, float)):
        v = float(value)
        return lambda _key: v
    if not isinstance(value, (list, dict)):
        value = normalize_weight(value, where)
        return compile_weight(value, arch=arch, rule=rule, where=where, label=label)
    family = family_of(arch)
    block_map: Callable[[str], str | None] | None = None
    if family is not None:
        block_map = get_rule(rule, where, family).map_for(family)  # fails early when the rule has no map for the family

    if isinstance(value, list):
        table = list_to_blocks([float(x) for x in value], _need_family(family, arch, "block weights lists", where, label), where)
        vae = table.get("VAE")
        transformer = is_transformer(family)

        def from_list(key: str) -> float:
            if vae is not None and is_vae_key(key):
                return vae
            block = block_map(key)
            if transformer and block not in table:
                raise UserError(f"tensor {key!r} ({block}) is outside the named blocks of {FAMILY_NAME[family]} that a block "
                                "list covers; use a mapping with `default`, TE or VAE", where)
            return table[block if block is not None else "BASE"]

        return from_list

    selectors = _selectors(value, family, arch, where, label)
    selectors.sort(key=lambda sv: sv[0].rank, reverse=True)
    fallback = "BASE" if family is not None and not is_transformer(family) else None

    def from_mapping(key: str) -> float:
        block = block_map(key) if block_map is not None else None
        block = block if block is not None else fallback
        best: tuple | None = None
        for sel, v in selectors:
            if best is not None and sel.rank < best[0].rank:
                break
            if sel.matches(key, block, family):
                if best is None:
                    best = (sel, v)
                elif v != best[1]:
                    raise UserError(f"tensor {key!r} matches both {best[0].text!r} and {sel.text!r} with different weights; "
                                    "make them disjoint", where)
        if best is None:
            raise UserError(f"block weights do not cover tensor {key!r}" + (f" (block {block})" if block else "")
                            + "; add `default:`", where)
        return best[1]

    return from_mapping
