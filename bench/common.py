"""Benchmark helpers: run a command as a child process and report its wall time and its own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one child process; fails loudly if the command fails."""
    wall, rss, _, _ = measure_full(argv, env)
    return wall, rss


def measure_output(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """`measure`, also returning what the child printed on standard output (a --json report)."""
    wall, rss, _, text = measure_full(argv, env)
    return wall, rss, text


def measure_cpu(argv: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GiB, CPU seconds user + system) of one child process. CPU time is what a machine
    shared with other work still measures well."""
    wall, rss, cpu, _ = measure_full(argv, env)
    return wall, rss, cpu


def measure_full(argv: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS in GiB, CPU seconds, standard output) of one child process; fails loudly if the
    command fails."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:  # files, not pipes: never blocks
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env or os.environ.copy(), stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read()[-4000:].decode(errors="replace")
            raise SystemExit(f"benchmark command failed ({code}): {' '.join(argv)}\n{tail}")
        out.seek(0)
        text = out.read().decode(errors="replace")
    return wall, usage.ru_maxrss / (1024 * 1024), usage.ru_utime + usage.ru_stime, text


def sdbuild(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergekit_sd", *args]


def warm(*paths: Path) -> None:
    """Read files once so the page cache is warm (the benchmark compares compute, not disk), after writing back
    what earlier cases left dirty, so that no case pays for another's write-back."""
    os.sync()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def report(name: str, value: float, unit: str = "") -> None:
    print(f"{name}: {value:.3f}{(' ' + unit) if unit else ''}", flush=True)


def ensure_models(work: Path, count: int, arch: str = "sd1", factor: int = 1) -> list[Path]:
    from mergekit_sd.synth.models import write_synth

    paths = []
    for i in range(count):
        p = work / f"{arch}-f{factor}-{i}.safetensors"
        if not p.exists():
            print(f"writing synthetic model {p.name} ...", file=sys.stderr, flush=True)
            write_synth(p, arch, factor, "fp16", seed=i + 1)
        paths.append(p)
    return paths
