"""LoRA module name -> target tables of Flux and SD3/3.5 (docs/keys.md#flux-and-sd3-lora-names).

The architecture module supplies the names (`Architecture.lora_aliases`: diffusers, XLabs, ... names of each
BFL/MMDiT layer with the rows they write; the kohya name is the BFL path). Each name is laid onto the tensors of the
model's naming: the BFL tensor itself (ComfyUI/BFL naming) or the diffusers tensors it is split into, by intersecting
row ranges, so one table holds every combination of LoRA format and model naming.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

from mergekit_sd.arch import registry
from mergekit_sd.arch.architecture import BARE, COMFYUI, DIFFUSERS
from mergekit_sd.arch.lora_target import Rows, Table, Target, kohya
from mergekit_sd.arch.prefixes import UNET

# transformer architectures with a LoRA name table, in the order a LoRA is tried against them
TRANSFORMER_ARCHES = tuple(a.id for a in registry.all_architectures() if a.lora_aliases is not None)


def _intersect(place: Rows | None, piece: Rows | None) -> tuple[Rows | None, Rows | None] | None:
    """(rows of the piece written, rows of the module's ΔW used), or None when they do not overlap. `place` is where
    the module writes in the whole tensor, `piece` where a separately stored part of that tensor lies (as fractions)."""
    a, b, n = place if place is not None else (0, 1, 1)
    c, d, m = piece if piece is not None else (0, 1, 1)
    a, b, c, d = a * m, b * m, c * n, d * n  # over the common denominator n·m
    lo, hi = max(a, c), min(b, d)
    if lo >= hi:
        return None
    dst = None if (lo, hi) == (c, d) else _reduce(lo - c, hi - c, d - c)
    src = None if (lo, hi) == (a, b) else _reduce(lo - a, hi - a, b - a)
    return dst, src


def _reduce(start: int, stop: int, of: int) -> Rows:
    g = gcd(gcd(start, stop), of)
    return (start // g, stop // g, of // g)


@lru_cache(maxsize=None)
def transformer_table(arch_id: str, naming: str) -> Table:
    """Every LoRA module name (kohya, diffusers/PEFT, XLabs) of a Flux/SD3 model in `naming`, with where it lands.

    Names are taken from the architecture's `lora_aliases` in BFL space (the kohya name is the BFL path) and laid onto
    the tensors of the naming: the BFL tensor itself (ComfyUI/BFL) or the diffusers parts it is split into."""
    a = registry.get(arch_id)
    bare = registry.named_reference(arch_id, BARE)
    prefix = UNET if naming == COMFYUI else ""
    modules: dict[str, Target] = {}
    multi: dict[str, tuple[Target, ...]] = {}
    preferred: dict[Target, str] = {}
    paths: dict[Target, str] = {}

    def add(name: str, targets: list[Target], prefer: bool = False) -> None:
        old = multi.get(name) or ((modules[name],) if name in modules else None)
        if old is not None and tuple(old) != tuple(targets):
            raise AssertionError(f"LoRA module name {name} is ambiguous: {old} / {targets}")
        if len(targets) == 1:
            modules[name] = targets[0]
            if targets[0].whole and (prefer or targets[0] not in preferred):
                preferred[targets[0]] = name
        else:
            multi[name] = tuple(targets)

    for key, e in sorted(bare.items()):
        if not key.endswith(".weight") or len(e["shape"]) < 2:
            continue
        path = key[: -len(".weight")]
        if naming == DIFFUSERS:
            pieces = [(d[: -len(".weight")], None if rows is None else (rows.start, rows.stop, e["shape"][0]), swap)
                      for d, rows, swap in a.to_diffusers(key, tuple(e["shape"]))]
        else:
            pieces = [(prefix + path, None, False)]
        names = [(kohya("lora_unet", path), None, False, True)]
        names += [(kohya("lora_unet", alias), rows, swap, False) for alias, rows, swap in a.lora_aliases(path)]
        for name, place, swap, prefer in names:
            targets = []
            for base, piece, pswap in pieces:
                hit = _intersect(place, piece)
                if hit is None:
                    continue
                dst, src = hit
                targets.append(Target(base, rows=dst, src=src, swap=swap != pswap, comp="unet"))
            if targets:
                add(name, targets, prefer)
                if naming != DIFFUSERS and place is None and not swap:
                    paths.setdefault(targets[0], "transformer." + path)
    # text encoders live only in ComfyUI files; the names are known in every naming, so that a bake can skip them
    ref = registry.named_reference(arch_id, COMFYUI)
    for te_prefix, comp in a.lora_text_encoders.items():
        root = a.components[comp][1] + "transformer."
        for key, e in sorted(ref.items()):
            if key.startswith(root) and key.endswith(".weight") and len(e["shape"]) == 2:
                path = key[len(root): -len(".weight")]
                add(kohya(te_prefix, path), [Target(root + path, comp="te")], prefer=te_prefix == "lora_te1")
    return Table(arch_id, modules, preferred, paths, multi)
