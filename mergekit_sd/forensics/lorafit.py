"""`sdbuild lora-fit`: which checkpoints a LoRA fits, measured against the checkpoint it was trained on.

A LoRA trained on W learned ΔW so that W + ΔW behaves as wanted. Applied to N it gives N + ΔW = (W + ΔW) + (N - W):
every layer it touches carries an extra (N - W)·x. Over the layers the LoRA touches:

  drift    = |W - N| / |ΔW|                      how far N is from W, in units of the LoRA's own change
  drift_in = |(W - N)·Q| / |ΔW|                  the same along the input directions the LoRA reads (Q: an
                                                 orthonormal basis of the row space of its down matrices, or of
                                                 ΔW for LoHa, LoKr and full diffs)

ΔW includes the module's alpha/rank scale at strength 1 (for DoRA, the low-rank ΔW before re-normalisation; IA3
ΔW = W ⊙ vector). Bias changes are not counted. Thresholds and verdicts: verdict.py.

W is `--trained-on`, else the file whose sha256 kohya recorded in `ss_new_sd_model_hash` (or whose legacy hash
is `ss_sd_model_hash`), searched in the model folders and among the candidates; else exit 2 naming what the LoRA
records.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_sd.arch.detect import detect
from mergekit_sd.arch.lora_keys import ARCH_TITLES, Target, table
from mergekit_sd.engine.inputs import model_files
from mergekit_sd.engine.memo import digest_file
from mergekit_sd.engine.options import model_dirs
from mergekit_sd.engine.progress import Progress
from mergekit_sd.engine.state import StateDB
from mergekit_sd.errors import UserError
from mergekit_sd.formats.open import open_model
from mergekit_sd.ops import pick_device
from mergekit_sd.forensics.sources import Member, open_checkpoint, open_many
from mergekit_sd.forensics.verdict import lora_verdict
from mergekit_sd.lazy import LazyModel
from mergekit_sd.lora.delta import compute_delta, delta_shape, fits, ia3_delta, module_scale
from mergekit_sd.lora.formats import Module, parse_lora
from mergekit_sd.ops.lora import check_declared_arch, rows, slice_shape
from mergekit_sd.formats.digests import legacy_hash

SHA_KEYS = ("ss_new_sd_model_hash",)
LEGACY_KEYS = ("ss_sd_model_hash",)
RANK_TOL = 1e-6  # singular values below this fraction of the largest do not span input directions


@dataclass
class Probe:
    """One target the LoRA touches: where, its ΔW (flattened to [out, in...]) and the input basis it reads."""

    target: Target
    module: Module
    read: Callable[[str], torch.Tensor]
    scale: float


def _recorded_base(meta: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(file name, sha256 or its prefix, legacy hash) of the training base, as kohya records them."""
    sha = next((meta[k].strip().lower() for k in SHA_KEYS if (meta.get(k) or "").strip()), None)
    legacy = next((meta[k].strip().lower() for k in LEGACY_KEYS if (meta.get(k) or "").strip()), None)
    name = (meta.get("ss_sd_model_name") or "").strip() or None
    return name, sha, legacy


def find_base(lora_label: str, meta: dict[str, str], trained_on: str | os.PathLike | None, models: list[Path],
              candidates: list[Path], cache_dir: str | os.PathLike) -> tuple[Path, str]:
    """(W's path, how it was found)."""
    if trained_on is not None:
        return Path(trained_on), "given with --trained-on"
    name, sha, legacy = _recorded_base(meta)
    if sha is None and legacy is None:
        what = f" (it names {name!r} but no hash)" if name else ""
        raise UserError(f"records no training base: no ss_new_sd_model_hash or ss_sd_model_hash{what}; "
                        "pass --trained-on FILE", lora_label)
    files = model_files(model_dirs(models)) + [c for c in candidates if c.is_file()]
    files.sort(key=lambda f: f.name != (Path(name).name if name else None))
    db = StateDB(cache_dir)
    seen: set[Path] = set()
    for f in files:
        real = f.resolve()
        if real in seen:
            continue
        seen.add(real)
        if sha is not None and len(sha) >= 8:
            got = digest_file(f, db)[1] or ""
            if got.startswith(sha):
                return f, f"sha256 recorded in ss_new_sd_model_hash ({sha[:12]}...)"
        if legacy is not None and f.stat().st_size > 0 and legacy_hash(f) == legacy:
            return f, f"legacy hash recorded in ss_sd_model_hash ({legacy})"
    bits = [f"base {name!r}" if name else "an unnamed base"]
    if sha:
        bits.append(f"sha256 {sha}")
    if legacy:
        bits.append(f"legacy hash {legacy}")
    dirs = ", ".join(str(m) for m in model_dirs(models))
    where = f"among the candidates or in {dirs}" if dirs else "among the candidates (no --models folder given)"
    raise UserError(f"was trained on {', '.join(bits)}, which is not {where}; "
                    "pass --trained-on FILE or --models DIR", lora_label)


