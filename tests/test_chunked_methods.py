"""Methods that need whole-tensor statistics compute them over chunks: TIES's threshold and DARE's masks exactly
(bit-identical to whole-tensor formulas restated here), slerp's and Model Stock's fp64 sums within a stated bound,
and the geometric median runs a fixed number of Weiszfeld steps that match an fp64 restatement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_sd.lazy import from_tensors
from mergekit_sd.methods import METHODS, chunks
from mergekit_sd.methods.average import stock_stats
from mergekit_sd.methods.chunks import kth_largest_chunked, spans
from mergekit_sd.methods.interp import slerp_stats
from mergekit_sd.methods.ties import dare_masks
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.merge import build_merge

SHAPE = (97, 61)  # 5917 elements: with CHUNK = 1000, six chunks, the last one short


def _tensors(count: int, seed: int = 5, dtype=torch.float16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    out = [base.to(dtype)]
    for _ in range(count - 1):
        d = torch.randn(SHAPE, generator=g) * 0.05
        d[torch.rand(SHAPE, generator=g) < 0.2] = 0  # ties at zero, like real fine-tunes
        out.append((base + d).to(dtype))
    return out


def _kernel(method: str, tensors: list[torch.Tensor], chunk: int, monkeypatch, **params) -> torch.Tensor:
    monkeypatch.setattr(chunks, "CHUNK", chunk)
    m = METHODS[method]
    full = {p.name: p.default for p in m.params if not p.required}
    full.update(params)
    models = [from_tensors({"w": t}, label=f"m{i}") for i, t in enumerate(tensors)]
    return build_merge(m, models, full, OpContext(step="s")).get("w")


@pytest.mark.parametrize("gather", [0, 50, 1 << 22])  # third pass from the chunks again, or from kept candidates
def test_kth_largest_over_chunks_is_exact(monkeypatch, gather):
    monkeypatch.setattr(chunks, "GATHER_LIMIT", gather)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(10_007, generator=g) * 3).round(decimals=2).abs()  # many ties
    ordered = torch.sort(x, descending=True).values
    for keep in (1, 2, 17, 5000, 10_006, 10_007):
        for size in (1, 333, 4096, 20_000):
            passes = []

            def mags():
                passes.append(1)
                return (x[s:e] for s, e in spans(x.numel(), size))

            got = kth_largest_chunked(mags, keep)
            assert got == float(ordered[keep - 1])
            if gather == 1 << 22:
                assert len(passes) == 2


def _ties_reference(tensors, alpha, k, how):
    """TIES as it was written before chunking: fp32 whole tensors, torch.kthvalue thresholds."""
    base, *ms = [t.float() for t in tensors]
    trimmed = []
    for m in ms:
        d = m - base
        n = d.numel()
        keep = int(k * n)
        mag = d.abs()
        thr = torch.kthvalue(mag.reshape(-1), n - keep + 1).values
        trimmed.append(d * (mag >= thr))
    sign = torch.zeros_like(base)
    for t in trimmed:
        sign += torch.sign(t) if how == "count" else t
    sign.sign_()
    total, count = torch.zeros_like(base), torch.zeros_like(base)
    for t in trimmed:
        agree = (t * sign) > 0
        total += t * agree
        count += agree
    return (base + alpha * total.div_(count.clamp_(min=1))).to(tensors[0].dtype)


@pytest.mark.parametrize("how", ["mass", "count"])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.9])
def test_ties_chunked_equals_the_whole_tensor_formula(monkeypatch, how, k):
    tensors = _tensors(4)
    want = _ties_reference(tensors, 0.8, k, how)
    for chunk in (1000, 1 << 20):
        got = _kernel("add_difference_ties", tensors, chunk, monkeypatch, alpha=0.8, k=k, sign_election=how)
        assert torch.equal(got, want)


def test_dare_chunked_masks_equal_the_whole_draw(monkeypatch):
    tensors = _tensors(3)
    base, *ms = [t.float() for t in tensors]
    masks = dare_masks(SHAPE, 2, 0.6, 9, "w")
    total = torch.zeros_like(base)
    for m, mask in zip(ms, masks):
        total = total + torch.where(mask, m - base, torch.zeros_like(base)) / (1 - 0.6)
    want = (base + 0.7 * total).to(torch.float16)
    for chunk in (1000, 4096, 1 << 20):
        assert torch.equal(_kernel("add_difference_dare", tensors, chunk, monkeypatch, alpha=0.7, p=0.6, seed=9), want)


def test_slerp_sums_are_fp64_within_the_bound(monkeypatch):
    a, b = [t.float() for t in _tensors(2, seed=8, dtype=torch.float32)]
    exact = [math.fsum(v) for v in ((a.double() ** 2).flatten().tolist(), (b.double() ** 2).flatten().tolist(),
                                    (a.double() * b.double()).flatten().tolist())]
    mags = [math.fsum(np.abs(v)) for v in ((a.double() ** 2).numpy().ravel(), (b.double() ** 2).numpy().ravel(),
                                           (a.double() * b.double()).numpy().ravel())]
    for chunk in (1000, 1 << 20):
        monkeypatch.setattr(chunks, "CHUNK", chunk)
        na, nb, ab = slerp_stats([a.reshape(-1), b.reshape(-1)])
        # fp64 summation of n terms: |error| <= n * 2^-53 * sum|terms| (docs/performance.md)
        for got, want, mag in zip((na * na, nb * nb, ab), exact, mags):
            assert abs(got - want) <= a.numel() * 2 ** -53 * mag + 1e-300
    chunked = _kernel("slerp", [a, b], 1000, monkeypatch, alpha=0.3)
    whole = _kernel("slerp", [a, b], 1 << 20, monkeypatch, alpha=0.3)
    # the factors agree to ~1e-15: the fp32 results to within one rounding
    assert torch.allclose(chunked, whole, rtol=2 ** -23, atol=1e-30)
    cos = exact[2] / math.sqrt(exact[0] * exact[1])
    w = math.acos(cos)
    ref = (math.sin(0.7 * w) * a.double() + math.sin(0.3 * w) * b.double()) / math.sin(w)
    assert torch.allclose(chunked.double(), ref, rtol=1e-6, atol=1e-6)


def test_model_stock_chunked_within_the_bound(monkeypatch):
    tensors = _tensors(4, seed=12)
    base, *ms = [t.float() for t in tensors]
    ds = [(m - base).double().numpy().ravel() for m in ms]
    pairs = [(0, 1), (0, 2), (1, 2)]
    cos = [float(np.dot(ds[i], ds[j]) / (np.linalg.norm(ds[i]) * np.linalg.norm(ds[j]))) for i, j in pairs]
    c = sum(cos) / 3
    t_ref = 3 * c / (1 + 2 * c)
    for chunk in (1000, 1 << 20):
        monkeypatch.setattr(chunks, "CHUNK", chunk)
        assert abs(stock_stats([t.reshape(-1) for t in tensors]) - t_ref) <= 1e-12
    chunked = _kernel("model_stock", tensors, 1000, monkeypatch)
    whole = _kernel("model_stock", tensors, 1 << 20, monkeypatch)
    assert (chunked.float() - whole.float()).abs().max() <= 2 ** -10 * whole.float().abs().max()  # one fp16 ulp


def _weiszfeld64(points: list[np.ndarray], steps: int) -> np.ndarray:
    y = sum(points) / len(points)
    for _ in range(steps):
        w = np.array([1 / max(np.linalg.norm(p - y), 1e-6) for p in points])
        y = sum(wi * p for wi, p in zip(w / w.sum(), points))
    return y


@pytest.mark.parametrize("steps", [0, 1, 7, 40])
def test_geometric_median_runs_fixed_steps(monkeypatch, steps):
    tensors = _tensors(4, seed=21, dtype=torch.float32)
    tensors[3] = tensors[3] + 3.0  # an outlier the median resists
    ref = _weiszfeld64([t.double().numpy() for t in tensors], steps)
    outs = [_kernel("geometric_median", tensors, chunk, monkeypatch, iterations=steps) for chunk in (1000, 1 << 20)]
    for got in outs:
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    # chunking changes only the order of fp64 additions: the fp32 results agree to a few roundings
    assert torch.allclose(outs[0], outs[1], rtol=4 * 2 ** -23, atol=1e-6)
    again = _kernel("geometric_median", tensors, 1000, monkeypatch, iterations=steps)
    assert torch.equal(again, outs[0])


def _cosine_reference(pairs: dict, alpha: float, variant: str) -> dict:
    """supermerger's cosineA/cosineB restated in fp64 numpy from whole tensors: stage 0 collects S over every
    tensor pair, stage 1 rescales each column's similarity by S's 1st..99th percentile range."""
    def norm0(x):
        return x / np.maximum(np.sqrt((x * x).sum(0, keepdims=True)), 1e-12)

    def cos0(x, y):
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        num, den = (x * y).sum(0), np.sqrt((x * x).sum(0)) * np.sqrt((y * y).sum(0))
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)

    def cosg(x, y):
        den = np.linalg.norm(x) * np.linalg.norm(y)
        return float((x * y).sum() / den) if den > 0 else 0.0

    def sims(a, b):
        if variant == "a":
            a, b = norm0(a), norm0(b)
            return cos0(a, b), (cos0(a, b) + cosg(a, b)) / 2
        s = (cos0(a, b) + cosg(a, b)) / 2
        return s, s

    s = np.sort(np.concatenate([sims(a, b)[0].ravel() for a, b in pairs.values()]))
    p1, p99 = np.percentile(s, 1, method="midpoint"), np.percentile(s, 99, method="midpoint")
    s = s[(s >= p1) & (s <= p99)]
    lo, hi = s.min(), s.max()
    out = {}
    for key, (a, b) in pairs.items():
        k = np.clip((sims(a, b)[1] - lo) / (hi - lo) - (abs(alpha) if variant == "a" else alpha), 0, 1)
        out[key] = b + k.reshape(a.shape[1:]) * (a - b)
    return out


@pytest.mark.parametrize("variant", ["a", "b"])
def test_cosine_columns_over_row_chunks(monkeypatch, variant):
    """Column cosines summed over row chunks, and A's share per column handed out across flat chunks that do not
    line up with the columns (61 columns, chunks of 1000 elements), give the whole-tensor formula."""
    g = torch.Generator().manual_seed(31)
    shapes = {"model.diffusion_model.w": SHAPE, "model.diffusion_model.c": (13, 4, 3, 3),
              "model.diffusion_model.b": (300,)}
    a = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    b = {k: 0.6 * a[k] + torch.randn(s, generator=g) for k, s in shapes.items()}
    a["model.diffusion_model.w"][:, 5] = 0  # a zero column: cosine 0
    want = _cosine_reference({k: (a[k].double().numpy(), b[k].double().numpy()) for k in shapes}, 0.2, variant)
    m = METHODS[f"cosine_{variant}"]
    results = []
    for chunk in (7, 1000, 1 << 20):
        monkeypatch.setattr(chunks, "CHUNK", chunk)
        merged = build_merge(m, [from_tensors(a, label="A"), from_tensors(b, label="B")], {"alpha": 0.2}, OpContext(step="s"))
        got = {k: merged.get(k) for k in shapes}
        for k in shapes:
            assert np.allclose(got[k].double().numpy(), want[k], rtol=1e-6, atol=1e-6), (chunk, k)
        results.append(got)
    for k in shapes:  # fp64 sums in another order move a column's share by at most an fp32 rounding
        assert torch.allclose(results[0][k], results[2][k], rtol=0, atol=4 * 2 ** -23 * float(a[k].abs().max() + b[k].abs().max()))


def test_cosine_bounds_pass_is_counted_by_the_budget_until_done():
    """The first tensors of a cosine step may have to run the whole-model bounds pass (one stored tensor of each
    model at a time): their reservation includes it, later ones do not."""
    g = torch.Generator().manual_seed(3)
    shapes = {"model.diffusion_model.big": (64, 32), "model.diffusion_model.small": (4, 4)}
    a = {k: torch.randn(s, generator=g).half() for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=g).half() for k, s in shapes.items()}
    merged = build_merge(METHODS["cosine_a"], [from_tensors(a, label="A"), from_tensors(b, label="B")], {"alpha": 0.2},
                         OpContext(step="s"))
    small = "model.diffusion_model.small"
    before = merged.cost(small)
    merged.get(small)  # runs the bounds pass
    assert before - merged.cost(small) == 2 * 64 * 32 * 2  # the largest pair, fp16


def test_train_difference_over_chunks_decides_b_equals_c_for_the_whole_tensor(monkeypatch):
    """B equals C in the first chunks only: the tensor is still merged everywhere (B == C must hold for the whole
    tensor to keep A), with the same bytes as one chunk; B == C everywhere keeps A."""
    a, b = [t.float() for t in _tensors(2, seed=4, dtype=torch.float32)]
    c = b.clone()
    c.view(-1)[3000:] += 0.25
    a.view(-1)[10] = -0.0  # kept, A's -0.0 stays; merged, -0.0 + 0 is +0.0: the only trace of the decision there
    frac = lambda a, b, c: torch.where((b - c).abs() + (b - a).abs() == 0, 0.0, (b - a).abs() / ((b - c).abs() + (b - a).abs()))
    want = a + 1.8 * 0.6 * (b - c) * frac(a, b, c)
    for chunk in (1000, 1 << 20):
        got = _kernel("train_difference", [a, b, c], chunk, monkeypatch, alpha=0.6)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        assert int(got.view(-1)[10:11].view(torch.int32)) == 0  # equal B and C there, but merged: +0.0
    assert torch.equal(_kernel("train_difference", [a, b, c], 1000, monkeypatch, alpha=0.6),
                       _kernel("train_difference", [a, b, c], 1 << 20, monkeypatch, alpha=0.6))
    kept = _kernel("train_difference", [a, b, b.clone()], 1000, monkeypatch, alpha=0.6)
    assert torch.equal(kept.view(torch.int32), a.view(torch.int32))  # B == C everywhere: A, -0.0 included


@pytest.mark.parametrize("method", ["tensor_swap", "tensor_swap2"])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.7, 0.6), (1.0, 0.0)])
def test_tensor_swaps_over_flat_chunks_take_the_same_band(monkeypatch, method, alpha, beta):
    """The band of slices taken from the other model is found per element from its flat position, so chunks that
    cut through rows give the slicing of whole tensors (restated here), bit for bit."""
    g = torch.Generator().manual_seed(17)
    for shape in [(97, 61), (13, 120, 3, 3), (300,), (7, 5, 4)]:
        a, b = torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()
        if method == "tensor_swap" or len(shape) == 1:
            dim, n = 0, shape[0]
        else:
            dim, n = 1, (shape[1] if shape[1] > 100 else shape[0])
        base, src = (a, b) if alpha + beta <= 1 else (b, a)
        lo, hi = (int(n * beta), int(n * (alpha + beta))) if alpha + beta <= 1 else (int(n * (alpha + beta - 1)), int(n * beta))
        want = base.clone()
        idx = [slice(None)] * len(shape)
        idx[dim] = slice(lo, hi)
        want[tuple(idx)] = src[tuple(idx)]
        for chunk in (7, 1000, 1 << 20):
            monkeypatch.setattr(chunks, "CHUNK", chunk)
            m = METHODS[method]
            got = build_merge(m, [from_tensors({"w": a}, label="A"), from_tensors({"w": b}, label="B")],
                              {"alpha": alpha, "beta": beta}, OpContext(step="s")).get("w")
            assert torch.equal(got, want), (shape, chunk)


def test_extract_merge_rows_over_chunks(monkeypatch):
    """One factor per row of the last dim, from chunks of whole rows, handed to flat chunks that cut rows: equal to
    the whole-tensor formula restated in fp64 numpy."""
    g = torch.Generator().manual_seed(23)
    for shape in [(97, 61), (6, 5, 40), (300,)]:
        a = torch.randn(shape, generator=g)
        b, c = a + torch.randn(shape, generator=g) * 0.1, a + torch.randn(shape, generator=g) * 0.1
        x = (b - a).double().numpy().reshape(-1, shape[-1])
        y = (c - a).double().numpy().reshape(-1, shape[-1])
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        d = ((np.clip(cos, -1, 1) + 1) / 2) ** 0.7
        f = d + 0.2 * ((1 - d) - d)
        want = a.double().numpy() + ((x + 0.4 * (y - x)) * f[:, None]).reshape(shape)
        for chunk in (7, 1000, 1 << 20):
            monkeypatch.setattr(chunks, "CHUNK", chunk)
            got = build_merge(METHODS["extract_merge"], [from_tensors({"w": t}, label=n) for t, n in ((a, "A"), (b, "B"), (c, "C"))],
                              {"alpha": 0.4, "beta": 0.2, "gamma": 0.7}, OpContext(step="s")).get("w")
            assert np.allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6), (shape, chunk)


@pytest.mark.parametrize("method,params", [("weighted_sum", {"alpha": 0.3}), ("add_difference_ties", {"k": 0.3}),
                                           ("slerp", {"alpha": 0.4}), ("model_stock", {}),
                                           ("add_difference_dare", {"p": 0.5, "seed": 3})])
def test_evaluation_chunk_size_does_not_change_the_bytes(monkeypatch, method, params):
    """Formulas run over small evaluation chunks (for the allocator's sake) while statistics keep CHUNK: the
    result is the same whatever the evaluation chunk."""
    n = 2 if method in ("weighted_sum", "slerp") else 3
    tensors = _tensors(n, seed=9)
    results = []
    for ev in (999, 1 << 16, 1 << 20):
        monkeypatch.setattr(chunks, "EVAL_CHUNK", ev)
        results.append(_kernel(method, tensors, 4096, monkeypatch, **params))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("shape", [(97, 61), (13, 6, 3, 3), (300,), (3, 5), (40, 2, 9)])
def test_smooth_add_over_slabs_of_rows_is_the_whole_filter(monkeypatch, shape):
    """smooth_add reads B - C a slab of rows and its halo at a time (reflected at the tensor's edges as the whole
    filter does): the bytes of filtering the whole tensor, whatever the slab size."""
    from mergekit_sd.methods import filters
    from mergekit_sd.methods.supermerger import _smooth_whole

    g = torch.Generator().manual_seed(41)
    a, b, c = (torch.randn(shape, generator=g).half() for _ in range(3))
    want = _smooth_whole(a.float(), b.float(), c.float(), 0.7).half()
    for chunk, hood in ((7, 1 << 22), (1000, 200), (1 << 20, 1 << 22)):
        monkeypatch.setattr(filters, "SLAB_NEIGHBOURHOOD", hood)
        got = _kernel("smooth_add", [a, b, c], chunk, monkeypatch, alpha=0.7)
        assert torch.equal(got, want), (shape, chunk)
    assert torch.equal(_kernel("smooth_add", [a, b, c], 1000, monkeypatch, alpha=0.0), a)
