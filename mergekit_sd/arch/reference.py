"""The reference key lists (real tensor names, shapes and dtypes) shipped as package data."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Iterable

REFERENCE_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json"}


def shrink(shape: Iterable[int], factor: int) -> tuple[int, ...]:
    """A reference shape divided by a synthetic model's shrink factor: every dimension that is a multiple of 32 and
    at least 64 (so q/k/v splits and LoRA factors still fit); factor 1 is full size."""
    return tuple(d // factor if (d % 32 == 0 and d >= 64 and factor > 1) else d for d in shape)


@lru_cache(maxsize=None)
def reference(arch: str) -> dict:
    """`arch` is an id of REFERENCE_FILES or a file name in data/keys/.

    {"architecture": ..., "components": {component: {name: {"shape", "dtype", "optional"?}}}}"""
    name = REFERENCE_FILES.get(arch) or (arch if arch.endswith(".json") else None)
    if name is None:
        raise KeyError(f"no reference key list for {arch!r}; known: {', '.join(REFERENCE_FILES)}")
    text = resources.files("mergekit_sd.data.keys").joinpath(name).read_text()
    return json.loads(text)


def reference_keys(arch: str, include_optional: bool = True) -> dict[str, dict]:
    """Flat name -> entry (with its component added) for one architecture."""
    out: dict[str, dict] = {}
    for comp, entries in reference(arch)["components"].items():
        for name, e in entries.items():
            if include_optional or not e.get("optional"):
                out[name] = dict(e, component=comp)
    return out


def shrink(shape: Iterable[int], factor: int) -> tuple[int, ...]:
    """A reference shape at a synthetic model's shrink factor: every dimension that is a multiple of 32 and at least
    64 is divided, so products of shapes stay consistent (q/k/v splits and LoRA factors still fit)."""
    return tuple(d // factor if (d % 32 == 0 and d >= 64 and factor > 1) else d for d in shape)
