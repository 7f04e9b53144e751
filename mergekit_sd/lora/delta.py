"""ΔW of every supported algorithm, scale rules and DoRA (docs/formats.md §5.3, §5.4), as pure fp32 functions.

Shapes are inferred from tensor specs too (`delta_shape`), so a bake can check that every module fits its target
before any tensor is read.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from mergekit_sd.lazy import TensorSpec
from mergekit_sd.lora.formats import Module

Tensor = torch.Tensor


def lora_delta(up: Tensor, down: Tensor, mid: Tensor | None = None) -> Tensor:
    """kohya LoRA / LoCon: U @ D (linear, 1x1, kxk); with a Tucker core M: Σ U[o,p] M[p,q,y,x] D[q,i]."""
    u2 = up.reshape(up.shape[0], up.shape[1])
    if mid is not None:
        d2 = down.reshape(down.shape[0], down.shape[1])
        return torch.einsum("op,pqyx,qi->oiyx", u2, mid, d2)
    out = u2 @ down.reshape(down.shape[0], -1)
    return out.reshape((up.shape[0],) + tuple(down.shape[1:])) if down.dim() > 2 else out


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """W[o,i,y,x] = Σ_{p,q} core[p,q,y,x]·a[p,o]·b[q,i] (LyCORIS Tucker rebuild)."""
    return torch.einsum("pqyx,po,qi->oiyx", core, a, b)


def loha_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None = None, t2: Tensor | None = None) -> Tensor:
    """LoHa: (w1a @ w1b) ⊙ (w2a @ w2b), or the Hadamard product of two Tucker rebuilds."""
    if t1 is not None and t2 is not None:
        return tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
    return (w1a @ w1b) * (w2a @ w2b)


def lokr_factor(full: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None = None) -> Tensor:
    """One Kronecker factor: stored whole, as a @ b, or as a Tucker rebuild (LoKr w2 only)."""
    if full is not None:
        return full
    assert a is not None and b is not None
    if t is not None:
        return tucker(t, a, b)
    return a @ b


def lokr_delta(w1: Tensor, w2: Tensor) -> Tensor:
    """LoKr: kron(W1, W2); a 4-D W2 brings the kernel axes (W1 is then treated as [a, b, 1, 1])."""
    if w2.dim() == 4:
        return torch.kron(w1.reshape(w1.shape[0], w1.shape[1], 1, 1).contiguous(), w2.contiguous())
    return torch.kron(w1.reshape(w1.shape[0], -1).contiguous(), w2.contiguous())


def ia3_delta(w: Tensor, vec: Tensor, on_input: bool) -> Tensor:
    """IA3: ΔW = W ⊙ w, w scaling output rows ([out, 1]) or input columns ([1, in])."""
    shape = [1] * w.dim()
    if on_input:
        shape[1] = w.shape[1]
    else:
        shape[0] = w.shape[0]
    return w * vec.reshape(shape)


def weight_norm(w: Tensor, convention: str) -> Tensor:
    """L2 norm over every axis but the input (`input`) or output (`output`) axis, kept broadcastable."""
    if convention == "output":
        n = w.reshape(w.shape[0], -1).norm(dim=1)
        return n.reshape([w.shape[0]] + [1] * (w.dim() - 1))
    n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return n.reshape([1, w.shape[1]] + [1] * (w.dim() - 2))


def dora_weight(w: Tensor, scaled_delta: Tensor, magnitude: Tensor, convention: str) -> Tensor:
    """Recomposed DoRA weight W_d = m ⊙ W' / n(W') with W' = W + s·ΔW."""
    wp = w + scaled_delta
    mag = magnitude.reshape(weight_norm(wp, convention).shape)
    return mag * wp / weight_norm(wp, convention)


def dora_convention(shape: Sequence[int], out: int, inp: int) -> str | None:
    """Per-input or per-output magnitude, decided by shape (docs/formats.md §5.3); None when it cannot be told."""
    shape = tuple(shape)
    if len(shape) == 1:
        return "output" if shape[0] == out else None
    rest = shape[2:]
    if any(d != 1 for d in rest):
        return None
    as_input = shape[0] == 1 and shape[1] == inp
    as_output = shape[1] == 1 and shape[0] == out
    if as_input and as_output:  # [1, 1]: out == in == 1
        return None
    return "input" if as_input else "output" if as_output else None


# --- shapes and scale from specs --------------------------------------------------------------------------------

