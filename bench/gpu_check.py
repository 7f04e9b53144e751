"""Device check: every merge method on CUDA against the CPU on a small synthetic SD1 model.

Run only where a GPU exists:  python bench/gpu_check.py [--factor 16] [--tol 1e-5]
Prints one line per method (`name: max_abs_diff`) and exits 1 when a method's results differ beyond fp32 tolerance
(relative to the tensor's scale) or when DARE's masks differ at all (they are drawn on the CPU for every device).
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

# tensors whose merged value is a selection (swaps, medians) or exact copies must agree exactly
EXACT = {"tensor_swap", "tensor_swap2", "self_scale"}


def run(method, models, params, device) -> dict[str, torch.Tensor]:
    ctx = OpContext(step="gpu-check", device=torch.device(device))
    out = build_merge(method, models, params, ctx)
    return {k: out.get(k) for k in out.keys()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=int, default=16)
    ap.add_argument("--tol", type=float, default=2e-5, help="allowed |cuda - cpu| / (1 + |cpu|), in fp32")
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
        limit = 0.0 if name in EXACT else args.tol
        status = "ok" if worst <= limit else "FAIL"
        if status != "ok":
            failed.append(name)
        print(f"{name}: {worst:.3g} ({status}; cpu {t1 - t0:.2f}s, {args.device} {t2 - t1:.2f}s)", flush=True)
    print(f"failed: {len(failed)}" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
