"""Hostile and broken inputs: every case is a one-line error with exit code 2; no crash, hang, traceback or huge allocation."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import write_recipe
from mergekit_sd.errors import UserError
from mergekit_sd.formats.safetensors import MAX_HEADER_SIZE, SafetensorsFile


def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def entry(dtype="F32", shape=(2,), offs=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def valid_file_bytes() -> bytes:
    return st_bytes({"__metadata__": {"format": "pt"}, "a": entry(), "b": entry("F16", (2, 2), (8, 16))}, bytes(16))


CASES = {
    "empty": (b"", "shorter than its 8-byte header length"),
    "short_length_field": (b"\x10\x00\x00", "shorter than its 8-byte header length"),
    "header_length_beyond_file": (st_bytes({"a": entry()}, bytes(8), length=10_000), "runs past the end of the file"),
    "header_over_100mb": (st_bytes({"a": entry()}, bytes(8), length=MAX_HEADER_SIZE + 1), "exceeds the 100000000-byte limit"),
    "header_length_2_64": (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the 100000000-byte limit"),
    "truncated_data": (valid_file_bytes()[:-5], "run past the end of the file (truncated?)"),
    "offsets_out_of_range": (st_bytes({"a": entry(offs=(100, 108))}, bytes(8)), "run past the end of the file"),
    "offsets_reversed": (st_bytes({"a": entry(offs=(8, 0))}, bytes(8)), "invalid data_offsets"),
    "offsets_negative": (st_bytes({"a": entry(offs=(-8, 0))}, bytes(8)), "invalid data_offsets"),
    "offsets_overlap": (st_bytes({"a": entry(offs=(0, 8)), "b": entry(offs=(4, 12))}, bytes(12)), "overlap in the data buffer"),
    "offsets_same_span": (st_bytes({"a": entry(offs=(0, 8)), "b": entry(offs=(0, 8))}, bytes(8)), "overlap in the data buffer"),
    "offsets_vs_shape": (st_bytes({"a": entry(shape=(1000000, 1000000), offs=(0, 8))}, bytes(8)), "need 4000000000000"),
    "offsets_float": (st_bytes({"a": entry(offs=(0.0, 8.0))}, bytes(8)), "invalid data_offsets"),
    "unknown_dtype": (st_bytes({"a": entry(dtype="F128")}, bytes(8)), "unsupported dtype 'F128'"),
    "dtype_not_a_string": (st_bytes({"a": entry(dtype=["F32"])}, bytes(8)), "unsupported dtype"),
    "shape_negative": (st_bytes({"a": entry(shape=(-2,))}, bytes(8)), "invalid shape"),
    "shape_too_many_dims": (st_bytes({"a": entry(shape=(1,) * 40, offs=(0, 4))}, bytes(8)), "invalid shape"),
    "duplicate_names": (st_bytes(b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}", bytes(8)),
                        "duplicate name 'a'"),
    "metadata_nested": (st_bytes({"__metadata__": {"x": {"y": "z"}}, "a": entry()}, bytes(8)), "must map strings to strings"),
    "metadata_number": (st_bytes({"__metadata__": {"x": 1}, "a": entry()}, bytes(8)), "must map strings to strings"),
    "metadata_null": (st_bytes({"__metadata__": {"x": None}, "a": entry()}, bytes(8)), "must map strings to strings"),
    "metadata_list": (st_bytes({"__metadata__": ["x"], "a": entry()}, bytes(8)), "must map strings to strings"),
    "metadata_empty_string": (st_bytes({"__metadata__": "", "a": entry()}, bytes(8)), "must map strings to strings"),
    "lone_surrogate_name": (st_bytes(b'{"a\\ud800":' + json.dumps(entry()).encode() + b"}", bytes(8)), "invalid Unicode"),
    "not_json": (st_bytes(b"{this is not json}", bytes(8)), "corrupt safetensors header"),
    "not_an_object": (st_bytes(b"[1, 2, 3]"), "does not start with '{'"),
    "not_utf8": (st_bytes(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    "deeply_nested": (st_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "corrupt safetensors header"),
    "entry_extra_field": (st_bytes({"a": dict(entry(), evil=1)}, bytes(8)), "corrupt header entry"),
    "entry_not_object": (st_bytes({"a": 5}, bytes(8)), "corrupt header entry"),
    "huge_number": (st_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}"), "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_safetensors_is_a_one_line_user_error(tmp_path, sdbuild, case):
    data, message = CASES[case]
    p = tmp_path / "hostile.safetensors"
    p.write_bytes(data)
    r = sdbuild("inspect", p)
    assert r.code == 2, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdbuild: error: {p}") and "Traceback" not in r.err
    assert message in lines[0]
    assert r.out == ""


def test_hostile_input_in_a_recipe_is_exit_2(tmp_path, sdbuild):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(CASES["offsets_overlap"][0])
    rec = write_recipe(tmp_path, f"sdbuild: 1\ninputs: {{m: {p}}}\nsteps: {{p: {{op: prune, model: m}}}}\noutputs: {{p: p.safetensors}}\n")
    r = sdbuild("build", rec, "-q")
    assert r.code == 2 and "overlap" in r.err and len(r.err.strip().splitlines()) == 1


def test_not_a_regular_file(tmp_path, sdbuild):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    r = sdbuild("inspect", d)
    assert r.code == 2 and "not a regular file" in r.err
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening a FIFO for reading would block forever
    r = sdbuild("inspect", fifo)
    assert r.code == 2 and "not a regular file" in r.err
    r = sdbuild("inspect", tmp_path / "missing.safetensors")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1


def test_file_shrinking_while_read_is_a_user_error(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1000)}, str(p))
    f = SafetensorsFile(p)
    os.truncate(p, 100)
    with pytest.raises(UserError, match="unexpected end of file"):
        f.read("a")
    f.close()


def test_valid_edge_cases_still_load(tmp_path):
    t = {"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), "e2": torch.zeros(0), "b": torch.tensor([True, False])}
    save_file(t, str(tmp_path / "ok.safetensors"), metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "ok.safetensors") as f:
        assert sorted(f.specs) == sorted(t) and f.metadata == {"k": "v"}
        for k, v in t.items():
            assert torch.equal(f.read(k), v)


# ---------------------------------------------------------------------------------------------------------------
# fuzzing the header reader

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "", "f32"]
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES) | json_scalars,
    "shape": st.lists(st.integers(-2, 6), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-4, 300), min_size=0, max_size=3) | json_values,
}) | json_values
headers = st.dictionaries(st.text(min_size=0, max_size=6), entries, max_size=5).flatmap(
    lambda d: st.one_of(st.just(d), st.dictionaries(st.text(max_size=4), json_values | st.text(max_size=4), max_size=3).map(
        lambda m: {**d, "__metadata__": m})))


def _check(path: Path) -> None:
    """Either a UserError, or a file whose every tensor reads back with its declared shape and dtype."""
    try:
        f = SafetensorsFile(path)
    except UserError as e:
        assert "\n" not in str(e)
        return
    with f:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in f.metadata.items())
        for name, spec in f.specs.items():
            t = f.read(name)
            assert t.dtype == spec.dtype and tuple(t.shape) == spec.shape


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data_len=st.integers(0, 320), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -9, 2**40]))
def test_fuzz_structured_headers(header, data_len, length_delta):
    h = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(struct.pack("<Q", max(0, len(h) + length_delta)) + h + bytes(data_len))
        _check(p)


@settings(max_examples=200, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6), cut=st.integers(0, 400))
def test_fuzz_mutated_bytes(edits, cut):
    data = bytearray(valid_file_bytes())
    for pos, val in edits:
        data[pos % len(data)] = val
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(bytes(data[: max(cut, 1)] if cut < len(data) else data))
        _check(p)


# ---------------------------------------------------------------------------------------------------------------
# recipes

def test_yaml_alias_bomb(tmp_path, sdbuild):
    """A billion-laughs recipe (9^10 strings once expanded) is refused quickly with one line."""
    lines = ["sdbuild: 1", 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 11)]
    lines += ["card:", "  description: *l10", "inputs: {a: a.safetensors}", "steps: {}", "outputs: {a: a.safetensors}"]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    r = sdbuild("build", tmp_path / "bomb.yaml", "-q")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "bomb.yaml" in r.err


@pytest.mark.parametrize("body", ["card: &a {x: *a}", "card: &a [*a]", "card: " + "[" * 5000 + "]" * 5000])
def test_yaml_recursive_alias_and_deep_nesting(tmp_path, sdbuild, body):
    p = tmp_path / "r.yaml"
    p.write_text(f"sdbuild: 1\n{body}\ninputs: {{a: a.safetensors}}\nsteps: {{}}\noutputs: {{a: a.safetensors}}\n")
    r = sdbuild("build", p, "-q")
    assert r.code == 2, r
    assert len(r.err.strip().splitlines()) == 1 and "internal failure" not in r.err
    assert "r.yaml" in r.err and ("nested too deeply" in r.err or "refers to itself" in r.err)
