"""The shipped demo recipes build on a fresh folder and every output reproduces bit for bit from its metadata alone
(inputs declared out of alphabetical order, an intermediate output, LoRA steps)."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from mergekit_sd.synth.demo import make_demo_models


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo_models(d / "models")
    for name in ("demo.yaml", "lora-demo.yaml"):
        shutil.copy(ROOT / "recipes" / name, d / name)
    return d


@pytest.mark.parametrize("recipe,outputs", [
    ("demo.yaml", ["demo-mix", "demo-mix-stage1"]),
    ("lora-demo.yaml", ["lora-demo", "lora-demo-extracted", "lora-demo-combined"]),
])
def test_demo_outputs_reproduce_identical_bytes(demo, sdbuild, recipe, outputs, tmp_path):
    assert sdbuild("build", demo / recipe, "-q").code == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo / "models", moved)
    for name in outputs:
        r = sdbuild("reproduce", demo / "out" / f"{name}.safetensors", "--models", moved)
        assert r.code == 0, r
        assert "identical bytes" in r.out + r.err, r
