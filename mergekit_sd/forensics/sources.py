"""The checkpoints a forensic command compares: files and folders expanded, each file opened and checked.

A file named on the command line must be a readable checkpoint of a known architecture (else exit 2 naming it);
a file found in a folder that is not one (a LoRA, a VAE, another architecture) is skipped and reported instead,
since folders of models hold all kinds. A hostile, truncated or unreadable file is an error either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.arch.detect import ArchInfo, detect, model_kind
from mergekit_sd.engine.inputs import model_files
from mergekit_sd.errors import UserError
from mergekit_sd.formats.open import open_model
from mergekit_sd.lazy import LazyModel


@dataclass
class Member:
    """One opened checkpoint: the path, the name reports use (the path as given), its lazy model and architecture."""

    path: Path
    name: str
    model: LazyModel
    arch: ArchInfo


def open_checkpoint(path: str | os.PathLike, name: str | None = None) -> Member:
    """Open a checkpoint; UserError (exit 2) for a missing, unreadable or hostile file, a LoRA/VAE, or an
    architecture sdbuild cannot tell."""
    p = Path(path)
    label = name or str(path)
    if not p.exists():
        raise UserError("model file not found", label)
    if p.is_dir():
        raise UserError("is a folder; name a model file", label)
    model = open_model(p)
    kind = model_kind(model.specs)
    if kind in ("lora", "vae"):
        raise UserError(f"is a {'LoRA' if kind == 'lora' else 'VAE'}, not a checkpoint", label)
    arch = detect(model.specs)
    if not arch.known:
        raise UserError("is not a Stable Diffusion checkpoint sdbuild recognises (SD1, SD2, SDXL)", label)
    return Member(p, label, model, arch)


def gather(items: list[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """(file, named explicitly) for every file named or found in a named folder, in order, without repeats."""
    out: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for it in items:
        p = Path(it)
        found = [(f, False) for f in model_files([p])] if p.is_dir() else [(p, True)]
        for f, explicit in found:
            real = f.resolve()
            if real in seen:
                if explicit:
                    raise UserError("is named twice", str(f))
                continue
            seen.add(real)
            out.append((f, explicit))
    return out


def open_many(items: list[str | os.PathLike], *, exclude: Path | None = None,
              arch: ArchInfo | None = None) -> tuple[list[Member], list[dict[str, str]]]:
    """Open every file named or found; folder files that are no checkpoint of `arch` are skipped (file, why)."""
    members: list[Member] = []
    skipped: list[dict[str, str]] = []
    for f, explicit in gather(items):
        if exclude is not None and f.resolve() == exclude.resolve():
            continue
        if explicit:
            m = open_checkpoint(f)
            if arch is not None and m.arch.arch != arch.arch:
                raise UserError(f"is {m.arch.describe()}, but the model is {arch.describe()}: different architectures", str(f))
            members.append(m)
            continue
        model = open_model(f)  # hostile or truncated files stop the command even inside a folder
        kind = model_kind(model.specs)
        found = detect(model.specs)
        if kind not in ("checkpoint", "unknown") or not found.known:
            skipped.append({"file": str(f), "why": f"a {kind}" if kind != "unknown" else "not a checkpoint sdbuild recognises"})
        elif arch is not None and found.arch != arch.arch:
            skipped.append({"file": str(f), "why": f"{found.describe()}, not {arch.describe()}"})
        else:
            members.append(Member(f, str(f), model, found))
    return members, skipped


