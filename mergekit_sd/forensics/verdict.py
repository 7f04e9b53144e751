"""Plain-word verdicts and the thresholds behind them.

Fit. A merge stored in fp16 cannot be reproduced better than its own rounding: the stream measures that floor
(the expected rounding error of the model's stored values, ulp²/12 per element). A model is called a linear merge
when the residual is at most LINEAR_LIMIT (5%) or twice that floor, whichever is larger: linear merges of fp16
models land at about the floor (0.3-3% on synthetic families, less on models that differ more), while TIES, DARE,
the cosine modes and merges with a missing parent leave 30-80%. It is a near-copy when every weight is between
0 and 1 and one of them is at least NEAR_COPY (0.9).

LoRA fit. A LoRA trained on W and applied to N adds (N - W)·x to every layer it touches, next to its own ΔW·x.
`drift_in` compares the two along the input directions the LoRA reads, so it is the size of the error relative to
the LoRA's own effect: up to FITS (0.5) the LoRA's change outweighs the error at least two to one (fits); up to
MARGINAL (1) the error is comparable to the change (marginal: expect a weaker or distorted effect); beyond, N
differs from W along the LoRA's inputs by more than the LoRA changes W at all (different family). These are
ratios of effects, chosen from that error model rather than tuned to particular files; on the synthetic
families of the test suite (fine-tunes of W with 1-20% noise, and an unrelated model) kohya LoRA, LoCon, Tucker,
PEFT and DoRA files put the fine-tunes at 0.01-0.35 and the unrelated model at 1.3-2.5. LoHa and norm files
whose ΔW is tiny next to the weights read as farther away, as they should: the same difference matters more.
"""

from __future__ import annotations

import numpy as np

LINEAR_LIMIT = 0.05
FLOOR_FACTOR = 2.0
NEAR_COPY = 0.9
FITS = 0.5
MARGINAL = 1.0


def pct(r: float) -> str:
    """A residual as people read it: 0.02%, 3.1%, 43%."""
    if r != r or r == float("inf"):
        return "n/a"
    p = 100.0 * r
    return f"{p:.2f}%" if p < 1 else f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def linear_limit(floor: float) -> float:
    return max(LINEAR_LIMIT, FLOOR_FACTOR * floor)


def is_linear(residual: float, floor: float) -> bool:
    return residual <= linear_limit(floor)


def near_copy(names: list[str], weights: np.ndarray) -> str | None:
    """"near-copy of A: 95.0% A, 5.0% B" for convex weights with one at least NEAR_COPY, else None."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) < 2 or (w < -0.005).any() or w.max() < NEAR_COPY or w.max() > 1.005:
        return None
    top = int(np.argmax(w))
    order = [top] + [i for i in range(len(w)) if i != top and abs(w[i]) >= 0.0005]
    parts = ", ".join(f"{100 * max(w[i], 0.0):.1f}% {names[i]}" for i in order)
    return f"near-copy of {names[top]}: {parts}"


def _num(x: float) -> str:
    return f"{x:.2f}"


def _value(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _num(values[0]) if abs(hi - lo) < 0.005 else f"{_num(lo)} to {_num(hi)} by block"


def describe_form(op: str, names: list[str], params: dict[str, list[float]]) -> str:
    """The merge in words; `params` holds each parameter's values (one, or one per block)."""
    if op == "copy":
        return f"copy of {names[0]}"
    if op == "weighted_sum":
        return f"weighted sum of {names[0]} and {names[1]}, alpha {_value(params['alpha'])}"
    if op == "add_difference":
        a, b, c = names
        return f"add difference {a} + alpha × ({b} − {c}), alpha {_value(params['alpha'])}"
    if op == "triple_sum":
        return (f"triple sum of {names[0]}, {names[1]} and {names[2]}, alpha {_value(params['alpha'])}, "
                f"beta {_value(params['beta'])}")
    terms = " + ".join(f"{_value(params[f'w{i}'])} × {n}" for i, n in enumerate(names))
    return f"linear merge {terms}"


def fit_verdict(*, op: str, op_names: list[str], params: dict[str, list[float]], residual: float, best: float, floor: float,
                global_weights: np.ndarray, names: list[str], block_residual: float | None, blocks_used: bool,
                kept: dict[str, str], all_identical: str | None) -> tuple[str, str]:
    """(kind, sentence) for a fit: kind is copy | near-copy | linear | block-linear | not-linear. `residual` is the
    chosen op's, `best` the free fit's (what decides whether the model is a linear merge at all)."""
    if all_identical is not None:
        return "copy", f"copy of {all_identical}: every compared tensor is bit-identical to it"
    kept_note = "".join(f"; {bucket} bit-identical to {who}" for bucket, who in kept.items())
    if not is_linear(best, floor):
        text = f"not a linear merge of these candidates (residual {pct(best)})"
        if not blocks_used and block_residual is not None and is_linear(block_residual, floor):
            return "block-linear", (f"a block-weighted merge: not linear as a whole (residual {pct(best)}), "
                                    f"linear block by block (residual {pct(block_residual)}); run with --blocks for the weights")
        return "not-linear", text
    varying = any(abs(max(v) - min(v)) >= 0.005 for v in params.values())
    close = near_copy(names, global_weights) if not varying else None
    if close is not None:
        return "near-copy", f"{close} (residual {pct(residual)}){kept_note}"
    text = describe_form(op, op_names, params)
    kind = "block-linear" if varying else "linear"
    if op == "copy":
        kind = "copy"
    return kind, f"{text} (residual {pct(residual)}){kept_note}"


def lora_verdict(drift_in: float) -> str:
    if drift_in <= FITS:
        return "fits"
    if drift_in <= MARGINAL:
        return "marginal"
    return "different family"
