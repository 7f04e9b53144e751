"""Check every step of a recipe against its inputs' architectures before the first step runs.

Input architectures come from safetensors headers (names and shapes, no tensor data); a step's output is taken to
have its first model's architecture (merges, bakes, prunes and conversions keep it) unless it writes a LoRA. Each op
checks what it can through its `OpSpec.check`, so a mistake in the fifth step never costs building the first four.
"""

from __future__ import annotations

from typing import Callable

from mergekit_sd.arch.detect import ArchInfo
from mergekit_sd.errors import UserError
from mergekit_sd.ops import get_op


def check_steps(steps: dict, order: list[str], input_arch: Callable[[str], ArchInfo | None],
                where: Callable[..., str], label: Callable[[str], str] = str) -> None:
    """`steps`: name -> recipe step (op, params, refs); `order`: the build order; `where(...)` a recipe location;
    `label(name)`: how messages name a node (an input's file name)."""
    archs: dict[str, ArchInfo | None] = {}
    for name in order:
        step = steps.get(name)
        if step is None:
            archs[name] = input_arch(name)
            continue
        op = get_op(step.op)
        ins = [archs.get(r) for r in op.refs(step.params)]
        if op.check is not None:
            try:
                op.check(step.params, ins, name, [label(r) for r in op.refs(step.params)])
            except UserError as e:
                if e.where is not None:
                    raise
                raise UserError(str(e), where("steps", name)) from None
        archs[name] = None if op.output_kind != "checkpoint" else (ins[0] if ins else None)
