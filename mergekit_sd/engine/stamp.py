"""The no-op fast path: after a successful build, remember the identity (size, mtime, inode) of every file it
touched; the next identical invocation only stats those files and answers without importing torch or opening
a model. Anything that differs falls through to the full planner, which then decides precisely what is stale.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any, Iterable

from mergekit_sd import TOOL
from mergekit_sd.engine.boot import boot_id
from mergekit_sd.engine.options import MODELS_ENV
from mergekit_sd.engine.state import StateDB



def stamp_key(recipe: str | os.PathLike, options: dict[str, Any]) -> str:
    # a stamp holds for one boot: after a reboot the planner re-verifies objects written without fsync
    body = {"tool": TOOL, "recipe": os.path.abspath(recipe), "cwd": os.getcwd(), "boot": boot_id(),
            "env": {k: os.environ.get(k, "") for k in (MODELS_ENV,)}, **options}
    return json.dumps(body, sort_keys=True, default=str)


def _ident(p: str) -> list[int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def check(cache_dir: str | os.PathLike, key: str) -> dict | None:
    """The stored report when nothing recorded has changed, else None."""
    try:
        db = StateDB.existing(cache_dir)
        found = db.stamp(key) if db is not None else None
    except sqlite3.Error:
        return None
    if found is None:
        return None
    files, report = found
    for path, ident in files:
        if _ident(path) != ident:
            return None
    return report


def record(cache_dir: str | os.PathLike, key: str, paths: Iterable[str | os.PathLike], report: dict) -> None:
    files = [[os.path.abspath(p), _ident(os.path.abspath(p))] for p in sorted({str(p) for p in paths})]
    StateDB(cache_dir).put_stamp(key, files, report)


def forget(cache_dir: str | os.PathLike) -> None:
    db = StateDB.existing(cache_dir)
    if db is not None:
        db.clear_stamps()
