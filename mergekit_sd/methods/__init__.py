"""Merge methods: small pure functions on tensors, registered by name.

A method's Python signature is its declaration: positional tensor parameters are the models (a `*models`
parameter makes it variadic), keyword-only parameters are its settings. A keyword parameter annotated `float`
is a *weight*: a recipe may give it as a number or as block weights, resolved to one float per tensor before
the function is called. A keyword parameter annotated `list[float]` is a list of weights, one per model, each a
number or block weights (resolved per tensor to a tuple of floats). Everything else (int, str, bool) is passed as
given. The recipe validator,
`sdbuild methods`, the JSON Schema and README's table all read this one registry.

Optional keyword parameters the engine fills in when a method declares them:
  key: str           the tensor name (for per-tensor seeding or name-dependent rules)
  context: object    whatever the method's `prepare` hook returned (whole-model statistics, computed on first
                     use; a context with `pending_bytes()` tells the memory budget what that pass still holds)
  stats: object      whatever the method's `stats` hook returned for this tensor (whole-tensor statistics)

A method whose result needs whole-tensor statistics (a norm, a k-th value) but is otherwise elementwise declares
`stats=fn(flats, device, shape=..., **kwargs)`: the kernel computes them from the flattened native tensors in chunks
(methods.chunks) and then evaluates the formula chunk by chunk with `stats=`, in order; called without `stats`
the formula computes them from the tensors it is given, with the same chunks and the same result. A method that
must iterate over whole tensors declares `streamed=fn(flats, device, shape=..., **kwargs) -> fp32 flat result` instead.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()
ENGINE_KWARGS = {"key", "context", "stats"}


@dataclass(frozen=True)
class MethodParam:
    name: str
    kind: str  # "weight" | "weights" (one weight per model) | "int" | "str" | "bool"
    default: Any = REQUIRED
    choices: tuple | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    version: int
    formula: str
    min_models: int
    max_models: int | None
    params: tuple[MethodParam, ...]
    engine_kwargs: frozenset = field(default_factory=frozenset)
    prepare: Callable | None = None
    model_names: tuple[str, ...] = ()
    doc: str = ""
    # a method whose first model is the base that every other model is compared with (deltas, TIES, ...)
    uses_base: bool = False
    # element i of the result depends only on element i of the inputs: the kernel may run it on chunks
    elementwise: bool = False
    # elementwise once these whole-tensor statistics are known (see the module docstring)
    stats: Callable | None = None
    # computes the whole result from the native flat tensors, holding no more than one fp32 copy
    streamed: Callable | None = None

    def param(self, name: str) -> MethodParam | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


METHODS: dict[str, Method] = {}


def merge_method(
    name: str | None = None,
    *,
    formula: str,
    version: int = 1,
    choices: dict[str, tuple] | None = None,
    prepare: Callable | None = None,
    docs: dict[str, str] | None = None,
    uses_base: bool = False,
    elementwise: bool = False,
    stats: Callable | None = None,
    streamed: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Register a merge method; see the module docstring for how the signature is read."""

    def deco(fn: Callable) -> Callable:
        mname = name or fn.__name__
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        n_pos, variadic, params, engine, model_names = 0, False, [], set(), []
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                n_pos += 1
                model_names.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                variadic = True
                model_names.append("*" + p.name)
            elif p.kind == p.KEYWORD_ONLY:
                if p.name in ENGINE_KWARGS:
                    engine.add(p.name)
                    continue
                hint = hints.get(p.name)
                kind = "weights" if hint == list[float] else {float: "weight", int: "int", str: "str", bool: "bool"}.get(hint)
                if kind is None:
                    raise TypeError(f"method {mname}: parameter {p.name} needs a float/list[float]/int/str/bool annotation")
                default = REQUIRED if p.default is p.empty else p.default
                params.append(MethodParam(p.name, kind, default, (choices or {}).get(p.name), (docs or {}).get(p.name, "")))
        min_models = max(n_pos, 1)
        METHODS[mname] = Method(
            name=mname,
            fn=fn,
            version=version,
            formula=formula,
            min_models=min_models,
            max_models=None if variadic else n_pos,
            params=tuple(params),
            engine_kwargs=frozenset(engine),
            prepare=prepare,
            model_names=tuple(model_names),
            doc=(inspect.getdoc(fn) or "").split("\n\n")[0],
            uses_base=uses_base,
            elementwise=elementwise,
            stats=stats,
            streamed=streamed,
        )
        return fn

    return deco


_LOADED = False
BUILTIN_MODULES = ["basic", "a1111", "supermerger", "interp", "ties", "average", "linear"]


def load_methods() -> dict[str, Method]:
    """Import built-in method modules and third-party plugins (entry point group `mergekit_sd.methods`)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        for ep in entry_points(group="mergekit_sd.methods"):
            try:
                ep.load()
            except Exception as e:  # third-party code may raise anything; the built-ins must still work
                warnings.warn(f"method plugin {ep.name!r} ({ep.value}) failed to load, its methods are unavailable: "
                              f"{type(e).__name__}: {e}", PluginWarning, stacklevel=2)
    return METHODS


class PluginWarning(UserWarning):
    """A third-party method plugin could not be loaded."""