def delta_shape(m: Module, specs: Mapping[str, TensorSpec]) -> tuple[int, ...] | None:
    """The shape ΔW comes out in (before reshaping to the target); None for IA3 / bias-only modules."""
    s = {role: specs[key].shape for role, key in m.keys.items()}
    if m.algo == "lora":
        up, down = s["lora_up.weight"], s["lora_down.weight"]
        if "lora_mid.weight" in s:
            return (up[0], down[1]) + tuple(s["lora_mid.weight"][2:])
        return (up[0],) + tuple(down[1:])
    if m.algo == "loha":
        if "hada_t1" in s:
            return (s["hada_w1_a"][1], s["hada_w1_b"][1]) + tuple(s["hada_t1"][2:])
        return (s["hada_w1_a"][0], s["hada_w1_b"][1])
    if m.algo == "lokr":
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1]) + tuple(s["lokr_t2"][2:])
        elif "lokr_w2" in s:
            w2 = tuple(s["lokr_w2"])
        else:
            w2 = (s["lokr_w2_a"][0], s["lokr_w2_b"][1])
        a, b = w1[0], (math.prod(w1[1:]) if len(w1) > 1 else 1)
        return (a * w2[0], b * w2[1]) + tuple(w2[2:])
    if m.algo == "full":
        return tuple(s["diff"]) if "diff" in s else None
    if m.algo == "norm":
        return tuple(s["w_norm"]) if "w_norm" in s else None
    return None


def rank_of(m: Module, specs: Mapping[str, TensorSpec]) -> int | None:
    """The `r` of `alpha / r` (None: the algorithm has a fixed scale of 1)."""
    k = m.keys
    if m.algo == "lora":
        return specs[k["lora_down.weight"]].shape[0]
    if m.algo == "loha":
        return specs[k["hada_w1_b"]].shape[0]
    if m.algo == "lokr":
        if "lokr_w1" in k and "lokr_w2" in k:
            return None  # both factors full: LyCORIS forces alpha = r, so the scale is 1 whatever alpha says
        if "lokr_w2_b" in k:
            return specs[k["lokr_w2_b"]].shape[0]
        return specs[k["lokr_w1_b"]].shape[0]
    return None


def module_scale(m: Module, specs: Mapping[str, TensorSpec], read: Callable[[str], Tensor]) -> float:
    """Stored `scale` wins, else alpha / r; a missing alpha means alpha = r (scale 1); fixed-scale algorithms 1."""
    if "scale" in m.keys:
        return float(read(m.keys["scale"]).float().reshape(-1)[0])
    r = rank_of(m, specs)
    if r is None or "alpha" not in m.keys:
        return 1.0
    return float(read(m.keys["alpha"]).float().reshape(-1)[0]) / r


def compute_delta(m: Module, read: Callable[[str], Tensor]) -> Tensor | None:
    """Unscaled ΔW in fp32 in the algorithm's natural shape (plus a weight-shaped `bias`, which A1111 adds)."""
    k = m.keys

    def g(role: str) -> Tensor | None:
        return read(k[role]).to(torch.float32) if role in k else None

    if m.algo == "lora":
        d = lora_delta(g("lora_up.weight"), g("lora_down.weight"), g("lora_mid.weight"))
    elif m.algo == "loha":
        d = loha_delta(g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"), g("hada_w2_b"), g("hada_t1"), g("hada_t2"))
    elif m.algo == "lokr":
        d = lokr_delta(lokr_factor(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b")),
                       lokr_factor(g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), g("lokr_t2")))
    elif m.algo == "full":
        d = g("diff")
    elif m.algo == "norm":
        d = g("w_norm")
    else:
        return None
    if d is not None and "bias" in k:
        b = g("bias")
        if b.numel() == d.numel():
            d = d + b.reshape(d.shape)
    return d


def place(d: Tensor, src: tuple[int, int, int] | None, swap: bool) -> Tensor:
    """The part of a module's ΔW (rows first) that lands on one tensor: rows `src` (start, stop, of) of it, with its
    two halves exchanged when `swap` (diffusers stores final modulations as scale, shift; BFL/MMDiT as shift, scale)."""
    if src is not None:
        n = d.shape[0]
        d = d[src[0] * n // src[2]: src[1] * n // src[2]]
    if swap:
        half = d.shape[0] // 2
        d = torch.cat([d[half:], d[:half]])
    return d


def bias_role(m: Module) -> str | None:
    if m.algo == "full" and "diff_b" in m.keys:
        return "diff_b"
    if m.algo == "norm" and "b_norm" in m.keys:
        return "b_norm"
    return None


def fits(delta: Sequence[int], target: Sequence[int]) -> bool:
    """ΔW can be laid onto W: same output size and element count, kernels equal when both are convolutions
    (this squeezes/unsqueezes the 1x1 of `proj_in` and unflattens LoHa conv factors)."""
    delta, target = tuple(delta), tuple(target)
    if not delta or not target or delta[0] != target[0] or math.prod(delta) != math.prod(target):
        return False
    if len(delta) == 4 and len(target) == 4:
        return delta == target
    return True
