"""Objects are written without a blocking fsync; after a reboot each is read back and checked before it is used."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import write_recipe
from mergekit_sd.engine import boot
from mergekit_sd.engine.state import StateDB


@pytest.fixture
def boot_file(tmp_path, monkeypatch) -> Path:
    """A boot-id source the test controls: writing a new id simulates a reboot."""
    p = tmp_path / "boot_id"
    p.write_text("boot-one\n")
    monkeypatch.setattr(boot, "BOOT_ID_PATH", str(p))
    return p


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    return write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
          top: {{op: weighted_sum, models: [mix, A], alpha: 0.5}}
        outputs: {{top: out/top.safetensors}}
        """)


def _objects(cache: Path) -> list[Path]:
    return sorted((cache / "objects").glob("*/*.safetensors"))


def _corrupt_keeping_identity(path: Path, offset: int) -> None:
    """Flip bytes the way lost page-cache writes would: same size, same mtime, same inode."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(64)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    os.chmod(path, st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_boot_id_is_read_from_the_kernel_file(boot_file):
    assert boot.boot_id() == "boot-one"
    boot_file.write_text("")
    assert boot.boot_id() is None


def test_corrupt_object_after_reboot_is_rebuilt_not_served(tmp_path, model_dir, boot_file, sdbuild, monkeypatch):
    rp = _recipe(tmp_path, model_dir)
    cache = tmp_path / "cache"
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    assert sdbuild("build", rp, "-q").code == 0
    assert synced == []  # with a boot id, nothing waits for the disk
    clean = _sha(tmp_path / "out/top.safetensors")
    db = StateDB(cache)
    assert {db.object_boot(k) for k in db.object_keys()} == {"boot-one"}
    victims = _objects(cache)
    assert len(victims) == 2
    for v in victims:
        _corrupt_keeping_identity(v, v.stat().st_size - 100)

    boot_file.write_text("boot-two\n")
    r = sdbuild("build", rp, "--json")
    assert r.code == 0, r
    assert sorted(json.loads(r.out)["built"]) == ["mix", "top"]  # neither corrupt object was served
    assert _sha(tmp_path / "out/top.safetensors") == clean
    db = StateDB(cache)
    assert {db.object_boot(k) for k in db.object_keys()} == {"boot-two"}


def test_intact_object_after_reboot_is_verified_once_then_trusted(tmp_path, model_dir, boot_file, sdbuild):
    rp = _recipe(tmp_path, model_dir)
    cache = tmp_path / "cache"
    assert sdbuild("build", rp, "-q").code == 0
    boot_file.write_text("boot-two\n")
    r = sdbuild("build", rp, "--json")
    assert r.code == 0 and json.loads(r.out)["built"] == []
    db = StateDB(cache)
    assert {db.object_boot(k) for k in db.object_keys()} == {None}  # read back after a reboot: on disk


def test_same_boot_no_op_is_answered_but_not_across_a_reboot(tmp_path, model_dir, boot_file, sdbuild):
    rp = _recipe(tmp_path, model_dir)
    assert sdbuild("build", rp, "-q").code == 0
    assert "nothing to do" in sdbuild("build", rp).err  # the stamp holds within a boot
    boot_file.write_text("boot-two\n")
    assert "nothing to do" not in sdbuild("build", rp).err  # after a reboot the planner checks the objects


def test_without_a_boot_id_objects_are_fsynced(tmp_path, model_dir, boot_file, sdbuild, monkeypatch):
    boot_file.unlink()
    real = os.fsync
    synced = []

    def spy(fd):
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    assert sdbuild("build", _recipe(tmp_path, model_dir), "-q").code == 0
    assert len(synced) >= 2  # each object's data (and its folder)
    db = StateDB(tmp_path / "cache")
    assert {db.object_boot(k) for k in db.object_keys()} == {None}


def test_old_state_database_gains_the_boot_column(tmp_path):
    cache = tmp_path / "old"
    cache.mkdir()
    con = sqlite3.connect(cache / "state.db")
    con.execute("CREATE TABLE object (key TEXT PRIMARY KEY, compute_key TEXT, digest TEXT, size INTEGER)")
    con.execute("INSERT INTO object VALUES ('k1', 'c1', 'd1', 10)")
    con.commit()
    con.close()
    db = StateDB(cache)
    assert db.object("k1") == ("c1", "d1", 10)
    assert db.object_boot("k1") is None  # written by a version that fsynced: durable
    db.put_object("k2", "c2", "d2", 20, "boot-x")
    assert db.object_boot("k2") == "boot-x"
    StateDB(cache)  # opening a migrated database again is harmless
