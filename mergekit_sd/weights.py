"""Weight parameters (alpha, beta, LoRA strength): a number, or block weights resolved per tensor name."""

from __future__ import annotations

from typing import Any, Callable

from .errors import UserError


def normalize_weight(value: Any, where: str) -> Any:
    """Validate a weight as written in a recipe and return its canonical form (what the step key hashes)."""
    if isinstance(value, bool):
        raise UserError(f"expected a number or block weights, got {value!r}", where)
    if isinstance(value, (int, float)):
        return float(value)
    raise UserError(f"expected a number, got {type(value).__name__}", where)


def compile_weight(value: Any, *, arch: str | None = None, rule: str | None = None, where: str = "") -> Callable[[str], float]:
    """A function from tensor name to the float weight for that tensor."""
    if isinstance(value, float):
        return lambda _key, v=value: v
    raise UserError(f"unsupported weight {value!r}", where)
