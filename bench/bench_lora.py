"""LoRA bake benchmark: a rank-32 LoRA on every default module (264 for SD1) baked into a full-size SD1 fp16 model.

Prints `name: value` lines: sdbuild's wall time and peak RSS (fresh cache, so the bake really runs), and the same
for a naive in-memory bake (whole state dicts loaded, kohya `merge_lora.py` style) for scale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_models, measure, report, sdbuild, warm  # noqa: E402

sys.path.insert(0, str(ROOT))

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from mergekit_sd.arch.lora_keys import table
model, lora = load_file(sys.argv[1]), load_file(sys.argv[2])
tab = table("sd1")
for name in sorted({k.split(".")[0] for k in lora}):
    t = tab.lookup(name)
    up, down = lora[name + ".lora_up.weight"].float(), lora[name + ".lora_down.weight"].float()
    s = float(lora[name + ".alpha"]) / down.shape[0]
    w = model[t.weight]
    d = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    model[t.weight] = (w.float() + 0.8 * s * d).to(w.dtype)
save_file(model, sys.argv[3])
"""


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=32)
    args, _ = ap.parse_known_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (model,) = ensure_models(work, 1, "sd1", 1)
    lora = work / f"sd1-lora-r{args.rank}.safetensors"
    if not lora.exists():
        from mergekit_sd.synth.loras import write_synth_lora

        print(f"writing synthetic LoRA {lora.name} ...", file=sys.stderr, flush=True)
        write_synth_lora(lora, "sd1", "lora", factor=1, rank=args.rank, seed=7)
    rp = work / "lora-bench.yaml"

    def recipe(strength: float) -> Path:
        rp.write_text(f"sdbuild: 1\ninputs: {{base: {model}, L: {lora}}}\n"
                      f"steps:\n  baked: {{op: lora, model: base, loras: [{{lora: L, strength: {strength}}}]}}\n"
                      "outputs: {baked: out/lora-baked.safetensors}\n")
        return rp

    warm(model, lora)
    res: dict[str, float] = {}
    res["naive_s"], res["naive_rss_gib"] = measure([sys.executable, "-c", NAIVE, str(model), str(lora), str(work / "naive-lora.safetensors")])
    cache = work / "cache-lora"
    shutil.rmtree(cache, ignore_errors=True)
    # first build also digests the inputs; the measured one is a real rebuild after a strength change
    measure(sdbuild("build", str(recipe(0.75)), "-q", "--cache-dir", str(cache)))
    res["sdbuild_s"], res["sdbuild_rss_gib"] = measure(sdbuild("build", str(recipe(0.8)), "-q", "--cache-dir", str(cache)))
    shutil.rmtree(cache, ignore_errors=True)
    report("lora bake modules", 264)
    report("lora bake rank", args.rank)
    report("naive lora bake wall", res["naive_s"], "s")
    report("naive lora bake peak RSS", res["naive_rss_gib"], "GiB")
    report("sdbuild lora bake wall", res["sdbuild_s"], "s")
    report("sdbuild lora bake peak RSS", res["sdbuild_rss_gib"], "GiB")
    report("ratio sdbuild / naive lora bake wall", res["sdbuild_s"] / res["naive_s"])
    report("ratio sdbuild / naive lora bake peak RSS", res["sdbuild_rss_gib"] / res["naive_rss_gib"])
    return res


if __name__ == "__main__":
    main()
