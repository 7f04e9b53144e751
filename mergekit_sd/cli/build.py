"""Subcommands that build and plan recipes: build (with --locked), plan, gc, schema."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mergekit_sd.cli.common import add_build_options, add_common, add_remote_options, cache_dir, command, options, remote_url, resources
from mergekit_sd.engine import stamp


def add_parsers(sub) -> None:
    b = sub.add_parser("build", help="build a recipe's outputs (default command)")
    add_build_options(b)
    b.add_argument("nodes", nargs="*", help="build only these nodes and what they need")
    b.add_argument("--device", default="cpu", help="where merge math runs: cpu (default), cuda, or auto (cuda where one exists)")
    b.add_argument("--locked", action="store_true", help="refuse inputs that differ from RECIPE.lock")
    add_remote_options(b)
    b.add_argument("--strict", action="store_true", help="a licence conflict in an output's model card is an error (exit 2)")
    add_common(b)

    pl = sub.add_parser("plan", help="show each node's key, state and reason; runs nothing")
    add_build_options(pl)
    pl.add_argument("nodes", nargs="*")
    add_common(pl)

    g = sub.add_parser("gc", help="remove cached objects that the given recipes no longer need")
    g.add_argument("recipes", nargs="*", type=Path, help="recipes whose current objects are kept (none: empty the cache)")
    g.add_argument("--cache-dir", type=Path, default=None)
    g.add_argument("--models", type=Path, action="append", default=[])
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    add_common(g)

    sc = sub.add_parser("schema", help="print the recipe format as JSON Schema")
    add_common(sc)


@command("build")
def cmd_build(args: argparse.Namespace) -> int:
    resources(args)  # a bad -j or --max-memory is an error even when there is nothing to build
    cache = cache_dir(args)
    key = stamp.stamp_key(args.recipe, {"nodes": args.nodes, "out_dir": os.path.abspath(args.out_dir) if args.out_dir else None,
                                        "cache": os.path.abspath(cache), "models": [os.path.abspath(m) for m in args.models],
                                        "locked": args.locked, "device": args.device, "remote": remote_url(args),
                                        "remote_endpoint": args.remote_endpoint, "remote_read_only": args.remote_read_only,
                                        "strict": args.strict})
    report = stamp.check(cache, key)
    if report is None:
        report = _build(args, key)
    elif not args.quiet:
        print("nothing to do: every output is up to date", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        print(f"built {len(report['built'])}, fresh {len(report['fresh'])}", file=sys.stderr)
    return 0


def _build(args: argparse.Namespace, key: str) -> dict:
    """The full planner and runner (torch is imported only here, not on the no-op path)."""
    from mergekit_sd.engine.lockfile import check_locked_inputs, lock_drift
    from mergekit_sd.engine.planner import Planner
    from mergekit_sd.engine.runner import Runner
    from mergekit_sd.recipe.load import load_recipe

    planner = Planner(load_recipe(args.recipe), options(args))
    if args.locked:
        check_locked_inputs(planner, args.nodes or None)
    result = Runner(planner).build(args.nodes or None)
    for msg in lock_drift(planner, list(result.outputs) or list(planner.recipe.outputs)):
        planner.progress.warn(msg)
        result.warnings.append(msg)
    report = result.as_json()
    if not result.warnings:
        stamp.record(cache_dir(args), key, planner.touched_files(),
                     {"built": [], "fresh": result.built + result.fresh, "outputs": result.outputs,
                      "steps": {n: {"source": "local"} for n in result.steps}})
    return report


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.planner import Planner
    from mergekit_sd.recipe.load import load_recipe

    states = Planner(load_recipe(args.recipe), options(args)).plan(args.nodes or None)
    if args.json:
        print(json.dumps({"nodes": [s.as_json() for s in states]}, indent=2))
        return 0
    width = max([len(s.name) for s in states] + [4])
    for s in states:
        if s.state == "input":
            print(f"  {s.name:<{width}}  input   {s.digest}")
        else:
            print(f"{'*' if s.state == 'stale' else ' '} {s.name:<{width}}  {s.state:<6}  {s.op:<16} {(s.key or '-')[:16]}  {s.reason}")
    return 0


@command("gc")
def cmd_gc(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.gc import gc

    args.out_dir = None
    removed, freed = gc(args.recipes, options(args), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} objects, {freed / 2**20:.1f} MiB")
    return 0


@command("schema")
def cmd_schema(args: argparse.Namespace) -> int:
    from mergekit_sd.recipe.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0
