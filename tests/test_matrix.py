"""Sweeps: `matrix:` variants, shared steps built once, typed substitution, file:line errors, the schema."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from mergekit_sd.provenance.record import read_provenance
from mergekit_sd.formats.safetensors import read_header

UNET = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
TE = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


def sweep(tmp_path, models, extra: str = ""):
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        matrix: {{alpha: [0.2, 0.3, 0.4], te: [0, 1]}}
        inputs: {{a: {models}/a.safetensors, b: {models}/b.safetensors}}
        steps:
          pre: {{op: prune, model: a}}
          mix: {{op: weighted_sum, models: [pre, b], alpha: {{default: "${{alpha}}", BASE: "${{te}}"}}}}
        outputs:
          mix: out/mix-a${{alpha}}-te${{te}}.safetensors
        {extra}""")


def test_3x2_matrix_builds_6_outputs_and_shares_the_fixed_step(tmp_path, model_dir, sdbuild):
    rp = sweep(tmp_path, model_dir)
    r = sdbuild(rp, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    names = [f"mix@alpha={a},te={t}" for a in ("0.2", "0.3", "0.4") for t in ("0", "1")]
    assert rep["built"] == ["pre"] + names  # `pre` uses no variable: built once, not six times
    assert sorted(rep["outputs"]) == sorted(names)
    a = load_file(str(model_dir / "a.safetensors"))
    b = load_file(str(model_dir / "b.safetensors"))
    for alpha in (0.2, 0.3, 0.4):
        for te in (0, 1):
            out = load_file(str(tmp_path / "out" / f"mix-a{alpha}-te{te}.safetensors"))
            want = a[UNET].double() * (1 - alpha) + b[UNET].double() * alpha  # rounded once to fp16 by the merge
            torch.testing.assert_close(out[UNET].double(), want, rtol=2 ** -10, atol=2 ** -24)
            assert torch.equal(out[TE], (a if te == 0 else b)[TE])  # BASE (text encoder) follows ${te}
    # typed substitution: the recorded parameters are numbers, as if written by hand
    _, meta = read_header(tmp_path / "out" / "mix-a0.3-te1.safetensors")
    step = read_provenance(meta)["recipe"]["steps"]["mix@alpha=0.3,te=1"]
    assert step["alpha"] == {"default": 0.3, "BASE": 1.0} or step["alpha"] == {"BASE": 1, "default": 0.3}
    assert all(isinstance(v, (int, float)) for v in step["alpha"].values())
    # a rebuild is all fresh
    r = sdbuild("build", rp, "--json")
    assert r.code == 0


def test_plan_and_build_accept_variant_names(tmp_path, model_dir, sdbuild):
    rp = sweep(tmp_path, model_dir)
    r = sdbuild("plan", rp, "mix@alpha=0.4,te=0", "--json")
    assert r.code == 0, r.err
    assert [n["name"] for n in json.loads(r.out)["nodes"]] == ["a", "b", "pre", "mix@alpha=0.4,te=0"]
    r = sdbuild("build", rp, "mix@te=1,alpha=0.20", "--json")  # any order, any spelling of the number
    assert r.code == 0, r.err
    assert json.loads(r.out)["built"] == ["pre", "mix@alpha=0.2,te=1"]
    r = sdbuild("plan", rp, "mix", "--json")  # the template stands for all its variants
    assert len([n for n in json.loads(r.out)["nodes"] if n["name"].startswith("mix@")]) == 6
    r = sdbuild("plan", rp, "mix@alpha=0.5,te=0")
    assert r.code == 2 and "no input or step named 'mix@alpha=0.5,te=0'" in r.err


@pytest.mark.parametrize("body,line,needle", [
    ("""
     sdbuild: 1
     matrix: {alpha: [0.2, 0.3]}
     inputs: {a: a.safetensors, b: b.safetensors}
     steps:
       mix: {op: weighted_sum, models: [a, b], alpha: "${alpah}"}
     outputs: {mix: "m-${alpha}.safetensors"}
     """, 5, "unknown matrix variable ${alpah} (did you mean 'alpha'?)"),
    ("""
     sdbuild: 1
     matrix:
       alpha: 0.2
     inputs: {a: a.safetensors, b: b.safetensors}
     steps: {mix: {op: weighted_sum, models: [a, b], alpha: "${alpha}"}}
     outputs: {mix: m.safetensors}
     """, 3, "needs a non-empty list of values"),
    ("""
     sdbuild: 1
     matrix: {alpha: [0.2, 0.3]}
     inputs: {a: a.safetensors, b: b.safetensors}
     steps:
       fixed: {op: weighted_sum, models: [a, b]}
     outputs:
       fixed: "f-${alpha}.safetensors"
     """, 7, "does not vary with 'alpha'"),
    ("""
     sdbuild: 1
     matrix: {alpha: [0.2, 0.3]}
     inputs: {a: a.safetensors, b: b.safetensors}
     steps:
       mix: {op: weighted_sum, models: [a, b], alpha: "${alpha}"}
     outputs:
       mix: m.safetensors
     """, 7, "are both written to 'm.safetensors'"),
    ("""
     sdbuild: 1
     matrix: {alpha: [0.2, x]}
     inputs: {a: a.safetensors, b: b.safetensors}
     steps:
       mix: {op: weighted_sum, models: [a, b], alpha: "${alpha}"}
     outputs:
       mix: "m-${alpha}.safetensors"
     """, 5, "unknown block weight preset 'x'"),
])
def test_matrix_mistakes_name_file_and_line(tmp_path, sdbuild, body, line, needle):
    rp = write_recipe(tmp_path, body)
    r = sdbuild("plan", rp)
    assert r.code == 2, r
    assert f"recipe.yaml:{line}:" in r.err and needle in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_schema_covers_matrix(tmp_path, model_dir):
    import jsonschema
    import yaml

    from mergekit_sd.recipe.schema import recipe_schema

    schema = recipe_schema()
    data = yaml.safe_load(sweep(tmp_path, model_dir).read_text())
    jsonschema.validate(data, schema)
    data["outputs"] = {"mix": {"path": "m-${alpha}-${te}.safetensors", "card": "m.md"}}
    jsonschema.validate(data, schema)
    for bad in ({"alpha": 0.2}, {"alpha": []}, {"bad name": [1]}):
        data["matrix"] = bad
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(data, schema)
