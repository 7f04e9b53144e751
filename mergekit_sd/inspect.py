"""`sdbuild inspect`: what is inside a model file, and what of it is junk.

Headers give architecture, components, dtypes, junk and key coverage without reading tensor data; the optional scan
reads tensors one at a time to find NaN/Inf values and the VAE fingerprint. Byte counts are exact integers so
reports can be compared and asserted on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mergekit_sd.arch.components import CATEGORY_DOC, COMPONENTS, JUNK, broken_position_ids, classify, is_position_ids
from mergekit_sd.arch.prefixes import MARKERS
from mergekit_sd.arch.vae import known_vae, vae_fingerprint
from mergekit_sd.formats.ckpt import rename_model
from mergekit_sd.formats.open import open_model
from mergekit_sd.formats.safetensors import dtype_code
from mergekit_sd.lazy import LazyModel
from mergekit_sd.provenance.record import read_provenance

JUNK_EXAMPLES = 5


def _tally(model: LazyModel, keys) -> dict[str, Any]:
    out: dict[str, Any] = {"tensors": 0, "bytes": 0, "dtypes": {}}
    for k in keys:
        s = model.spec(k)
        out["tensors"] += 1
        out["bytes"] += s.nbytes
        c = dtype_code(s.dtype)
        out["dtypes"][c] = out["dtypes"].get(c, 0) + 1
    return out


def _kind(arch: str, specs) -> str:
    if arch == "vae":
        return "vae"
    if arch != "unknown":
        return "checkpoint"
    marks = ("lora", "hada_w", "lokr_w", "oft_", ".diff", ".on_input", ".weight_norm", "dora_scale")
    if any(any(m in k.lower() for m in marks) for k in specs):
        return "lora"
    return "unknown"


def inspect_model(path: str | os.PathLike, scan: bool = True) -> dict[str, Any]:
    """The report behind `sdbuild inspect FILE [--json]`; tensors are read (one at a time) only when `scan`."""
    p = Path(path)
    model = rename_model(open_model(p))
    specs = model.specs
    cls = classify(specs)
    arch = cls.arch
    report: dict[str, Any] = {
        "file": p.name,
        "format": model.info.format,
        "file_bytes": p.stat().st_size,
        "architecture": arch.arch,
        "kind": _kind(arch.arch, specs),
        "variant": arch.variant,
        **({"naming": arch.naming} if arch.naming else {}),
        "modelspec_architecture": arch.modelspec,
        "tensors": len(specs),
        "bytes": model.nbytes(),
    }
    if arch.factor != 1:
        report["shrink_factor"] = arch.factor
    dtypes: dict[str, dict[str, int]] = {}
    waste = 0
    for k, s in specs.items():
        d = dtypes.setdefault(dtype_code(s.dtype), {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += s.nbytes
        if s.dtype in (torch.float32, torch.float64):
            waste += s.nbytes - s.numel * 2  # what storing it as fp16 would save
    report["dtypes"] = dict(sorted(dtypes.items()))
    report["precision_waste_bytes"] = waste

    by_cat: dict[str, list[str]] = {}
    for k, c in cls.category.items():
        by_cat.setdefault(c, []).append(k)
    for v in by_cat.values():
        v.sort()
    report["components"] = {c: _tally(model, by_cat[c]) for c in COMPONENTS if c in by_cat}
    junk_cats = {}
    for c in JUNK if arch.arch != "unknown" else ():  # no reference for a LoRA or an unknown file: nothing is junk
        if c in by_cat:
            t = _tally(model, by_cat[c])
            junk_cats[c] = {"tensors": t["tensors"], "bytes": t["bytes"], "what": CATEGORY_DOC[c], "keys": by_cat[c]}
    report["junk"] = {"tensors": sum(j["tensors"] for j in junk_cats.values()),
                      "bytes": sum(j["bytes"] for j in junk_cats.values()), "categories": junk_cats}
    if "scheduler" in by_cat:
        t = _tally(model, by_cat["scheduler"])
        report["scheduler_buffers"] = {"tensors": t["tensors"], "bytes": t["bytes"]}
    report["keys"] = {
        "reference": arch.reference or ("sd1-vae" if arch.arch == "vae" and arch.variant is None else None),
        "missing": cls.missing,
        "unexpected": by_cat.get("unknown", []) if arch.arch != "unknown" else [],
        "shape_mismatch": cls.shape_mismatch,
        "absent_components": cls.absent_components,
    }

    markers: dict[str, Any] = {}
    for k in MARKERS:
        if k in specs:
            s = specs[k]
            entry: dict[str, Any] = {"dtype": dtype_code(s.dtype), "shape": list(s.shape)}
            if s.numel == 1 and s.dtype.is_floating_point:
                entry["value"] = float(model.get(k).reshape(-1)[0])
            markers[k] = entry
    report["markers"] = markers
    meta = dict(model.metadata)
    pred = meta.get("modelspec.prediction_type") or meta.get("modelspec.predict_key")
    if pred is None and ("v_pred" in specs or "edm_vpred.sigma_max" in specs):
        pred = "v"
    report["prediction_type"] = pred
    report["ztsnr"] = "ztsnr" in specs

    pos: dict[str, Any] = {}
    for k in sorted(k for k in specs if is_position_ids(k) and cls.category[k] not in JUNK):
        t = model.get(k)
        broken = broken_position_ids(t)
        pos[k] = {"dtype": dtype_code(t.dtype), "broken": broken, "ok": not broken and t.dtype == torch.int64}
    report["position_ids"] = pos

    report["scanned"] = bool(scan)
    if scan:
        bad = []
        for k in model.keys():
            s = specs[k]
            if not s.dtype.is_floating_point or s.numel == 0:
                continue
            t = model.get(k)
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            if nan or inf:
                bad.append({"key": k, "nan": nan, "inf": inf})
            del t
        report["non_finite"] = bad
        vae_keys = by_cat.get("vae", [])
        fp = vae_fingerprint(model, vae_keys) if vae_keys else None
        report["vae_fingerprint"] = fp
        report["vae_known_as"] = known_vae(fp)
    else:
        report["non_finite"] = None

    prov_in = model.info.provenance
    if prov_in.get("training_state_dropped"):
        report["training_state"] = prov_in["training_state_dropped"]
    if prov_in.get("renamed"):
        report["renamed_on_load"] = prov_in["renamed"]
    report["metadata"] = meta
    report["provenance"] = read_provenance(meta)
    report["integrity"] = recorded_hashes_check(p, meta) if scan else None
    return report


def recorded_hashes_check(path: Path, meta: dict[str, str]) -> list[str]:
    """What the metadata records about this file's own tensors and does not match them: the content digest
    (`sdbuild.content_digest`) and the tensor-buffer sha256 (`modelspec.hash_sha256`). Empty when all agree."""
    from mergekit_sd.formats.digests import tensor_buffer_sha256
    from mergekit_sd.formats.safetensors import BUFFER_SHA_KEY, CONTENT_DIGEST_KEY, file_content_digest

    if path.suffix.lower() != ".safetensors":
        return []
    out = []
    recorded = meta.get(CONTENT_DIGEST_KEY)
    if recorded:
        actual = file_content_digest(path, False)[0]
        if actual != recorded:
            out.append(f"recorded content digest {recorded} does not match the tensors ({actual}): edited after it was written")
    recorded = (meta.get(BUFFER_SHA_KEY) or "").lower()
    if recorded:
        actual = "0x" + tensor_buffer_sha256(path).removeprefix("0x")
        if actual != recorded and actual.removeprefix("0x") != recorded.removeprefix("0x"):
            out.append(f"recorded {BUFFER_SHA_KEY} {recorded[:18]}... does not match the tensor data ({actual[:18]}...)")
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def format_inspect(r: dict[str, Any]) -> str:
    """A readable report for a terminal."""
    lines: list[str] = []
    extra = [x for x in (r.get("variant"), f"{r['naming']} naming" if r.get("naming") else None) if x]
    arch = r["architecture"] + (f" ({', '.join(extra)})" if extra else "")
    lines.append(f"{r['file']}  [{r['format']}, {_size(r['file_bytes'])}]")
    lines.append(f"architecture  {arch}" + (f"  (shrunk x{r['shrink_factor']})" if r.get("shrink_factor") else "")
                 + (f"  [{r['kind']}]" if r.get("kind") not in (None, "checkpoint", r["architecture"]) else ""))
    lines.append(f"tensors       {r['tensors']}  ({_size(r['bytes'])})")
    lines.append("dtypes        " + ", ".join(f"{c} {d['tensors']} ({_size(d['bytes'])})" for c, d in r["dtypes"].items()))
    if r.get("prediction_type") or r.get("markers"):
        lines.append(f"prediction    {r.get('prediction_type') or 'not recorded'}" + ("  ztsnr" if r.get("ztsnr") else "")
                     + (f"  markers: {', '.join(r['markers'])}" if r.get("markers") else ""))
    lines.append("")
    lines.append(f"{'component':<16}{'tensors':>9}{'size':>14}  dtypes")
    for c, t in r["components"].items():
        lines.append(f"{c:<16}{t['tensors']:>9}{_size(t['bytes']):>14}  {', '.join(f'{k} {v}' for k, v in t['dtypes'].items())}")
    keys = r["keys"]
    if keys.get("absent_components"):
        lines.append(f"absent: {', '.join(keys['absent_components'])}")
    lines.append("")
    junk = r["junk"]
    if junk["tensors"]:
        lines.append(f"JUNK: {junk['tensors']} tensors wasting {_size(junk['bytes'])} ({junk['bytes']} bytes); `op: prune` removes them")
        for c, j in junk["categories"].items():
            ex = ", ".join(j["keys"][:2]) + (" ..." if len(j["keys"]) > 2 else "")
            lines.append(f"  {c:<18}{j['tensors']:>7}{_size(j['bytes']):>14}  {j['what']}: {ex}")
    else:
        lines.append("junk: none")
    if r.get("scheduler_buffers"):
        s = r["scheduler_buffers"]
        lines.append(f"scheduler buffers: {s['tensors']} ({_size(s['bytes'])}), optional")
    if r.get("precision_waste_bytes"):
        lines.append(f"precision: {_size(r['precision_waste_bytes'])} would be saved by storing fp32/fp64 tensors as fp16")
    if keys.get("reference"):
        lines.append(f"reference keys ({keys['reference']}): {len(keys['missing'])} missing, {len(keys['unexpected'])} unexpected"
                     + (f", {len(keys['shape_mismatch'])} with wrong shape" if keys.get("shape_mismatch") else ""))
        for k in keys["missing"][:5]:
            lines.append(f"  missing {k}")
        if len(keys["missing"]) > 5:
            lines.append(f"  ... and {len(keys['missing']) - 5} more (--json lists all)")
    for k, p in r.get("position_ids", {}).items():
        if p["ok"]:
            lines.append(f"position_ids ok ({k})")
        else:
            lines.append(f"BROKEN position_ids {k}: {p['dtype']}, wrong at {p['broken'][:12]}{' ...' if len(p['broken']) > 12 else ''}; "
                         "`op: prune` repairs them")
    if r.get("non_finite") is None:
        lines.append("values: not scanned")
    elif r["non_finite"]:
        lines.append(f"NON-FINITE values in {len(r['non_finite'])} tensors:")
        for b in r["non_finite"][:10]:
            lines.append(f"  {b['key']}: {b['nan']} NaN, {b['inf']} Inf")
    else:
        lines.append("values: all finite")
    if r.get("vae_fingerprint") is not None:
        lines.append(f"VAE fingerprint {r['vae_fingerprint']}" + (f" ({r['vae_known_as']})" if r.get("vae_known_as") else ""))
    if r.get("training_state"):
        lines.append(f"training state ignored: {', '.join(r['training_state'][:8])}")
    lines.append("")
    for problem in r.get("integrity") or []:
        lines.append(f"MISMATCH: {problem}")
    prov = r.get("provenance")
    if prov:
        lines.append("provenance: sdbuild recipe embedded (--json shows it)")
    meta = r.get("metadata") or {}
    if meta:
        lines.append(f"metadata ({len(meta)} fields):")
        for k in sorted(meta):
            if k == "sdbuild.provenance":
                continue
            v = meta[k].replace("\n", " ")
            lines.append(f"  {k}: {v[:100]}{'...' if len(v) > 100 else ''}")
    else:
        lines.append("metadata: none")
    return "\n".join(lines)
