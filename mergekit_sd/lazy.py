"""Lazy models: the currency every op takes and returns.

A lazy model knows each tensor's name, dtype and shape up front and produces a tensor only when asked, so the
executor can stream any chain of ops tensor by tensor without holding a model in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@lru_cache(maxsize=None)
def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@dataclass(frozen=True)
class KeyInputs:
    """What one produced tensor depends on, declared by the op that produces it (tensor-level reuse keys on it).

    `params`: the JSON-able parameters that apply to this tensor alone (a block weight resolved for it, not the
    list it came from); `reads`: every (input index, tensor name) the producer reads for it. A declaration must be
    complete: a tensor whose result depends on anything else (whole-model statistics) declares nothing.
    """

    params: Any
    reads: tuple[tuple[int, str], ...]


@dataclass
class ModelInfo:
    """What a lazy model reports besides its tensors: the engine reads it, ops hand parts of it downstream."""

    arch: Any = None  # the detected architecture (arch.detect.ArchInfo), set when the engine opens a node
    architecture: str | None = None  # its ModelSpec id, written into outputs
    format: str = "safetensors"  # the container the tensors were read from
    provenance: dict[str, Any] = field(default_factory=dict)  # JSON-able facts recorded in the step's provenance
    log: list[str] = field(default_factory=list)  # lines the user sees as warnings; kept in the step's provenance

    def derive(self, **changes: Any) -> "ModelInfo":
        """The info of an op's output: keeps what describes the model, starts a fresh record of the step."""
        return replace(self, **{"provenance": {}, "log": [], **changes})


class LazyModel:
    """Tensor name -> (spec, producer). `get` returns a contiguous CPU tensor of exactly the declared spec."""

    def __init__(
        self,
        specs: Mapping[str, TensorSpec],
        producer: Callable[[str], torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        label: str = "",
        info: ModelInfo | None = None,
        ranger: Callable[[str, int, int], torch.Tensor] | None = None,
        key_inputs: Callable[[str], KeyInputs | None] | None = None,
        coster: Callable[[str], int] | None = None,
    ):
        self._specs = dict(specs)
        self._producer = producer
        self._ranger = ranger
        self._key_inputs = key_inputs
        self._coster = coster
        self.metadata: dict[str, str] = dict(metadata or {})
        self.label = label
        self.info = info if info is not None else ModelInfo()

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return self._specs

    def get(self, name: str) -> torch.Tensor:
        return self._producer(name)

    def key_inputs(self, name: str) -> KeyInputs | None:
        """What tensor `name` is computed from, when its op declares it (None: always computed)."""
        return self._key_inputs(name) if self._key_inputs is not None else None

    def get_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor; files read only those bytes, so a pass over several
        models can stream in chunks whatever the tensor size."""
        if self._ranger is not None:
            return self._ranger(name, start, stop)
        return self._producer(name).reshape(-1)[start:stop]

    def cost(self, name: str) -> int:
        """Bytes producing `name` holds at its peak (inputs read, working copies, the result): what a memory budget
        reserves before the work starts. An estimate; ops that know better say so through `coster`."""
        if self._coster is not None:
            return self._coster(name)
        s = self._specs[name]
        return 2 * s.nbytes + 4 * s.numel  # read, result and one fp32 working copy

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self._specs.items()}

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())


def from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, label: str = "") -> LazyModel:
    """A lazy view of tensors already in memory (tests, small LoRAs)."""
    specs = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    return LazyModel(specs, lambda k: tensors[k].contiguous(), metadata, label)
