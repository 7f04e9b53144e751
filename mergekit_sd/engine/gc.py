"""Garbage collection: keep the objects the given recipes' current plans point at, drop the rest."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.engine import stamp
from mergekit_sd.engine.options import Options
from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.store import Store, collect_garbage
from mergekit_sd.recipe.load import load_recipe


def gc(recipes: list[Path], options: Options, dry_run: bool = False) -> tuple[int, int]:
    """Keep the objects every given recipe's current plan points at (whether built or not); drop the rest."""
    keep: set[str] = set()
    for r in recipes:
        planner = Planner(load_recipe(r), options)
        planner.plan(list(planner.recipe.node_names()))
        keep |= {k for k, _ in planner.keys.values()}
    store = Store(options.cache_dir)
    if dry_run:
        paths = [p for p in (store.root / "objects").glob("*/*.safetensors") if p.name[: -len(".safetensors")] not in keep]
        return len(paths), sum(p.stat().st_size for p in paths)
    stamp.forget(options.cache_dir)
    return collect_garbage(store, keep)
