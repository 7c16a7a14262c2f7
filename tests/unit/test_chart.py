"""The Helm chart's values, schema and RBAC against the operator's code, without Helm or a cluster.

- ``settings`` in values.yaml are OperatorSettings' defaults, key for key;
- values.schema.json mirrors OperatorSettings' fields and constraints, and refuses unknown keys;
- every key of values.yaml is commented, and every settings field is at least shown in a comment;
- the operator's RBAC rules cover every kind the operator's API client can touch.

tests/e2e/test_chart.py renders, installs and runs the chart for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubedistill import __version__
from kubedistill.api.settings import OperatorSettings
from kubedistill.kube.client import PLURALS

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubedistill"
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES: dict[str, Any] = yaml.safe_load(VALUES_TEXT)
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
CONSTRAINTS: tuple[str, ...] = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength")
CONSTRAINTS += ("pattern", "enum")


def _errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def _deref(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref (local only); siblings of the $ref (a description) are kept."""
    while "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


# --------------------------------------------------------------------------- defaults


def test_chart_settings_are_the_operator_defaults() -> None:
    assert VALUES["settings"] == OperatorSettings().to_wire()


def test_chart_settings_load_as_operator_settings() -> None:
    assert OperatorSettings.model_validate(VALUES["settings"]) == OperatorSettings()


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__
    assert VALUES["settings"]["workerImage"].endswith(f":{chart['appVersion']}")


# --------------------------------------------------------------------------- schema


def test_values_yaml_validates_against_the_schema() -> None:
    assert _errors(VALUES) == []


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": 1}, "Additional properties"),
        ({"settings": {"gpuPool": {"gpuPerNode": 8}}}, "Additional properties"),
        ({"operator": {"resources": {"requests": {"gpu": "1"}}}}, "Additional properties"),
        ({"settings": {"gpuPool": {"gpusPerNode": "eight"}}}, "is not of type 'integer'"),
        ({"settings": {"gpuPool": {"gpusPerNode": 65}}}, "greater than the maximum"),
        ({"settings": {"imagePullPolicy": "Sometimes"}}, "is not one of"),
        ({"settings": {"cpuPool": {"memory": "4 GB"}}}, "does not match"),
        ({"settings": {"reconcile": {"apiQps": 0}}}, "less than or equal to the minimum"),
        ({"settings": {"stagePodAnnotations": {"serve": {"a": "b"}}}}, "Additional properties"),
        ({"settings": {"gpuPool": {"tolerations": [{"key": "x", "effect": "Sometimes"}]}}}, "is not one of"),
    ],
)
def test_schema_refuses_unknown_keys_and_bad_values(patch: dict[str, Any], message: str) -> None:
    errors = _errors(_merge(VALUES, patch))
    assert errors and any(message in e for e in errors), errors


def test_every_object_in_the_schema_refuses_unknown_keys() -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}/{index}")

    walk(SCHEMA, "#")


