"""Subcommands that publish a model: card, graph, report.

Argument parsing, gathering and printing only; the rendering lives in provenance/card.py and publish/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergekit_sd.cli.common import add_common, cache_dir, command, emit_text
from mergekit_sd.errors import UserError


def add_parsers(sub) -> None:
    c = sub.add_parser("card", help="write a Markdown model card (Hugging Face front matter) from a file's provenance")
    c.add_argument("file", type=Path)
    c.add_argument("-o", "--output", type=Path, default=None, help="write the card here (e.g. README.md) instead of printing it")
    c.add_argument("--strict", action="store_true", help="a licence conflict is an error (exit 2)")
    c.add_argument("--cache-dir", type=Path, default=None, help="cache whose memo database holds file hashes")
    add_common(c)

    g = sub.add_parser("graph", help="the recipe's DAG with each node's op, key parameters and fresh/stale state")
    g.add_argument("recipe")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--mermaid", action="store_const", const="mermaid", dest="format", help="Mermaid flowchart")
    fmt.add_argument("--dot", action="store_const", const="dot", dest="format", help="Graphviz DOT")
    g.add_argument("--cache-dir", type=Path, default=None, help="cache to read fresh/stale state from")
    g.add_argument("--models", type=Path, action="append", default=[], help="folder to find inputs in (repeatable)")
    add_common(g)

    r = sub.add_parser("report", help="one self-contained HTML page about a model file")
    r.add_argument("file", type=Path)
    r.add_argument("-o", "--output", type=Path, default=None, help="HTML file to write (default: FILE's name + .html)")
    r.add_argument("--models", type=Path, action="append", default=[], help="folder to find the file's parents in (repeatable)")
    r.add_argument("--cache-dir", type=Path, default=None, help="cache whose memo database holds file hashes")
    r.add_argument("--no-scan", action="store_true", help="skip the NaN/Inf scan of tensor values")
    add_common(r)


def _card_source(path: Path, cache: Path):
    from mergekit_sd.engine.memo import digest_file
    from mergekit_sd.engine.reproduce import read_metadata
    from mergekit_sd.engine.state import StateDB
    from mergekit_sd.provenance.card import CardSource

    meta = read_metadata(path)
    digest, sha = digest_file(path, StateDB(cache))
    return CardSource(path.name, meta, sha, digest)


@command("card")
def cmd_card(args: argparse.Namespace) -> int:
    from mergekit_sd.provenance.card import render_card, write_card_file

    src = _card_source(args.file, cache_dir(args))
    text, verdict = render_card(src)
    for w in verdict.warnings:
        if args.strict:
            raise UserError(f"licence: {w} (--strict)", str(args.file))
        if not args.quiet:
            print(f"warning: licence: {w}", file=sys.stderr)
    emit_text(args, text, write_card_file)
    return 0


@command("graph")
def cmd_graph(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.options import Options
    from mergekit_sd.engine.planner import Planner
    from mergekit_sd.publish.dag import recipe_graph, to_dot, to_mermaid, to_text
    from mergekit_sd.recipe.load import load_recipe

    planner = Planner(load_recipe(args.recipe), Options(cache_dir=cache_dir(args), models=list(args.models), quiet=True))
    g = recipe_graph(planner)
    sys.stdout.write({"mermaid": to_mermaid, "dot": to_dot}.get(args.format or "", to_text)(g))
    return 0


def _compare(args: argparse.Namespace, parent: Path, label: str):
    """Per-block distances from one parent, with a progress bar (bytes read, rate, time left) on a terminal."""
    from mergekit_sd.engine.progress import Progress
    from mergekit_sd.formats.open import open_model
    from mergekit_sd.publish.similarity import compare_blocks

    progress = Progress(args.quiet)
    total = open_model(args.file).nbytes() + open_model(parent).nbytes()
    done = [0, 0]

    def tick(name: str, nbytes: int) -> None:
        done[0] += 1
        done[1] += nbytes
        progress.tensor(f"compare {parent.name}", min(done[1], total), total, name, nbytes, total)

    try:
        return compare_blocks(args.file, parent, label, on_tensor=tick)
    finally:
        progress.close()


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.inputs import find_recorded
    from mergekit_sd.engine.options import model_dirs
    from mergekit_sd.engine.state import StateDB
    from mergekit_sd.inspect import inspect_model
    from mergekit_sd.formats.digests import legacy_hash
    from mergekit_sd.provenance.card import write_card_file
    from mergekit_sd.provenance.recover import recipe_from_provenance
    from mergekit_sd.provenance.record import CONTENT_DIGEST_KEY, read_provenance
    from mergekit_sd.publish.report import ReportInput, render_report

    src = _card_source(args.file, cache_dir(args))
    prov = read_provenance(src.metadata)
    ri = ReportInput(src, inspect_model(args.file, scan=not args.no_scan), legacy_hash(args.file))
    if prov is not None and isinstance(prov.get("recipe"), dict):
        ri.recipe_yaml = recipe_from_provenance(prov, src.file, src.metadata.get(CONTENT_DIGEST_KEY))
        parents = {n: e for n, e in (prov["recipe"].get("inputs") or {}).items() if isinstance(e, dict)}
        dirs = model_dirs(list(args.models))
        found, _ = find_recorded(parents, dirs, StateDB(cache_dir(args))) if dirs and parents else ({}, None)
        for name, e in parents.items():
            if name in found:
                if not args.quiet:
                    print(f"comparing with {found[name]}", file=sys.stderr)
                ri.comparisons.append(_compare(args, found[name], f"{name} ({e.get('file')})"))
            else:
                ri.parents_missing.append(f"{name} ({e.get('file')})")
    out = args.output or args.file.with_name(args.file.name + ".html")
    write_card_file(out, render_report(ri))
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0

