"""A runnable recipe for a fitted merge: the chosen op, its models, and its parameters per block.

Parameter values come per bucket (block of the block map, or VAE). One value everywhere is written as a number;
a few buckets that differ (a VAE copied from one parent) as a selector mapping; values that vary block by block
as the architecture's block list (26 for SD1/SD2, 20 for SDXL, plus a last value for the VAE when it differs), or
for Flux and SD3/3.5, whose lists have no slot for text encoders and VAE, as a mapping of the blocks that differ.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from mergekit_sd.arch.blockmap import OTHER
from mergekit_sd.arch.blocks import VAE, blocks_for, is_transformer
from mergekit_sd.errors import UserError
from mergekit_sd.forensics.affine import Form

DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
STEP = "fit"


def input_names(paths: list[Path]) -> list[str]:
    """Recipe input names from file stems: valid names, unique, never the step's name."""
    out: list[str] = []
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9_.\-]+", "_", p.stem) or "model"
        if not re.match(r"[A-Za-z_]", base):
            base = "m_" + base
        name, i = base, 2
        while name in out or name == STEP:
            name, i = f"{base}_{i}", i + 1
        out.append(name)
    return out


def _num(x: float) -> str:
    v = float(x)
    return "0.0" if v == 0 else repr(v)


def weight_text(values: dict[str, float], order: list[str], family: str | None, exceptions_only: bool) -> str:
    """YAML for one weight given its value per bucket (buckets missing from `values` take the most common value)."""
    distinct = sorted(set(values.values()))
    if len(distinct) <= 1:
        return _num(distinct[0] if distinct else 0.0)
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    default = max(counts, key=lambda v: (counts[v], -abs(v)))
    if exceptions_only or family is None or is_transformer(family):  # Flux/SD3 lists cannot hold TE and VAE
        items = [f"default: {_num(default)}"] + [f"{b}: {_num(v)}" for b, v in values.items()
                                                 if v != default and b in order and b != OTHER]
        return "{" + ", ".join(items) + "}"
    blocks = list(blocks_for(family))
    vals = [values.get(b, default) for b in blocks]
    vae = values.get(VAE)
    if vae is not None and vae != values.get("BASE", default):
        vals.append(vae)
    return "[" + ", ".join(_num(v) for v in vals) + "]"


def recipe_text(*, form: Form, params: dict[str, dict[str, float]], candidates: list[Path], model_name: str,
                model_dtype: torch.dtype | None, first_dtype: torch.dtype | None, family: str | None, order: list[str],
                exceptions_only: bool, comment: str, out_dir: Path | None) -> str:
    """The YAML text: `params` maps each op parameter (alpha, beta, or the weight of each linear model, w0...)
    to its value per bucket."""
    used = [candidates[j] for j in form.models]
    names = input_names(used)
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += ["sdbuild: 1", f"name: {json.dumps(Path(model_name).stem + '-fit')}", "inputs:"]
    for n, p in zip(names, used):
        where = os.path.relpath(p.resolve(), out_dir.resolve()) if out_dir is not None else str(p)
        lines.append(f"  {n}: {json.dumps(where)}")
    lines += ["steps:", f"  {STEP}:", f"    op: {'linear' if form.op == 'copy' else form.op}", f"    models: [{', '.join(names)}]"]
    if form.op == "copy":
        lines.append("    weights: [1.0]")
    elif form.op == "linear":
        ws = [weight_text(params[f"w{i}"], order, family, exceptions_only) for i in range(len(names))]
        lines.append(f"    weights: [{', '.join(ws)}]")
    else:
        for p in form.params:
            lines.append(f"    {p}: {weight_text(params[p], order, family, exceptions_only)}")
    if model_dtype is not None and model_dtype != first_dtype and model_dtype in DTYPE_NAME:
        lines.append(f"    dtype: {DTYPE_NAME[model_dtype]}")
    lines += ["outputs:", f"  {STEP}: {json.dumps(Path(model_name).stem + '-fit.safetensors')}"]
    return "\n".join(lines) + "\n"


def rounded(theta: np.ndarray, decimals: int) -> np.ndarray:
    return np.round(np.asarray(theta, dtype=np.float64), decimals) + 0.0


def write_recipe(path: Path, text: str) -> Path:
    """Write the recipe atomically (a killed run leaves the old file or none, never half of one)."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise UserError("-o writes a recipe (YAML), not a model file; name it .yaml", str(path))
    from mergekit_sd.formats.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)
