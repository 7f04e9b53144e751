"""Averages of several models: plain mean, geometric median (Weiszfeld) and Model Stock."""

from __future__ import annotations

import torch

from mergekit_sd.methods import merge_method


@merge_method(formula="(M1 + M2 + ... + Mn)/n", elementwise=True)
def n_average(m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """Plain average of any number of models."""
    ms = (m1, m2, *models)
    total = ms[0].clone()
    for m in ms[1:]:
        total += m
    return total / len(ms)


GM_EPS = 1e-6


def weiszfeld(points: list[torch.Tensor], iterations: int, eps: float = GM_EPS, tol: float = 1e-20) -> torch.Tensor:
    """Geometric median of tensors seen as points: y <- sum(x_i/|x_i - y|) / sum(1/|x_i - y|), from the mean."""
    y = torch.stack(points).mean(0)
    prev = None
    for _ in range(iterations):
        dist = torch.stack([torch.linalg.vector_norm(p - y) for p in points]).clamp(min=eps)
        w = 1.0 / dist
        y = sum(wi * p for wi, p in zip(w, points)) / w.sum()
        obj = float(torch.stack([torch.linalg.vector_norm(p - y) for p in points]).sum())
        if prev is not None and abs(prev - obj) <= tol * obj:
            break
        prev = obj
    return y


@merge_method(formula="argmin_Y sum_i |Mi - Y| (Weiszfeld iterations from the mean)",
              docs={"iterations": "maximum Weiszfeld iterations"})
def geometric_median(m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """The point nearest to every model in total (robust to one outlier model), tensor by tensor."""
    return weiszfeld([m1, m2, *models], max(0, iterations))


def stock_ratio(deltas: list[torch.Tensor]) -> float:
    """Model Stock's t = N cos / (1 + (N-1) cos), cos = mean pairwise cosine of the deltas; 0 when degenerate."""
    n = len(deltas)
    flat = [d.reshape(-1).to(torch.float64) for d in deltas]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(0.0 if norms[i] == 0 or norms[j] == 0 else float(torch.dot(flat[i], flat[j])) / (norms[i] * norms[j]))
    c = sum(cos) / len(cos)
    denom = 1 + (n - 1) * c
    if abs(denom) < 1e-6:
        return 0.0
    return n * c / denom


@merge_method(formula="base + t*(mean(Mi) - base), t = N*cos/(1 + (N-1)*cos), cos = mean pairwise cos(Mi - base)", uses_base=True)
def model_stock(base: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, *models: torch.Tensor) -> torch.Tensor:
    """Model Stock: move from the base toward the fine-tunes' mean as far as their agreement (angle) suggests."""
    ms = (m1, m2, *models)
    deltas = [m - base for m in ms]
    t = stock_ratio(deltas)
    mean = torch.stack(deltas).mean(0)
    return base + t * mean
