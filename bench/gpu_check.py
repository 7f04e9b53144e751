"""Device check: every merge method on CUDA against the CPU on a small synthetic SD1 model.

Run only where a GPU exists:  python bench/gpu_check.py [--factor 16]
Prints one line per method (`name: worst |cuda - cpu| / (1 + |cpu|)` and its bound) and exits 1 when a method
differs beyond its own bound (BOUNDS, the same table as docs/performance.md, "CPU and GPU agreement").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mergekit_sd.lazy import from_tensors  # noqa: E402
from mergekit_sd.methods import load_methods  # noqa: E402
from mergekit_sd.ops import OpContext  # noqa: E402
from mergekit_sd.ops.merge import build_merge  # noqa: E402
from mergekit_sd.synth.models import synth_tensors  # noqa: E402

# worst |cuda - cpu| / (1 + |cpu|) each method may show on fp32 inputs; why, in docs/performance.md
BOUNDS = {
    "tensor_swap": 0.0,  # selections and exact copies
    "tensor_swap2": 0.0,
    "self_scale": 0.0,  # one multiplication, correctly rounded on both
    "weighted_sum": 1e-6,  # elementwise: a fused multiply-add may round once instead of twice
    "add_difference": 1e-6,
    "triple_sum": 1e-6,
    "sum_twice": 1e-6,
    "linear": 1e-6,
    "n_average": 1e-6,
    "sigmoid": 1e-6,
    "inverse_sigmoid": 1e-6,
    "train_difference": 1e-6,
    "add_difference_dare": 1e-6,  # the masks are drawn on the CPU for every device: identical
    "add_difference_ties": 1e-6,  # thresholds from integer histograms: identical; the mean is elementwise
    "slerp": 1e-6,  # fp64 chunk sums: the factors agree to ~1e-15
    "model_stock": 1e-6,
    "geometric_median": 1e-5,  # fixed steps, fp64 distances; fp32 rounding compounds over the steps
    "extract_merge": 1e-5,  # fp32 row cosines, then a power
    "smooth_add": 1e-5,  # convolution order differs on the GPU
    "cosine_a": 1e-4,  # fp64 column sums, rescaled by the model's similarity range (magnifies the last bits)
    "cosine_b": 1e-4,
}
DEFAULT_BOUND = 2e-5  # a method without an entry (a plugin)


def run(method, models, params, device) -> dict[str, torch.Tensor]:
    ctx = OpContext(step="gpu-check", device=torch.device(device))
    out = build_merge(method, models, params, ctx)
    return {k: out.get(k) for k in out.keys()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every bound (e.g. 0 to demand identical results)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    models = [from_tensors(synth_tensors("sd1", args.factor, "fp32", seed=i), label=f"m{i}") for i in range(4)]
    failed = []
    for name, method in sorted(load_methods().items()):
        params = {p.name: p.default for p in method.params if not p.required}
        params.update({p.name: 0.7 for p in method.params if p.required})
        if "seed" in params:
            params["seed"] = 1234
        n = max(method.min_models, 3 if method.max_models is None else method.min_models)
        t0 = time.perf_counter()
        cpu = run(method, models[:n], params, "cpu")
        t1 = time.perf_counter()
        gpu = run(method, models[:n], params, args.device)
        t2 = time.perf_counter()
        worst = 0.0
        for k, c in cpu.items():
            g = gpu[k]
            if not c.dtype.is_floating_point:
                ok = torch.equal(c, g)
                worst = max(worst, 0.0 if ok else float("inf"))
                continue
            rel = ((g.double() - c.double()).abs() / (1 + c.double().abs())).max().item() if c.numel() else 0.0
            worst = max(worst, rel)
        limit = BOUNDS.get(name, DEFAULT_BOUND) * args.scale
        status = "ok" if worst <= limit else "FAIL"
        if status != "ok":
            failed.append(name)
        print(f"{name}: {worst:.3g} (bound {limit:.0e}, {status}; cpu {t1 - t0:.2f}s, {args.device} {t2 - t1:.2f}s)", flush=True)
    print(f"failed: {len(failed)}" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
