"""The no-op fast path: after a successful build, remember the identity (size, mtime, inode) of every file it
touched; the next identical invocation only stats those files and answers without importing torch or opening
a model. Anything that differs falls through to the full planner, which then decides precisely what is stale.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable

from mergekit_sd import TOOL

TABLE = "CREATE TABLE IF NOT EXISTS stamp (key TEXT PRIMARY KEY, files TEXT, report TEXT)"


def stamp_key(recipe: str | os.PathLike, options: dict[str, Any]) -> str:
    body = {"tool": TOOL, "recipe": os.path.abspath(recipe), "cwd": os.getcwd(),
            "env": {k: os.environ.get(k, "") for k in ("SDBUILD_MODELS",)}, **options}
    return json.dumps(body, sort_keys=True, default=str)


def _ident(p: str) -> list[int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def check(cache_dir: str | os.PathLike, key: str) -> dict | None:
    """The stored report when nothing recorded has changed, else None."""
    db = Path(cache_dir) / "state.db"
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            rows = con.execute("SELECT files, report FROM stamp WHERE key=?", (key,)).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    if not rows:
        return None
    files = json.loads(rows[0][0])
    for path, ident in files:
        if _ident(path) != ident:
            return None
    return json.loads(rows[0][1])


def record(cache_dir: str | os.PathLike, key: str, paths: Iterable[str | os.PathLike], report: dict) -> None:
    db = Path(cache_dir) / "state.db"
    files = [[os.path.abspath(p), _ident(os.path.abspath(p))] for p in sorted({str(p) for p in paths})]
    con = sqlite3.connect(db, timeout=60)
    try:
        con.execute(TABLE)
        con.execute("INSERT OR REPLACE INTO stamp VALUES (?,?,?)", (key, json.dumps(files), json.dumps(report)))
        con.commit()
    finally:
        con.close()


def forget(cache_dir: str | os.PathLike) -> None:
    db = Path(cache_dir) / "state.db"
    if db.exists():
        con = sqlite3.connect(db, timeout=60)
        try:
            con.execute(TABLE)
            con.execute("DELETE FROM stamp")
            con.commit()
        finally:
            con.close()
