"""The build engine end to end: exact values, incremental rebuilds, determinism, crash safety, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, write_recipe
from mergekit_sd.engine import memo as hashing
from mergekit_sd.formats import safetensors as tensorio
from mergekit_sd.engine.options import Options
from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.runner import Runner
from mergekit_sd.recipe.load import load_recipe
from mergekit_sd.synth.models import write_synth

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def f64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.dtype.is_floating_point else v for k, v in load_file(str(path)).items()}


def recipe_four(tmp_path: Path, model_dir: Path, alpha=0.3) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs:
          A: {model_dir}/a.safetensors
          B: {model_dir}/b.safetensors
          C: {model_dir}/c.safetensors
        steps:
          ws: {{op: weighted_sum, models: [A, B], alpha: {alpha}, dtype: fp32}}
          ad: {{op: add_difference, models: [A, B, C], alpha: 0.7, dtype: fp32}}
          ts: {{op: triple_sum, models: [A, B, C], alpha: 0.2, beta: 0.3, dtype: fp32}}
          st: {{op: sum_twice, models: [A, B, C], alpha: 0.5, beta: 0.4, dtype: fp32}}
        outputs:
          ws: out/ws.safetensors
          ad: out/ad.safetensors
          ts: out/ts.safetensors
          st: out/st.safetensors
        """)


def test_four_ops_match_their_formulas(tmp_path, model_dir, sdbuild):
    r = sdbuild("build", recipe_four(tmp_path, model_dir), "-q")
    assert r.code == 0, r
    A, B, C = (f64(model_dir / f"{n}.safetensors") for n in "abc")
    expect = {
        "ws": lambda k: A[k] * 0.7 + B[k] * 0.3,
        "ad": lambda k: A[k] + 0.7 * (B[k] - C[k]),
        "ts": lambda k: A[k] * 0.5 + B[k] * 0.2 + C[k] * 0.3,
        "st": lambda k: (A[k] * 0.5 + B[k] * 0.5) * 0.6 + C[k] * 0.4,
    }
    for name, formula in expect.items():
        out = load_file(str(tmp_path / "out" / f"{name}.safetensors"))
        assert set(out) == set(A)
        for k, t in out.items():
            if k == POS:
                assert t.dtype == torch.int64 and torch.equal(t, torch.arange(77).reshape(1, 77))
                continue
            assert t.dtype == torch.float32, k
            torch.testing.assert_close(t.double(), formula(k), rtol=2e-6, atol=2e-7, msg=f"{name} {k}")


def test_worked_example_values(tmp_path, sdbuild):
    """docs/formats.md §2.5 on one two-element tensor."""
    from safetensors.torch import save_file

    for n, v in (("a", [1.0, 2.0]), ("b", [3.0, 0.0]), ("c", [1.0, 1.0])):
        save_file({"model.diffusion_model.x.weight": torch.tensor(v)}, str(tmp_path / f"{n}.safetensors"))
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {A: a.safetensors, B: b.safetensors, C: c.safetensors}
        steps:
          ws: {op: weighted_sum, models: [A, B], alpha: 0.25}
          ad: {op: add_difference, models: [A, B, C], alpha: 0.5}
          ts: {op: triple_sum, models: [A, B, C], alpha: 0.2, beta: 0.3}
          st: {op: sum_twice, models: [A, B, C], alpha: 0.5, beta: 0.5}
        outputs: {ws: ws.safetensors, ad: ad.safetensors, ts: ts.safetensors, st: st.safetensors}
        """)
    assert sdbuild(rp, "-q").code == 0
    got = {n: load_file(str(tmp_path / f"{n}.safetensors"))["model.diffusion_model.x.weight"].tolist() for n in ("ws", "ad", "ts", "st")}
    assert got["ws"] == [1.5, 1.5]
    assert got["ad"] == [2.0, 1.5]
    assert got["ts"] == pytest.approx([1.4, 1.3], abs=1e-6)
    assert got["st"] == [1.5, 1.0]


def test_chain_rounds_once_per_step(tmp_path, model_dir, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
        steps:
          s1: {{op: weighted_sum, models: [A, B], alpha: 0.4}}
          s2: {{op: add_difference, models: [s1, C, A], alpha: 0.5}}
          s3: {{op: sum_twice, models: [s2, B, C], alpha: 0.25, beta: 0.1, dtype: fp32}}
        outputs: {{s3: out.safetensors}}
        """)
    assert sdbuild(rp, "-q").code == 0
    A, B, C = (f64(model_dir / f"{n}.safetensors") for n in "abc")
    out = load_file(str(tmp_path / "out.safetensors"))
    half = lambda t: t.float().half().double()  # noqa: E731 - intermediate steps keep A's dtype (fp16)
    for k, t in out.items():
        if k == POS:
            continue
        s1 = half(A[k] * 0.6 + B[k] * 0.4)
        s2 = half(s1 + 0.5 * (C[k] - A[k]))
        s3 = (s2 * 0.75 + B[k] * 0.25) * 0.9 + C[k] * 0.1
        torch.testing.assert_close(t.double(), s3, rtol=2e-6, atol=2e-7, msg=k)


