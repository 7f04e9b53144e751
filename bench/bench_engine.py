"""weighted_sum of two full-size SD1 fp16 models: sdbuild vs a naive whole-model merge vs the I/O floor.

Prints figures and ratios measured in this run. Inputs come from a warm page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ensure_models, measure, report, sdbuild, warm  # noqa: E402

NAIVE = """
import sys
from safetensors.torch import load_file, save_file
a = load_file(sys.argv[1]); b = load_file(sys.argv[2])
out = {k: (a[k].float() * 0.7 + b[k].float() * 0.3).to(a[k].dtype) if a[k].is_floating_point() else a[k] for k in a}
save_file(out, sys.argv[3], metadata={"format": "pt"})
"""

SD_MECHA = """
import sys, sd_mecha
recipe = sd_mecha.weighted_sum(sd_mecha.model(sys.argv[1]), sd_mecha.model(sys.argv[2]), alpha=0.3)
sd_mecha.merge(recipe, output=sys.argv[3])
"""

IO_FLOOR = """
import sys
bufs = []
for p in sys.argv[1:3]:
    with open(p, "rb") as f:
        while f.read(64 << 20):
            pass
with open(sys.argv[1], "rb") as src, open(sys.argv[3], "wb") as dst:
    while True:
        b = src.read(64 << 20)
        if not b:
            break
        dst.write(b)
"""


def recipe(work: Path, a: Path, b: Path, alpha: float) -> Path:
    p = work / "bench.yaml"
    p.write_text(textwrap.dedent(f"""
        sdbuild: 1
        inputs: {{A: {a}, B: {b}}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: {alpha}}}
        outputs: {{mix: out/mix.safetensors}}
        """))
    return p


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--factor", type=int, default=1)
    ap.add_argument("--sd-mecha", default=os.environ.get("SDMECHA_PYTHON"),
                    help="a python with sd-mecha installed, to time the same merge with it (optional)")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    a, b = ensure_models(work, 2, factor=args.factor)
    warm(a, b)
    res: dict[str, float] = {}
    res["io_floor_s"], _ = measure([sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work / "copy.bin")])
    (work / "copy.bin").unlink()
    res["naive_s"], res["naive_rss_gib"] = measure([sys.executable, "-c", NAIVE, str(a), str(b), str(work / "naive.safetensors")])
    (work / "naive.safetensors").unlink()
    if args.sd_mecha:
        res["sd_mecha_s"], res["sd_mecha_rss_gib"] = measure([args.sd_mecha, "-c", SD_MECHA, str(a), str(b), str(work / "mecha.safetensors")])
        (work / "mecha.safetensors").unlink()
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    rp = recipe(work, a, b, 0.3)
    res["first_build_s"], res["first_build_rss_gib"] = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    rp = recipe(work, a, b, 0.31)  # edit one number: inputs are already hashed, the merge runs again
    warm(a, b)
    res["sdbuild_s"], res["sdbuild_rss_gib"] = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    res["noop_s"], _ = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    report("io floor (read both inputs, write one copy)", res["io_floor_s"], "s")
    report("naive merge (load both whole)", res["naive_s"], "s")
    report("naive merge peak RSS", res["naive_rss_gib"], "GiB")
    if "sd_mecha_s" in res:
        report("sd-mecha 1.x merge", res["sd_mecha_s"], "s")
        report("sd-mecha peak RSS", res["sd_mecha_rss_gib"], "GiB")
    report("sdbuild first build (hashes inputs: xxh3 + sha256)", res["first_build_s"], "s")
    report("sdbuild merge after editing alpha", res["sdbuild_s"], "s")
    report("sdbuild peak RSS", res["sdbuild_rss_gib"], "GiB")
    report("sdbuild no-op rebuild", res["noop_s"], "s")
    report("ratio sdbuild / naive time (target <= 0.5)", res["sdbuild_s"] / res["naive_s"])
    report("ratio sdbuild / io floor time (target <= 3)", res["sdbuild_s"] / res["io_floor_s"])
    report("ratio sdbuild / naive peak RSS", res["sdbuild_rss_gib"] / res["naive_rss_gib"])
    return res


if __name__ == "__main__":
    main()
