"""Generate the ``settings`` part of the Helm chart's values.schema.json from ``OperatorSettings``.

    python -m kubedistill.api.chartgen --model kubedistill.api.settings:OperatorSettings           # rewrite it
    python -m kubedistill.api.chartgen --model kubedistill.api.settings:OperatorSettings --check   # exit 1 on drift

``hack/gen-crds`` runs it from the repository root. Only ``properties.settings`` of
charts/kubedistill/values.schema.json is generated; the rest of the schema (image, rbac,
operator, metrics, ...) is hand-written and kept as it is. The model is named on the command
line (``--model``, ``kubedistill.api.settings:OperatorSettings``), so the generator serves any
pydantic model of the chart's values.

The chart's schema is JSON Schema draft-07, checked by Helm, so unlike the CRDs (see
``crdgen``) it keeps what JSON Schema can say:

- every ``$ref`` is inlined (``crdgen``'s resolver: the field's description, then the
  model's docstring);
- every object with ``properties`` gets ``additionalProperties: false``, so a typo under
  ``settings`` is an error at ``helm install``; free-form maps keep their value schema;
- ``X | None`` becomes ``type: [X, "null"]`` (``null`` added to an ``enum``): what pydantic
  accepts, with readable errors;
- a ``dict[Literal[...], X]`` (``propertyNames`` with an ``enum``) becomes one optional
  property per name;
- ``title`` and ``default`` are dropped: values.yaml holds the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kubedistill.api.crdgen import _ordered, _resolve

Schema = dict[str, Any]

VALUES_SCHEMA = Path("charts/kubedistill/values.schema.json")
_DROPPED_KEYS = frozenset({"title", "default", "$defs"})


def _nullable(node: Schema, defs: dict[str, Schema]) -> Schema:
    """``anyOf: [X, null]`` -> X with ``null`` allowed (the outer description wins)."""
    variants = [v for v in node["anyOf"] if v != {"type": "null"}]
    if len(variants) != 1 or len(variants) == len(node["anyOf"]):
        raise ValueError(f"unions other than X | None have no chart schema: {node['anyOf']}")
    inner = chart_schema(variants[0], defs)
    inner["type"] = [inner["type"], "null"]
    if "enum" in inner:
        inner["enum"] = [*inner["enum"], None]
    outer = chart_schema({k: v for k, v in node.items() if k != "anyOf"}, defs)
    return _ordered({**inner, **outer})


def _fixed_keys(node: Schema, defs: dict[str, Schema]) -> Schema:
    """``dict[Literal[a, b], X]`` -> properties a and b, both X, and nothing else."""
    value = node["additionalProperties"]
    rest = {k: v for k, v in node.items() if k not in ("propertyNames", "additionalProperties")}
    names = node["propertyNames"]["enum"]
    return chart_schema({**rest, "properties": dict.fromkeys(names, value), "additionalProperties": False}, defs)


def chart_schema(node: Schema, defs: dict[str, Schema]) -> Schema:
    """The chart (draft-07) form of one pydantic JSON Schema node, recursively."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        return _nullable(node, defs)
    if "enum" in node.get("propertyNames", {}):
        return _fixed_keys(node, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: chart_schema(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = chart_schema(value, defs)
        else:
            out[key] = value
    if "properties" in out:
        out["additionalProperties"] = False
    return _ordered(out)


def settings_schema(model: type[BaseModel]) -> Schema:
    """The ``properties.settings`` node of values.schema.json: ``model``'s schema, camelCase."""
    schema = model.model_json_schema(by_alias=True)
    generated = f"Generated from {model.__module__}.{model.__qualname__} by hack/gen-crds. Do not edit."
    return {"$comment": generated, **chart_schema(schema, schema.get("$defs", {}))}


def render_values_schema(text: str, model: type[BaseModel]) -> str:
    """values.schema.json's text with its ``settings`` part generated from ``model``, the rest as it was."""
    schema = json.loads(text)
    schema["properties"]["settings"] = settings_schema(model)
    return json.dumps(schema, indent=2) + "\n"


def load_model(name: str) -> type[BaseModel]:
    """The pydantic model named ``module:Class``."""
    module, _, attribute = name.partition(":")
    model = getattr(importlib.import_module(module), attribute, None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"{name} is not a pydantic model (expected module:Class)")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubedistill.api.chartgen", description="Generate the settings part of values.schema.json."
    )
    parser.add_argument("--model", required=True, help="module:Class, e.g. kubedistill.api.settings:OperatorSettings")
    parser.add_argument("--file", type=Path, default=VALUES_SCHEMA, help=f"default: {VALUES_SCHEMA}")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file differs")
    args = parser.parse_args(argv)
    committed = args.file.read_text()
    generated = render_values_schema(committed, load_model(args.model))
    if committed == generated:
        return 0
    if args.check:
        print(f"{args.file}: settings differ from OperatorSettings; run hack/gen-crds", file=sys.stderr)
        return 1
    args.file.write_text(generated)
    print(f"wrote {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
