"""Atomic writes: a failed write leaves the target as it was and no temporary file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergekit_sd.engine.lockfile import Lock, LockEntry, read_lock, write_lock
from mergekit_sd.formats.atomic import atomic_path, temp_name, write_text
from mergekit_sd.formats.safetensors import write_model
from mergekit_sd.lazy import LazyModel, TensorSpec
from mergekit_sd.synth.models import write_synth


def test_write_text_replaces_the_target_and_leaves_nothing_else(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    assert write_text(target, "new ✓\n") == target
    assert target.read_bytes() == "new ✓\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_failing_write_leaves_neither_target_nor_temp_file(tmp_path: Path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half a file")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_failing_write_keeps_the_old_target(tmp_path: Path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_failing_rename_removes_the_temp_file(tmp_path: Path):
    target = tmp_path / "taken"
    target.mkdir()  # a folder in the way: the rename fails after the data was written
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_text(target, "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (target / "keep").read_text() == "x"


def test_stale_temp_file_of_a_killed_run_is_replaced(tmp_path: Path):
    target = tmp_path / "out.txt"
    temp_name(target).write_text("left by a killed process")
    write_text(target, "fresh")
    assert target.read_text() == "fresh" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_model_write_failing_mid_stream_leaves_nothing(tmp_path: Path):
    specs = {"a": TensorSpec(torch.float32, (4,)), "b": TensorSpec(torch.float32, (4,))}

    def read(name: str) -> torch.Tensor:
        if name == "b":
            raise RuntimeError("tensor b failed")
        return torch.ones(4)

    target = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="tensor b failed"):
        with atomic_path(target) as tmp:
            write_model(tmp, LazyModel(specs, read, {}), {})
    assert list(tmp_path.iterdir()) == []


def test_synthetic_model_and_lock_writes_are_atomic(tmp_path: Path):
    m = write_synth(tmp_path / "m.safetensors", "sd1", 64, "fp16", 1)
    lock = Lock.of([LockEntry("input", "a", "d" * 32, "e" * 64)])
    lp = write_lock(tmp_path / "r.lock", lock, "r.yaml")
    assert read_lock(lp) == lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "r.lock"]
    assert os.path.getsize(m) > 0
