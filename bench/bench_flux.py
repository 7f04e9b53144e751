"""weighted_sum of two Flux.1-dev diffusion models (BFL naming, bf16) at a shrink factor: time vs the I/O floor, peak RSS.

Factor 2 (the default) is about 6 GB per input; factor 1 is the full 23.8 GB model (two inputs and the output need
about 72 GB of disk). Targets: peak RSS <= 1 GiB, time <= 3x the I/O floor. Inputs come from a warm page cache.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import IO_FLOOR, recipe  # noqa: E402
from common import measure, report, sdbuild, warm  # noqa: E402


def flux_models(work: Path, factor: int) -> list[Path]:
    from mergekit_sd.synth.models import write_synth

    out = []
    for i in range(2):
        p = work / f"flux-f{factor}-{i}.safetensors"
        if not p.exists():
            print(f"writing synthetic Flux model {p.name} ...", file=sys.stderr, flush=True)
            write_synth(p, "flux", factor, "bf16", seed=i + 1, naming="bfl")
        out.append(p)
    return out


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--flux-factor", type=int, default=2)
    args, _ = ap.parse_known_args()
    work = args.workdir.resolve() / "flux"
    work.mkdir(parents=True, exist_ok=True)
    a, b = flux_models(work, args.flux_factor)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    rp = recipe(work, a, b, 0.3)
    sdbuild_cmd = sdbuild("build", str(rp), "-q", "--cache-dir", str(cache))
    measure(sdbuild_cmd)  # first build also hashes the inputs; the figure below is the merge alone
    rp = recipe(work, a, b, 0.31)
    warm(a, b)
    res: dict[str, float] = {}
    res["io_floor_s"], _ = measure([sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work / "copy.bin")])
    (work / "copy.bin").unlink()
    warm(a, b)
    res["sdbuild_s"], res["sdbuild_rss_gib"] = measure(sdbuild_cmd)
    report(f"flux factor {args.flux_factor}: input size", a.stat().st_size / 2**30, "GiB")
    report("io floor (read both inputs, write one copy)", res["io_floor_s"], "s")
    report("sdbuild weighted_sum", res["sdbuild_s"], "s")
    report("sdbuild peak RSS (target <= 1)", res["sdbuild_rss_gib"], "GiB")
    report("ratio sdbuild / io floor time (target <= 3)", res["sdbuild_s"] / res["io_floor_s"])
    shutil.rmtree(cache, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
