"""Lock files: the exact inputs a recipe was built from and the outputs it gave, kept in git beside the recipe.

A recipe names files by path (and an optional sha256 pin); its lock records what those files *were*: each
input's file sha256 and tensor content digest, and each output's content digest. `build --locked` refuses
inputs that differ from the lock; a normal build reports outputs that no longer match it.

The format is plain text, one entry per line, sorted, no alignment padding, so adding or changing one input
changes one line of a diff:

    # sdbuild lock 1 for aurora.yaml ...
    input anime sha256=7f96... digest=0a1b...
    output release digest=9c8d...
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.runner import Runner
from mergekit_sd.errors import UserError
from mergekit_sd.formats.atomic import write_text
from mergekit_sd.recipe.graph import build_order
from mergekit_sd.recipe.load import load_recipe

LOCK_VERSION = 1
KINDS = ("input", "output")
_HEX = re.compile(r"^[0-9a-f]+$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_FIELDS = {"input": ("sha256", "digest"), "output": ("digest",)}


@dataclass(frozen=True)
class LockEntry:
    kind: str  # "input" | "output"
    name: str
    digest: str | None = None  # tensor content digest (xxh3-128)
    sha256: str | None = None  # full-file sha256 (inputs)

    def line(self) -> str:
        parts = [self.kind, self.name]
        for f in _FIELDS[self.kind]:
            v = getattr(self, f)
            if v:
                parts.append(f"{f}={v}")
        return " ".join(parts)


@dataclass(frozen=True)
class Lock:
    entries: tuple[LockEntry, ...]

    @staticmethod
    def of(entries: Iterable[LockEntry]) -> "Lock":
        by = {(e.kind, e.name): e for e in entries}
        return Lock(tuple(by[k] for k in sorted(by, key=lambda k: (KINDS.index(k[0]), k[1]))))

    def get(self, kind: str, name: str) -> LockEntry | None:
        for e in self.entries:
            if e.kind == kind and e.name == name:
                return e
        return None

    def of_kind(self, kind: str) -> dict[str, LockEntry]:
        return {e.name: e for e in self.entries if e.kind == kind}


@dataclass(frozen=True)
class LockDifference:
    kind: str
    name: str
    field: str  # "sha256" | "digest" | "missing" (in the lock) | "gone" (no longer in the recipe)
    locked: str | None
    actual: str | None

    def describe(self) -> str:
        if self.field == "missing":
            return f"{self.kind} {self.name!r} is not in the lock file"
        if self.field == "gone":
            return f"{self.kind} {self.name!r} is in the lock file but not in the recipe"
        return f"{self.kind} {self.name!r}: {self.field} {_short(self.actual)} differs from the locked {_short(self.locked)}"


def _short(v: str | None) -> str:
    return (v[:16] + "…") if v and len(v) > 16 else (v or "(none)")


def lock_path(recipe_path: str | os.PathLike) -> Path:
    """`recipes/aurora.yaml` -> `recipes/aurora.yaml.lock` (beside the recipe, never confused with another recipe's)."""
    p = Path(recipe_path)
    return p.with_name(p.name + ".lock")


def format_lock(lock: Lock, recipe_file: str) -> str:
    head = [
        f"# sdbuild lock {LOCK_VERSION} for {recipe_file}: input file sha256 and content digests, output content digests.",
        f"# Keep it in version control. `sdbuild lock {recipe_file}` rewrites it; `sdbuild build --locked` enforces it.",
    ]
    return "\n".join(head + [e.line() for e in Lock.of(lock.entries).entries]) + "\n"


def parse_lock(text: str, where: str = "lock file") -> Lock:
    entries: list[LockEntry] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        w = f"{where}:{i}"
        if len(parts) < 3 or parts[0] not in KINDS:
            raise UserError(f"expected `input NAME sha256=... digest=...` or `output NAME digest=...`, got {line[:80]!r}", w)
        kind, name = parts[0], parts[1]
        if not _NAME.match(name):
            raise UserError(f"invalid name {name!r}", w)
        if (kind, name) in seen:
            raise UserError(f"{kind} {name!r} is listed twice", w)
        seen.add((kind, name))
        values: dict[str, str] = {}
        for tok in parts[2:]:
            k, sep, v = tok.partition("=")
            if not sep or k not in _FIELDS[kind] or not _HEX.match(v) or k in values:
                raise UserError(f"bad field {tok[:80]!r} for {kind} {name!r}; expected {' '.join(f + '=HEX' for f in _FIELDS[kind])}", w)
            values[k] = v
        if not values:
            raise UserError(f"{kind} {name!r} has no digest", w)
        entries.append(LockEntry(kind, name, values.get("digest"), values.get("sha256")))
    return Lock.of(entries)


def read_lock(path: str | os.PathLike) -> Lock | None:
    """The lock at `path`, or None when there is none."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read lock file: {e}", str(p)) from None
    return parse_lock(text, p.name)


def write_lock(path: str | os.PathLike, lock: Lock, recipe_file: str) -> Path:
    """Write atomically (a crash never leaves half a lock)."""
    return write_text(path, format_lock(lock, recipe_file))


def compare(locked: Lock, actual: Lock, kind: str, *, report_gone: bool = False) -> list[LockDifference]:
    """Entries of `kind` whose recorded fields differ; a field is compared only when both sides record it."""
    out: list[LockDifference] = []
    old, new = locked.of_kind(kind), actual.of_kind(kind)
    for name in sorted(new):
        e = new[name]
        o = old.get(name)
        if o is None:
            out.append(LockDifference(kind, name, "missing", None, e.digest))
            continue
        for f in _FIELDS[kind]:
            a, b = getattr(o, f), getattr(e, f)
            if a and b and a != b:
                out.append(LockDifference(kind, name, f, a, b))
                break
    if report_gone:
        for name in sorted(set(old) - set(new)):
            out.append(LockDifference(kind, name, "gone", old[name].digest, None))
    return out


def entries_from(inputs: Mapping[str, tuple[str | None, str | None]], outputs: Mapping[str, str]) -> Lock:
    """A lock from {input: (sha256, digest)} and {output node: digest}."""
    es = [LockEntry("input", n, d, s) for n, (s, d) in inputs.items()]
    es += [LockEntry("output", n, d) for n, d in outputs.items()]
    return Lock.of(es)


# ----------------------------------------------------------------------------------------------------------------
# locking a recipe and holding builds to the lock


def input_hashes(planner: Planner, targets: list[str] | None = None) -> dict[str, tuple[str | None, str]]:
    """input name -> (file sha256, content digest) for every input the targets need (memoised, no model bytes read)."""
    return {n: (planner.input_facts(n).sha256, planner.input_facts(n).digest)
            for n in build_order(planner.recipe, planner.graph, targets) if n in planner.recipe.inputs}


def planner_lock(planner: Planner, targets: list[str] | None = None) -> Lock:
    """What a planner's inputs are now and what its outputs came out as (after a build)."""
    inputs = input_hashes(planner, targets)
    outputs = {n: planner.states[n].digest for n in planner.recipe.outputs if n in planner.states and planner.states[n].digest}
    return entries_from(inputs, outputs)


def lock_recipe(recipe_path: str | os.PathLike, options) -> tuple[Path, Lock]:
    """Build the recipe (cached steps are not redone) and write RECIPE.lock beside it."""
    recipe = load_recipe(recipe_path)
    planner = Planner(recipe, options)
    Runner(planner).build(None)
    lock = planner_lock(planner)
    return write_lock(lock_path(recipe.path), lock, recipe.path.name), lock


def check_locked_inputs(planner: Planner, targets: list[str] | None = None) -> None:
    """`build --locked`: refuse (exit 2) when any input differs from the lock, naming every one that does."""
    path = lock_path(planner.recipe.path)
    locked = read_lock(path)
    if locked is None:
        raise UserError(f"--locked, but there is no lock file {path.name}; run `sdbuild lock {planner.recipe.path.name}` first",
                        planner.recipe.path.name)
    diffs = compare(locked, entries_from(input_hashes(planner, targets), {}), "input")
    if diffs:
        names = ", ".join(repr(d.name) for d in diffs)
        raise UserError(f"input(s) {names} differ from {path.name}: " + "; ".join(d.describe() for d in diffs)
                        + "; restore them or run `sdbuild lock` to accept the change", planner.recipe.path.name)


def lock_drift(planner: Planner, outputs: Iterable[str]) -> list[str]:
    """After a build: outputs (and inputs) that no longer match RECIPE.lock, as messages; [] without a lock."""
    locked = read_lock(lock_path(planner.recipe.path))
    if locked is None:
        return []
    now = planner_lock(planner, [n for n in outputs if n in planner.recipe.outputs] or None)
    diffs = compare(locked, now, "input") + compare(locked, now, "output")
    name = lock_path(planner.recipe.path).name
    return [f"{d.describe()} ({name})" for d in diffs]
