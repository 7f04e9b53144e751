"""Shared fixtures: tiny synthetic models with real tensor names, and a CLI runner."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mergekit_sd.cli.main import main  # noqa: E402
from mergekit_sd.synth.models import write_synth  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Every test gets its own cache and no model search path from the environment."""
    monkeypatch.setenv("SDBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDBUILD_MODELS", raising=False)
    yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Three SD1 models (fp16, factor 32) and one SDXL model, written once per test session."""
    d = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_synth(d / f"{name}.safetensors", "sd1", 32, "fp16", seed)
    write_synth(d / "xl.safetensors", "sdxl", 32, "fp16", 4)
    return d


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, err={self.err!r})"


@pytest.fixture
def sdbuild(capsys):
    """Run the CLI in-process: sdbuild("build", "r.yaml") -> Result(code, out, err)."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


def write_recipe(folder: Path, body: str, name: str = "recipe.yaml") -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(body).lstrip())
    return p
