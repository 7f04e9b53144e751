"""The built-in demo: small synthetic models that `recipes/demo.yaml` merges on a fresh clone."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.synth.loras import make_demo_loras
from mergekit_sd.synth.models import write_synth

DEMO_FACTOR = 16
DEMO_MODELS = {"base": 1, "anime": 2, "detail": 3}


def make_demo_models(folder: str | Path) -> list[Path]:
    """Write the demo's input checkpoints (skipping ones already there) and return their paths."""
    folder = Path(folder)
    out = []
    for name, seed in DEMO_MODELS.items():
        p = folder / f"{name}.safetensors"
        if not p.exists():
            write_synth(p, "sd1", DEMO_FACTOR, "fp16", seed, title=f"demo {name}")
        out.append(p)
    out += make_demo_loras(folder, DEMO_FACTOR)
    return out
