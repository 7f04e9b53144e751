"""Replaying provenance: rebuild a model from the recipe embedded in it and prove the result is the same.

`reproduce` finds every recorded input in the given model folders by content digest or file sha256 (through
the memo database, so a second run stats files instead of hashing them), rebuilds the recorded node in a
scratch cache (so nothing cached can stand in for real work), and compares the result's content digest with
the digest recorded in the file and with the file's actual tensors. Inputs are presented to the rebuild under
their recorded file names, so the rebuilt metadata (and therefore the whole file) is byte-identical when the
same sdbuild version replays it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mergekit_sd import TOOL
from mergekit_sd.errors import UserError, VerifyError
from mergekit_sd.engine.inputs import find_recorded
from mergekit_sd.engine.memo import digest_file
from mergekit_sd.engine.options import DEFAULT_MAX_MEMORY, Options, model_dirs
from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.progress import Progress
from mergekit_sd.engine.runner import Runner
from mergekit_sd.engine.state import StateDB, file_identity
from mergekit_sd.formats.digests import autov2, legacy_hash, sha256_file
from mergekit_sd.formats.safetensors import SafetensorsFile, read_header, tensor_digest
from mergekit_sd.ops import load_ops
from mergekit_sd.provenance.lineage import lineage_json, lineage_lines
from mergekit_sd.provenance.record import CONTENT_DIGEST_KEY, SCHEMA_VERSION, read_provenance
from mergekit_sd.provenance.recover import recipe_from_provenance, recover_recipe
from mergekit_sd.recipe.load import check_url, parse_recipe
from mergekit_sd.remote.fetch import fetch, name_from_url

def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A model file's `__metadata__` (safetensors only: legacy pickles carry none)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("model file not found", str(p))
    if p.suffix.lower() != ".safetensors":
        raise UserError("only .safetensors files carry metadata", str(p))
    return dict(read_header(p)[1])


# ----------------------------------------------------------------------------------------------------------------
# reproduce


@dataclass
class ReproduceReport:
    file: str
    node: str
    recorded_digest: str | None
    file_digest: str
    rebuilt_digest: str
    identical: bool  # rebuilt tensors == recorded == the file's tensors
    same_bytes: bool  # and the whole file (header included) is byte-identical
    inputs: dict[str, str]  # input name -> file used
    differing: list[str] = field(default_factory=list)  # tensor names that differ, sorted (first few)
    notes: list[str] = field(default_factory=list)
    hashed: int = 0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reproduce(path: str | os.PathLike, models: list[Path], cache_dir: str | os.PathLike, keep: str | os.PathLike | None = None,
              device: str = "cpu", fetch_missing: bool = False, jobs: int | None = None,
              max_memory: int = DEFAULT_MAX_MEMORY) -> ReproduceReport:
    """Rebuild `path` from its embedded recipe and verify it; raises UserError for missing inputs (exit 2) and
    VerifyError when the rebuilt model differs (exit 1, naming the first differing tensors)."""
    path = Path(path)
    meta = read_metadata(path)
    prov = read_provenance(meta)
    if prov is None:
        hint = " it has an AUTOMATIC1111/supermerger recipe: `sdbuild recipe` turns it into a recipe" if "sd_merge_recipe" in meta else ""
        raise UserError(f"no sdbuild provenance to replay;{hint}" if hint else "no sdbuild provenance to replay", str(path))
    if not isinstance(prov.get("schema"), int) or prov["schema"] > SCHEMA_VERSION:
        raise UserError(f"provenance schema {prov.get('schema')!r} is newer than this sdbuild reads ({SCHEMA_VERSION}); upgrade sdbuild", str(path))
    node = prov.get("node")
    recipe = prov.get("recipe") or {}
    inputs = recipe.get("inputs") or {}
    if not node or not isinstance(inputs, dict):
        raise UserError("provenance names no node or inputs", str(path))
    db = StateDB(cache_dir)
    dirs = model_dirs(list(models))
    found, index = find_recorded(inputs, dirs, db)
    missing = [n for n in inputs if n not in found]
    if missing and fetch_missing:
        fetched = _fetch_recorded({n: inputs[n] for n in missing}, list(models), str(path))
        more, _ = find_recorded({n: inputs[n] for n in fetched}, [fetched[n] for n in fetched], db)
        found.update(more)
        missing = [n for n in inputs if n not in found]
    if missing:
        parts = []
        for n in missing:
            e = inputs[n]
            bits = [f"file {e.get('file')!r}", f"sha256 {e.get('sha256')}"]
            if e.get("url"):
                bits.append(f"url {e['url']}")
            parts.append(f"{n} ({', '.join(bits)})")
        raise UserError(f"{len(missing)} input(s) not found in {', '.join(map(str, dirs)) or '(no --models folders)'}: " + "; ".join(parts), str(path))

    notes = _version_notes(prov)
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="sdbuild-reproduce-"))
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        links: dict[str, str] = {}
        for i, (n, p) in enumerate(sorted(found.items())):
            link = scratch / "inputs" / str(i) / (inputs[n].get("file") or p.name)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.exists() or link.is_symlink():
                link.unlink()
            try:
                link.symlink_to(p.resolve())
            except OSError:
                shutil.copyfile(p, link)
            links[n] = str(link.relative_to(scratch))
        text = recipe_from_provenance(prov, path.name, paths=links)
        rpath = scratch / "recipe.yaml"
        rpath.write_text(text, encoding="utf-8")
        rec = parse_recipe(text, rpath)
        opts = Options(cache_dir=scratch / "cache", out_dir=scratch / "out", models=[], device=device, quiet=True,
                       progress=Progress(True), jobs=jobs, max_memory=max_memory)
        planner = Planner(rec, opts)
        for n, p in found.items():  # the memo rows travel with the files: the rebuild reads no input twice for hashing
            real = p.resolve()
            memo = db.memo(real)
            if memo is not None:
                planner.store.db.remember(real, file_identity(real), memo[1], memo[2])
        Runner(planner).build([node])
        key = planner.keys[node][0]
        obj = planner.store.object_path(key)
        rebuilt = planner.states[node].digest or ""
        file_digest, file_sha = digest_file(path, db)
        recorded = meta.get(CONTENT_DIGEST_KEY)
        identical = rebuilt == file_digest and (recorded is None or recorded == rebuilt)
        same_bytes = identical and sha256_file(obj) == file_sha
        report = ReproduceReport(str(path), node, recorded, file_digest, rebuilt, identical, same_bytes,
                                 {n: str(p) for n, p in sorted(found.items())}, notes=notes, hashed=index.hashed)
        if recorded is None:
            notes.append("the file records no content digest; compared with its tensors only")
        elif recorded != file_digest:
            notes.append(f"the file's tensors (digest {file_digest}) no longer match its recorded digest {recorded}: it was altered after it was written")
        if not identical:
            report.differing = differing_tensors(obj, path)
            first = ", ".join(report.differing[:3]) or "(tensor names and values agree; dtypes or shapes differ)"
            more = f" and {len(report.differing) - 3} more" if len(report.differing) > 3 else ""
            raise VerifyError(f"{path.name}: rebuilt model differs: {len(report.differing)} tensor(s) differ: {first}{more}"
                              + (f" ({'; '.join(notes)})" if notes else ""), ) from None
        return report
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _fetch_recorded(wanted: dict[str, dict[str, Any]], models: list[Path], where: str) -> dict[str, Path]:
    """Download recorded inputs by their recorded url, verified by their recorded sha256, into the first --models folder."""
    if not models:
        raise UserError("--fetch needs --models DIR to download the inputs into", where)
    out: dict[str, Path] = {}
    for n, e in sorted(wanted.items()):
        url, sha = e.get("url"), e.get("sha256")
        if not url or not sha:
            continue  # reported below as missing, with what is known of it
        check_url(url, f"{where}: input {n!r}")
        out[n] = fetch(url, Path(models[0]), e.get("file") or name_from_url(url), sha)
    return out


def _version_notes(prov: dict[str, Any]) -> list[str]:
    """Ops whose implementation changed since the file was written (results may legitimately differ)."""
    notes = []
    ops = load_ops()
    for name, n in sorted((prov.get("nodes") or {}).items()):
        op = ops.get(n.get("op") or "")
        if op is None:
            notes.append(f"step {name!r}: op {n.get('op')!r} is not available in {TOOL}")
        elif n.get("version") is not None and n["version"] != op.version:
            notes.append(f"step {name!r}: op {op.name} is version {op.version} here but was {n['version']} when the file was made")
    if prov.get("tool") and prov["tool"] != TOOL:
        notes.append(f"the file was made by {prov['tool']}; this is {TOOL}")
    return notes


def tensor_digests(path: str | os.PathLike) -> dict[str, bytes]:
    """Per-tensor content digests (name, dtype, shape, bytes) of a safetensors file."""
    out: dict[str, bytes] = {}
    with SafetensorsFile(path) as f:
        for name in sorted(f.specs):
            spec = f.specs[name]
            out[name] = tensor_digest(name, spec.dtype, spec.shape, f.read_raw(name))
    return out


def differing_tensors(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Names of tensors that differ between two files (missing on either side counts), sorted."""
    da, dbb = tensor_digests(a), tensor_digests(b)
    return sorted(n for n in set(da) | set(dbb) if da.get(n) != dbb.get(n))


