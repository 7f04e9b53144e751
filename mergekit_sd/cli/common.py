"""What every command group shares: the command registry and the common options.

Imports no torch: `sdbuild build` answers a no-op build from stamps before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from mergekit_sd.engine.options import REMOTE_ENV, Options, default_cache_dir, jobs_from, max_memory_from
from mergekit_sd.engine.progress import Progress

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    """Register `fn(args) -> exit code` as the handler of subcommand `name`."""
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress or warnings")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache store (default: $SDBUILD_CACHE or ./cache)")
    p.add_argument("--models", type=Path, action="append", default=[], help="folder to find inputs in by name or sha256 (repeatable)")
    p.add_argument("--out-dir", type=Path, default=None, help="write outputs here instead of beside the recipe")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    add_resource_options(p)


def add_resource_options(p: argparse.ArgumentParser) -> None:
    """How much of the machine a build uses; results never depend on these."""
    p.add_argument("-j", "--jobs", default=None, metavar="N",
                   help="worker threads for hashing, reading, computing and writing (default: $SDBUILD_JOBS, else one per core)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the build may use, e.g. 512M, 2G, 1.5GiB (default: $SDBUILD_MAX_MEMORY, else 1G)")


def resources(args: argparse.Namespace) -> tuple[int | None, int]:
    """(jobs, max memory in bytes) from the options or the environment; a bad value is exit 2, one line."""
    return jobs_from(getattr(args, "jobs", None)), max_memory_from(getattr(args, "max_memory", None))


def add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote", default=None, metavar="s3://BUCKET/PREFIX", help="shared cache (default: $SDBUILD_REMOTE)")
    p.add_argument("--remote-endpoint", default=None, metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--remote-read-only", action="store_true", help="download from the remote, never upload")


def remote_url(args: argparse.Namespace) -> str | None:
    return getattr(args, "remote", None) or os.environ.get(REMOTE_ENV) or None


def cache_dir(args: argparse.Namespace) -> Path:
    return getattr(args, "cache_dir", None) or default_cache_dir()


def options(args: argparse.Namespace) -> Options:
    jobs, max_memory = resources(args)
    return Options(jobs=jobs, max_memory=max_memory, cache_dir=cache_dir(args), out_dir=getattr(args, "out_dir", None), models=list(getattr(args, "models", [])),
                   device=getattr(args, "device", "cpu"), quiet=args.quiet, progress=Progress(args.quiet),
                   remote=remote_url(args), remote_endpoint=getattr(args, "remote_endpoint", None),
                   remote_read_only=getattr(args, "remote_read_only", False),
                   strict=getattr(args, "strict", False))


def emit_text(args: argparse.Namespace, text: str, write: Callable[[Path, str], object]) -> None:
    """Write `text` to `-o FILE` with `write` (saying so unless quiet), else to standard output."""
    if args.output:
        write(args.output, text)
        if not args.quiet:
            print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
