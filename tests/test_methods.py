"""Every merge method against an independent computation (numpy, float64) on small tensors, docs/formats.md §2.5's worked
examples, the kernel's architecture and block-weight handling, and the recipe-level contracts end to end."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import write_recipe
from mergekit_sd.errors import UserError
from mergekit_sd.lazy import LazyModel, from_tensors
from mergekit_sd.methods import load_methods
from mergekit_sd.ops import OpContext
from mergekit_sd.ops.merge import build_merge
from mergekit_sd.synth.models import synth_tensors

METHODS = load_methods()
UNET = "model.diffusion_model."


def T(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def merge(method: str, tensors: list, *, key: str = "w", labels=None, **params) -> torch.Tensor:
    """Run one method through the merge kernel on one tensor per model."""
    models = [from_tensors({key: t}, label=f"m{i}") for i, t in enumerate(tensors)]
    out = merge_models(method, models, labels=labels, **params)
    return out.get(key)


def merge_models(method: str, models: list[LazyModel], labels=None, **params) -> LazyModel:
    m = METHODS[method]
    full = {p.name: p.default for p in m.params if not p.required}
    full.update(params)
    ctx = OpContext(step="s", input_labels=labels or [mm.label for mm in models])
    return build_merge(m, models, full, ctx)


def close(got: torch.Tensor, want, tol: float = 1e-6) -> None:
    np.testing.assert_allclose(got.double().numpy(), np.asarray(want, dtype=np.float64), rtol=tol, atol=tol)


RNG = np.random.default_rng(1234)


def rand(*shape) -> torch.Tensor:
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# docs/formats.md §2.5 worked examples

A, B, C = T(1.0, 2.0), T(3.0, 0.0), T(1.0, 1.0)


def test_worked_examples():
    assert merge("weighted_sum", [A, B], alpha=0.25).tolist() == [1.5, 1.5]
    assert merge("add_difference", [A, B, C], alpha=0.5).tolist() == [2.0, 1.5]
    close(merge("triple_sum", [A, B, C], alpha=0.2, beta=0.3), [1.4, 1.3])
    assert merge("sum_twice", [A, B, C], alpha=0.5, beta=0.5).tolist() == [1.5, 1.0]
    close(merge("train_difference", [A, B, C], alpha=0.5), [1.9, 1.4])


def test_inpainting_worked_example():
    a = rand(8, 9, 3, 3)
    b = rand(8, 4, 3, 3)
    key = UNET + "input_blocks.0.0.weight"
    out = merge("weighted_sum", [a, b], key=key, alpha=0.3)
    close(out[:, :4], 0.7 * a[:, :4].double() + 0.3 * b.double())
    assert torch.equal(out[:, 4:], a[:, 4:])
    with pytest.raises(UserError, match="inpainting model must come first"):
        merge("weighted_sum", [b, a], key=key, alpha=0.3)


# ---------------------------------------------------------------------------------------------------------------
# A1111 legacy


def test_sigmoid_and_inverse():
    a, b = rand(5), rand(5)
    for m in (0.0, 0.2, 0.5, 0.9, 1.0):
        s = m * m * (3 - 2 * m)
        close(merge("sigmoid", [a, b], alpha=m), a.double() + (b.double() - a.double()) * s)
        inv = 0.5 - math.sin(math.asin(1 - 2 * m) / 3)
        close(merge("inverse_sigmoid", [a, b], alpha=m), a.double() + (b.double() - a.double()) * inv)
        # the two multipliers are inverse functions of each other
        assert 0.5 - math.sin(math.asin(1 - 2 * s) / 3) == pytest.approx(m, abs=1e-12)
    assert torch.equal(merge("sigmoid", [a, b], alpha=0.0), a)
    assert torch.equal(merge("inverse_sigmoid", [a, b], alpha=0.0), a)
    with pytest.raises(UserError, match="alpha must be between 0 and 1"):
        merge("inverse_sigmoid", [a, b], alpha=1.5)


# ---------------------------------------------------------------------------------------------------------------
# supermerger calcmodes


def test_train_difference_edges():
    a, b = rand(6), rand(6)
    assert torch.equal(merge("train_difference", [a, b, b.clone()], alpha=0.7), a)  # B == C: A untouched
    # 0/0 fraction: where B == C == A the element stays A
    a2, b2, c2 = T(1, 2), T(1, 5), T(1, 3)
    close(merge("train_difference", [a2, b2, c2], alpha=1.0), [1, 2 + 1.8 * 2 * 3 / (2 + 3)])
    x, y, z = (t.double().numpy() for t in (rand(4, 3), rand(4, 3), rand(4, 3)))
    want = x + 1.8 * 0.4 * (y - z) * np.abs(y - x) / (np.abs(y - z) + np.abs(y - x))
    close(merge("train_difference", [torch.tensor(x).float(), torch.tensor(y).float(), torch.tensor(z).float()], alpha=0.4), want, 1e-5)


def naive_median3(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1, mode="symmetric")  # numpy symmetric == scipy.ndimage reflect
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        win = p[tuple(slice(i, i + 3) for i in idx)]
        out[idx] = np.median(win)
    return out


def naive_gaussian(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    y = x.astype(np.float32)
    for ax in range(x.ndim):
        p = np.pad(y.astype(np.float64), [(r, r) if a == ax else (0, 0) for a in range(x.ndim)], mode="symmetric")
        acc = np.zeros(y.shape)
        for j in range(2 * r + 1):
            acc += k[j] * np.take(p, range(j, j + y.shape[ax]), axis=ax)
        y = acc.astype(np.float32)
    return y


def test_smooth_add_against_naive_filters():
    a, b, c = rand(6, 5, 3, 3), rand(6, 5, 3, 3), rand(6, 5, 3, 3)
    d = (b - c).numpy()
    want = a.double().numpy() + 0.6 * naive_gaussian(naive_median3(d)).astype(np.float64)
    close(merge("smooth_add", [a, b, c], alpha=0.6), want, 1e-6)
    a1, b1, c1 = rand(9), rand(9), rand(9)
    close(merge("smooth_add", [a1, b1, c1], alpha=1.0),
          a1.double().numpy() + naive_gaussian(naive_median3((b1 - c1).numpy())), 1e-6)
    assert torch.equal(merge("smooth_add", [a, b, c], alpha=0.0), a)


def test_smooth_add_matches_scipy_bitwise():
    nd = pytest.importorskip("scipy.ndimage")
    from mergekit_sd.methods.filters import gaussian_filter, median_filter3, smooth

    for shape in [(7,), (5, 6), (4, 3, 3, 3), (2, 1, 1, 1), (3, 2), (30, 7)]:
        x = rand(*shape)
        assert np.array_equal(median_filter3(x).numpy(), nd.median_filter(x.numpy(), size=3))
        assert np.array_equal(gaussian_filter(x).numpy(), nd.gaussian_filter(x.numpy(), sigma=1))
        assert np.array_equal(smooth(x).numpy(), nd.gaussian_filter(nd.median_filter(x.numpy(), size=3), sigma=1))


def test_median_filter_chunks_agree(monkeypatch):
    from mergekit_sd.methods import filters

    x = rand(23, 4, 3)
    whole = filters.median_filter3(x)
    monkeypatch.setattr(filters, "MEDIAN_CHUNK_ELEMENTS", 500)
    assert torch.equal(filters.median_filter3(x), whole)


def np_cos0(x, y):
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    num = (x * y).sum(0)
    den = np.sqrt((x * x).sum(0)) * np.sqrt((y * y).sum(0))
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def np_cosg(x, y):
    den = np.linalg.norm(x) * np.linalg.norm(y)
    return float((x * y).sum() / den) if den > 0 else 0.0


def np_norm0(x):
    n = np.sqrt((x * x).sum(0, keepdims=True))
    return x / np.maximum(n, 1e-12)


def np_cosine(models_a: dict, models_b: dict, alpha: float, variant: str) -> dict:
    """Independent restatement of docs/formats.md §2.3 cosineA/cosineB (stage 0 over the whole model, then per key)."""
    s = []
    for k in models_a:
        if k.startswith("first_stage_model."):
            continue
        a, b = models_a[k], models_b[k]
        if variant == "a":
            s.append(np_cos0(np_norm0(a), np_norm0(b)).ravel())
        else:
            s.append(((np_cos0(a, b) + np_cosg(a, b)) / 2).ravel())
    s = np.concatenate(s)
    s = s[~np.isnan(s)]
    p1, p99 = np.percentile(s, 1, method="midpoint"), np.percentile(s, 99, method="midpoint")
    s = s[(s >= p1) & (s <= p99)]
    lo, hi = s.min(), s.max()
    out = {}
    for k in models_a:
        a, b = models_a[k], models_b[k]
        if k.startswith("first_stage_model."):
            out[k] = a
            continue
        if variant == "a":
            na, nb = np_norm0(a), np_norm0(b)
            sim = (np_cos0(na, nb) + np_cosg(na, nb)) / 2
        else:
            sim = (np_cos0(a, b) + np_cosg(a, b)) / 2
        kk = np.clip((sim - lo) / (hi - lo) - (abs(alpha) if variant == "a" else alpha), 0, 1)
        kk = kk.reshape(a.shape[1:]) if a.ndim > 1 else kk.reshape(())
        out[k] = b + kk * (a - b)
    return out


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_cosine_against_restatement(variant, alpha):
    keys = {UNET + "input_blocks.1.1.proj_in.weight": (6, 5, 1, 1), UNET + "out.2.weight": (4, 7),
            UNET + "out.2.bias": (9,), "first_stage_model.decoder.conv_in.weight": (3, 3)}
    ta = {k: rand(*s) for k, s in keys.items()}
    tb = {k: ta[k] * 0.5 + rand(*s) for k, s in keys.items()}
    out = merge_models(f"cosine_{variant}", [from_tensors(ta, label="A"), from_tensors(tb, label="B")], alpha=alpha)
    want = np_cosine({k: v.double().numpy() for k, v in ta.items()}, {k: v.double().numpy() for k, v in tb.items()}, alpha, variant)
    for k in keys:
        close(out.get(k), want[k], 1e-5)
    vae = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(out.get(vae), ta[vae])


def test_cosine_degenerate_inputs():
    z = torch.zeros(4, 3)
    a = rand(4, 3)
    # zero vectors: no NaN, one tensor only -> empty similarity range -> k = 0.5 - alpha
    out = merge("cosine_b", [z, a], alpha=0.2)
    close(out, 0.3 * 0 + 0.7 * a.double().numpy())
    out = merge("cosine_a", [a, z], alpha=0.0)
    close(out, 0.5 * a.double().numpy())
    # identical models give A back whatever alpha is
    assert torch.equal(merge("cosine_a", [a, a.clone()], alpha=0.7), a)


def test_extract_merge():
    a, b, c = rand(5, 4), rand(5, 4), rand(5, 4)
    x, y = (b - a).double().numpy(), (c - a).double().numpy()
    s = np.clip((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)), -1, 1)[:, None]
    for al, be, ga in [(0.5, 0.25, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.3, 0.7, 2.0)]:
        d = ((s + 1) / 2) ** ga
        want = a.double().numpy() + (x + al * (y - x)) * (d + be * ((1 - d) - d))
        close(merge("extract_merge", [a, b, c], alpha=al, beta=be, gamma=ga), want, 1e-5)
    for bad, msg in [({"alpha": 1.5}, "alpha must be between 0 and 1"), ({"beta": -0.1}, "beta must"), ({"gamma": -1.0}, "gamma must")]:
        with pytest.raises(UserError, match=msg):
            merge("extract_merge", [a, b, c], **bad)


def np_swap(a, b, n, alpha, beta, axis):
    out_from_b = alpha + beta <= 1
    if out_from_b:
        lo, hi, out, src = int(n * beta), int(n * (alpha + beta)), a.copy(), b
    else:
        lo, hi, out, src = int(n * (alpha + beta - 1)), int(n * beta), b.copy(), a
    idx = np.arange(a.shape[axis])
    sel = (idx >= lo) & (idx < hi)
    shape = [1] * a.ndim
    shape[axis] = -1
    return np.where(sel.reshape(shape), src, out)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.25), (0.3, 0.0), (0.8, 0.6), (0.0, 0.0), (1.0, 0.0)])
def test_tensor_swaps(alpha, beta):
    a, b = rand(10, 6, 3), rand(10, 6, 3)
    an, bn = a.numpy(), b.numpy()
    assert np.array_equal(merge("tensor_swap", [a, b], alpha=alpha, beta=beta).numpy(), np_swap(an, bn, 10, alpha, beta, 0))
    # tensor2: dim 1, indices from shape[0] while shape[1] <= 100 (supermerger's quirk), from shape[1] above
    assert np.array_equal(merge("tensor_swap2", [a, b], alpha=alpha, beta=beta).numpy(), np_swap(an, bn, 10, alpha, beta, 1))
    w, v = rand(3, 120), rand(3, 120)
    assert np.array_equal(merge("tensor_swap2", [w, v], alpha=alpha, beta=beta).numpy(),
                          np_swap(w.numpy(), v.numpy(), 120, alpha, beta, 1))
    s, t = rand(7), rand(7)
    assert np.array_equal(merge("tensor_swap2", [s, t], alpha=alpha, beta=beta).numpy(), np_swap(s.numpy(), t.numpy(), 7, alpha, beta, 0))
    z = torch.tensor(2.0)
    assert merge("tensor_swap", [z, torch.tensor(3.0)], alpha=alpha, beta=beta).item() == 2.0


def test_self_scale():
    a = rand(4, 4)
    close(merge("self_scale", [a], key=UNET + "input_blocks.1.1.proj_in.weight", alpha=0.9), a.double().numpy() * 0.9)
    for k in ("attn1.to_out.0.weight", "proj_out.weight", "norm1.weight"):
        assert torch.equal(merge("self_scale", [a], key=UNET + "input_blocks.1.1." + k, alpha=0.9), a)
    assert torch.equal(merge("self_scale", [a], alpha=0.0), a)


# ---------------------------------------------------------------------------------------------------------------
# slerp


def np_slerp(a, b, t):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float((a * b).sum() / (na * nb))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    w = math.acos(dot)
    return math.sin((1 - t) * w) / math.sin(w) * a + math.sin(t * w) / math.sin(w) * b


def test_slerp():
    close(merge("slerp", [T(1, 0), T(0, 1)], alpha=0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    a, b = rand(3, 4), rand(3, 4)
    for t in (0.1, 0.5, 0.77):
        close(merge("slerp", [a, b], alpha=t), np_slerp(a.double().numpy(), b.double().numpy(), t), 1e-5)
    assert torch.equal(merge("slerp", [a, b], alpha=0.0), a)
    assert torch.equal(merge("slerp", [a, b], alpha=1.0), b)
    # parallel, antiparallel and zero vectors fall back to a plain weighted sum (no NaN)
    close(merge("slerp", [a, 2 * a], alpha=0.25), a.double().numpy() * 1.25)
    close(merge("slerp", [a, -a], alpha=0.25), a.double().numpy() * 0.5)
    close(merge("slerp", [torch.zeros(3, 4), b], alpha=0.5), b.double().numpy() * 0.5)
    close(merge("slerp", [a, torch.zeros(3, 4)], alpha=0.5), a.double().numpy() * 0.5)


# ---------------------------------------------------------------------------------------------------------------
# TIES and DARE


def np_ties(base, models, alpha, k, how):
    deltas = [m - base for m in models]
    trimmed = []
    for d in deltas:
        n = d.size
        keep = int(k * n)
        if keep >= n:
            trimmed.append(d)
            continue
        if keep == 0:
            trimmed.append(np.zeros_like(d))
            continue
        thr = np.sort(np.abs(d).ravel())[::-1][keep - 1]
        trimmed.append(np.where(np.abs(d) >= thr, d, 0))
    st = np.stack(trimmed)
    sign = np.sign(np.sign(st).sum(0)) if how == "count" else np.sign(st.sum(0))
    agree = (np.sign(st) == sign) & (st != 0)
    cnt = agree.sum(0)
    merged = np.where(cnt > 0, np.where(agree, st, 0).sum(0) / np.maximum(cnt, 1), 0)
    return base + alpha * merged


@pytest.mark.parametrize("how", ["mass", "count"])
@pytest.mark.parametrize("k", [1.0, 0.5, 0.2, 0.0])
def test_ties_against_restatement(how, k):
    base = rand(6, 5)
    ms = [base + rand(6, 5) for _ in range(3)]
    got = merge("add_difference_ties", [base, *ms], alpha=0.8, k=k, sign_election=how)
    want = np_ties(base.double().numpy(), [m.double().numpy() for m in ms], 0.8, k, how)
    close(got, want, 1e-5)


def test_ties_all_equal_signs_and_elections():
    base = T(0, 0, 0)
    out = merge("add_difference_ties", [base, T(1, 2, 3), T(3, 2, 1)], alpha=1.0, k=1.0)
    assert out.tolist() == [2.0, 2.0, 2.0]  # all signs agree: the plain mean of the deltas
    # mass vs count: deltas +1, +1, -5 -> mass elects minus (-5), count elects plus (mean of the two +1)
    ms = [T(1.0), T(1.0), T(-5.0)]
    assert merge("add_difference_ties", [T(0.0), *ms], alpha=1.0, k=1.0, sign_election="mass").tolist() == [-5.0]
    assert merge("add_difference_ties", [T(0.0), *ms], alpha=1.0, k=1.0, sign_election="count").tolist() == [1.0]
    assert torch.equal(merge("add_difference_ties", [base, T(1, 2, 3)], alpha=0.0), base)
    with pytest.raises(UserError, match="k must be between 0 and 1"):
        merge("add_difference_ties", [base, T(1, 2, 3)], k=1.5)


def test_dare_deterministic_and_rescaled():
    base = rand(64, 32)
    m1, m2 = base + rand(64, 32), base + rand(64, 32)
    key = UNET + "input_blocks.1.1.proj_in.weight"
    out1 = merge("add_difference_dare", [base, m1, m2], key=key, alpha=0.5, p=0.7, seed=42)
    out2 = merge("add_difference_dare", [base, m1, m2], key=key, alpha=0.5, p=0.7, seed=42)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, merge("add_difference_dare", [base, m1, m2], key=key, alpha=0.5, p=0.7, seed=43))
    assert not torch.equal(out1, merge("add_difference_dare", [base, m1, m2], key=key + "x", alpha=0.5, p=0.7, seed=42))
    # restated: generator seeded with seed*1000003 + crc32(name), one uniform draw per model, keep where u >= p
    g = torch.Generator().manual_seed((42 * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFFFFFFFFFFFFFF)
    masks = [torch.rand(base.shape, generator=g) >= 0.7 for _ in range(2)]
    want = base.double() + 0.5 * sum(torch.where(mk, (m - base).double(), 0.0) / 0.3 for mk, m in zip(masks, (m1, m2)))
    close(out1, want.numpy(), 1e-5)
    kept = masks[0].double().mean().item()
    assert 0.2 < kept < 0.4
    # p = 0 is a plain add difference of every delta
    close(merge("add_difference_dare", [base, m1, m2], alpha=1.0, p=0.0), (m1 + m2 - base).double().numpy(), 1e-5)
    with pytest.raises(UserError, match="below 1"):
        merge("add_difference_dare", [base, m1], p=1.0)


# ---------------------------------------------------------------------------------------------------------------
# averages


def test_n_average():
    ms = [rand(3, 2) for _ in range(4)]
    close(merge("n_average", ms), np.mean([m.double().numpy() for m in ms], 0))
    close(merge("n_average", ms[:2]), (ms[0].double() + ms[1].double()).numpy() / 2)


def test_geometric_median():
    # collinear points: the median is the middle one
    close(merge("geometric_median", [T(0.0, 0.0), T(1.0, 1.0), T(5.0, 5.0)]), [1.0, 1.0], 1e-4)
    # symmetric points: the centroid
    close(merge("geometric_median", [T(1, 0), T(-1, 0), T(0, 1), T(0, -1)]), [0, 0], 1e-6)
    ms = [rand(4, 3) for _ in range(5)]
    got = merge("geometric_median", ms).double().numpy()
    pts = [m.double().numpy() for m in ms]

    def obj(y):
        return sum(np.linalg.norm(p - y) for p in pts)

    assert obj(got) <= obj(np.mean(pts, 0)) + 1e-9
    for _ in range(20):  # no nearby point is better (it is the minimiser)
        assert obj(got) <= obj(got + 1e-3 * RNG.standard_normal(got.shape)) + 1e-7


def np_stock(base, ms):
    ds = [m - base for m in ms]
    n = len(ds)
    cs = [np_cosg(ds[i], ds[j]) for i in range(n) for j in range(i + 1, n)]
    c = sum(cs) / len(cs)
    t = n * c / (1 + (n - 1) * c)
    return base + t * np.mean(ds, 0)


def test_model_stock():
    base = rand(5, 4)
    ms = [base + rand(5, 4) * 0.1 + 0.3 for _ in range(3)]
    close(merge("model_stock", [base, *ms]), np_stock(base.double().numpy(), [m.double().numpy() for m in ms]), 1e-5)
    # identical fine-tunes (cos = 1): t = 1, the fine-tune itself
    close(merge("model_stock", [base, ms[0], ms[0].clone()]), ms[0].double().numpy(), 1e-6)
    # zero deltas: the base, no NaN
    assert torch.equal(merge("model_stock", [base, base.clone(), base.clone()]), base)
    # opposite deltas with two models: 1 + (N-1)cos = 0 is guarded (t = 0)
    d = rand(5, 4)
    close(merge("model_stock", [base, base + d, base - d]), base.double().numpy())


# ---------------------------------------------------------------------------------------------------------------
# kernel: architectures, block weights, elemental, include/exclude


class Untouchable(LazyModel):
    def __init__(self, tensors: dict, label: str):
        m = from_tensors(tensors)
        super().__init__(m.specs, self._fail, label=label)

    @staticmethod
    def _fail(key):
        raise AssertionError(f"tensor {key} was read")


def test_sd1_x_sdxl_fails_before_reading():
    sd1 = Untouchable(synth_tensors("sd1", 32, "fp16", seed=1), "sd15.safetensors")
    xl = Untouchable(synth_tensors("sdxl", 32, "fp16", seed=2), "xl.safetensors")
    with pytest.raises(UserError) as e:
        merge_models("weighted_sum", [sd1, xl], alpha=0.5)
    msg = str(e.value)
    assert "sd15.safetensors (sd1)" in msg and "xl.safetensors (sdxl)" in msg and "different model architectures" in msg


def test_generic_state_dict_merges_with_scalars_only():
    a, b = {"layer.weight": rand(3, 3)}, {"layer.weight": rand(3, 3)}
    out = merge_models("weighted_sum", [from_tensors(a), from_tensors(b)], alpha=0.5)
    close(out.get("layer.weight"), (a["layer.weight"].double() + b["layer.weight"].double()).numpy() / 2)
    assert "block_rule" not in out.info.provenance
    with pytest.raises(UserError, match="'alpha'.*named blocks \\(IN00\\) need a known architecture.*m0 is unknown.*re:<regex>"):
        merge_models("weighted_sum", [from_tensors(a, label="m0"), from_tensors(b)], alpha={"default": 0.5, "IN00": 0.1})
    # key substrings still work on unknown architectures
    out = merge_models("weighted_sum", [from_tensors(a), from_tensors(b)], alpha=0.5, exclude=["layer"])
    assert torch.equal(out.get("layer.weight"), a["layer.weight"])


@pytest.fixture(scope="module")
def sd1_pair():
    return synth_tensors("sd1", 32, "fp32", seed=1), synth_tensors("sd1", 32, "fp32", seed=2)


def test_block_weights_through_the_kernel(sd1_pair):
    ta, tb = sd1_pair
    s = "0.1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,0,0,0,0,0,0.8,0,0,0,0,0,0"
    from mergekit_sd.arch.weights import normalize_weight

    out = merge_models("weighted_sum", [from_tensors(ta), from_tensors(tb)], alpha=normalize_weight(s, "alpha"))
    assert out.info.provenance["block_rule"] == "supermerger-2025"
    k1 = UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    k2 = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    k3 = UNET + "input_blocks.7.1.proj_in.weight"
    close(out.get(k1), 0.2 * ta[k1].double() + 0.8 * tb[k1].double(), 1e-6)
    close(out.get(k2), 0.9 * ta[k2].double() + 0.1 * tb[k2].double(), 1e-6)
    assert torch.equal(out.get(k3), ta[k3])
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert torch.equal(out.get(pos), ta[pos])


def test_elemental_include_exclude_rule_through_the_kernel(sd1_pair):
    ta, tb = sd1_pair
    models = [from_tensors(ta), from_tensors(tb)]
    attn = UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight"
    other = UNET + "output_blocks.6.0.in_layers.2.weight"
    out = merge_models("weighted_sum", models, alpha=0.0, elemental=["OUT06:attn2:1.0"])
    assert torch.equal(out.get(attn), tb[attn]) and torch.equal(out.get(other), ta[other])
    out = merge_models("weighted_sum", models, alpha=1.0, include=["OUT06"], exclude=["attn2"])
    assert torch.equal(out.get(other), tb[other]) and torch.equal(out.get(attn), ta[attn])
    k_in = UNET + "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(out.get(k_in), ta[k_in])
    assert out.info.provenance["not_merged"] > 0
    with pytest.raises(UserError, match="elemental sets alpha, but model_stock has no alpha"):
        merge_models("model_stock", models + [from_tensors(ta)], elemental=["OUT06:attn2:1.0"])
    with pytest.raises(UserError, match="no SDXL block map"):
        xa, xb = synth_tensors("sdxl", 32, "fp16", seed=1), synth_tensors("sdxl", 32, "fp16", seed=2)
        merge_models("weighted_sum", [from_tensors(xa), from_tensors(xb)], alpha=0.5, block_rule="mbw-classic")


def test_supermerger_2023_keeps_sdxl_embeddings():
    xa, xb = synth_tensors("sdxl", 32, "fp32", seed=1), synth_tensors("sdxl", 32, "fp32", seed=2)
    out = merge_models("weighted_sum", [from_tensors(xa), from_tensors(xb)], alpha=0.5, block_rule="supermerger-2023")
    for k in (UNET + "time_embed.0.weight", UNET + "label_emb.0.0.weight"):
        assert torch.equal(out.get(k), xa[k])
    k = UNET + "middle_block.1.proj_in.weight"
    close(out.get(k), (xa[k].double() + xb[k].double()).numpy() / 2, 1e-6)
    assert out.info.provenance["block_rule"] == "supermerger-2023"


def test_weight_checks_run_per_tensor(sd1_pair):
    ta, tb = sd1_pair
    models = [from_tensors(ta), from_tensors(tb), from_tensors(ta)]
    with pytest.raises(UserError, match=r"alpha must be between 0 and 1, got 2.0 \(tensor model.diffusion_model.out"):
        merge_models("extract_merge", models, alpha={"default": 0.5, "OUT": 2.0})


def test_every_method_runs_on_a_synthetic_model(sd1_pair):
    ta, tb = sd1_pair
    tc = synth_tensors("sd1", 32, "fp32", seed=3)
    keys = [k for k in ta if k.startswith((UNET + "middle_block.1", "first_stage_model.decoder.mid"))][:12]
    keys.append("cond_stage_model.transformer.text_model.embeddings.position_ids")
    sub = [from_tensors({k: t[k] for k in keys}) for t in (ta, tb, tc)]
    for name, m in METHODS.items():
        params = {p.name: [0.5] * m.min_models if p.kind == "weights" else 0.5 for p in m.params if p.required}
        out = merge_models(name, sub[:m.min_models], **params)
        for k in keys:
            t = out.get(k)
            assert t.shape == ta[k].shape and t.dtype == ta[k].dtype
            if t.dtype.is_floating_point:
                assert torch.isfinite(t).all(), (name, k)


def test_catalog_lists_every_method():
    from mergekit_sd.methods.catalog import describe_methods, format_methods_markdown, format_methods_table

    d = {m["name"]: m for m in describe_methods()}
    assert set(d) == set(METHODS)
    assert d["add_difference_ties"]["models"] == "[base, M1, ...]"
    ties_params = {p["name"]: p for p in d["add_difference_ties"]["params"]}
    assert ties_params["sign_election"]["choices"] == ["mass", "count"] and ties_params["k"]["default"] == 0.2
    assert all(m["formula"] and m["version"] >= 1 for m in d.values())
    text = format_methods_table()
    assert "slerp" in text and "block_rule" in text
    assert format_methods_markdown().count("\n") == len(METHODS) + 1


# ---------------------------------------------------------------------------------------------------------------
# end to end through the command line


def tensor_bytes(path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_string_and_mapping_give_identical_bytes(tmp_path, model_dir, sdbuild):
    write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
        steps:
          s: {{op: weighted_sum, models: [A, B], alpha: "0.1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,0,0,0,0,0,0.8,0,0,0,0,0,0"}}
          m:
            op: weighted_sum
            models: [A, B]
            alpha: {{default: 0, BASE: 0.1, M00: 0.5, OUT05: 0.8}}
        outputs: {{s: s.safetensors, m: m.safetensors}}
        """)
    r = sdbuild("build", tmp_path / "recipe.yaml", "-q")
    assert r.code == 0, r
    a, b = tensor_bytes(tmp_path / "s.safetensors"), tensor_bytes(tmp_path / "m.safetensors")
    assert a == b
    a_in = tensor_bytes(model_dir / "a.safetensors")
    assert a[UNET + "input_blocks.7.1.proj_in.weight"] == a_in[UNET + "input_blocks.7.1.proj_in.weight"]
    assert a[UNET + "middle_block.1.proj_in.weight"] != a_in[UNET + "middle_block.1.proj_in.weight"]
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = f.metadata()
    assert "supermerger-2025" in json.dumps(meta)


