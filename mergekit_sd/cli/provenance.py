"""Subcommands that replay and record provenance: reproduce, recipe, hash, lock.

Argument parsing and printing only; each command calls one library function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mergekit_sd.cli.common import (add_build_options, add_common, add_remote_options, add_resource_options, cache_dir, command,
                                   emit_text, options, resources)
from mergekit_sd.formats.atomic import write_text


def add_parsers(sub) -> None:
    r = sub.add_parser("reproduce", help="rebuild a model from its embedded recipe and verify it is identical")
    r.add_argument("file", type=Path)
    r.add_argument("--models", type=Path, action="append", default=[], help="folder to find inputs in by digest or sha256 (repeatable)")
    r.add_argument("--cache-dir", type=Path, default=None, help="cache whose memo database indexes the folders")
    r.add_argument("--keep", type=Path, default=None, help="keep the scratch build in this folder")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (cuda where one exists)")
    r.add_argument("--json", action="store_true")
    add_resource_options(r)
    r.add_argument("--fetch", action="store_true", help="download missing inputs by their recorded url (verified by sha256) into the first --models folder")
    add_common(r)

    rc = sub.add_parser("recipe", help="recover a runnable recipe from a model's metadata (sdbuild, AUTOMATIC1111, supermerger)")
    rc.add_argument("file", type=Path)
    rc.add_argument("-o", "--output", type=Path, default=None, help="write the recipe here instead of printing it")
    rc.add_argument("--cache-dir", type=Path, default=None, help="cache whose memo database holds file digests")
    add_common(rc)

    h = sub.add_parser("hash", help="file sha256, AutoV2, legacy hash and content digest (memoised)")
    h.add_argument("file", type=Path)
    h.add_argument("--cache-dir", type=Path, default=None)
    h.add_argument("--json", action="store_true")
    add_common(h)

    lk = sub.add_parser("lock", help="build, then write RECIPE.lock with input and output digests")
    add_build_options(lk)
    add_remote_options(lk)
    lk.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (cuda where one exists)")
    add_common(lk)


@command("reproduce")
def cmd_reproduce(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.reproduce import reproduce

    jobs, max_memory = resources(args)
    rep = reproduce(args.file, list(args.models), cache_dir(args), keep=args.keep, device=args.device, fetch_missing=args.fetch,
                    jobs=jobs, max_memory=max_memory)
    if args.json:
        print(json.dumps(rep.as_json(), indent=2, sort_keys=True))
    elif not args.quiet:
        for name, path in rep.inputs.items():
            print(f"input {name}: {path}", file=sys.stderr)
        for note in rep.notes:
            print(f"note: {note}", file=sys.stderr)
        same = "identical bytes" if rep.same_bytes else "identical tensors (metadata differs)"
        print(f"{rep.file}: reproduced node {rep.node!r}: {same}, content digest {rep.rebuilt_digest}")
    return 0


@command("recipe")
def cmd_recipe(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.reproduce import recipe_for_file

    text = recipe_for_file(args.file, cache_dir(args))
    emit_text(args, text, write_text)
    return 0


@command("hash")
def cmd_hash(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.reproduce import hash_file

    h = hash_file(args.file, cache_dir(args))
    if args.json:
        print(json.dumps(h, indent=2, sort_keys=True))
    else:
        for k in ("sha256", "autov2", "legacy_hash", "content_digest"):
            print(f"{k:<15} {h[k]}")
    return 0


@command("lock")
def cmd_lock(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.lockfile import lock_recipe

    path, lock = lock_recipe(args.recipe, options(args))
    if not args.quiet:
        print(f"wrote {path} ({len(lock.of_kind('input'))} inputs, {len(lock.of_kind('output'))} outputs)", file=sys.stderr)
    return 0
