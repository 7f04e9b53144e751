"""Forensics at full size: `sdbuild fit` of an SD1 fp16 model against 3 candidates vs the time to read the four
files, and `sdbuild family` over 6 files (one pass) vs the time to read them. Prints figures measured in this run
(wall seconds from a warm page cache, and each command's own peak RSS). `--repeat N` takes each figure's best of N
runs, which is what a machine shared with other work needs; `--factor F` shrinks the models (F = 4: 1/16 the size)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ensure_models, measure_cpu, report, sdbuild, warm  # noqa: E402

READ = """
import sys
for p in sys.argv[1:]:
    with open(p, "rb") as f:
        while f.read(64 << 20):
            pass
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--factor", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    args, _ = ap.parse_known_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = ensure_models(work, 6, "sd1", args.factor)
    four = models[:4]
    warm(*models)

    def best(argv: list[str]) -> tuple[float, float, float]:
        runs = [measure_cpu(argv) for _ in range(max(1, args.repeat))]
        return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)

    start, _, start_cpu = best([sys.executable, "-c", "import mergekit_sd.cli.forensics, mergekit_sd.forensics.fit"])
    report("forensics: start-up of a command, imports included (s)", start)
    read4, _, read4_cpu = best([sys.executable, "-c", READ, *map(str, four)])
    fit, fit_rss, fit_cpu = best(sdbuild("fit", str(four[0]), "--candidates", *map(str, four[1:]), "--json", "-q", "--device", args.device))
    report("forensics: read 4 files (s)", read4)
    report("forensics: fit vs 3 candidates (s)", fit)
    report("forensics: fit / read ratio", fit / read4)
    report("forensics: fit without start-up / read ratio", (fit - start) / read4)
    report("forensics: fit CPU (s)", fit_cpu)
    report("forensics: read 4 files CPU (s)", read4_cpu)
    report("forensics: fit peak RSS (GiB)", fit_rss)
    read6, _, read6_cpu = best([sys.executable, "-c", READ, *map(str, models)])
    fam, fam_rss, fam_cpu = best(sdbuild("family", *map(str, models), "--json", "-q", "--device", args.device))
    report("forensics: read 6 files (s)", read6)
    report("forensics: family of 6 (s)", fam)
    report("forensics: family / read ratio", fam / read6)
    report("forensics: family without start-up / read ratio", (fam - start) / read6)
    report("forensics: family CPU (s)", fam_cpu)
    report("forensics: read 6 files CPU (s)", read6_cpu)
    report("forensics: family peak RSS (GiB)", fam_rss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
