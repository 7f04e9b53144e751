"""Tensors are produced ahead on several threads, yet arrive in name order, within the memory window, with the first
failure in name order reported, and the written bytes do not depend on the number of threads."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

from conftest import write_recipe
from mergekit_sd.engine import runner
from mergekit_sd.formats.prefetch import batches, produce_ahead
from mergekit_sd.lazy import LazyModel, TensorSpec


def _model(sizes: dict[str, int], produce=None) -> LazyModel:
    specs = {n: TensorSpec(torch.float32, (k,)) for n, k in sizes.items()}
    return LazyModel(specs, produce or (lambda n: torch.full((sizes[n],), float(len(n)))))


def test_order_and_values_for_any_worker_count():
    sizes = {f"t{i:03d}": 1 + (i * 37) % 5000 for i in range(300)}
    m = _model(sizes)
    names = m.keys()
    for workers in (1, 2, 5):
        got = list(produce_ahead(m, names, workers=workers))
        assert [n for n, _ in got] == names
        for n, t in got:
            assert t.shape == (sizes[n],) and float(t[0]) == len(n)


def test_small_tensors_travel_in_batches():
    sizes = {f"s{i:03d}": 16 for i in range(200)} | {"big": 4 << 20}
    groups = batches(_model(sizes), sorted(sizes))
    assert len(groups) < 10  # 200 tiny tensors: a handful of hand-offs
    assert ["big"] in groups  # a tensor over the batch size goes alone


def test_window_bounds_what_waits_for_the_consumer():
    sizes = {f"t{i:02d}": 1 << 18 for i in range(40)}  # 1 MiB each in fp32
    live, peak, lock = [0], [0], threading.Lock()

    def produce(n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return torch.zeros(sizes[n])

    m = _model(sizes, produce)
    for _name, _t in produce_ahead(m, m.keys(), workers=4, window=3 << 20):
        time.sleep(0.002)  # a slow consumer: producers would run far ahead without the window
        with lock:
            live[0] -= 1
    assert peak[0] <= 4  # 3 MiB of window (+ the one being consumed)


def test_first_failure_in_name_order_is_raised():
    def produce(n):
        if n in ("t05", "t30"):
            raise RuntimeError(f"bad {n}")
        return torch.zeros(4)

    m = _model({f"t{i:02d}": 4 for i in range(40)}, produce)
    seen = []
    with pytest.raises(RuntimeError, match="bad t05"):
        for n, _ in produce_ahead(m, m.keys(), workers=3):
            seen.append(n)
    assert seen == m.keys()[:len(seen)] and len(seen) <= 5  # nothing after the failing tensor was handed on


def test_build_bytes_do_not_depend_on_the_thread_count(tmp_path, model_dir, sdbuild, monkeypatch):
    shas = []
    for workers in (1, 3):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        rp = write_recipe(d, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
            steps:
              t: {{op: add_difference_ties, models: [A, B, C], alpha: 1.0, k: 0.3}}
              e: {{op: extract_lora, models: [A, t], rank: 4}}
            outputs: {{t: t.safetensors, e: e.safetensors}}
            """)
        monkeypatch.setattr(runner, "default_workers", lambda w=workers: w)
        assert sdbuild("build", rp, "-q", "--cache-dir", d / "cache").code == 0
        shas.append([hashlib.sha256((d / f).read_bytes()).hexdigest() for f in ("t.safetensors", "e.safetensors")])
    assert shas[0] == shas[1]
