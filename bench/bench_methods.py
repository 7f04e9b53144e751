"""Merge methods at full size: TIES over three SD1 fp16 models and a block-weighted weighted_sum, next to a scalar
weighted_sum of the same run. Wall time and peak RSS of each `sdbuild build`, inputs already hashed and page-cached.

    python bench/bench_methods.py --workdir DIR [--factor N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ensure_models, measure, report, sdbuild, warm  # noqa: E402

STEPS = {
    "warmup": "{op: weighted_sum, models: [A, B], alpha: 0.29}",
    "weighted_sum": "{op: weighted_sum, models: [A, B], alpha: 0.3}",
    "ties": "{op: add_difference_ties, models: [A, B, C], alpha: 1.0, k: 0.2}",
}
STEPS["block_weighted_sum"] = ("{op: weighted_sum, models: [A, B], "
                               "alpha: {default: 0.3, IN00-IN05: 0.1, M00: 0.5, OUT: 0.8, 're:attn2': 0.25}}")


def recipe(work: Path, models: list[Path], step: str) -> Path:
    p = work / f"methods-{step}.yaml"
    a, b, c = models
    p.write_text(textwrap.dedent(f"""
        sdbuild: 1
        inputs: {{A: {a}, B: {b}, C: {c}}}
        steps:
          {step}: {STEPS[step]}
        outputs: {{{step}: out/{step}.safetensors}}
        """))
    return p


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--factor", type=int, default=1, help="shrink factor of the synthetic models (1 = full size)")
    args, _ = ap.parse_known_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = ensure_models(work, 3, factor=args.factor)
    cache = work / "cache-methods"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    res: dict[str, float] = {}
    # the first build hashes the inputs (memoised); the timed builds below only merge and write
    measure(sdbuild("build", str(recipe(work, models, "warmup")), "-q", "--cache-dir", str(cache)))
    for step in ("weighted_sum", "block_weighted_sum", "ties"):
        warm(*models)
        res[f"{step}_s"], res[f"{step}_rss_gib"] = measure(
            sdbuild("build", str(recipe(work, models, step)), "-q", "--cache-dir", str(cache)))
    size = "full-size" if args.factor == 1 else f"factor {args.factor}"
    report(f"weighted_sum 2 x SD1 fp16 ({size}), scalar alpha", res["weighted_sum_s"], "s")
    report("weighted_sum scalar peak RSS", res["weighted_sum_rss_gib"], "GiB")
    report("weighted_sum block weights (mapping with ranges, groups, regex)", res["block_weighted_sum_s"], "s")
    report("weighted_sum block weights peak RSS", res["block_weighted_sum_rss_gib"], "GiB")
    report(f"add_difference_ties 3 x SD1 fp16 ({size}), k 0.2", res["ties_s"], "s")
    report("add_difference_ties peak RSS", res["ties_rss_gib"], "GiB")
    report("ratio block-weighted / scalar weighted_sum time", res["block_weighted_sum_s"] / res["weighted_sum_s"])
    report("ratio ties / scalar weighted_sum time", res["ties_s"] / res["weighted_sum_s"])
    shutil.rmtree(cache, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
