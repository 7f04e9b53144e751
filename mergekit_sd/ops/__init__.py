"""Op registry: every step kind a recipe can name.

An op declares its fields (so the recipe validator, `sdbuild schema` and README read one source), its version
(bump it when results change), which fields reference other nodes and what kind of model each must be, and a
lazy `build` that turns input lazy models into an output lazy model without computing any tensor.

Everything an op wants recorded in provenance must be known when `build` returns (the header is written
before the tensors): put it in `model.info.provenance` (a JSON-able dict) and `model.info.log` (lines for the user).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mergekit_sd.errors import UserError, did_you_mean
from mergekit_sd.lazy import LazyModel

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # ref | refs | weight | number | int | str | bool | dtype | choice | list | mapping | any
    default: Any = REQUIRED
    choices: tuple | None = None
    doc: str = ""
    # custom validation: (value, where) -> normalised value; raise UserError with `where`
    validate: Callable[[Any, str], Any] | None = None
    # JSON Schema fragment for `sdbuild schema` (derived from kind when None)
    schema: dict | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class OpContext:
    """What a running op may use besides its inputs."""

    step: str
    device: torch.device = torch.device("cpu")
    log: list[str] = field(default_factory=list)
    # name of each referenced node, aligned with the inputs list (for messages)
    input_names: list[str] = field(default_factory=list)
    # input labels for messages (file names)
    input_labels: list[str] = field(default_factory=list)
    # brings a host tensor to `device` in its own dtype (None: ops.transfer.host_to_device(device))
    to_device: Callable[[torch.Tensor], torch.Tensor] | None = None

    def warn(self, message: str) -> None:
        self.log.append(message)


@dataclass(frozen=True)
class OpSpec:
    name: str
    version: int
    doc: str
    fields: tuple[Field, ...]
    build: Callable[[list[LazyModel], dict, OpContext], LazyModel]
    # node names this step reads, in the order `build` receives them
    references: Callable[[dict], list[str]] | None = None
    # expected kind of each referenced input: "checkpoint" | "lora" | "vae" | "any"
    input_kinds: Callable[[dict], list[str]] | None = None
    # what the step produces: "checkpoint" | "lora"
    output_kind: str = "checkpoint"
    formula: str = ""
    category: str = "merge"
    # (params, input architectures (ArchInfo or None: not known before building), step name, input labels)
    # -> raises UserError;
    # run for every step before the first one builds (ops.check)
    check: Callable[[dict, list, str, list], None] | None = None

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def refs(self, params: dict) -> list[str]:
        if self.references is not None:
            return self.references(params)
        out: list[str] = []
        if "model" in params:
            out.append(params["model"])
        out.extend(params.get("models", []))
        return out

    def kinds(self, params: dict) -> list[str]:
        if self.input_kinds is not None:
            return self.input_kinds(params)
        return ["checkpoint"] * len(self.refs(params))


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


# modules that register ops when imported; later capabilities append theirs here
BUILTIN_OP_MODULES = ["merge", "prune", "convert", "vae", "lora", "extract_lora", "merge_loras"]
_LOADED = False


def load_ops() -> dict[str, OpSpec]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_OP_MODULES:
            importlib.import_module(f"{__name__}.{mod}")
    return OPS


def get_op(name: str, where: str | None = None) -> OpSpec:
    ops = load_ops()
    if name not in ops:
        raise UserError(f"unknown op {name!r}{did_you_mean(name, ops)}; `sdbuild methods` lists them", where)
    return ops[name]


def op_defaults(name: str) -> dict[str, Any] | None:
    """Field defaults of a registered op (None for required fields), or None when no op has that name.

    Recovered recipes and lineage trees show only the parameters that differ from these.
    """
    spec = load_ops().get(name)
    if spec is None:
        return None
    return {f.name: (None if f.required else f.default) for f in spec.fields}


DTYPE_FIELD = Field("dtype", "dtype", None, ("fp16", "bf16", "fp32", "fp8_e4m3", "fp8_e5m2"), "output dtype of float tensors (default: the first model's; fp8 only when asked)")


def pick_device(name: str, cuda_available: Callable[[], bool] = torch.cuda.is_available) -> torch.device:
    """The device math runs on: cpu, cuda (exit 2 when absent), or auto (cuda where one exists, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name.startswith("cuda") and not cuda_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or auto") from None
