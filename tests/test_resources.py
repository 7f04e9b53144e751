"""How much of the machine a build uses (-j, --max-memory, --device auto) never changes what it writes; bad values
are one-line errors; the memory budget makes work wait instead of exceeding it; the device is reported per step;
the host-to-device staging sends tensors in their stored dtype."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from mergekit_sd.engine import runner
from mergekit_sd.engine.options import parse_size
from mergekit_sd.errors import UserError
from mergekit_sd.formats.budget import MemoryBudget
from mergekit_sd.formats.prefetch import produce_ahead
from mergekit_sd.formats.safetensors import SafetensorsFile, write_model
from mergekit_sd.lazy import LazyModel, TensorSpec, from_tensors
from mergekit_sd.methods import METHODS
from mergekit_sd.ops import OpContext, pick_device
from mergekit_sd.ops.merge import build_merge
from mergekit_sd.ops.transfer import fetch_inputs, host_to_device

STEPS = """
  ws: {op: weighted_sum, models: [A, B], alpha: 0.3}
  ties: {op: add_difference_ties, models: [A, B, C], alpha: 0.8, k: 0.3}
  dare: {op: add_difference_dare, models: [A, B, C], p: 0.6, seed: 11}
  sl: {op: slerp, models: [A, B], alpha: 0.4}
  gm: {op: geometric_median, models: [A, B, C], iterations: 8}
  cos: {op: cosine_a, models: [A, B], alpha: 0.3}
"""
NAMES = ("ws", "ties", "dare", "sl", "gm", "cos")


def _recipe(folder, model_dir):
    folder.mkdir(parents=True, exist_ok=True)
    outputs = ", ".join(f"{n}: {n}.safetensors" for n in NAMES)
    return write_recipe(folder, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
        steps:
        """ + STEPS.replace("\n  ", "\n          ") + f"""
        outputs: {{{outputs}}}
        """)


def _shas(folder):
    return {n: hashlib.sha256((folder / f"{n}.safetensors").read_bytes()).hexdigest() for n in NAMES}


def test_output_bytes_do_not_depend_on_jobs(tmp_path, model_dir, sdbuild, monkeypatch):
    results = {}
    for jobs in ("1", "2", "8"):
        d = tmp_path / f"j{jobs}"
        r = sdbuild("build", _recipe(d, model_dir), "-q", "-j", jobs, "--cache-dir", d / "cache")
        assert r.code == 0, r
        results[jobs] = _shas(d)
    d = tmp_path / "env"
    monkeypatch.setenv("SDBUILD_JOBS", "3")
    assert sdbuild("build", _recipe(d, model_dir), "-q", "--cache-dir", d / "cache").code == 0
    results["env"] = _shas(d)
    assert results["1"] == results["2"] == results["8"] == results["env"]
    load_file(tmp_path / "j1" / "gm.safetensors")  # readable by the safetensors library


@pytest.mark.parametrize("flag", [("-j", "0"), ("-j", "-1"), ("-j", "two"), ("--jobs", "1.5"), ("--max-memory", "lots"),
                                  ("--max-memory=-5M",), ("--max-memory", "12Q")])
def test_bad_resource_values_are_one_line_errors(tmp_path, model_dir, sdbuild, flag):
    rp = _recipe(tmp_path, model_dir)
    r = sdbuild("build", rp, *flag)
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and flag[0].lstrip("-").split("-")[0] in lines[0] and "Traceback" not in r.err
    assert not (tmp_path / "ws.safetensors").exists()


