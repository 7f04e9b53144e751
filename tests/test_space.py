"""A full disk is found before anything is written: exit 1, one line naming the folder and the bytes, no files left."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import write_recipe
from mergekit_sd.engine import space


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
        outputs: {{mix: out/mix.safetensors}}
        """)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "state.db" and not p.name.startswith("state.db-")
                  and p.suffix != ".lock") if folder.exists() else []


def _clean_object_size(tmp_path: Path, model_dir: Path, sdbuild) -> int:
    other = tmp_path / "clean"
    other.mkdir()
    assert sdbuild("build", _recipe(other, model_dir), "-q", "--cache-dir", other / "cache").code == 0
    return (other / "out/mix.safetensors").stat().st_size


def test_full_cache_disk_stops_before_writing(tmp_path, model_dir, sdbuild, monkeypatch):
    size = _clean_object_size(tmp_path, model_dir, sdbuild)
    cache = tmp_path / "cache"
    monkeypatch.setattr(space, "free_bytes", lambda folder: 4096)
    r = sdbuild("build", _recipe(tmp_path, model_dir), "--cache-dir", cache)
    assert r.code == 1, r
    line = r.err.strip().splitlines()[-1]
    assert "Traceback" not in r.err
    assert f"not enough free space in {cache.resolve() / 'tmp'}" in line
    assert re.search(rf"needs {size} bytes .*, 4096 bytes \(4.0 KiB\) are available", line), line
    assert _files(cache) == []  # no partial object, no object
    assert not (tmp_path / "out").exists()


def test_full_output_disk_stops_before_writing(tmp_path, model_dir, sdbuild, monkeypatch):
    size = _clean_object_size(tmp_path, model_dir, sdbuild)
    cache, out = tmp_path / "cache", tmp_path / "out"
    # the cache and the output folder on two filesystems: outputs must be copies
    monkeypatch.setattr(space, "filesystem_id", lambda folder: 1 if "cache" in str(folder) else 2)
    monkeypatch.setattr(space, "free_bytes", lambda folder: size - 1 if Path(folder) == tmp_path else 10 * size)
    r = sdbuild("build", _recipe(tmp_path, model_dir), "--cache-dir", cache)
    assert r.code == 1, r
    line = r.err.strip().splitlines()[-1]
    assert f"not enough free space in {tmp_path}" in line and f"needs {size} bytes" in line
    assert f"{size - 1} bytes" in line
    assert _files(cache) == [] and not out.exists()


def test_enough_space_builds(tmp_path, model_dir, sdbuild, monkeypatch):
    size = _clean_object_size(tmp_path, model_dir, sdbuild)
    monkeypatch.setattr(space, "free_bytes", lambda folder: size)  # exactly enough
    assert sdbuild("build", _recipe(tmp_path, model_dir), "-q").code == 0
    assert (tmp_path / "out/mix.safetensors").stat().st_size == size