def _probes(lora: LazyModel, label: str, w: Member) -> tuple[list[Probe], list[str]]:
    """The targets of every module that maps onto W and fits it; and what was skipped (why)."""
    arch = detect(w.model.specs, partial=True).lora_arch
    if arch is None:
        raise UserError(f"is {w.arch.describe()}; LoRAs fit SD1, SD2 and SDXL checkpoints", w.name)
    parsed = parse_lora(lora.specs, label, "lora_te1" if arch == "sdxl" else "lora_te")
    check_declared_arch(parsed, lora.metadata, arch, label, w.name)
    tab = table(arch)
    probes: list[Probe] = []
    skipped: list[str] = []
    for name, m in sorted(parsed.modules.items()):
        t = tab.lookup(name)
        if t is None or t.weight not in w.model.specs:
            skipped.append(f"{m.source}: maps to no tensor of {ARCH_TITLES[arch]}")
            continue
        wshape = slice_shape(w.model.specs[t.weight].shape, t)
        if m.algo == "ia3":
            n = lora.specs[m.keys["weight"]].numel
            ok = n in (wshape[0], wshape[1] if len(wshape) > 1 else -1)
        else:
            dshape = delta_shape(m, lora.specs)
            ok = dshape is not None and fits(dshape, wshape)
        if not ok:
            skipped.append(f"{m.source}: does not fit {t.describe()}")
            continue
        probes.append(Probe(t, m, lora.get, module_scale(m, lora.specs, lora.get)))
    if not probes:
        raise UserError(f"none of its modules fits {w.name} ({ARCH_TITLES[arch]})", label)
    return probes, skipped


def _delta_and_basis(p: Probe, w0: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scaled ΔW flattened to [out, -1] in fp64, orthonormal basis [in, r] of the inputs it reads or None for all)."""
    m = p.module
    rd = lambda k: p.read(k).to(device)  # noqa: E731
    if m.algo == "ia3":
        vec = rd(m.keys["weight"]).to(torch.float64).reshape(-1)
        on_input = "on_input" in m.keys and bool(int(p.read(m.keys["on_input"]).reshape(-1)[0]))
        d = ia3_delta(w0, vec, on_input)
    else:
        d = compute_delta(m, rd).to(torch.float64) * p.scale
    d = d.reshape(w0.shape[0], -1) if w0.dim() > 1 else d.reshape(-1)
    if d.dim() == 1:
        return d, None
    if m.algo == "lora" and "lora_mid.weight" not in m.keys:
        down = rd(m.keys["lora_down.weight"]).to(torch.float64)
        down = down.reshape(down.shape[0], -1)
        if down.shape[1] == d.shape[1] and down.shape[0] < down.shape[1]:
            q, r = torch.linalg.qr(down.T)
            keep = r.diagonal().abs() > RANK_TOL * max(float(r.diagonal().abs().max()), 1e-300)
            return d, q[:, keep]
    if d.shape[1] <= 1:
        return d, None
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    rank = int((s > RANK_TOL * float(s.max())).sum()) if s.numel() and float(s.max()) > 0 else 0
    if rank >= d.shape[1]:
        return d, None
    return d, vh[:rank].T


def lora_fit(lora: str | os.PathLike, candidates: list[str | os.PathLike], *, trained_on: str | os.PathLike | None = None,
             models: list[Path] | None = None, cache_dir: str | os.PathLike = "cache", device: str = "cpu",
             progress: Progress | None = None) -> dict[str, Any]:
    """{"lora", "trained_on", "found_by", "modules", "ranking": [{file, drift, drift_in, verdict}], "skipped_modules"}."""
    dev = pick_device(device)
    lp = Path(lora)
    label = str(lora)
    if not lp.is_file():
        raise UserError("LoRA file not found", label)
    if not candidates:
        raise UserError("lora-fit needs at least one candidate checkpoint")
    lmodel = open_model(lp)
    wpath, how = find_base(label, lmodel.metadata, trained_on, list(models or []), [Path(c) for c in candidates], cache_dir)
    w = open_checkpoint(wpath)
    probes, skipped = _probes(lmodel, label, w)
    cands, _ = open_many(list(candidates), arch=w.arch)
    sums = {i: [0.0, 0.0] for i in range(len(cands))}  # |W-N|², |(W-N)Q|²
    delta_sq = 0.0
    for done, p in enumerate(probes):
        if progress is not None:
            progress.tensor("lora-fit", done, len(probes), p.target.weight)
        key = p.target.weight
        full = w.model.specs[key].shape
        sl = rows(p.target, full[0])
        w0 = w.model.get(key).to(device=dev, dtype=torch.float64)[sl]
        d, q = _delta_and_basis(p, w0, dev)
        delta_sq += float((d * d).sum())
        wf = w0.reshape(d.shape)
        for i, c in enumerate(cands):
            spec = c.model.specs.get(key)
            if spec is None or spec.shape != full:
                raise UserError(f"has no tensor {key!r} of the shape {list(full)} that {w.name} has: not the same architecture", c.name)
            diff = wf - c.model.get(key).to(device=dev, dtype=torch.float64)[sl].reshape(d.shape)
            sums[i][0] += float((diff * diff).sum())
            proj = diff if q is None else diff @ q
            sums[i][1] += float((proj * proj).sum())
    if progress is not None:
        progress.tensor("lora-fit", len(probes), len(probes), "")
    if delta_sq <= 0:
        raise UserError("changes nothing (every ΔW is zero); there is nothing to fit", label)
    ranking = []
    for i, c in enumerate(cands):
        drift = math.sqrt(sums[i][0] / delta_sq)
        drift_in = math.sqrt(sums[i][1] / delta_sq)
        ranking.append({"file": c.name, "drift": round(drift, 6), "drift_in": round(drift_in, 6), "verdict": lora_verdict(drift_in)})
    ranking.sort(key=lambda e: (e["drift_in"], e["drift"], e["file"]))
    return {"lora": label, "trained_on": str(wpath), "found_by": how, "modules": len(probes),
            "ranking": ranking, "skipped_modules": skipped}
