"""Scaling table: one build step per row (weighted_sum, TIES, geometric median) on synthetic SD1 models, one column
per worker count (-j 1, -j 2, every core) and CUDA where a GPU exists; each case is a fresh cache (so inputs are
hashed by the step's own reads, as in a first build) from a warm page cache, and reports wall time and the
process's peak RSS.

    python bench/bench_scaling.py [--factor 1] [--workdir bench/work] [--max-memory 1G] [--gm-iterations 10]
                                  [--rows ws,ties,gm,dare,slerp,model_stock,cosine,smooth] [--out table.md]

`--factor N` shrinks every tensor N-fold (1 = full size, ~2 GiB per fp16 model); the table is printed as
Markdown, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ensure_models, measure, sdbuild, warm  # noqa: E402

ROWS = {
    "ws": ("weighted_sum", 2, "{op: weighted_sum, models: [A, B], alpha: 0.3}"),
    "ties": ("TIES (2 fine-tunes, k 0.2)", 3, "{op: add_difference_ties, models: [A, B, C], alpha: 1.0, k: 0.2}"),
    "gm": ("geometric median (3 models, {it} steps)", 3, "{op: geometric_median, models: [A, B, C], iterations: {it}}"),
    "dare": ("DARE (2 fine-tunes, p 0.9, seeded)", 3,
             "{op: add_difference_dare, models: [A, B, C], alpha: 1.0, p: 0.9, seed: 1}"),
    "slerp": ("slerp", 2, "{op: slerp, models: [A, B], alpha: 0.3}"),
    "model_stock": ("model_stock (2 fine-tunes)", 3, "{op: model_stock, models: [A, B, C]}"),
    "cosine": ("cosine_a", 2, "{op: cosine_a, models: [A, B], alpha: 0.3}"),
    "smooth": ("smooth_add", 3, "{op: smooth_add, models: [A, B, C], alpha: 0.5}"),
}


def machine() -> str:
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def case(models: list[Path], step: str, jobs: int | None, device: str, max_memory: str, work: Path) -> tuple[float, float]:
    d = Path(tempfile.mkdtemp(prefix="scale-", dir=work))
    try:
        names = "ABC"[:len(models)]
        inputs = ", ".join(f"{n}: {p}" for n, p in zip(names, models))
        (d / "r.yaml").write_text(f"sdbuild: 1\ninputs: {{{inputs}}}\nsteps:\n  s: {step}\noutputs: {{s: out.safetensors}}\n")
        argv = sdbuild("build", str(d / "r.yaml"), "-q", "--cache-dir", str(d / "cache"), "--device", device,
                       "--max-memory", max_memory)
        if jobs is not None:
            argv += ["-j", str(jobs)]
        warm(*models)
        return measure(argv)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=int, default=1, help="shrink factor of the synthetic models (1 = full size)")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / "work")
    ap.add_argument("--max-memory", default="1G")
    ap.add_argument("--gm-iterations", type=int, default=10)
    ap.add_argument("--rows", default="ws,ties,gm")
    ap.add_argument("--jobs", default=None, help="worker counts to compare, comma-separated (default: 1,2,all cores)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args, _ = ap.parse_known_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = [int(j) for j in args.jobs.split(",")] if args.jobs else sorted({1, 2, cores})
    cols: list[tuple[str, int | None, str]] = [(f"-j {j}" + (" (all cores)" if j == cores and j > 2 else ""), j, "cpu") for j in jobs]
    try:
        import torch

        if torch.cuda.is_available():
            cols.append(("cuda", None, "cuda"))
    except ImportError:  # pragma: no cover
        pass
    models = ensure_models(args.workdir, 3, "sd1", args.factor)
    lines = [f"SD1 fp16 models, factor {args.factor} ({models[0].stat().st_size / 2**30:.2f} GiB each); "
             f"--max-memory {args.max_memory}; {machine()}", "",
             "| step | " + " | ".join(c[0] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    print("\n".join(lines), flush=True)
    for row in args.rows.split(","):
        title, n, step = ROWS[row]
        step = step.replace("{it}", str(args.gm_iterations))
        cells = []
        for _, j, device in cols:
            wall, rss = case(models[:n], step, j, device, args.max_memory, args.workdir)
            cells.append(f"{wall:.1f} s, {rss * 1024:.0f} MiB")
        line = f"| {title.replace('{it}', str(args.gm_iterations))} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