@pytest.mark.parametrize("var,value", [("SDBUILD_JOBS", "0"), ("SDBUILD_JOBS", "many"), ("SDBUILD_MAX_MEMORY", "1X")])
def test_bad_resource_values_in_the_environment(tmp_path, model_dir, sdbuild, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    r = sdbuild("build", _recipe(tmp_path, model_dir))
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and var in r.err


def test_sizes():
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("800MB") == 800_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "G", "1.2.3G", "5 parsecs", "0", "-1G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_device_auto_is_cpu_here_and_reported_per_step(tmp_path, model_dir, sdbuild):
    runs = {}
    for dev in ("cpu", "auto"):
        d = tmp_path / dev
        r = sdbuild("build", _recipe(d, model_dir), "--json", "-q", "--device", dev, "--cache-dir", d / "cache")
        assert r.code == 0, r
        runs[dev] = (_shas(d), json.loads(r.out))
    if not torch.cuda.is_available():
        assert runs["cpu"][0] == runs["auto"][0]
    for dev, (_, report) in runs.items():
        want = "cuda" if dev == "auto" and torch.cuda.is_available() else "cpu"
        assert {n: report["steps"][n]["device"] for n in NAMES} == {n: want for n in NAMES}


def test_pick_device():
    assert pick_device("auto", cuda_available=lambda: True).type == "cuda"
    assert pick_device("auto", cuda_available=lambda: False).type == "cpu"
    assert pick_device("cpu", cuda_available=lambda: True).type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        pick_device("cuda", cuda_available=lambda: False)
    with pytest.raises(UserError, match="cpu, cuda or auto"):
        pick_device("tpu", cuda_available=lambda: False)


# -- the budget -------------------------------------------------------------------------------------------------


def test_budget_makes_work_wait_and_never_exceeds():
    b = MemoryBudget(100)
    b.acquire(60)
    assert not b.try_acquire(50)
    got = []
    t = threading.Thread(target=lambda: (b.acquire(50), got.append(b.used)))
    t.start()
    time.sleep(0.05)
    assert got == [] and b.used == 60  # waiting, not exceeding
    b.release(60)
    t.join(5)
    assert got == [50] and b.peak == 60


def test_oversize_work_runs_alone_with_one_warning():
    warnings = []
    b = MemoryBudget(100, warn=warnings.append)
    b.acquire(10)
    assert not b.try_acquire(500, "tensor 'big'")  # too large: waits until nothing else is held
    b.release(10)
    assert b.try_acquire(500, "tensor 'big'")
    b.release(500)
    b.acquire(500, "tensor 'big'")
    b.release(500)
    assert len(warnings) == 1 and "tensor 'big'" in warnings[0] and "memory budget" in warnings[0]


def _model(sizes: dict[str, int], factor: int = 3, produce=None):
    specs = {n: TensorSpec(torch.float32, (k,)) for n, k in sizes.items()}
    produce = produce or (lambda n: torch.arange(sizes[n], dtype=torch.float32) * len(n))
    return LazyModel(specs, produce, coster=lambda n: factor * specs[n].nbytes)


def test_produce_ahead_stays_within_the_budget():
    sizes = {f"t{i:03d}": 1000 + 7919 * i % 60000 for i in range(120)}
    m = _model(sizes)
    live, peak, lock = [0], [0], threading.Lock()
    limit = 2 << 20

    def produce(n):
        with lock:  # what is held while producing: the cost the model declares
            live[0] += m.cost(n)
            peak[0] = max(peak[0], live[0])
        time.sleep(0.001)
        with lock:
            live[0] -= m.cost(n) - m.spec(n).nbytes
        return torch.zeros(sizes[n])

    model = LazyModel(m.specs, produce, coster=m.cost)
    budget = MemoryBudget(limit)
    names = []
    for n, _t in produce_ahead(model, model.keys(), workers=6, budget=budget):
        names.append(n)
        with lock:
            live[0] -= m.spec(n).nbytes
    assert names == model.keys()
    assert peak[0] <= limit and budget.peak <= limit and budget.used == 0


def test_write_model_with_a_tight_budget(tmp_path):
    sizes = {"a.small": 5000, "b.big": 1 << 20, "c.small": 3000, "d.mid": 200_000}
    m = _model(sizes)
    ref = tmp_path / "ref.safetensors"
    write_model(ref, m, {}, workers=2)
    for workers in (1, 4):
        warnings = []
        budget = MemoryBudget(3 << 20, warn=warnings.append)  # b.big needs 12 MiB, everything else fits
        out = tmp_path / f"w{workers}.safetensors"
        write_model(out, m, {}, workers=workers, budget=budget)
        assert out.read_bytes() == ref.read_bytes()
        assert len(warnings) == 1 and "'b.big'" in warnings[0]
        assert budget.used == 0
    got = load_file(tmp_path / "w4.safetensors")
    assert torch.equal(got["d.mid"], torch.arange(200_000, dtype=torch.float32) * 5)


def test_build_with_a_budget_below_one_tensor_warns_once(tmp_path, model_dir, sdbuild, monkeypatch):
    a, b = (SafetensorsFile(model_dir / f"{x}.safetensors").lazy() for x in "ab")
    model = build_merge(METHODS["weighted_sum"], [a, b], {"alpha": 0.3}, OpContext(step="ws"))
    costs = sorted(((model.cost(k), k) for k in model.keys()), reverse=True)
    assert costs[0][0] > costs[1][0]
    limit = (costs[0][0] + costs[1][0]) // 2
    monkeypatch.setattr(runner, "for_tensors", lambda max_memory, workers=1: limit)
    d = tmp_path / "b"
    d.mkdir()
    rp = write_recipe(d, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps: {{ws: {{op: weighted_sum, models: [A, B], alpha: 0.3}}}}
        outputs: {{ws: ws.safetensors}}
        """)
    r = sdbuild("build", rp, "-j", "4", "--cache-dir", d / "cache")
    assert r.code == 0, r
    lines = [ln for ln in r.err.splitlines() if "memory budget" in ln]
    assert len(lines) == 1 and repr(costs[0][1]) in lines[0]
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.undo()
    rp2 = write_recipe(ref, rp.read_text())
    assert sdbuild("build", rp2, "-q", "--cache-dir", ref / "cache").code == 0
    assert (d / "ws.safetensors").read_bytes() == (ref / "ws.safetensors").read_bytes()


# -- moving tensors to the device ---------------------------------------------------------------------------------


def test_staging_sends_the_stored_dtype_through_pinned_buffers_in_read_order():
    events = []

    def pin(t):
        events.append(("pin", t.dtype))
        return t.clone()

    def copy(t, device):
        events.append(("copy", t.dtype, device.type))
        return t

    move = host_to_device(torch.device("cuda"), pin=pin, copy=copy)
    reads = []

    def reader(i):
        def get():
            reads.append(i)
            events.append(("read", i))
            return torch.full((4,), float(i), dtype=torch.float16)
        return get

    got = fetch_inputs([reader(0), reader(1)], move)
    assert [g.dtype for g in got] == [torch.float16, torch.float16]
    assert events == [("read", 0), ("pin", torch.float16), ("copy", torch.float16, "cuda"),
                      ("read", 1), ("pin", torch.float16), ("copy", torch.float16, "cuda")]
    cpu = host_to_device(torch.device("cpu"), pin=pin, copy=copy)
    t = torch.ones(3)
    assert cpu(t) is t


def test_the_kernel_moves_inputs_in_their_stored_dtype_and_widens_on_the_device():
    g = torch.Generator().manual_seed(3)
    tensors = [{"w": torch.randn(40, 30, generator=g).to(torch.float16)} for _ in range(3)]
    models = [from_tensors(t, label=f"m{i}") for i, t in enumerate(tensors)]
    moved = []

    def move(t):
        moved.append(t.dtype)
        return t

    for name, params in (("weighted_sum", {"alpha": 0.3}), ("slerp", {"alpha": 0.3}), ("geometric_median", {"iterations": 5})):
        moved.clear()
        method = METHODS[name]
        ms = models[:max(2, method.min_models)]
        plain = build_merge(method, ms, dict(params), OpContext(step="s")).get("w")
        staged = build_merge(method, ms, dict(params), OpContext(step="s", to_device=move)).get("w")
        assert moved == [torch.float16] * len(ms)
        assert torch.equal(plain, staged)


def test_gpu_bounds_table_matches_the_docs_and_covers_every_method():
    import importlib.util
    import re
    from pathlib import Path

    from mergekit_sd.methods import load_methods

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = (root / "docs" / "performance.md").read_text(encoding="utf-8")
    section = doc[doc.index("### CPU and GPU agreement"):doc.index("## 5.")]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([0-9e.-]+) \|", section, re.M))
    assert {k: float(v) for k, v in rows.items()} == mod.BOUNDS
    assert set(load_methods()) <= set(mod.BOUNDS)


def test_tensors_held_for_the_sha256_never_keep_the_budget(tmp_path):
    """A tensor read before the bytes that precede it in the file waits for the sha256, perhaps until the step's
    end (a tensor the step never reads): it must not hold the budget, or later work would wait forever."""
    from mergekit_sd.formats.hashread import HashingReader
    from mergekit_sd.formats.safetensors import file_content_digest

    path = tmp_path / "m.safetensors"
    write_model(path, from_tensors({n: torch.full((50_000,), float(i)) for i, n in enumerate("abc")}), {})
    budget = MemoryBudget(1 << 20)
    reader = HashingReader(SafetensorsFile(path), budget=budget)
    try:
        for n in ("b", "c"):  # "a" comes first in the file and is never read by the "step"
            reader.read(n)
        for _ in range(500):
            if budget.used == 0:
                break
            time.sleep(0.01)
        assert budget.used == 0 and budget.peak >= 200_000
        assert reader.finish() == file_content_digest(path)
    finally:
        reader.close()


def test_one_job_runs_the_pipeline_on_one_thread(tmp_path, model_dir, sdbuild, monkeypatch):
    started = []
    real_start = threading.Thread.start

    def start(self, *a, **k):
        started.append(self.name)
        return real_start(self, *a, **k)

    monkeypatch.setattr(threading.Thread, "start", start)
    for jobs in ("1", "2"):
        started.clear()
        d = tmp_path / jobs
        rp = _recipe(d, model_dir)
        assert sdbuild("build", rp, "ws", "ties", "-q", "-j", jobs, "--cache-dir", d / "cache").code == 0
        ours = [n for n in started if n.startswith("sdbuild")]
        if jobs == "1":
            assert ours == [] and torch.get_num_threads() == 1
        else:
            assert any(n.startswith("sdbuild-compute") for n in ours) and "sdbuild-writer" in ours


def test_inputs_hashed_before_the_build_are_read_side_by_side(tmp_path, model_dir, sdbuild, monkeypatch):
    """`plan` (like a build with pins or a remote cache) hashes its inputs before it starts: on up to -j threads at
    once, each file once, with the digests a one-thread run gives."""
    import threading
    import time

    import mergekit_sd.engine.memo as memo

    real = memo.content_digest_and_sha256
    live, peak, calls = [0], [0], []
    lock = threading.Lock()

    def slow(path, *args, **kwargs):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            calls.append(path.name)
        time.sleep(0.3)
        try:
            return real(path, *args, **kwargs)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(memo, "content_digest_and_sha256", slow)
    plans = {}
    for jobs in ("3", "1"):
        d = tmp_path / f"j{jobs}"
        d.mkdir()
        rp = write_recipe(d, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
            steps: {{t: {{op: add_difference, models: [A, B, C], alpha: 0.5}}}}
            outputs: {{t: t.safetensors}}
            """)
        peak[0], calls[:] = 0, []
        r = sdbuild("plan", rp, "--json", "-j", jobs, "--cache-dir", d / "cache")
        assert r.code == 0, r
        plans[jobs] = json.loads(r.out)
        assert sorted(calls) == ["a.safetensors", "b.safetensors", "c.safetensors"]  # each file hashed once
        assert peak[0] == (3 if jobs == "3" else 1)
    assert plans["3"] == plans["1"]
