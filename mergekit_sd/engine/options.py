"""What a build is asked to do besides the recipe: where the cache, outputs and model folders are, and how to run.

Imports no torch: the no-op fast path needs the default cache folder before anything heavy is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.engine.progress import Progress
from mergekit_sd.errors import UserError

CACHE_ENV = "SDBUILD_CACHE"
MODELS_ENV = "SDBUILD_MODELS"
REMOTE_ENV = "SDBUILD_REMOTE"
JOBS_ENV = "SDBUILD_JOBS"
MEMORY_ENV = "SDBUILD_MAX_MEMORY"
DEFAULT_MAX_MEMORY = 1 << 30  # the whole process, torch's own ~220 MiB included (see docs/performance.md)


def default_cache_dir() -> Path:
    """`$SDBUILD_CACHE`, else `./cache`."""
    return Path(os.environ.get(CACHE_ENV) or "cache")


def model_dirs(given: list[Path]) -> list[Path]:
    """Folders searched for inputs: `--models` first, then `$SDBUILD_MODELS` (colon-separated)."""
    return list(given) + [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]


def jobs_from(given: str | int | None) -> int | None:
    """Worker threads for a build: `-j N`, else `$SDBUILD_JOBS`, else None (one per core). A value that is not a
    whole number of at least 1 is a user error (exit 2) naming where it came from."""
    source, value = ("-j/--jobs", given) if given is not None else (JOBS_ENV, os.environ.get(JOBS_ENV) or None)
    if value is None:
        return None
    text = str(value).strip()
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise UserError(f"{source} {value!r}: give a whole number of worker threads, 1 or more")
    return int(text)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000 ** 4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """`512M`, `2G`, `1.5GiB`, `800MB`, `1073741824` -> bytes. A bare letter is binary (M = MiB); `MB` is decimal.
    Raises ValueError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(text)
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(text)
    return size


def max_memory_from(given: str | None) -> int:
    """The memory budget in bytes: `--max-memory SIZE`, else `$SDBUILD_MAX_MEMORY`, else 1 GiB."""
    source, value = ("--max-memory", given) if given is not None else (MEMORY_ENV, os.environ.get(MEMORY_ENV) or None)
    if value is None:
        return DEFAULT_MAX_MEMORY
    try:
        return parse_size(value)
    except ValueError:
        raise UserError(f"{source} {value!r}: not a size; write it like 512M, 2G or 1.5GiB") from None


@dataclass
class Options:
    cache_dir: Path = field(default_factory=default_cache_dir)
    out_dir: Path | None = None
    models: list[Path] = field(default_factory=list)
    device: str = "cpu"
    quiet: bool = False
    progress: Progress | None = None
    remote: str | None = None  # s3://bucket/prefix of a shared cache
    remote_endpoint: str | None = None  # else $AWS_ENDPOINT_URL, else AWS
    remote_read_only: bool = False
    strict: bool = False  # a licence conflict in an output's model card is an error
    jobs: int | None = None  # worker threads for the whole pipeline; None: one per core
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes the build process may reach (see formats.budget)
