"""JSON Schema of the recipe format, generated from the op registry so it never drifts from the validator."""

from __future__ import annotations

from typing import Any

from mergekit_sd.ops import Field, load_ops
from mergekit_sd.recipe.load import CARD_FIELDS, INPUT_FIELDS, RECOMMENDED_FIELDS

NUMBER = {"type": "number"}
BLOCK_WEIGHTS = {
    "description": "a number, a list with one value per block, a mapping of block selectors, a preset name or a comma string",
    "anyOf": [NUMBER, {"type": "array", "items": {"type": ["number", "string"]}},
              {"type": "object", "additionalProperties": {"type": ["number", "string"]}}, {"type": "string"}],
}


def field_schema(f: Field) -> dict[str, Any]:
    if f.schema is not None:
        s = dict(f.schema)
    else:
        s = {
            "ref": {"type": "string"},
            "refs": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "weight": dict(BLOCK_WEIGHTS),
            "number": NUMBER,
            "int": {"type": "integer"},
            "str": {"type": "string"},
            "bool": {"type": "boolean"},
            "dtype": {"enum": list(f.choices or ())},
            "choice": {"enum": list(f.choices or ())},
            "list": {"type": "array"},
            "mapping": {"type": "object"},
        }.get(f.kind, {})
        s = dict(s)
    if f.doc:
        s["description"] = f.doc
    if not f.required and f.default is not None and isinstance(f.default, (int, float, str, bool)):
        s["default"] = f.default
    return s


# a matrix variable standing for a whole value (`alpha: "${alpha}"`): the value's type is checked after substitution
MATRIX_VALUE = {"type": "string", "pattern": "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}"}
MATRIX = {
    "description": "sweep: one variant of every step that uses ${name} per combination of values",
    "type": "object", "minProperties": 1,
    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
    "additionalProperties": {"type": "array", "minItems": 1, "items": {"type": ["number", "string", "boolean"]}},
}
OUTPUT_PATH = {"anyOf": [{"type": "string", "pattern": "\\.safetensors$"},
                         {"type": "array", "items": {"type": "string", "pattern": "\\.safetensors$"}}]}
CARD_VALUE = {
    "trigger_words": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "recommended": {"type": "object", "additionalProperties": False,
                    "properties": {k: {"int": {"type": "integer"}, "number": {"type": "number"}}.get(kind, {"type": ["string", "number"]})
                                   for k, kind in RECOMMENDED_FIELDS.items()}},
}


def _templated(s: dict[str, Any]) -> dict[str, Any]:
    """A field's schema, or a matrix variable in its place."""
    out: dict[str, Any] = {"anyOf": [{k: v for k, v in s.items() if k not in ("description", "default")}, MATRIX_VALUE]}
    for k in ("description", "default"):
        if k in s:
            out[k] = s[k]
    return out


def recipe_schema() -> dict[str, Any]:
    steps = []
    for name, op in sorted(load_ops().items()):
        props: dict[str, Any] = {"op": {"const": name}}
        props.update({f.name: _templated(field_schema(f)) for f in op.fields})
        steps.append({
            "type": "object",
            "title": name,
            "description": op.doc + (f"  Formula: {op.formula}" if op.formula else ""),
            "properties": props,
            "required": ["op"] + [f.name for f in op.fields if f.required],
            "additionalProperties": False,
        })
    name_pattern = "^[A-Za-z_][A-Za-z0-9_.\\-]*$"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sdbuild recipe, format version 1",
        "type": "object",
        "required": ["sdbuild", "outputs"],
        "additionalProperties": False,
        "properties": {
            "sdbuild": {"const": 1},
            "name": {"type": "string"},
            "card": {"type": "object", "additionalProperties": False,
                     "properties": {k: CARD_VALUE.get(k, {"type": ["string", "number"]}) for k in CARD_FIELDS}},
            "matrix": MATRIX,
            "inputs": {"type": "object", "propertyNames": {"pattern": name_pattern}, "additionalProperties": {
                "anyOf": [{"type": "string"}, {"type": "object", "additionalProperties": False,
                                                "properties": {k: {"type": "string"} for k in INPUT_FIELDS}}]}},
            "steps": {"type": "object", "propertyNames": {"pattern": name_pattern}, "additionalProperties": {"oneOf": steps}},
            "outputs": {"type": "object", "minProperties": 1, "additionalProperties": {
                "anyOf": OUTPUT_PATH["anyOf"] + [{"type": "object", "required": ["path"], "additionalProperties": False,
                                                  "properties": {"path": OUTPUT_PATH, "card": {"type": "string", "pattern": "\\.md$"}}}]}},
        },
    }
