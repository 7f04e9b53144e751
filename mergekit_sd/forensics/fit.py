"""`sdbuild fit`: the affine merge of candidate parents that best explains a model, globally and per block.

One streaming pass accumulates, per bucket (block of the architecture's block map, or VAE), the Gram matrix of
[MODEL, C1, ..., Ck] minus C1 (stream.py: fp32 block products summed in fp64). Everything after that is small
linear algebra on those matrices (affine.py): the free fit reported as weights, the fits of every simpler op, the choice of the simplest op
that explains the model as well as the free fit, and the recipe that rebuilds it. Tensors bit-identical to a
candidate (a VAE copied as is) are counted and left out of the fit, though not out of the residual, which is that of
the written recipe over every compared tensor.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_sd.engine.progress import Progress
from mergekit_sd.errors import UserError
from mergekit_sd.forensics.affine import COMPLEXITY, Form, abs_residual, all_forms, fit_form, general_form, relative
from mergekit_sd.forensics.fitrecipe import recipe_text, rounded
from mergekit_sd.ops import pick_device
from mergekit_sd.forensics.sources import Member, open_checkpoint, open_many
from mergekit_sd.forensics.stream import StreamResult, stream
from mergekit_sd.forensics.verdict import fit_verdict

# a simpler op is chosen when its residual is within this of the free fit's: relative slack, absolute slack
SIMPLER_SLACK = (1.1, 0.001)


@dataclass
class FitReport:
    model: str
    candidates: list[str]
    global_fit: dict[str, Any]
    blocks: dict[str, Any] | None
    identical: dict[str, float]
    verdict: str
    kind: str
    op: str
    recipe: str
    residual: float  # of the chosen op, as fitted (globally, or block by block with --blocks)
    rounding_floor: float
    tensors: int
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "candidates": self.candidates, "global": self.global_fit}
        if self.blocks is not None:
            out["blocks"] = self.blocks
        out.update({"identical": self.identical, "verdict": self.verdict, "kind": self.kind, "op": self.op,
                    "residual": self.residual, "rounding_floor": self.rounding_floor, "tensors": self.tensors,
                    "notes": self.notes, "recipe": self.recipe})
        return out


def open_fit_members(model: str | os.PathLike, candidates: list[str | os.PathLike]) -> list[Member]:
    """[MODEL, C1, ..., Ck], all readable checkpoints of one architecture; at least two distinct candidates."""
    if len(candidates) < 2:
        raise UserError(f"fit needs at least two candidates (got {len(candidates)}): a model is explained as a merge of several")
    m = open_checkpoint(model)
    cands, _ = open_many(list(candidates), arch=m.arch)
    for c in cands:
        if c.path.resolve() == m.path.resolve():
            raise UserError("is the model itself; name its candidate parents", c.name)
    return [m, *cands]


def _weights_json(names: list[str], u: np.ndarray) -> dict[str, float]:
    return {n: round(float(w), 6) for n, w in zip(names, u)}


class _Fitter:
    """Fits of forms over the stream's buckets (globally: summed Gram; or bucket by bucket), and the error of the
    recipe they give over every compared tensor: the fitted ones, and those left out of the fit because they are
    bit-identical to some candidates (the recipe reproduces them exactly only where it copies such a candidate)."""

    def __init__(self, res: StreamResult, k: int):
        self.res = res
        self.k = k
        self.data = [b for b in res.order if b in res.buckets]
        self.total = res.total()
        n = len(res.names)
        self.full = {b: (res.buckets[b].gram if b in res.buckets else np.zeros((n, n)))
                     + res.skipped_gram.get(b, np.zeros((n, n))) for b in res.order}
        self.c = float(sum(g[0, 0] for g in self.full.values()))  # |MODEL - C1|² over every compared tensor

    def global_fit(self, form: Form) -> np.ndarray:
        return fit_form(form, self.total.gram)

    def block_fits(self, form: Form) -> dict[str, np.ndarray]:
        return {b: fit_form(form, self.res.buckets[b].gram) for b in self.data}

    def bucket_error(self, b: str, u: np.ndarray) -> float:
        """Squared error of candidate weights `u` in bucket b. Skipped tensors equal every candidate in
        `kept_from`: weights on those candidates alone (summing to 1) rebuild them exactly."""
        matched = {j - 1 for j in self.res.kept_from.get(b, set()) if j >= 1}
        support = {j for j in range(self.k) if u[j] != 0.0}
        if b in self.res.skipped_gram and support <= matched:
            return abs_residual(self.res.buckets[b].gram, u) if b in self.res.buckets else 0.0
        return abs_residual(self.full[b], u)

    def error(self, form: Form, values: dict[str, list[float]]) -> float:
        """Squared error of the recipe with op values per bucket, summed over every compared tensor."""
        return sum(self.bucket_error(b, _candidate_weights(form, values[b])) for b in self.res.order)

    def residual(self, form: Form, values: dict[str, list[float]]) -> float:
        """|MODEL - recipe| / |MODEL - C1| over every compared tensor."""
        return relative(self.error(form, values), self.c)


def _candidate_weights(form: Form, v: list[float]) -> np.ndarray:
    """The weight of every candidate given the op's values (its parameters, or for `linear` its weights)."""
    if form.op == "linear":
        u = np.zeros(form.k)
        for j, w in zip(form.models, v):
            u[j] = w
        return u
    return form.weights(np.asarray(v, dtype=np.float64))


