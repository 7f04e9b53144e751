"""Subcommands that move results and inputs between machines: push, pull, fetch."""

from __future__ import annotations

import argparse
import json
import sys

from mergekit_sd.cli.common import add_build_options, add_common, add_remote_options, command, options


def add_parsers(sub) -> None:
    for name, text in (("push", "upload the cached objects a recipe's outputs need that the remote lacks"),
                       ("pull", "download a recipe's results from the remote and write its outputs, computing nothing")):
        p = sub.add_parser(name, help=text)
        add_build_options(p)
        p.add_argument("nodes", nargs="*", help="only these nodes and what they need")
        add_remote_options(p)
        add_common(p)
    f = sub.add_parser("fetch", help="download missing inputs by their url, verified against their sha256 pin")
    add_build_options(f)
    f.add_argument("nodes", nargs="*", help="only the inputs these nodes need")
    add_common(f)


@command("push")
def cmd_push(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.sync import push

    rep = push(args.recipe, options(args), args.nodes or None)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    elif not args.quiet:
        print(f"pushed {rep['uploaded']} object(s), {rep['bytes'] / 2**20:.1f} MiB; {rep['already_there']} already there", file=sys.stderr)
        if rep["not_built"]:
            print(f"not built here (run sdbuild build first): {', '.join(rep['not_built'])}", file=sys.stderr)
    return 0


@command("pull")
def cmd_pull(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.sync import pull

    rep = pull(args.recipe, options(args), args.nodes or None)
    if args.json:
        print(json.dumps(rep.as_json(), indent=2, sort_keys=True))
    elif not args.quiet:
        print(f"downloaded {len(rep.built)}, fresh {len(rep.fresh)}", file=sys.stderr)
    return 0


@command("fetch")
def cmd_fetch(args: argparse.Namespace) -> int:
    from mergekit_sd.engine.sync import fetch_inputs

    rep = fetch_inputs(args.recipe, options(args), args.nodes or None)
    if args.json:
        print(json.dumps(rep.as_json(), indent=2, sort_keys=True))
    elif not args.quiet:
        print(f"fetched {len(rep.fetched)}, present {len(rep.present)}", file=sys.stderr)
    return 0
