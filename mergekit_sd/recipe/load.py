"""Recipe files: YAML (safe loader only) into typed, immutable objects, with file:line for every mistake."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from typing import Any, Mapping

import yaml

from mergekit_sd.arch.weights import normalize_weight
from mergekit_sd.errors import UserError, did_you_mean
from mergekit_sd.ops import Field, OpSpec, get_op, load_ops
from mergekit_sd.recipe.matrix import VARIANT_NAME_RE, expand

FORMAT_VERSION = 1
TOP_FIELDS = ("sdbuild", "name", "card", "matrix", "inputs", "steps", "outputs")
CARD_FIELDS = ("title", "author", "description", "license", "usage_hint", "tags", "trigger_phrase",
               "prediction_type", "resolution", "thumbnail", "encoder_layer", "timestep_range", "implementation",
               "prompt_format", "trigger_words", "negative_hint", "recommended")
INPUT_FIELDS = ("path", "sha256", "author", "url", "prediction_type", "description", "license")
CREDIT_FIELDS = ("author", "url", "prediction_type", "description", "license")
OUTPUT_FIELDS = ("path", "card")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
MAX_YAML_NODES = 200_000
MAX_DEPTH = 64
DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class InputDecl:
    name: str
    path: str
    sha256: str | None = None
    credits: Mapping[str, str] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class StepDecl:
    name: str
    op: str
    params: Mapping[str, Any]  # validated and normalised, defaults filled in
    refs: tuple[str, ...]
    line: int = 0


@dataclass(frozen=True)
class Recipe:
    path: Path
    version: int
    name: str
    card: Mapping[str, Any]  # text fields are str; trigger_words a list, recommended a mapping
    inputs: Mapping[str, InputDecl]
    steps: Mapping[str, StepDecl]
    outputs: Mapping[str, tuple[str, ...]]  # node -> relative output paths
    lines: Mapping[tuple, int] = field(default_factory=dict, compare=False, repr=False)
    cards: Mapping[str, str] = field(default_factory=dict)  # node -> relative path of its Markdown model card
    variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # matrix template step -> its variants

    @property
    def dir(self) -> Path:
        return self.path.parent

    def where(self, *path: Any) -> str:
        """`file:line` of the deepest located prefix of a YAML path."""
        for i in range(len(path), -1, -1):
            if tuple(path[:i]) in self.lines:
                return f"{self.path.name}:{self.lines[tuple(path[:i])]}"
        return self.path.name

    def node_names(self) -> list[str]:
        return list(self.inputs) + list(self.steps)


# ----------------------------------------------------------------------------------------------------------------
# YAML with locations


def _compose(text: str, where: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 0
        raise UserError(f"invalid YAML: {e.problem or e}", f"{where}:{line}") from None
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML: {e}", where) from None
    except RecursionError:
        raise UserError(f"recipe nested too deeply (more than {MAX_DEPTH} levels)", where) from None


def _to_python(node: yaml.Node, where: str) -> tuple[Any, dict[tuple, int]]:
    """Plain Python values plus a map from YAML path to line; aliases count towards a node budget."""
    loader = yaml.SafeLoader("")
    lines: dict[tuple, int] = {}
    budget = [MAX_YAML_NODES]

    active: set[int] = set()

    def walk(n: yaml.Node, path: tuple) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise UserError(f"recipe too large: more than {MAX_YAML_NODES} YAML nodes (alias expansion?)", where)
        if len(path) > MAX_DEPTH:
            raise UserError(f"recipe nested too deeply (more than {MAX_DEPTH} levels)", f"{where}:{n.start_mark.line + 1}")
        if id(n) in active:
            raise UserError("a YAML alias refers to itself", f"{where}:{n.start_mark.line + 1}")
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            active.add(id(n))
            try:
                return _walk_collection(n, path)
            finally:
                active.discard(id(n))
        if len(path) < 8:
            lines.setdefault(path, n.start_mark.line + 1)
        try:
            return loader.construct_object(n, deep=True)
        except yaml.YAMLError as e:
            raise UserError(f"invalid value: {e}", f"{where}:{n.start_mark.line + 1}") from None

    def _walk_collection(n: yaml.Node, path: tuple) -> Any:
        if len(path) < 8:
            lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            loader.flatten_mapping(n)
            out: dict = {}
            for k, v in n.value:
                key = walk(k, path + ("<key>",)) if not isinstance(k, yaml.ScalarNode) else loader.construct_object(k)
                if isinstance(key, (list, dict)):
                    raise UserError("mapping keys must be plain values", f"{where}:{k.start_mark.line + 1}")
                if key in out:
                    raise UserError(f"duplicate key {key!r}", f"{where}:{k.start_mark.line + 1}")
                if len(path) < 8:
                    lines[path + (key,)] = k.start_mark.line + 1
                out[key] = walk(v, path + (key,))
                if len(path) < 8:
                    lines[path + (key,)] = k.start_mark.line + 1
            return out
        return [walk(v, path + (i,)) for i, v in enumerate(n.value)]

    return walk(node, ()), lines


# ----------------------------------------------------------------------------------------------------------------
# field validation


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(type(v), type(v).__name__)


def validate_field(f: Field, value: Any, where: str) -> Any:
    if f.validate is not None:
        return f.validate(value, f"{where}: {f.name}")
    k = f.kind
    if k == "ref":
        if not isinstance(value, str):
            raise UserError(f"{f.name} must name an input or step, got {_type_name(value)}", where)
        return value
    if k == "refs":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise UserError(f"{f.name} must be a non-empty list of input or step names", where)
        return list(value)
    if k == "weight":
        return normalize_weight(value, where)
    if k == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{f.name} must be a number, got {value!r}", where)
        return float(value)
    if k in _PLAIN_KINDS:
        ok, what = _PLAIN_KINDS[k]
        if not ok(value):
            raise UserError(f"{f.name} must be {what}, got {value!r}" if k in ("int", "bool") else
                            f"{f.name} must be {what}, got {_type_name(value)}", where)
        return value
    if k in ("choice", "dtype"):
        if value not in (f.choices or ()):
            raise UserError(f"{f.name} must be one of {', '.join(map(str, f.choices or ()))}; got {value!r}{did_you_mean(value, f.choices or ())}", where)
        return value
    return value


# field kinds that are a plain type check: kind -> (test, what the message calls it)
_PLAIN_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "mapping": (lambda v: isinstance(v, dict), "a mapping"),
}


def _float_safe(v: Any, where: str) -> None:
    """Reject NaN/Inf anywhere in parameters: they would poison a build and its key."""
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError("numbers must be finite", where)
    if isinstance(v, dict):
        for x in v.values():
            _float_safe(x, where)
    elif isinstance(v, list):
        for x in v:
            _float_safe(x, where)


# ----------------------------------------------------------------------------------------------------------------
# loading


URL_SCHEMES = ("https", "http", "s3")


def check_url(url: Any, where: str) -> str:
    """An input URL sdbuild can download from (https, http or s3), else a one-line error at the recipe line."""
    u = urlparse(url) if isinstance(url, str) else None
    if u is None or u.scheme not in URL_SCHEMES or not u.netloc:
        raise UserError(f"url {url!r} is not an https, http or s3 URL", where)
    return url


def check_relative_path(p: str, where: str, what: str = "output path") -> str:
    """Refuse absolute paths and `..`: a recipe from someone else must not write outside its directory."""
    if not isinstance(p, str) or not p.strip():
        raise UserError(f"{what} must be a non-empty string", where)
    pp = PurePosixPath(p.replace("\\", "/"))
    if pp.is_absolute() or re.match(r"^[A-Za-z]:", p) or ".." in pp.parts:
        raise UserError(f"{what} {p!r} leaves the output directory; use a path relative to it without '..'", where)
    return str(pp)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("recipe file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe: {e}", str(path)) from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Path) -> Recipe:
    fname = path.name
    node = _compose(text, fname)
    if node is None:
        raise UserError("recipe is empty; start with `sdbuild: 1`", f"{fname}:1")
    try:
        data, lines = _to_python(node, fname)
    except RecursionError:
        raise UserError("recipe nested too deeply or refers to itself through aliases", fname) from None

    def where(*p: Any) -> str:
        for i in range(len(p), -1, -1):
            if tuple(p[:i]) in lines:
                return f"{fname}:{lines[tuple(p[:i])]}"
        return fname

    if not isinstance(data, dict):
        raise UserError("a recipe is a mapping with sdbuild, inputs, steps and outputs", where())
    for k in data:
        if k not in TOP_FIELDS:
            raise UserError(f"unknown field {k!r}{did_you_mean(k, TOP_FIELDS)}", where(k))
    version = data.get("sdbuild")
    if version is None:
        raise UserError("missing `sdbuild: 1` (the recipe format version)", where())
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UserError(f"unsupported recipe format version {version!r}; this sdbuild reads version {FORMAT_VERSION}", where("sdbuild"))
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise UserError("name must be a string", where("name"))

    card_raw = data.get("card") or {}
    if not isinstance(card_raw, dict):
        raise UserError("card must be a mapping", where("card"))
    card: dict[str, Any] = {}
    for k, v in card_raw.items():
        if k not in CARD_FIELDS:
            raise UserError(f"unknown card field {k!r}{did_you_mean(k, CARD_FIELDS)}", where("card", k))
        if k in STRUCTURED_CARD_FIELDS:
            card[k] = STRUCTURED_CARD_FIELDS[k](v, lambda *p, k=k: where("card", k, *p))
            continue
        if isinstance(v, (dict, list)) or v is None:
            raise UserError(f"card field {k!r} must be text", where("card", k))
        card[k] = str(v)


    data, variants = expand(data, lines, where)  # sweeps: one variant per combination, then validated as usual

    inputs_raw = data.get("inputs") or {}
    steps_raw = data.get("steps") or {}
    outputs_raw = data.get("outputs")
    if not isinstance(inputs_raw, dict):
        raise UserError("inputs must be a mapping of name -> path", where("inputs"))
    if not isinstance(steps_raw, dict):
        raise UserError("steps must be a mapping of name -> step", where("steps"))
    if not isinstance(outputs_raw, dict) or not outputs_raw:
        raise UserError("outputs must map at least one node to a file path", where("outputs") if "outputs" in data else where())

    inputs: dict[str, InputDecl] = {}
    for iname, spec in inputs_raw.items():
        w = where("inputs", iname)
        if not isinstance(iname, str) or not NAME_RE.match(iname):
            raise UserError(f"invalid input name {iname!r}: use letters, digits, '_', '-', '.'", w)
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise UserError("an input is a path or a mapping with path (and optional sha256, author, url)", w)
        for k in spec:
            if k not in INPUT_FIELDS:
                raise UserError(f"unknown input field {k!r}{did_you_mean(k, INPUT_FIELDS)}", where("inputs", iname, k))
        p = spec.get("path")
        sha = spec.get("sha256")
        if p is None and sha is None:
            raise UserError("an input needs a path or a sha256 to find it by", w)
        if p is not None and not isinstance(p, str):
            raise UserError("path must be a string", where("inputs", iname, "path"))
        if sha is not None:
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
                raise UserError("sha256 must be 64 hexadecimal characters", where("inputs", iname, "sha256"))
            sha = sha.lower()
        if "url" in spec:
            check_url(spec["url"], where("inputs", iname, "url"))
        credits = {k: str(spec[k]) for k in CREDIT_FIELDS if k in spec}
        inputs[iname] = InputDecl(iname, p or "", sha, credits, lines.get(("inputs", iname), 0))

    load_ops()
    steps: dict[str, StepDecl] = {}
    for sname, spec in steps_raw.items():
        w = where("steps", sname)
        if not isinstance(sname, str) or not (NAME_RE.match(sname) or VARIANT_NAME_RE.match(sname)):
            raise UserError(f"invalid step name {sname!r}: use letters, digits, '_', '-', '.'", w)
        if sname in inputs:
            raise UserError(f"step {sname!r} has the same name as an input; inputs and steps share one namespace", w)
        if not isinstance(spec, dict):
            raise UserError("a step is a mapping with an op and its fields", w)
        if "op" not in spec:
            raise UserError(f"step {sname!r} has no op", w)
        op = get_op(spec["op"], where("steps", sname, "op")) if isinstance(spec["op"], str) else None
        if op is None:
            raise UserError("op must be a name", where("steps", sname, "op"))
        params = _validate_step(op, sname, spec, where)
        refs = tuple(op.refs(params))
        steps[sname] = StepDecl(sname, op.name, params, refs, lines.get(("steps", sname), 0))

    known = list(inputs) + list(steps)
    for sname, st in steps.items():
        for r in st.refs:
            if r not in inputs and r not in steps:
                raise UserError(f"step {sname!r} refers to {r!r}, which is neither an input nor a step{did_you_mean(r, known)}", _ref_where(where, sname, r, steps_raw))

    outputs: dict[str, tuple[str, ...]] = {}
    cards: dict[str, str] = {}
    seen: dict[str, str] = {}
    for node, target in outputs_raw.items():
        w = where("outputs", node)
        if node not in inputs and node not in steps:
            raise UserError(f"output {node!r} names no input or step{did_you_mean(node, known)}", w)
        if isinstance(target, dict):
            for k in target:
                if k not in OUTPUT_FIELDS:
                    raise UserError(f"unknown output field {k!r}{did_you_mean(k, OUTPUT_FIELDS)}; an output is a path, "
                                    "a list of paths, or {path: ..., card: NAME.md}", where("outputs", node, k))
            if "path" not in target:
                raise UserError(f"output {node!r} needs a path", w)
            if "card" in target:
                card_rel = check_relative_path(target["card"], where("outputs", node, "card"), "card path")
                if not card_rel.endswith(".md"):
                    raise UserError(f"card {card_rel!r} must end in .md (it is a Markdown model card)", where("outputs", node, "card"))
                if card_rel.lower() in seen:
                    raise UserError(f"outputs {seen[card_rel.lower()]!r} and {node!r} are both written to {card_rel!r}", w)
                seen[card_rel.lower()] = node
                cards[node] = card_rel
            target = target["path"]
        targets = target if isinstance(target, list) else [target]
        norm = []
        for t in targets:
            rel = check_relative_path(t, w)
            if not rel.endswith(".safetensors"):
                raise UserError(f"output {rel!r} must end in .safetensors (sdbuild never writes pickles)", w)
            low = rel.lower()
            if low in seen:
                raise UserError(f"outputs {seen[low]!r} and {node!r} are both written to {rel!r}", w)
            seen[low] = node
            norm.append(rel)
        outputs[node] = tuple(norm)
    return Recipe(path.resolve(), version, name, card, inputs, steps, outputs, lines, cards, variants)


def _ref_where(where, sname, ref, steps_raw) -> str:
    spec = steps_raw.get(sname) or {}
    for k, v in spec.items():
        if v == ref:
            return where("steps", sname, k)
        if isinstance(v, list):
            for i, x in enumerate(v):
                if x == ref or (isinstance(x, dict) and ref in x.values()):
                    return where("steps", sname, k, i)
    return where("steps", sname)


def _validate_step(op: OpSpec, sname: str, spec: dict, where) -> dict:
    names = [f.name for f in op.fields]
    params: dict[str, Any] = {}
    for k, v in spec.items():
        if k == "op":
            continue
        f = op.field(k)
        if f is None:
            hint = did_you_mean(k, names)
            if not hint and k in ("model", "models"):
                hint = f" (op {op.name} takes {'models: [...]' if 'models' in names else 'model: NAME'})"
            raise UserError(f"unknown field {k!r} for op {op.name}{hint}; fields: {', '.join(names)}", where("steps", sname, k))
        _float_safe(v, where("steps", sname, k))
        params[k] = validate_field(f, v, where("steps", sname, k))
    for f in op.fields:
        if f.name not in params:
            if f.required:
                raise UserError(f"step {sname!r} (op {op.name}) needs field {f.name!r}", where("steps", sname))
            params[f.name] = f.default
    return params


# ----------------------------------------------------------------------------------------------------------------
# structured card fields


RECOMMENDED_FIELDS = {"sampler": "str", "scheduler": "str", "steps": "int", "cfg": "number", "clip_skip": "int",
                      "resolution": "str", "hires": "str"}


def _trigger_words(v: Any, where) -> list[str]:
    """Words that switch a style or subject on: a list of strings (one string is a list of one)."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
        raise UserError("trigger_words must be a string or a list of strings", where())
    return [str(x) for x in v]


