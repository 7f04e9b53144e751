"""The package's structure holds: layers and no cycles (import-linter), the README agrees with the code, the demo's
bytes do not move, and what ops report reaches the user."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from conftest import ROOT, write_recipe
from mergekit_sd.methods.catalog import format_methods_markdown
from mergekit_sd.synth.models import synth_tensors, write_synth_ckpt

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layers_hold_and_a_lower_layer_importing_a_higher_one_breaks_them(tmp_path):
    assert _lint(ROOT).returncode == 0, _lint(ROOT).stdout[-3000:]
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "mergekit_sd", copy / "mergekit_sd", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "mergekit_sd" / "formats" / "open.py"
    target.write_text(target.read_text() + "\n\ndef _upward():\n    from mergekit_sd.engine import planner  # noqa\n")
    r = _lint(copy)
    assert r.returncode != 0
    assert "mergekit_sd.formats is not allowed to import mergekit_sd.engine" in r.stdout


def test_readme_methods_table_is_what_sdbuild_methods_prints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    table = format_methods_markdown().splitlines()
    start = readme.index(table[0])
    end = next(i for i in range(start, len(readme)) if not readme[i].startswith("|"))
    assert readme[start:end] == table, "README's methods table differs from `sdbuild methods`: paste format_methods_markdown()"


# sha256 of every file `make demo` writes, from the release before the package was split into layers: the
# restructuring must not move a byte
DEMO_SHA256 = {
    "models/base.safetensors": "76ab0d5b8ddca0c46e4cd815589ea36f671af83f0dd2d4af39d8fec9e5df95db",
    "models/anime.safetensors": "fb8baa58b3d0acf735908c2b9852b1c364f02512b983fac55632dfcb638a6bf0",
    "models/detail.safetensors": "0c9b48ad11567e47b101eaa870180ee4e79866d30650da1bd947efc80c3d37f4",
    "models/detail-lora.safetensors": "5416f0714161d883e6f1424665b5f80a8c55b24696878c97f11e02fbcc88fcec",
    "models/style-locon.safetensors": "38e9ee8199f0b7356a02317ebf6034ff4114f434fbe5f03e0790ed450433562c",
    "out/demo-mix-stage1.safetensors": "20df387694ab5ddf3fb3354632f2d77a318e6551f7c318ce3a9ea77dc51c9a22",
    "out/demo-mix.safetensors": "de31f0784ffbd0e824fcee6f15f66e740b6855638f35f93b72aaec609be8665f",
    "out/lora-demo.safetensors": "356cfd86700d96e0c8fb30caa8e035b924e854380b395268e76c55c84ffd7657",
    "out/lora-demo-combined.safetensors": "0411a9093a08630dae6f42eb845af5b7f2c929a421a96c3ea360d4403b1e48d4",
    "out/lora-demo-extracted.safetensors": "5906a81fdb61a18b9e7aabf659111de5fcafb9825eee0f59841978297353212d",
}


def test_demo_outputs_are_byte_identical_to_the_release(tmp_path, sdbuild):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("demo.yaml", "lora-demo.yaml"):
        shutil.copy(ROOT / "recipes" / name, recipes / name)
    assert sdbuild("synth", "--demo", recipes / "models", "-q").code == 0
    for name in ("demo.yaml", "lora-demo.yaml"):
        r = sdbuild("build", recipes / name, "-q", "--cache-dir", tmp_path / "cache")
        assert r.code == 0, r
    got = {rel: hashlib.sha256((recipes / rel).read_bytes()).hexdigest() for rel in DEMO_SHA256}
    assert got == DEMO_SHA256


def test_a_ckpt_inputs_dropped_training_state_reaches_the_user(tmp_path, sdbuild):
    p = write_synth_ckpt(tmp_path / "m.ckpt", synth_tensors("sd1", 32, "fp32", 3), extra={"global_step": 7, "epoch": 1})
    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs: {{m: {p}}}\nsteps: {{p: {{op: prune, model: m}}}}\noutputs: {{p: p.safetensors}}\n")
    r = sdbuild("build", rec)
    assert r.code == 0, r
    line = "dropped training state from m.ckpt: epoch, global_step"
    assert f"warning: p: {line}" in r.err
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        prov = json.loads(f.metadata()["sdbuild.provenance"])
    assert line in prov["log"]["p"]


def test_a_broken_method_plugin_is_a_warning_naming_it(monkeypatch):
    import importlib.metadata as md

    import pytest

    from mergekit_sd import methods

    ep = md.EntryPoint(name="broken", value="no_such_module_for_sdbuild:register", group="mergekit_sd.methods")
    monkeypatch.setattr(methods, "entry_points", lambda group: [ep] if group == "mergekit_sd.methods" else [])
    monkeypatch.setattr(methods, "_LOADED", False)
    with pytest.warns(methods.PluginWarning, match="method plugin 'broken' .*no_such_module_for_sdbuild.*failed to load"):
        loaded = methods.load_methods()
    assert "weighted_sum" in loaded