def test_equal_spellings_share_a_cache_entry(tmp_path, model_dir, sdbuild):
    body = """
        sdbuild: 1
        inputs: {{A: {d}/a.safetensors, B: {d}/b.safetensors}}
        steps:
          s: {{op: weighted_sum, models: [A, B], alpha: {alpha}}}
        outputs: {{s: s.safetensors}}
        """
    write_recipe(tmp_path, body.format(d=model_dir, alpha="WRAP08"))
    assert sdbuild("build", tmp_path / "recipe.yaml", "-q").code == 0
    write_recipe(tmp_path, body.format(d=model_dir, alpha="[0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1]"))
    r = sdbuild("build", tmp_path / "recipe.yaml", "--json", "-q")
    assert r.code == 0 and json.loads(r.out)["fresh"] == ["s"]


def test_sd1_x_sdxl_recipe_exits_2_and_writes_nothing(tmp_path, model_dir, sdbuild):
    write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, X: {model_dir}/xl.safetensors}}
        steps:
          mix: {{op: weighted_sum, models: [A, X], alpha: 0.5}}
        outputs: {{mix: out/mix.safetensors}}
        """)
    r = sdbuild("build", tmp_path / "recipe.yaml")
    assert r.code == 2
    assert "a.safetensors (sd1)" in r.err and "xl.safetensors (sdxl)" in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "out").exists()
    objects = [p for p in (tmp_path / "cache").rglob("*.safetensors")] if (tmp_path / "cache").exists() else []
    assert objects == []


def test_recipe_fields_and_errors(tmp_path, model_dir, sdbuild):
    write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors, C: {model_dir}/c.safetensors}}
        steps:
          e:
            op: weighted_sum
            models: [A, B]
            alpha: GRAD_V
            block_rule: supermerger-2023
            elemental: "OUT06:attn:0.5, NOT OUT04:attn2.to_k:0.2"
            include: [IN, M]
            exclude: VAE, attn1
          t: {{op: add_difference_ties, models: [A, B, C], k: 0.5, sign_election: count}}
          d: {{op: add_difference_dare, models: [A, B, C], p: 0.5, seed: 7}}
          s: {{op: self_scale, model: e, alpha: 1.01}}
        outputs: {{s: s.safetensors, t: t.safetensors, d: d.safetensors}}
        """)
    r = sdbuild("build", tmp_path / "recipe.yaml", "-q")
    assert r.code == 0, r
    bad = {
        "alpha: GRAD_W": "did you mean 'GRAD_V'",
        "block_rule: supermerger-2024": "block_rule",
        "elemental: 'OUT06:attn'": "two colons",
        "alpha: {IN00: 0.3}": "add `default:`",
    }
    for line, msg in bad.items():
        write_recipe(tmp_path, f"""
            sdbuild: 1
            inputs: {{A: {model_dir}/a.safetensors, B: {model_dir}/b.safetensors}}
            steps:
              e:
                op: weighted_sum
                models: [A, B]
                {line}
            outputs: {{e: bad.safetensors}}
            """, name="bad.yaml")
        r = sdbuild("build", tmp_path / "bad.yaml", "-q")
        assert r.code == 2 and msg in r.err and len(r.err.strip().splitlines()) == 1, (line, r)
        assert not (tmp_path / "bad.safetensors").exists()


def test_exact_top_k_threshold():
    from mergekit_sd.methods.ties import kth_largest

    x = rand(50, 41).abs()
    x[0, :10] = 0.0
    x[1, :5] = x[2, 0]  # ties
    flat = x.reshape(-1)
    n = flat.numel()
    for keep in (1, 2, 7, n // 5, n // 2, n - 11, n - 1, n):
        assert kth_largest(x, keep).item() == torch.kthvalue(flat, n - keep + 1).values.item()
    assert kth_largest(torch.zeros(9), 3).item() == 0.0