def _session(rp: Path, cache: Path) -> Planner:
    return Planner(load_recipe(rp), Options(cache_dir=cache, quiet=True))


def _count_reads(monkeypatch) -> list[int]:
    reads = [0]
    orig = tensorio._preadinto

    def counting(fd, buf, offset):
        reads[0] += len(buf)
        return orig(fd, buf, offset)

    monkeypatch.setattr(tensorio, "_preadinto", counting)
    return reads


def test_noop_build_reads_no_model_bytes(tmp_path, model_dir, monkeypatch, sdbuild):
    rp = recipe_four(tmp_path, model_dir)
    cache = tmp_path / "cache"
    first = Runner(_session(rp, cache)).build()
    assert sorted(first.built) == ["ad", "st", "ts", "ws"]
    hashed = hashing.STATS["files_hashed"]
    reads = _count_reads(monkeypatch)
    again = Runner(_session(rp, cache)).build()
    assert again.built == [] and sorted(again.fresh) == ["ad", "st", "ts", "ws"]
    assert hashing.STATS["files_hashed"] == hashed
    assert reads[0] == 0
    # the CLI answers a repeated build from its stamp without planning at all
    r = sdbuild("build", rp, "--json")
    assert r.code == 0 and json.loads(r.out)["built"] == []
    assert reads[0] == 0