# ----------------------------------------------------------------------------------------------------------------
# recipe


def recipe_for_file(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """`sdbuild recipe`: the recipe recovered from a file, checked against the file's own tensors."""
    p = Path(path)
    meta = read_metadata(p)
    actual = digest_file(p, StateDB(cache_dir), want_sha256=False)[0] if CONTENT_DIGEST_KEY in meta else None
    try:
        return recover_recipe(meta, p.name, actual)
    except ValueError as e:
        raise UserError(str(e), str(p)) from None


# ----------------------------------------------------------------------------------------------------------------
# hash


def hash_file(path: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[str, str]:
    """sha256, AutoV2, legacy hash and content digest of a model file (sha256 and digest memoised)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("model file not found", str(p))
    digest, sha = digest_file(p, StateDB(cache_dir))
    assert sha is not None
    return {"file": p.name, "sha256": sha, "autov2": autov2(sha), "legacy_hash": legacy_hash(p), "content_digest": digest}


# ----------------------------------------------------------------------------------------------------------------
# lineage tree


def lineage_tree(path: str | os.PathLike, as_json: bool = False) -> str:
    """The lineage of a model as an indented tree (or nested JSON): steps, inputs, and the generations before them."""
    p = Path(path)
    meta = read_metadata(p)
    if as_json:
        return json.dumps(lineage_json(meta, p.name), indent=2, sort_keys=True) + "\n"
    return "\n".join(lineage_lines(meta, p.name)) + "\n"
