"""The engine's speed targets in one run, each next to the I/O floor measured in the same run (the machine may be
shared): SD1 weighted_sum of two full-size fp16 models (fresh cache, inputs hashed by the merge's own reads; a
rebuild after editing alpha; a rebuild after editing one value of a 26-value block-weight list, where tensor-level
reuse copies every other block; a no-op), a rank-32 LoRA bake, an SDXL weighted_sum, a naive whole-model merge for
scale, and a one-thread floor for each part of the work (read, convert, math, hash, write). Inputs come from a
warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ensure_models, measure, measure_output, report, sdbuild, warm  # noqa: E402

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


PARTS = r"""
# Per-part floors of one SD1 weighted_sum, each part alone on one thread: what the pipeline overlaps.
import hashlib, os, sys, time, torch, xxhash
torch.set_num_threads(1)
from mergekit_sd.formats.safetensors import SafetensorsFile, tensor_bytes
a, b = SafetensorsFile(sys.argv[1]), SafetensorsFile(sys.argv[2])
names = sorted(a.specs)

def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
read = 0.0; convert = 0.0; math_ = 0.0; hashing = 0.0; write = 0.0
out = open(sys.argv[3], "wb")
CH = 1 << 20
for n in names:
    t0 = time.perf_counter(); x, y = a.read(n), b.read(n); read += time.perf_counter() - t0
    if not x.dtype.is_floating_point:
        continue
    fx, fy = x.reshape(-1), y.reshape(-1)
    res = torch.empty_like(fx)
    for s in range(0, fx.numel(), CH):
        t0 = time.perf_counter(); u = fx[s:s + CH].float(); v = fy[s:s + CH].float(); convert += time.perf_counter() - t0
        t0 = time.perf_counter(); r = torch.lerp(u, v, 0.3); math_ += time.perf_counter() - t0
        t0 = time.perf_counter(); res[s:s + CH].copy_(r); convert += time.perf_counter() - t0
    t0 = time.perf_counter()
    for z in (x, y, res):  # inputs: xxh3 + sha256 (first build); output: xxh3 + sha256
        xxhash.xxh3_128(tensor_bytes(z)).digest(); hashlib.sha256(tensor_bytes(z)).digest()
    hashing += time.perf_counter() - t0
    t0 = time.perf_counter(); out.write(tensor_bytes(res)); write += time.perf_counter() - t0
out.close()
for k, v in (("read", read), ("convert", convert), ("math", math_), ("hash", hashing), ("write", write)):
    print(f"{k} {v:.3f}")
"""


def recipe(work: Path, a: Path, b: Path, alpha: float, name: str = "bench") -> Path:
    p = work / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        sdbuild: 1
        inputs: {{A: {a}, B: {b}}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: {alpha}}}
        outputs: {{mix: out/{name}.safetensors}}
        """))
    return p


def mbw_recipe(work: Path, a: Path, b: Path, in04: float) -> Path:
    """weighted_sum with a 26-value SD1 block-weight list (BASE first); `in04` is block IN04's value."""
    values = [0.3] * 26
    values[5] = in04
    p = work / "bench-mbw.yaml"
    p.write_text(textwrap.dedent(f"""
        sdbuild: 1
        inputs: {{A: {a}, B: {b}}}
        steps:
          mix: {{op: weighted_sum, models: [A, B], alpha: "{','.join(str(v) for v in values)}"}}
        outputs: {{mix: out/bench-mbw.safetensors}}
        """))
    return p


def mbw_edit(work: Path, a: Path, b: Path) -> tuple[float, float, int, int]:
    """(seconds, peak RSS, tensors computed, tensors reused) of a rebuild after editing IN04 of a 26-value list."""
    cache = work / "cache-mbw"
    shutil.rmtree(cache, ignore_errors=True)
    measure(sdbuild("build", str(mbw_recipe(work, a, b, 0.3)), "-q", "--cache-dir", str(cache)))
    warm(a, b)
    wall, rss, out = measure_output(sdbuild("build", str(mbw_recipe(work, a, b, 0.7)), "-q", "--json", "--cache-dir", str(cache)))
    shutil.rmtree(cache, ignore_errors=True)
    mix = json.loads(out)["steps"]["mix"]
    return wall, rss, mix["computed"], mix["reused"]


