"""Command line: argument parsing and printing only; every command calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from mergekit_sd import __version__
from mergekit_sd.errors import SdbuildError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or warnings")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _build_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache store (default: $SDBUILD_CACHE or ./cache)")
    p.add_argument("--models", type=Path, action="append", default=[], help="folder to find inputs in by name or sha256 (repeatable)")
    p.add_argument("--out-dir", type=Path, default=None, help="write outputs here instead of beside the recipe")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdbuild", description="make for Stable Diffusion checkpoints")
    ap.add_argument("--version", action="version", version=f"sdbuild {__version__}")
    sub = ap.add_subparsers(dest="cmd")

    b = sub.add_parser("build", help="build a recipe's outputs (default command)")
    _build_opts(b)
    b.add_argument("nodes", nargs="*", help="build only these nodes and what they need")
    b.add_argument("--device", default="cpu", help="where merge math runs: cpu (default) or cuda")
    b.add_argument("--locked", action="store_true", help="refuse inputs that differ from RECIPE.lock")
    _common(b)

    pl = sub.add_parser("plan", help="show each node's key, state and reason; runs nothing")
    _build_opts(pl)
    pl.add_argument("nodes", nargs="*")
    _common(pl)

    i = sub.add_parser("inspect", help="what is inside a model file")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true")
    i.add_argument("--tree", action="store_true", help="show the lineage tree")
    i.add_argument("--no-scan", action="store_true", help="read headers only (skip the NaN/Inf scan of tensor values)")
    _common(i)

    m = sub.add_parser("methods", help="list merge methods and ops with their parameters")
    m.add_argument("--json", action="store_true")
    _common(m)

    s = sub.add_parser("synth", help="write synthetic models with real tensor names (tests, demos, benchmarks)")
    s.add_argument("out", type=Path, help="output file (or folder with --demo)")
    s.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    s.add_argument("--factor", type=int, default=32, help="shrink every large dimension by this (1 = full size)")
    s.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ema", action="store_true", help="add EMA copies of the UNet")
    s.add_argument("--junk", action="store_true", help="add an embedding_manager copy of CLIP")
    s.add_argument("--markers", action="store_true", help="add SDXL prediction-type marker tensors")
    s.add_argument("--inpainting", action="store_true", help="9-channel input conv")
    s.add_argument("--lora", metavar="FORMAT", help="write a LoRA of this format instead of a checkpoint")
    s.add_argument("--rank", type=int, default=4, help="LoRA rank")
    s.add_argument("--demo", action="store_true", help="write the demo's input models into the folder OUT")
    _common(s)

    g = sub.add_parser("gc", help="remove cached objects that the given recipes no longer need")
    g.add_argument("recipes", nargs="*", type=Path, help="recipes whose current objects are kept (none: empty the cache)")
    g.add_argument("--cache-dir", type=Path, default=None)
    g.add_argument("--models", type=Path, action="append", default=[])
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    _common(g)

    sc = sub.add_parser("schema", help="print the recipe format as JSON Schema")
    _common(sc)
    for hook in EXTRA_PARSERS:
        hook(sub)
    return ap


# later capabilities register (subparsers) -> None hooks here
EXTRA_PARSERS: list[Callable] = []


def _options(args: argparse.Namespace):
    from mergekit_sd.engine.session import Options, default_cache_dir
    from mergekit_sd.engine.progress import Progress

    return Options(cache_dir=args.cache_dir or default_cache_dir(), out_dir=args.out_dir, models=list(args.models),
                   device=getattr(args, "device", "cpu"), quiet=args.quiet, progress=Progress(args.quiet))


@command("build")
def cmd_build(args: argparse.Namespace) -> int:
    from mergekit_sd.engine import stamp

    cache_dir = args.cache_dir or Path(os.environ.get("SDBUILD_CACHE") or "cache")
    key = stamp.stamp_key(args.recipe, {"nodes": args.nodes, "out_dir": os.path.abspath(args.out_dir) if args.out_dir else None,
                                        "cache": os.path.abspath(cache_dir), "models": [os.path.abspath(m) for m in args.models],
                                        "locked": args.locked, "device": args.device})
    report = stamp.check(cache_dir, key)
    if report is None:
        from mergekit_sd.engine.session import Session
        from mergekit_sd.recipe.load import load_recipe

        session = Session(load_recipe(args.recipe), _options(args))
        for hook in HOOKS.get("before_build", []):
            hook(session, args)
        result = session.build(args.nodes or None)
        for hook in HOOKS.get("after_build", []):
            hook(session, args, result)
        report = result.as_json()
        if not result.warnings:
            stamp.record(cache_dir, key, session.touched_files(), {"built": [], "fresh": result.built + result.fresh,
                                                                   "outputs": result.outputs})
    elif not args.quiet:
        print("nothing to do: every output is up to date", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        print(f"built {len(report['built'])}, fresh {len(report['fresh'])}", file=sys.stderr)
    return 0


# hooks other capabilities attach to a build ("before_build": (session, args), "after_build": (session, args, report))
HOOKS: dict[str, list[Callable]] = {}


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.session import Session
    from mergekit_sd.recipe.load import load_recipe

    states = Session(load_recipe(args.recipe), _options(args)).plan(args.nodes or None)
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


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    from mergekit_sd.inspect import format_inspect, inspect_model

    if args.tree and "inspect_tree" in HOOKS:
        return HOOKS["inspect_tree"][0](args)
    report = inspect_model(args.file, scan=not args.no_scan) if "scan" in inspect_model.__code__.co_varnames else inspect_model(args.file)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(format_inspect(report))
    return 0


@command("methods")
def cmd_methods(args: argparse.Namespace) -> int:
    from mergekit_sd.methods.catalog import describe_methods, format_methods_table

    if args.json:
        print(json.dumps(describe_methods(), indent=2))
    else:
        print(format_methods_table())
    return 0


@command("synth")
def cmd_synth(args: argparse.Namespace) -> int:
    if args.demo:
        from mergekit_sd.synth.demo import make_demo_models

        for p in make_demo_models(args.out):
            if not args.quiet:
                print(p)
        return 0
    if args.lora:
        from mergekit_sd.synth.loras import write_synth_lora

        path = write_synth_lora(args.out, arch=args.arch, format=args.lora, factor=args.factor, rank=args.rank, seed=args.seed)
    else:
        from mergekit_sd.synth.models import write_synth

        path = write_synth(args.out, args.arch, args.factor, args.dtype, args.seed, ema=args.ema, junk=args.junk,
                           markers=args.markers, inpainting=args.inpainting)
    if not args.quiet:
        print(path)
    return 0


@command("gc")
def cmd_gc(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.session import gc

    args.out_dir = None
    removed, freed = gc(args.recipes, _options(args), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} objects, {freed / 2**20:.1f} MiB")
    return 0


@command("schema")
def cmd_schema(args: argparse.Namespace) -> int:
    from mergekit_sd.recipe.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def _load_plugins() -> None:
    """Modules that add subcommands register themselves in EXTRA_PARSERS/COMMANDS when imported."""
    import importlib

    for mod in CLI_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


CLI_MODULES: list[str] = ["mergekit_sd.cli.provenance"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_plugins()
    known = set(COMMANDS) | {"-h", "--help", "--version"}
    if argv and argv[0] not in known:
        argv = ["build"] + argv
    debug = "--debug" in argv
    try:
        args = parser().parse_args(argv)
        if not args.cmd:
            parser().print_help()
            return 2
        return COMMANDS[args.cmd](args)
    except SdbuildError as e:
        if debug:
            raise
        print(f"sdbuild: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sdbuild: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 2
    except Exception as e:  # an unexpected failure inside a step is a failed build, not a crash dump
        if debug:
            raise
        print(f"sdbuild: error: internal failure: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
