"""Least squares on Gram matrices: which affine combination of candidates best explains a model.

Members are [MODEL, C1, C2, ..., Ck] and the Gram matrix holds inner products of their differences from C1, so
D0 = MODEL - C1, D1 = 0 and Dj = Cj - C1. A combination u of the candidates (weights summing to 1) predicts
C1 + sum_{j>1} u_j Dj, and its squared error is c - 2 v.b + v'Av with v = u[1:], c = |D0|², b_j = <D0, Dj>,
A = <Di, Dj>: every residual comes from the Gram matrix alone, without reading the models again.

A *form* is a merge op written as u = u0 + P·theta (weighted_sum: u = e_i + alpha (e_j - e_i), and so on); fitting
a form is a small least-squares problem in theta.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations, permutations

import numpy as np

# complexity of each op: the simplest form that explains the model as well as the general one is chosen
COMPLEXITY = {"copy": 0, "weighted_sum": 1, "add_difference": 2, "triple_sum": 3, "linear": 4}


@dataclass(frozen=True)
class Form:
    """A merge op over some candidates, as an affine map from its parameters to candidate weights."""

    op: str
    models: tuple[int, ...]  # candidate indices in the op's model order
    k: int  # number of candidates

    @property
    def params(self) -> tuple[str, ...]:
        return {"copy": (), "weighted_sum": ("alpha",), "add_difference": ("alpha",),
                "triple_sum": ("alpha", "beta")}.get(self.op, tuple(f"w{i}" for i in range(1, len(self.models))))

    def basis(self) -> tuple[np.ndarray, np.ndarray]:
        """(u0, P): weights u = u0 + P @ theta over all k candidates."""
        e = np.eye(self.k)
        m = self.models
        u0 = e[m[0]].copy()
        if self.op == "copy":
            cols: list[np.ndarray] = []
        elif self.op == "add_difference":
            cols = [e[m[1]] - e[m[2]]]
        else:  # weighted_sum, triple_sum, linear: u = e_first + sum theta_j (e_j - e_first)
            cols = [e[j] - e[m[0]] for j in m[1:]]
        p = np.stack(cols, axis=1) if cols else np.zeros((self.k, 0))
        return u0, p

    def weights(self, theta: np.ndarray) -> np.ndarray:
        u0, p = self.basis()
        return u0 + p @ np.asarray(theta, dtype=np.float64)

    def theta_for(self, u: np.ndarray) -> np.ndarray | None:
        """Parameters giving exactly the weights `u`, or None when this form cannot express them."""
        u0, p = self.basis()
        if p.shape[1] == 0:
            return np.zeros(0) if np.allclose(u, u0, atol=1e-9) else None
        theta = np.linalg.lstsq(p, u - u0, rcond=None)[0]
        return theta if np.allclose(p @ theta + u0, u, atol=1e-9) else None

    def op_weights(self, theta: np.ndarray) -> list[float]:
        """For `linear`: the weight of each of its models, in its order."""
        u = self.weights(theta)
        return [float(u[j]) for j in self.models]


def split(gram: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(c, b, A) of a Gram matrix over [MODEL, C1, ..., Ck] taken relative to C1."""
    return float(gram[0, 0]), gram[2:, 0], gram[2:, 2:]


def abs_residual(gram: np.ndarray, u: np.ndarray) -> float:
    """|MODEL - sum u_j C_j|² (u sums to 1), from the Gram matrix; never negative."""
    c, b, a = split(gram)
    v = np.asarray(u, dtype=np.float64)[1:]
    return max(0.0, c - 2.0 * float(v @ b) + float(v @ a @ v))


def relative(abs_sq: float, c: float) -> float:
    """|MODEL - fit| / |MODEL - C1| from the squared numerator and denominator."""
    if c <= 0:
        return 0.0 if abs_sq <= 0 else float("inf")
    return float(np.sqrt(abs_sq / c))


def fit_form(form: Form, gram: np.ndarray) -> np.ndarray:
    """The parameters of `form` that minimise the residual over this Gram matrix (minimum-norm when ambiguous)."""
    u0, p = form.basis()
    if p.shape[1] == 0:
        return np.zeros(0)
    _, b, a = split(gram)
    q, v0 = p[1:], u0[1:]
    h = q.T @ a @ q
    rhs = q.T @ (b - a @ v0)
    scale = float(np.abs(h).max()) or 1.0
    return np.linalg.lstsq(h / scale, rhs / scale, rcond=1e-12)[0]


def all_forms(k: int) -> list[Form]:
    """Every form over k candidates, simplest first: copies, weighted sums of pairs, add differences, triple sums,
    and the linear merge of all of them (when k > 3; for k <= 3 a triple or weighted sum is already general)."""
    out = [Form("copy", (i,), k) for i in range(k)]
    out += [Form("weighted_sum", (i, j), k) for i, j in combinations(range(k), 2)]
    out += [Form("add_difference", (i, j, l), k) for i, j, l in permutations(range(k), 3) if j < l]
    out += [Form("triple_sum", t, k) for t in combinations(range(k), 3)]
    if k > 3:
        out.append(Form("linear", tuple(range(k)), k))
    return out


def general_form(k: int) -> Form:
    """The form with a free weight per candidate."""
    if k == 1:
        return Form("copy", (0,), 1)
    if k == 2:
        return Form("weighted_sum", (0, 1), 2)
    if k == 3:
        return Form("triple_sum", (0, 1, 2), 3)
    return Form("linear", tuple(range(k)), k)
