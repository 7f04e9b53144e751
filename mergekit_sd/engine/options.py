"""What a build is asked to do besides the recipe: where the cache, outputs and model folders are, and how to run.

Imports no torch: the no-op fast path needs the default cache folder before anything heavy is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.engine.progress import Progress

CACHE_ENV = "SDBUILD_CACHE"
MODELS_ENV = "SDBUILD_MODELS"
REMOTE_ENV = "SDBUILD_REMOTE"


def default_cache_dir() -> Path:
    """`$SDBUILD_CACHE`, else `./cache`."""
    return Path(os.environ.get(CACHE_ENV) or "cache")


def model_dirs(given: list[Path]) -> list[Path]:
    """Folders searched for inputs: `--models` first, then `$SDBUILD_MODELS` (colon-separated)."""
    return list(given) + [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]


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
