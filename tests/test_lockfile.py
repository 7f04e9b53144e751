"""Lock files: stable text, parsed strictly, compared entry by entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_sd.errors import UserError
from mergekit_sd.engine.lockfile import (
    Lock,
    LockDifference,
    LockEntry,
    compare,
    entries_from,
    format_lock,
    lock_path,
    parse_lock,
    read_lock,
    write_lock,
)

S1, S2 = "a" * 64, "b" * 64
D1, D2, D3 = "1" * 32, "2" * 32, "3" * 32


def _lock() -> Lock:
    return entries_from({"zeta": (S2, D2), "base": (S1, D1)}, {"release": D3})


def test_format_is_sorted_one_line_per_entry():
    text = format_lock(_lock(), "mix.yaml")
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body == [f"input base sha256={S1} digest={D1}", f"input zeta sha256={S2} digest={D2}", f"output release digest={D3}"]
    assert text.startswith("# sdbuild lock 1 for mix.yaml")
    assert text.endswith("\n")
    # insertion order does not matter: same entries, same text
    again = entries_from({"base": (S1, D1), "zeta": (S2, D2)}, {"release": D3})
    assert format_lock(again, "mix.yaml") == text


def test_round_trip_and_file_io(tmp_path: Path):
    p = write_lock(tmp_path / "mix.yaml.lock", _lock(), "mix.yaml")
    assert read_lock(p) == _lock()
    assert parse_lock(p.read_text()) == _lock()
    assert read_lock(tmp_path / "none.lock") is None
    assert not list(tmp_path.glob(".*tmp*"))


def test_lock_path_sits_beside_the_recipe():
    assert lock_path("recipes/aurora.yaml") == Path("recipes/aurora.yaml.lock")
    assert lock_path("recipes/aurora.yml") == Path("recipes/aurora.yml.lock")


@pytest.mark.parametrize("line,msg", [
    ("inpt base digest=11", "expected `input NAME"),
    ("input base sha256=xyz", "bad field"),
    ("output rel sha256=aa", "bad field"),
    ("input base", "expected `input NAME"),
    ("input 9bad digest=11", "invalid name"),
])
def test_bad_lines_are_user_errors_with_line_numbers(line, msg):
    with pytest.raises(UserError, match=msg) as e:
        parse_lock(f"# header\n{line}\n", "mix.yaml.lock")
    assert str(e.value).startswith("mix.yaml.lock:2: ")


def test_duplicates_rejected():
    with pytest.raises(UserError, match="listed twice"):
        parse_lock(f"input a digest={D1}\ninput a digest={D2}\n", "x.lock")


def test_compare_names_what_differs():
    locked = _lock()
    now = entries_from({"base": (S1, D2), "zeta": (S2, D2), "new": (S1, D1)}, {"release": D1})
    diffs = compare(locked, now, "input")
    assert [(d.name, d.field) for d in diffs] == [("base", "digest"), ("new", "missing")]
    assert "input 'base': digest 2222222222222222… differs from the locked 1111111111111111…" == diffs[0].describe()
    out = compare(locked, now, "output")
    assert [(d.name, d.field, d.locked, d.actual) for d in out] == [("release", "digest", D3, D1)]
    assert compare(locked, locked, "input") == [] and compare(locked, locked, "output") == []
    gone = compare(locked, entries_from({"base": (S1, D1)}, {}), "input", report_gone=True)
    assert [(d.name, d.field) for d in gone] == [("zeta", "gone")]


def test_sha_change_alone_is_a_difference():
    now = entries_from({"base": (S2, D1), "zeta": (S2, D2)}, {})
    assert [(d.name, d.field) for d in compare(_lock(), now, "input")] == [("base", "sha256")]
