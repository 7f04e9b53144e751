"""Sweeps: `matrix:` expands steps and outputs into one variant per combination of values.

A step that uses a variable (`${alpha}`), directly or through a step it reads, becomes one node per combination
of the variables it depends on, named `mix@alpha=0.2,te=0`; a step that uses none stays a single node, so it is
built once however many variants read it. Substitution is typed: a value that is exactly `${alpha}` becomes the
number itself, a longer string gets the value's text. Expansion happens on the parsed YAML, before validation,
so every variant is checked like a hand-written step and its errors point at the template's line.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Callable, Mapping

from mergekit_sd.errors import UserError, did_you_mean

VAR_RE = re.compile(r"\$\{([^}]*)\}")
VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VALUE_TEXT_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")
# a variant's node name: the template's name, then `@var=value,...`
VARIANT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*@[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.+\-]+(,[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.+\-]+)*$")
MAX_VARIANTS = 10_000

Where = Callable[..., str]


def format_value(v: Any) -> str:
    """The text a value takes in node names and in strings (`0.2`, `1`, `true`, `anime`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def variant_name(step: str, assign: Mapping[str, Any]) -> str:
    return step + "@" + ",".join(f"{k}={format_value(v)}" for k, v in assign.items())


def parse_matrix(raw: Any, where: Where) -> dict[str, list[Any]]:
    if not isinstance(raw, dict) or not raw:
        raise UserError("matrix must map variable names to lists of values, e.g. {alpha: [0.2, 0.3]}", where("matrix"))
    out: dict[str, list[Any]] = {}
    for name, values in raw.items():
        w = where("matrix", name)
        if not isinstance(name, str) or not VAR_NAME_RE.match(name):
            raise UserError(f"invalid matrix variable name {name!r}: use letters, digits and '_'", w)
        if not isinstance(values, list) or not values:
            raise UserError(f"matrix variable {name!r} needs a non-empty list of values, e.g. {name}: [0.2, 0.3]", w)
        seen: set[str] = set()
        for v in values:
            if v is None or isinstance(v, (list, dict)):
                raise UserError(f"matrix variable {name!r}: values must be numbers, strings or booleans, got {v!r}", w)
            if isinstance(v, float) and v != v:
                raise UserError(f"matrix variable {name!r}: values must be finite", w)
            text = format_value(v)
            if not VALUE_TEXT_RE.match(text):
                raise UserError(f"matrix variable {name!r}: value {text!r} may only use letters, digits, '_', '.', '+', '-'", w)
            if text in seen:
                raise UserError(f"matrix variable {name!r} lists {text!r} twice", w)
            seen.add(text)
        out[name] = list(values)
    return out


def _vars_in(value: Any, path: tuple, known: Mapping[str, Any], where: Where) -> list[str]:
    """Variables a value uses, in first-use order; an unknown `${name}` is an error at its line."""
    found: list[str] = []

    def walk(v: Any, p: tuple) -> None:
        if isinstance(v, str):
            for m in VAR_RE.finditer(v):
                name = m.group(1)
                if name not in known:
                    hint = did_you_mean(name, list(known)) if known else "; declare it under `matrix:`"
                    raise UserError(f"unknown matrix variable ${{{name}}}{hint}", where(*p))
                if name not in found:
                    found.append(name)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, p + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, p + (i,))

    walk(value, path)
    return found