def io_floor(a: Path, b: Path, work: Path) -> float:
    warm(a, b)
    s, _ = measure([sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work / "copy.bin")])
    (work / "copy.bin").unlink()
    return s


def parts(a: Path, b: Path, work: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PARTS, str(a), str(b), str(work / "parts.bin")], check=True,
                         capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1])).stdout
    (work / "parts.bin").unlink()
    return {k: float(v) for k, v in (line.split() for line in out.splitlines())}


def lora_bake(work: Path, model: Path, factor: int, rank: int = 32) -> tuple[float, float, float]:
    """(bake seconds after a strength change, its peak RSS, the bake's I/O floor: read model and LoRA, write one)."""
    lora = work / f"sd1-f{factor}-lora-r{rank}.safetensors"
    if not lora.exists():
        from mergekit_sd.synth.loras import write_synth_lora

        print(f"writing synthetic LoRA {lora.name} ...", file=sys.stderr, flush=True)
        write_synth_lora(lora, "sd1", "lora", factor=factor, rank=rank, seed=7)
    rp = work / "engine-lora.yaml"
    cache = work / "cache-engine-lora"
    shutil.rmtree(cache, ignore_errors=True)

    def recipe_at(strength: float) -> Path:
        rp.write_text(f"sdbuild: 1\ninputs: {{base: {model}, L: {lora}}}\n"
                      f"steps:\n  baked: {{op: lora, model: base, loras: [{{lora: L, strength: {strength}}}]}}\n"
                      "outputs: {baked: out/engine-lora.safetensors}\n")
        return rp

    measure(sdbuild("build", str(recipe_at(0.75)), "-q", "--cache-dir", str(cache)))
    warm(model, lora)
    floor = io_floor(model, lora, work)
    warm(model, lora)
    wall, rss = measure(sdbuild("build", str(recipe_at(0.8)), "-q", "--cache-dir", str(cache)))
    shutil.rmtree(cache, ignore_errors=True)
    return wall, rss, floor


