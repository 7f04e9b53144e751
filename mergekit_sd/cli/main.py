"""The `sdbuild` entry point: one parser built from every command group, one error policy for all of them."""

from __future__ import annotations

import argparse
import sys

from mergekit_sd import __version__
from mergekit_sd.cli import build, forensics, models, provenance, publish, remote
from mergekit_sd.cli.common import COMMANDS
from mergekit_sd.errors import SdbuildError

GROUPS = (build, models, provenance, publish, remote, forensics)  # each has add_parsers(subparsers) and registers its commands


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdbuild", description="make for Stable Diffusion checkpoints")
    ap.add_argument("--version", action="version", version=f"sdbuild {__version__}")
    sub = ap.add_subparsers(dest="cmd")
    for group in GROUPS:
        group.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