def _step_refs(spec: Any, steps: set[str]) -> set[str]:
    """Steps a step names (any string field equal to a step's name)."""
    out: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str) and v in steps:
            out.add(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k != "op":
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(spec)
    return out


def _substitute(value: Any, assign: Mapping[str, Any], rename: Callable[[str], str | None]) -> Any:
    if isinstance(value, str):
        renamed = rename(value)
        if renamed is not None:
            return renamed
        m = VAR_RE.fullmatch(value)
        if m:
            return assign[m.group(1)]
        return VAR_RE.sub(lambda m: format_value(assign[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: (v if k == "op" else _substitute(v, assign, rename)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, assign, rename) for v in value]
    return value


def check_unused_syntax(data: Mapping[str, Any], where: Where) -> None:
    """`${...}` is only meaningful in steps and outputs: anywhere else it is a mistake, not text."""
    for top in ("card", "inputs", "name"):
        if top in data:
            bad = _first_var(data[top], (top,))
            if bad is not None:
                raise UserError("matrix variables (${...}) can be used in steps and outputs only", where(*bad))


def _first_var(value: Any, path: tuple) -> tuple | None:
    if isinstance(value, str):
        return path if VAR_RE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        hit = _first_var(v, path + (k,))
        if hit is not None:
            return hit
    return None


def expand(data: dict[str, Any], lines: dict[tuple, int], where: Where) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """The recipe data with steps and outputs expanded, and {template step: its variant names in order}.

    `lines` gains entries for every variant path (the template's lines), so errors in variants point at the file.
    """
    check_unused_syntax(data, where)
    matrix = parse_matrix(data["matrix"], where) if "matrix" in data else {}
    steps_raw = data.get("steps")
    outputs_raw = data.get("outputs")
    if not isinstance(steps_raw, dict):
        if matrix:
            raise UserError("a matrix needs steps that use its variables", where("matrix"))
        return data, {}
    names = set(steps_raw)
    direct = {s: _vars_in(spec, ("steps", s), matrix, where) for s, spec in steps_raw.items()}
    refs = {s: _step_refs(spec, names - {s}) for s, spec in steps_raw.items()}
    memo: dict[str, set[str]] = {}

    def deps(s: str, stack: frozenset = frozenset()) -> set[str]:
        if s in memo:
            return memo[s]
        got = set(direct[s])
        for r in refs[s]:
            if r not in stack:  # a cycle is reported, with its names, when the graph is built
                got |= deps(r, stack | {s})
        memo[s] = got
        return got

    order = list(matrix)
    step_vars = {s: [v for v in order if v in deps(s)] for s in steps_raw}
    variants: dict[str, tuple[str, ...]] = {}
    new_steps: dict[str, Any] = {}
    total = 0
    for s, spec in steps_raw.items():
        vs = step_vars[s]
        if not vs:
            new_steps[s] = spec
            continue
        combos = [dict(zip(vs, vals)) for vals in itertools.product(*(matrix[v] for v in vs))]
        total += len(combos)
        if total > MAX_VARIANTS:
            raise UserError(f"the matrix makes more than {MAX_VARIANTS} step variants; sweep fewer values", where("matrix"))
        names_out = []
        for assign in combos:
            vname = variant_name(s, assign)

            def rename(text: str, assign=assign) -> str | None:
                if text in names and text != s and step_vars[text]:
                    return variant_name(text, {v: assign[v] for v in step_vars[text]})
                return None

            new_steps[vname] = _substitute(spec, assign, rename)
            _copy_lines(lines, ("steps", s), ("steps", vname))
            names_out.append(vname)
        variants[s] = tuple(names_out)

    new_outputs = outputs_raw
    if isinstance(outputs_raw, dict):
        new_outputs = {}
        for node, target in outputs_raw.items():
            used = _vars_in(target, ("outputs", node), matrix, where)
            if node in variants:
                vs = step_vars[node]
                for v in used:
                    if v not in vs:
                        raise UserError(f"output of {node!r} uses ${{{v}}}, but {node!r} does not vary with {v!r}", where("outputs", node))
                for vname in variants[node]:
                    assign = _assignment(vname, vs, matrix)
                    new_outputs[vname] = _substitute(target, assign, lambda _t: None)
                    _copy_lines(lines, ("outputs", node), ("outputs", vname))
            else:
                if used:
                    raise UserError(f"output of {node!r} uses ${{{used[0]}}}, but {node!r} does not vary with {used[0]!r}",
                                    where("outputs", node))
                new_outputs[node] = target
    out = {k: v for k, v in data.items() if k != "matrix"}
    out["steps"] = new_steps
    if outputs_raw is not None:
        out["outputs"] = new_outputs
    return out, variants


def _assignment(vname: str, vs: list[str], matrix: Mapping[str, list[Any]]) -> dict[str, Any]:
    texts = dict(part.split("=", 1) for part in vname.split("@", 1)[1].split(","))
    return {v: next(x for x in matrix[v] if format_value(x) == texts[v]) for v in vs}


def _copy_lines(lines: dict[tuple, int], old: tuple, new: tuple) -> None:
    n = len(old)
    for k, line in list(lines.items()):
        if k[:n] == old:
            lines.setdefault(new + k[n:], line)


def resolve_targets(names: list[str], variants: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Node names on the command line: a template step stands for all its variants; variables in any order."""
    out: list[str] = []
    for n in names:
        if n in variants:
            out.extend(variants[n])
            continue
        if "@" in n:
            base, _, rest = n.partition("@")
            want = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
            for v in variants.get(base, ()):
                have = dict(p.split("=", 1) for p in v.split("@", 1)[1].split(","))
                if have == want or _numeric_equal(have, want):
                    n = v
                    break
        out.append(n)
    return out


def _numeric_equal(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """`alpha=0.20` names the same variant as `alpha=0.2`."""
    if set(a) != set(b):
        return False
    for k in a:
        if a[k] == b[k]:
            continue
        try:
            if float(a[k]) != float(b[k]):
                return False
        except ValueError:
            return False
    return True