def check(name: str, value: float, limit: float, unit: str = "") -> bool:
    ok = value <= limit
    print(f"{name}: {value:.3f}{(' ' + unit) if unit else ''} (target <= {limit:g}: {'met' if ok else 'MISSED'})", flush=True)
    return ok


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("bench/work"))
    ap.add_argument("--factor", type=int, default=1)
    ap.add_argument("--no-sdxl", action="store_true", help="skip the SDXL case (two 6.9 GB inputs)")
    ap.add_argument("--sd-mecha", default=os.environ.get("SDMECHA_PYTHON"),
                    help="a python with sd-mecha installed, to time the same merge with it (optional)")
    args, _ = ap.parse_known_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    a, b = ensure_models(work, 2, factor=args.factor)
    warm(a, b)
    res: dict[str, float] = {}
    res["io_floor_s"] = io_floor(a, b, work)
    res["naive_s"], res["naive_rss_gib"] = measure([sys.executable, "-c", NAIVE, str(a), str(b), str(work / "naive.safetensors")])
    (work / "naive.safetensors").unlink()
    if args.sd_mecha:
        res["sd_mecha_s"], res["sd_mecha_rss_gib"] = measure([args.sd_mecha, "-c", SD_MECHA, str(a), str(b), str(work / "mecha.safetensors")])
        (work / "mecha.safetensors").unlink()
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    warm(a, b)
    rp = recipe(work, a, b, 0.3)
    res["first_build_s"], res["first_build_rss_gib"] = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    rp = recipe(work, a, b, 0.31)  # edit one number: inputs are already hashed, the merge runs again
    warm(a, b)
    res["sdbuild_s"], res["sdbuild_rss_gib"] = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    res["noop_s"], _ = measure(sdbuild("build", str(rp), "-q", "--cache-dir", str(cache)))
    shutil.rmtree(cache, ignore_errors=True)
    res["mbw_s"], res["mbw_rss_gib"], res["mbw_computed"], res["mbw_reused"] = mbw_edit(work, a, b)
    res["io_floor_after_s"] = io_floor(a, b, work)  # the machine is shared: a second floor shows the drift
    res.update({f"part_{k}_s": v for k, v in parts(a, b, work).items()})
    res["lora_s"], res["lora_rss_gib"], res["lora_floor_s"] = lora_bake(work, a, args.factor)
    if not args.no_sdxl:
        xa, xb = ensure_models(work, 2, "sdxl", args.factor)
        warm(xa, xb)
        res["sdxl_floor_s"] = io_floor(xa, xb, work)
        xcache = work / "cache-sdxl"
        shutil.rmtree(xcache, ignore_errors=True)
        measure(sdbuild("build", str(recipe(work, xa, xb, 0.3, "sdxl")), "-q", "--cache-dir", str(xcache)))
        warm(xa, xb)
        res["sdxl_s"], res["sdxl_rss_gib"] = measure(sdbuild("build", str(recipe(work, xa, xb, 0.31, "sdxl")), "-q",
                                                            "--cache-dir", str(xcache)))
        shutil.rmtree(xcache, ignore_errors=True)

    floor = min(res["io_floor_s"], res["io_floor_after_s"])  # the faster floor: the stricter ratio
    report("io floor (read both inputs, write one copy)", res["io_floor_s"], "s")
    report("io floor, measured again after the builds", res["io_floor_after_s"], "s")
    report("naive merge (load both whole)", res["naive_s"], "s")
    report("naive merge peak RSS", res["naive_rss_gib"], "GiB")
    if "sd_mecha_s" in res:
        report("sd-mecha 1.x merge", res["sd_mecha_s"], "s")
        report("sd-mecha peak RSS", res["sd_mecha_rss_gib"], "GiB")
    report("sdbuild first build, fresh cache (inputs hashed by the merge's reads)", res["first_build_s"], "s")
    report("sdbuild merge after editing alpha", res["sdbuild_s"], "s")
    report("sdbuild no-op rebuild", res["noop_s"], "s")
    report("sdbuild merge after editing one value of a 26-value MBW list", res["mbw_s"], "s")
    print(f"  tensors computed {res['mbw_computed']}, reused {res['mbw_reused']}", flush=True)
    for k in ("read", "convert", "math", "hash", "write"):
        report(f"one-thread floor of part: {k}", res[f"part_{k}_s"], "s")
    report("sdbuild lora bake (rank 32, all default modules) after a strength change", res["lora_s"], "s")
    report("lora bake io floor (read model and LoRA, write one copy)", res["lora_floor_s"], "s")
    rss = [res["first_build_rss_gib"], res["sdbuild_rss_gib"], res["lora_rss_gib"], res["mbw_rss_gib"]]
    if "sdxl_s" in res:
        report("sdxl io floor", res["sdxl_floor_s"], "s")
        report("sdbuild sdxl weighted_sum after editing alpha", res["sdxl_s"], "s")
        rss.append(res["sdxl_rss_gib"])
    check("ratio alpha edit / io floor", res["sdbuild_s"] / floor, 3)
    check("ratio alpha edit / naive", res["sdbuild_s"] / res["naive_s"], 0.3)
    check("ratio fresh cache / io floor", res["first_build_s"] / floor, 4)
    check("ratio lora bake / its io floor", res["lora_s"] / res["lora_floor_s"], 3)
    if "sdxl_s" in res:
        check("ratio sdxl weighted_sum / its io floor", res["sdxl_s"] / res["sdxl_floor_s"], 3)
        check("sdxl peak RSS", res["sdxl_rss_gib"], 1, "GiB")
    check("ratio MBW one-value edit / io floor", res["mbw_s"] / floor, 1.5)
    check("no-op", res["noop_s"], 0.1, "s")
    check("peak RSS, every sdbuild case", max(rss), 1, "GiB")
    return res


if __name__ == "__main__":
    main()
