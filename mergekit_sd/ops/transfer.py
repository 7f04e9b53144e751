"""Moving input tensors to the compute device so that the copy overlaps the reading.

On the CPU nothing moves. On a GPU each input goes through a page-locked (pinned) staging buffer from torch's
caching host allocator, which keeps a buffer out of reuse until the copy that reads it has finished, and is copied
with `non_blocking=True`: the call returns as soon as the copy is queued, so the thread reads the next input from
disk while the previous one crosses the bus. Tensors cross in their stored dtype (fp16 or bf16: half the bytes of
fp32) and are widened to fp32 on the device, where the merge math runs; results come back in the output dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

Move = Callable[[torch.Tensor], torch.Tensor]


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, non_blocking=True)


def host_to_device(device: torch.device, pin: Callable[[torch.Tensor], torch.Tensor] = _pin,
                   copy: Callable[[torch.Tensor, torch.device], torch.Tensor] = _copy) -> Move:
    """The function that brings a host tensor to `device` in its own dtype (`pin` and `copy` are parameters so
    the staging logic can be checked without a GPU)."""
    if device.type == "cpu":
        return lambda t: t

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t if t.device == device else copy(t, device)
        return copy(pin(t), device)

    return move


def fetch_inputs(getters: list[Callable[[], torch.Tensor]], move: Move) -> list[torch.Tensor]:
    """Read each input and start its copy before reading the next, so reads and copies overlap."""
    return [move(get()) for get in getters]