def _kept_buckets(res: StreamResult, k: int) -> dict[str, list[int]]:
    """Buckets wholly bit-identical to some candidates (but not to all, which constrains nothing): candidates."""
    out: dict[str, list[int]] = {}
    for b, members in res.kept_from.items():
        if b in res.buckets:
            continue
        cands = sorted(j - 1 for j in members if j >= 1)
        if cands and len(cands) < k:
            out[b] = cands
    return out


def fit_model(model: str | os.PathLike, candidates: list[str | os.PathLike], *, blocks: bool = False, device: str = "cpu",
              progress: Progress | None = None, recipe_dir: Path | None = None) -> FitReport:
    """Fit MODEL as an affine merge of the candidates; `recipe_dir` is where the recipe will be written (input
    paths are made relative to it)."""
    dev = pick_device(device)
    members = open_fit_members(model, candidates)
    names = [m.name for m in members[1:]]
    short = _short_names(members[1:])
    k = len(names)
    res = stream(members, reference=1, device=dev, progress=progress, label="fit", query=0, skip_identical=True, rounding=True)
    if res.keys == 0:
        raise UserError("shares no tensors with the candidates (same names and shapes); nothing to compare", members[0].name)
    identical = {n: round(res.identical.get(j + 1, 0) / res.keys, 6) for j, n in enumerate(names)}
    fitter = _Fitter(res, k)
    family = members[0].arch.family
    if not fitter.data or fitter.c == 0:
        who = max(range(k), key=lambda j: res.identical.get(j + 1, 0))
        if res.identical.get(who + 1, 0) == res.keys or fitter.c == 0:
            return _copy_report(members, names, short, identical, who, res, recipe_dir, blocks)
        raise UserError("every tensor is bit-identical to one candidate or another; nothing left to fit", members[0].name)

    kept = _kept_buckets(res, k)

    def values_of(form: Form, theta) -> dict[str, list[float]]:
        return _bucket_values(form, theta, fitter.global_fit(form), kept, res.order)

    general = general_form(k)
    u_global = general.weights(fitter.global_fit(general))
    r_global = fitter.residual(general, values_of(general, fitter.global_fit(general)))
    per_block = fitter.block_fits(general)
    r_blocks = fitter.residual(general, values_of(general, per_block))
    floor = relative(fitter.total.rounding, fitter.c)

    # the simplest op whose residual (of the recipe it writes) is about the free fit's
    best = r_blocks if blocks else r_global
    scored = []
    for form in all_forms(k):
        theta = fitter.block_fits(form) if blocks else fitter.global_fit(form)
        scored.append((COMPLEXITY[form.op], fitter.residual(form, values_of(form, theta)), form, theta))
    limit = SIMPLER_SLACK[0] * best + SIMPLER_SLACK[1]
    _, r_form, form, theta = min((s for s in scored if s[1] <= limit), key=lambda s: (s[0], s[1]))
    form, theta = _oriented(form, theta, fitter)

    values = values_of(form, theta)
    values, r_form = _round_values(form, values, fitter, blocks)

    kept_note = {b: short[c[0]] for b, c in kept.items()}
    op_names = [short[j] for j in form.models]
    described = {p: [values[b][i] for b in fitter.data] for i, p in enumerate(_param_names(form))}
    kind, verdict = fit_verdict(op=form.op, op_names=op_names, params=described, residual=r_form, best=best, floor=floor,
                                global_weights=u_global, names=short, block_residual=r_blocks, blocks_used=blocks,
                                kept=kept_note, all_identical=None)
    comment = f"fitted by `sdbuild fit` to the weights of {Path(members[0].name).name}: {verdict}"
    params = {p: {b: values[b][i] for b in values} for i, p in enumerate(_param_names(form))}
    recipe = recipe_text(form=form, params=params, candidates=[m.path if recipe_dir is not None else Path(m.name) for m in members[1:]],
                         model_name=members[0].name, model_dtype=_main_dtype(members[0]), first_dtype=_main_dtype(members[1 + form.models[0]]),
                         family=family, order=res.order, exceptions_only=not blocks, comment=comment, out_dir=recipe_dir)

    block_json = None
    if blocks:
        block_json = {}
        for b in res.order:
            if b in res.buckets:
                g = res.buckets[b].gram
                block_json[b] = {"weights": _weights_json(names, general.weights(per_block[b])),
                                 "residual": round(relative(abs_residual(g, general.weights(per_block[b])), float(g[0, 0])), 6),
                                 "tensors": res.buckets[b].tensors}
            elif b in kept:
                u = np.eye(k)[kept[b][0]]
                block_json[b] = {"weights": _weights_json(names, u), "residual": 0.0, "tensors": 0,
                                 "identical_to": [names[c] for c in kept[b]]}
    notes = []
    if res.not_shared:
        notes.append(f"{res.not_shared} tensors are not in every file (or differ in shape) and were not compared")
    skipped = sum(res.skipped.values())
    if skipped:
        notes.append(f"{skipped} tensors bit-identical to a candidate were left out of the fit")
    return FitReport(members[0].name, names, {"weights": _weights_json(names, u_global), "residual": round(r_global, 6)},
                     block_json, identical, verdict, kind, form.op, recipe, round(r_form, 6), round(floor, 6),
                     res.keys, notes)