def _pydantic_types(node: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
    """The JSON types a pydantic property allows and its non-null variant."""
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        assert len(variants) == 1, node
        types, inner = _pydantic_types(variants[0])
        return types | {"null"}, inner
    return {node["type"]} if "type" in node else set(), node


def _compare(ours: dict[str, Any], theirs: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    """Differences between the chart schema (ours) and pydantic's (theirs) at one property."""
    theirs = _deref(theirs, root)
    ours = _deref(ours, SCHEMA)
    their_types, theirs = _pydantic_types(theirs)
    theirs = _deref(theirs, root)
    our_types = set(ours["type"]) if isinstance(ours.get("type"), list) else {ours.get("type")}
    problems = []
    if "properties" in theirs:  # a model: same fields, recursively
        if set(ours.get("properties", {})) != set(theirs["properties"]):
            return [f"{where}: fields {sorted(ours.get('properties', {}))} != {sorted(theirs['properties'])}"]
        for name, prop in theirs["properties"].items():
            problems += _compare(ours["properties"][name], prop, root, f"{where}.{name}")
        return problems
    if not our_types - {"null"} or our_types - their_types or (their_types - {"null"}) - our_types:
        problems.append(f"{where}: types {sorted(map(str, our_types))} vs {sorted(their_types)}")
    for key in CONSTRAINTS:
        mine = ours.get(key)
        if key == "enum" and "null" in our_types and mine is not None:
            mine = [v for v in mine if v is not None]  # X | None: null is one of the values
        if key in theirs and mine != theirs[key]:
            problems.append(f"{where}: {key} {mine!r} != {theirs[key]!r}")
    if "items" in theirs:
        problems += _compare(ours.get("items", {}), theirs["items"], root, f"{where}[]")
    if "propertyNames" in theirs:  # dict[Literal[...], X]: a fixed set of optional keys
        names = theirs["propertyNames"]["enum"]
        if sorted(ours.get("properties", {})) != sorted(names):
            problems.append(f"{where}: keys {sorted(ours.get('properties', {}))} != {sorted(names)}")
        for name in names:
            problems += _compare(ours["properties"][name], theirs["additionalProperties"], root, f"{where}.{name}")
    elif isinstance(theirs.get("additionalProperties"), dict):
        problems += _compare(ours.get("additionalProperties", {}), theirs["additionalProperties"], root, f"{where}{{}}")
    return problems


def test_settings_schema_mirrors_operator_settings() -> None:
    theirs = OperatorSettings.model_json_schema(by_alias=True)
    assert _compare(SCHEMA["properties"]["settings"], theirs, theirs, "settings") == []


# --------------------------------------------------------------------------- comments


def _schema_node(path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] = SCHEMA
    for key in path:
        node = _deref(node, SCHEMA)
        if key not in node.get("properties", {}):
            return None
        node = node["properties"][key]
    return node


def _value_keys(text: str) -> list[tuple[list[str], bool]]:
    """(path, commented) of every mapping key in values.yaml, from the text (comments are lost to yaml)."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    found = []
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        match = re.match(r"(- )?([^\s:#][^:#]*):(\s|$)", stripped)
        if not match:
            continue
        if match.group(1):  # the first key of a list item: data, not a documented key
            stack.append((indent, "[]"))
            continue
        key = match.group(2).strip("\"'")
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        commented = previous.startswith("#") or " # " in line
        found.append(([k for _, k in stack] + [key], commented))
        stack.append((indent, key))
    return found


def test_every_values_key_is_commented() -> None:
    keys = _value_keys(VALUES_TEXT)
    documented = [path for path, _ in keys if _schema_node(path) is not None]
    assert len(documented) > 80
    missing = [".".join(path) for path, commented in keys if _schema_node(path) is not None and not commented]
    assert missing == []


def test_every_settings_field_is_shown_in_values_yaml() -> None:
    """Optional settings without a default (serviceAccountName, ...) appear as commented examples."""

    def fields(node: dict[str, Any], prefix: str) -> list[str]:
        node = _deref(node, SCHEMA)
        out = []
        for name, child in node.get("properties", {}).items():
            out.append(f"{prefix}{name}")
            if "properties" in _deref(child, SCHEMA) and name != "stagePodAnnotations":
                out += fields(child, f"{prefix}{name}.")
        return out

    shown = set()
    for line in VALUES_TEXT.splitlines():
        if match := re.match(r"\s*#?\s*([A-Za-z]+):", line):
            shown.add(match.group(1))
    missing = [f for f in fields(SCHEMA["properties"]["settings"], "") if f.rsplit(".", 1)[-1] not in shown]
    assert missing == []


# --------------------------------------------------------------------------- RBAC


def _operator_rules() -> list[dict[str, Any]]:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = helpers.split('{{- define "kubedistill.operatorRules" -}}', 1)[1].split("{{- end }}", 1)[0]
    assert "{{" not in body, "the rules are plain YAML, so that this test can read them"
    rules: list[dict[str, Any]] = yaml.safe_load(body)
    return rules


def _allowed(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_operator_rules_cover_every_kind_the_client_touches() -> None:
    rules = _operator_rules()
    for (api_version, _kind), plural in PLURALS.items():
        group = api_version.split("/")[0] if "/" in api_version else ""
        assert _allowed(rules, group, plural), f"no rule for {group}/{plural}"


def test_operator_rules_are_least_privilege() -> None:
    rules = _operator_rules()
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"] and "impersonate" not in rule["verbs"]
    assert not _allowed(rules, "", "secrets"), "the operator references Secrets, never reads them"
    assert not _allowed(rules, "", "namespaces")
    assert _allowed(rules, "", "pods") == {"get", "list", "watch"}  # read only: adapter pools' reports
    assert _allowed(rules, "", "pods/status") == {"patch"}  # held so that the sidecar's Role may grant it
    assert "update" not in _allowed(rules, "kubedistill.io", "distillationjobs")
    # Server-side apply creates what does not exist: every applied kind needs create and patch.
    for group, plural in [("apps", "deployments"), ("", "services"), ("policy", "poddisruptionbudgets"),
                          ("autoscaling", "horizontalpodautoscalers"), ("", "configmaps"),
                          ("kubedistill.io", "distilledmodels"), ("keda.sh", "scaledobjects"),
                          ("monitoring.coreos.com", "podmonitors"), ("monitoring.coreos.com", "servicemonitors"),
                          ("inference.networking.k8s.io", "inferencepools"), ("", "serviceaccounts"),
                          ("inference.networking.x-k8s.io", "inferenceobjectives"),
                          ("rbac.authorization.k8s.io", "roles"),
                          ("rbac.authorization.k8s.io", "rolebindings")]:  # fmt: skip
        assert {"create", "patch"} <= _allowed(rules, group, plural), plural


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base.get(key), value)
        return out
    return patch