def test_mtime_only_change_builds_nothing(tmp_path, model_dir):
    local = tmp_path / "m"
    shutil.copytree(model_dir, local)
    rp = recipe_four(tmp_path, local)
    cache = tmp_path / "cache"
    Runner(_session(rp, cache)).build()
    st = os.stat(local / "b.safetensors")
    os.utime(local / "b.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hashed = hashing.STATS["files_hashed"]
    again = Runner(_session(rp, cache)).build()
    assert again.built == []
    assert hashing.STATS["files_hashed"] == hashed + 1  # b was re-hashed, found identical


def test_changed_input_or_parameter_rebuilds_only_dependants(tmp_path, model_dir):
    local = tmp_path / "m"
    shutil.copytree(model_dir, local)
    body = f"""
        sdbuild: 1
        inputs: {{A: {local}/a.safetensors, B: {local}/b.safetensors, C: {local}/c.safetensors}}
        steps:
          ab: {{op: weighted_sum, models: [A, B], alpha: ALPHA}}
          ac: {{op: weighted_sum, models: [A, C], alpha: 0.5}}
          top: {{op: weighted_sum, models: [ab, ac], alpha: 0.5}}
          side: {{op: weighted_sum, models: [ac, A], alpha: 0.5}}
        outputs: {{top: top.safetensors, side: side.safetensors}}
        """
    rp = write_recipe(tmp_path, body.replace("ALPHA", "0.3"))
    cache = tmp_path / "cache"
    assert len(Runner(_session(rp, cache)).build().built) == 4
    # a parameter: that step and its dependants only
    write_recipe(tmp_path, body.replace("ALPHA", "0.6"))
    s = _session(rp, cache)
    reasons = {n.name: n.reason for n in s.plan() if n.state == "stale"}
    assert reasons == {"ab": "parameters changed", "top": "input 'ab' will be rebuilt"}
    assert sorted(Runner(s).build().built) == ["ab", "top"]
    # an input's content: its dependants only
    write_synth(local / "c.safetensors", "sd1", 32, "fp16", seed=99)
    rep = Runner(_session(rp, cache)).build()
    assert sorted(rep.built) == ["ac", "side", "top"] and rep.fresh == ["ab"]


def test_early_cutoff_reuses_identical_tensors(tmp_path, model_dir):
    body = f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          up: {{op: weighted_sum, models: [A, B], alpha: 0.5, on_missing: MODE}}
          down: {{op: weighted_sum, models: [up, A], alpha: 0.5}}
        outputs: {{down: down.safetensors}}
        """
    rp = write_recipe(tmp_path, body.replace("MODE", "keep_a"))
    cache = tmp_path / "cache"
    Runner(_session(rp, cache)).build()
    before = load_file(str(tmp_path / "down.safetensors"))
    write_recipe(tmp_path, body.replace("MODE", "take_b"))  # same tensors (no key is missing), new parameters
    s = _session(rp, cache)
    Runner(s).build()
    assert s.states["up"].digest is not None
    after = load_file(str(tmp_path / "down.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    plan = {n.name: n for n in _session(rp, cache).plan()}
    assert plan["down"].state == "fresh"


def test_clean_caches_give_identical_bytes_readable_by_safetensors(tmp_path, model_dir, sdbuild):
    rp = recipe_four(tmp_path, model_dir)
    assert sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "c1", "--out-dir", tmp_path / "o1").code == 0
    assert sdbuild("build", rp, "-q", "--cache-dir", tmp_path / "c2", "--out-dir", tmp_path / "o2").code == 0
    for name in ("ws", "ad", "ts", "st"):
        one = (tmp_path / "o1" / "out" / f"{name}.safetensors").read_bytes()
        two = (tmp_path / "o2" / "out" / f"{name}.safetensors").read_bytes()
        assert one == two
        path = str(tmp_path / "o1" / "out" / f"{name}.safetensors")
        assert len(load_file(path)) == 1131
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        prov = json.loads(meta["sdbuild.provenance"])
        assert prov["node"] == name and set(prov["recipe"]["inputs"]) >= {"A", "B"}
        assert str(tmp_path) not in meta["sdbuild.provenance"]  # no absolute paths
        digest, _ = tensorio.file_content_digest(path)
        assert meta["sdbuild.content_digest"] == digest


def test_plan_json_reports_state_and_reason(tmp_path, model_dir, sdbuild):
    rp = recipe_four(tmp_path, model_dir)
    r = sdbuild("plan", rp, "--json")
    assert r.code == 0
    nodes = {n["name"]: n for n in json.loads(r.out)["nodes"]}
    assert nodes["ws"]["state"] == "stale" and nodes["ws"]["reason"] == "never built" and nodes["ws"]["op"] == "weighted_sum"
    assert len(nodes["ws"]["key"]) == 32
    sdbuild("build", rp, "-q")
    nodes = {n["name"]: n for n in json.loads(sdbuild("plan", rp, "--json").out)["nodes"]}
    assert {nodes[n]["state"] for n in ("ws", "ad", "ts", "st")} == {"fresh"}


def test_damaged_object_is_rebuilt_not_served(tmp_path, model_dir):
    rp = recipe_four(tmp_path, model_dir)
    cache = tmp_path / "cache"
    s = _session(rp, cache)
    Runner(s).build()
    obj = s.store.object_path(s.keys["ws"][0])
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-10] ^= 0xFF
    obj.write_bytes(bytes(data))
    s2 = _session(rp, cache)
    plan = {n.name: n for n in s2.plan()}
    assert plan["ws"].state == "stale" and plan["ws"].reason == "object damaged"
    assert Runner(s2).build().built == ["ws"]
    assert (tmp_path / "out" / "ws.safetensors").read_bytes() != bytes(data)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "mergekit_sd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_during_write_leaves_no_object(tmp_path):
    big = tmp_path / "big"
    write_synth(big / "a.safetensors", "sd1", 4, "fp16", 1)
    write_synth(big / "b.safetensors", "sd1", 4, "fp16", 2)
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {big}/a.safetensors, B: {big}/b.safetensors}}
        steps:
          m: {{op: weighted_sum, models: [A, B], alpha: 0.5, dtype: fp32}}
        outputs: {{m: m.safetensors}}
        """)
    cache = tmp_path / "cache"
    proc = _cli("build", str(rp), "-q", "--cache-dir", str(cache))
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        parts = list((cache / "tmp").glob("*.partial")) if (cache / "tmp").exists() else []
        if parts and parts[0].stat().st_size > 1 << 20:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the build finished before it could be interrupted"
    assert not list((cache / "objects").rglob("*.safetensors"))
    assert not (tmp_path / "m.safetensors").exists()
    done = _cli("build", str(rp), "-q", "--cache-dir", str(cache))
    assert done.wait() == 0, done.stderr.read()
    assert not list((cache / "tmp").glob("*.partial"))
    assert len(load_file(str(tmp_path / "m.safetensors"))) == 1131


