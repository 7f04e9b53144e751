"""Finding model files: an input's declared path, else a file of the same name or pinned sha256 in the model
folders; for replay, every recorded input by content digest or sha256. Digests come from the memo database, so a
second search only stats files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mergekit_sd.engine.memo import STATS, digest_file
from mergekit_sd.engine.state import StateDB
from mergekit_sd.errors import UserError

MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def model_files(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Model files in the folders (recursively, sorted), or the paths themselves when they are files."""
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            files.append(d)
        elif d.is_dir():
            files += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_EXTS)
    return files


def search_folders(dirs: list[Path], file_name: str | None, sha256: str | None, db: StateDB) -> Path | None:
    """A file named `file_name` (matching the pin, if any), else any file whose sha256 is the pin."""
    files = model_files(d for d in dirs if Path(d).is_dir())
    if file_name:
        for f in files:
            if f.name == file_name and (not sha256 or digest_file(f, db)[1] == sha256):
                return f
    if sha256:
        for f in files:
            if digest_file(f, db)[1] == sha256:
                return f
    return None


@dataclass
class ModelIndex:
    """Model files found in folders, by content digest and by file sha256."""

    by_digest: dict[str, Path] = field(default_factory=dict)
    by_sha256: dict[str, Path] = field(default_factory=dict)
    hashed: int = 0  # files actually read (not answered from the memo database)
    scanned: int = 0


def find_recorded(wanted: dict[str, dict[str, Any]], dirs: list[Path], db: StateDB) -> tuple[dict[str, Path], ModelIndex]:
    """Locate each wanted input ({name: {"digest", "sha256", "file"}}) among the files in `dirs`.

    Files named like a recorded input are looked at first; the search stops as soon as everything is found.
    """
    index = ModelIndex()
    files = model_files(dirs)
    names = {e.get("file") for e in wanted.values() if e.get("file")}
    files.sort(key=lambda p: (p.name not in names,))
    found: dict[str, Path] = {}

    def settle() -> None:
        for n, e in wanted.items():
            if n in found:
                continue
            p = index.by_digest.get(e.get("digest") or "") or index.by_sha256.get(e.get("sha256") or "")
            if p is not None:
                found[n] = p

    for f in files:
        if len(found) == len(wanted):
            break
        before = STATS["files_hashed"]
        try:
            digest, sha = digest_file(f, db)
        except UserError:
            continue  # not a model we can read; others may still match
        index.hashed += STATS["files_hashed"] - before
        index.scanned += 1
        index.by_digest.setdefault(digest, f)
        if sha:
            index.by_sha256.setdefault(sha, f)
        settle()
    return found, index
