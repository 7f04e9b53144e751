"""Every recipe mistake is one line naming file and line, with exit code 2, before anything runs."""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_recipe

HEAD = """sdbuild: 1
inputs:
  A: {a}
  B: {b}
"""

CASES = {
    "unknown_top_field": (HEAD + "stepz: {{}}\noutputs: {{A: x.safetensors}}\n", 5, "unknown field 'stepz' (did you mean 'steps'?)"),
    "unknown_step_field": (HEAD + "steps:\n  m:\n    op: weighted_sum\n    models: [A, B]\n    alpah: 0.3\noutputs: {{m: m.safetensors}}\n",
                           9, "unknown field 'alpah' for op weighted_sum (did you mean 'alpha'?)"),
    "unknown_op": (HEAD + "steps:\n  m:\n    op: weighted_summ\n    models: [A, B]\noutputs: {{m: m.safetensors}}\n",
                   7, "unknown op 'weighted_summ' (did you mean 'weighted_sum'?)"),
    "dangling_reference": (HEAD + "steps:\n  m:\n    op: weighted_sum\n    models: [A, Bb]\noutputs: {{m: m.safetensors}}\n",
                           8, "refers to 'Bb', which is neither an input nor a step (did you mean 'B'?)"),
    "cycle": (HEAD + "steps:\n  x:\n    op: weighted_sum\n    models: [A, z]\n  y:\n    op: weighted_sum\n    models: [x, B]\n"
                     "  z:\n    op: weighted_sum\n    models: [y, B]\noutputs: {{z: z.safetensors}}\n",
              6, "steps form a cycle: x -> y -> z -> x"),
    "wrong_type": (HEAD + "steps:\n  m:\n    op: weighted_sum\n    models: [A, B]\n    alpha: [1, 2\n", 0, "invalid YAML"),
    "wrong_value_type": (HEAD + "steps:\n  m:\n    op: weighted_sum\n    models: A\noutputs: {{m: m.safetensors}}\n",
                         8, "models must be a non-empty list"),
    "bool_weight": (HEAD + "steps:\n  m:\n    op: weighted_sum\n    models: [A, B]\n    alpha: yes\noutputs: {{m: m.safetensors}}\n",
                    9, "alpha"),
    "two_outputs_one_path": (HEAD + "steps:\n  m: {{op: weighted_sum, models: [A, B]}}\n  n: {{op: weighted_sum, models: [B, A]}}\n"
                                    "outputs:\n  m: out/x.safetensors\n  n: out/X.safetensors\n", 10, "are both written to"),
    "output_escapes_with_dotdot": (HEAD + "outputs:\n  A: ../evil.safetensors\n", 6, "leaves the output directory"),
    "output_absolute": (HEAD + "outputs:\n  A: /tmp/evil.safetensors\n", 6, "leaves the output directory"),
    "output_names_nothing": (HEAD + "outputs:\n  Z: z.safetensors\n", 6, "output 'Z' names no input or step"),
    "missing_version": ("inputs: {{A: {a}}}\noutputs: {{A: x.safetensors}}\n", 1, "missing `sdbuild: 1`"),
    "missing_required_field": (HEAD + "steps:\n  m:\n    op: add_difference\noutputs: {{m: m.safetensors}}\n", 6, "needs field 'models'"),
    "bad_dtype": (HEAD + "steps:\n  m: {{op: weighted_sum, models: [A, B], dtype: fp17}}\noutputs: {{m: m.safetensors}}\n",
                  6, "dtype must be one of fp16, bf16, fp32"),
    "duplicate_key": (HEAD + "steps:\n  m: {{op: weighted_sum, models: [A, B]}}\n  m: {{op: weighted_sum, models: [A, B]}}\n"
                             "outputs: {{m: m.safetensors}}\n", 7, "duplicate key 'm'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_is_a_one_line_error_with_location(case, tmp_path, model_dir, sdbuild):
    text, line, message = CASES[case]
    rp = write_recipe(tmp_path, text.format(a=model_dir / "a.safetensors", b=model_dir / "b.safetensors"))
    r = sdbuild("build", rp)
    assert r.code == 2, r
    err = r.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert message in err, err
    if line:
        assert f"recipe.yaml:{line}:" in err, err
    assert not (tmp_path / "cache" / "objects").exists() or not list((tmp_path / "cache" / "objects").rglob("*.safetensors"))


def test_sha256_pin_mismatch(tmp_path, model_dir, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A:
            path: {model_dir}/a.safetensors
            sha256: {"ab" * 32}
          B: {model_dir}/b.safetensors
        steps:
          m: {{op: weighted_sum, models: [A, B]}}
        outputs: {{m: m.safetensors}}
        """)
    r = sdbuild(rp)
    assert r.code == 2 and "recipe.yaml:5:" in r.err and "pins" in r.err and "a.safetensors" in r.err


def test_sha256_pin_finds_the_file_in_models_folders(tmp_path, model_dir, sdbuild):
    from mergekit_sd.formats.digests import sha256_file

    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A: {{sha256: {sha256_file(model_dir / "a.safetensors")}}}
          B: {{path: somewhere/else/b.safetensors}}
        steps:
          m: {{op: weighted_sum, models: [A, B]}}
        outputs: {{m: m.safetensors}}
        """)
    assert sdbuild(rp, "-q").code == 2
    assert sdbuild(rp, "-q", "--models", model_dir).code == 0
    assert (tmp_path / "m.safetensors").exists()


def test_missing_input_file(tmp_path, sdbuild):
    rp = write_recipe(tmp_path, "sdbuild: 1\ninputs:\n  A: nothere.safetensors\noutputs: {A: x.safetensors}\n")
    r = sdbuild(rp)
    assert r.code == 2 and "recipe.yaml:3:" in r.err and "nothere.safetensors" in r.err and "not found" in r.err


def test_output_through_a_link_is_refused(tmp_path, model_dir, sdbuild):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "proj"
    inside.mkdir()
    os.symlink(outside, inside / "link")
    rp = write_recipe(inside, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps: {{m: {{op: weighted_sum, models: [A, B]}}}}
        outputs: {{m: link/m.safetensors}}
        """)
    r = sdbuild(rp)
    assert r.code == 2 and "through a link" in r.err
    assert not list(outside.iterdir())


def test_schema_accepts_the_demo_recipe(sdbuild):
    import jsonschema
    import yaml

    from conftest import ROOT

    r = sdbuild("schema")
    assert r.code == 0
    schema = json.loads(r.out)
    for name in ("demo.yaml",):
        jsonschema.validate(yaml.safe_load((ROOT / "recipes" / name).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"sdbuild": 1, "outputs": {"m": "m.safetensors"}, "steps": {"m": {"op": "weighted_sum", "alpah": 1}}}, schema)