def test_concurrent_builds_share_one_cache(tmp_path, model_dir):
    rp = recipe_four(tmp_path, model_dir)
    cache = tmp_path / "cache"
    procs = [_cli("build", str(rp), "--json", "--cache-dir", str(cache), "--out-dir", str(tmp_path / f"o{i}")) for i in (1, 2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
    built = [set(json.loads(out)["built"]) for _, out, _ in results]
    assert built[0].isdisjoint(built[1]) and built[0] | built[1] == {"ws", "ad", "ts", "st"}  # each node built once
    for name in ("ws", "ad", "ts", "st"):
        assert (tmp_path / "o1" / "out" / f"{name}.safetensors").read_bytes() == (tmp_path / "o2" / "out" / f"{name}.safetensors").read_bytes()


def test_progress_is_silent_in_pipes(tmp_path, model_dir, sdbuild):
    rp = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps: {{ws: {{op: weighted_sum, models: [A, B]}}}}
        outputs: {{ws: ws.safetensors}}
        """)
    r = sdbuild("build", rp, "--cache-dir", tmp_path / "cache")  # stderr is not a terminal here
    assert r.code == 0 and "\r" not in r.err and "\x1b" not in r.err
    assert "ws: building (never built)" in r.err
    q = _cli("build", str(rp), "--quiet", "--cache-dir", str(tmp_path / "cache2"))  # a real pipe, a real build
    assert q.wait() == 0 and q.stderr.read() == ""
    assert (tmp_path / "ws.safetensors").exists()


def test_non_finite_result_fails_the_step(tmp_path, sdbuild):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "a.safetensors"))
    save_file({"model.diffusion_model.w": torch.tensor([1.0, 2.0])}, str(tmp_path / "b.safetensors"))
    rp = write_recipe(tmp_path, """
        sdbuild: 1
        inputs: {A: a.safetensors, B: b.safetensors}
        steps: {m: {op: weighted_sum, models: [A, B], alpha: 0.5}}
        outputs: {m: m.safetensors}
        """)
    r = sdbuild(rp)
    assert r.code == 1 and "model.diffusion_model.w" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "m.safetensors").exists()


def test_metadata_only_change_reuses_tensors(tmp_path, model_dir):
    from mergekit_sd.methods import METHODS

    body = f"""
        sdbuild: 1
        card: {{title: TITLE}}
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          m: {{op: weighted_sum, models: [A, B], alpha: 0.5}}
        outputs: {{m: m.safetensors}}
        """
    rp = write_recipe(tmp_path, body.replace("TITLE", "First"))
    cache = tmp_path / "cache"
    Runner(_session(rp, cache)).build()
    before = load_file(str(tmp_path / "m.safetensors"))
    write_recipe(tmp_path, body.replace("TITLE", "Second"))
    s = _session(rp, cache)
    assert [n.reason for n in s.plan() if n.name == "m"] == ["metadata changed (tensors reused)"]
    method = METHODS["weighted_sum"]
    original = method.fn

    def refuse(*a, **k):
        raise AssertionError("tensors were recomputed")

    object.__setattr__(method, "fn", refuse)
    try:
        assert Runner(s).build().built == ["m"]
    finally:
        object.__setattr__(method, "fn", original)
    after = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.title"] == "Second"


def test_gc_keeps_what_a_recipe_needs(tmp_path, model_dir, sdbuild):
    rp = recipe_four(tmp_path, model_dir, alpha=0.3)
    assert sdbuild(rp, "-q").code == 0
    recipe_four(tmp_path, model_dir, alpha=0.6)
    assert sdbuild(rp, "-q").code == 0
    objects = lambda: sorted((tmp_path / "cache" / "objects").rglob("*.safetensors"))  # noqa: E731
    assert len(objects()) == 5  # ws at two alphas, ad, ts, st
    r = sdbuild("gc", rp)
    assert r.code == 0 and "removed 1 objects" in r.out
    assert len(objects()) == 4
    assert sdbuild(rp, "--json").code == 0
    plan = json.loads(sdbuild("plan", rp, "--json").out)
    assert {n["state"] for n in plan["nodes"]} == {"fresh"}
    assert sdbuild("gc").code == 0 and objects() == []