def _param_names(form: Form) -> list[str]:
    return [f"w{i}" for i in range(len(form.models))] if form.op == "linear" else list(form.params)


def _op_values(form: Form, theta: np.ndarray) -> list[float]:
    """What the recipe writes: the op's parameters, or for `linear` the weight of each of its models."""
    return form.op_weights(theta) if form.op == "linear" else [float(t) for t in theta]


def _oriented(form: Form, theta, fitter: _Fitter):
    """add_difference(A; B, C) with a negative alpha is add_difference(A; C, B) with a positive one."""
    if form.op != "add_difference":
        return form, theta
    ref = fitter.global_fit(form)[0]
    if ref >= 0:
        return form, theta
    flipped = Form(form.op, (form.models[0], form.models[2], form.models[1]), form.k)
    if isinstance(theta, dict):
        return flipped, {b: -t for b, t in theta.items()}
    return flipped, -theta


def _bucket_values(form: Form, theta, theta_global: np.ndarray, kept: dict[str, list[int]],
                   order: list[str]) -> dict[str, list[float]]:
    """The op's values in every bucket: fitted, or (a bucket copied from a candidate) whatever reproduces that."""
    out: dict[str, list[float]] = {}
    for b in order:
        t = theta.get(b) if isinstance(theta, dict) else theta
        if b in kept:
            for c in kept[b]:
                exact = form.theta_for(np.eye(form.k)[c])
                if exact is not None:
                    t = exact
                    break
        out[b] = _op_values(form, t if t is not None else theta_global)
    return out


def _round_values(form: Form, values: dict[str, list[float]], fitter: _Fitter,
                  blocks: bool) -> tuple[dict[str, list[float]], float]:
    """Values with as few decimals (2, 3, 4 or 6) as cost at most 1% of the residual or a tenth of the expected
    rounding error (bucket by bucket with --blocks), and the residual of exactly those values over every compared
    tensor: a merge made with round weights is written with those weights, and the residual reported is the one
    the written recipe gives."""
    out = {b: [float(x) for x in rounded(v, 6)] for b, v in values.items()}
    groups = [[b] for b in fitter.data] if blocks else [list(values)]
    for group in groups:
        def err(vals: dict[str, list[float]]) -> float:
            return sum(fitter.bucket_error(b, _candidate_weights(form, vals[b])) for b in group)

        target = err(values)
        floor = fitter.res.buckets[group[0]].rounding if blocks else fitter.total.rounding  # expected squared rounding error
        for decimals in (2, 3, 4):
            trial = {b: [float(x) for x in rounded(values[b], decimals)] for b in group}
            if err(trial) <= target + max(0.0201 * target, 0.1 * floor):
                out.update(trial)
                break
    return out, fitter.residual(form, out)


def _main_dtype(m: Member):
    counts = Counter(s.dtype for s in m.model.specs.values() if s.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else None


def _short_names(members: list[Member]) -> list[str]:
    """File names for sentences (full names where two files share one)."""
    base = [Path(m.name).name for m in members]
    return [b if base.count(b) == 1 else m.name for b, m in zip(base, members)]


def _copy_report(members, names, short, identical, who, res, recipe_dir, blocks) -> FitReport:
    k = len(names)
    form = Form("copy", (who,), k)
    u = np.eye(k)[who]
    kind, verdict = fit_verdict(op="copy", op_names=[short[who]], params={}, residual=0.0, best=0.0, floor=0.0, global_weights=u,
                                names=short, block_residual=None, blocks_used=blocks, kept={}, all_identical=short[who])
    recipe = recipe_text(form=form, params={}, candidates=[m.path if recipe_dir is not None else Path(m.name) for m in members[1:]],
                         model_name=members[0].name, model_dtype=_main_dtype(members[0]), first_dtype=_main_dtype(members[1 + who]),
                         family=members[0].arch.family, order=res.order, exceptions_only=True,
                         comment=f"fitted by `sdbuild fit` to the weights of {Path(members[0].name).name}: {verdict}", out_dir=recipe_dir)
    block_json = {b: {"weights": _weights_json(names, u), "residual": 0.0, "tensors": 0} for b in res.order} if blocks else None
    return FitReport(members[0].name, names, {"weights": _weights_json(names, u), "residual": 0.0}, block_json, identical,
                     verdict, kind, "copy", recipe, 0.0, 0.0, res.keys, [])