def _recommended(v: Any, where) -> dict[str, Any]:
    """Generation settings the author recommends: sampler, scheduler, steps, cfg, clip_skip, resolution, hires."""
    if isinstance(v, str) and v.startswith("{"):  # the canonical JSON an output's modelspec.recommended holds
        try:
            v = json.loads(v)
        except ValueError:
            pass
    if not isinstance(v, dict) or not v:
        raise UserError(f"recommended must be a mapping with some of {', '.join(RECOMMENDED_FIELDS)}", where())
    out: dict[str, Any] = {}
    for k, x in v.items():
        kind = RECOMMENDED_FIELDS.get(k)
        if kind is None:
            raise UserError(f"unknown recommended setting {k!r}{did_you_mean(str(k), RECOMMENDED_FIELDS)}; "
                            f"settings: {', '.join(RECOMMENDED_FIELDS)}", where(k))
        if kind == "int" and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            raise UserError(f"recommended {k} must be a whole number, got {x!r}", where(k))
        if kind == "number" and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
            raise UserError(f"recommended {k} must be a number, got {x!r}", where(k))
        if kind == "str":
            if isinstance(x, (dict, list)) or x is None:
                raise UserError(f"recommended {k} must be text, got {x!r}", where(k))
            x = str(x)
        out[k] = x
    return out


STRUCTURED_CARD_FIELDS = {"trigger_words": _trigger_words, "recommended": _recommended}
