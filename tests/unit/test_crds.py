"""The generated CRDs: committed files match the models, schemas are structural and documented."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.api import crdgen
from kubedistill.api.conditions import JobPhase
from kubedistill.cli import main

REPO = Path(__file__).resolve().parents[2]
CRD_DIRS = (REPO / "crds", REPO / "charts" / "kubedistill" / "crds")
RENDERED = crdgen.render_all()
CRDS = crdgen.build_crds()


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (items as [], map values as {})."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _fields(crd: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every named property (what kubectl explain lists)."""
    for path, node in _walk(_schema(crd)):
        for name, child in node.get("properties", {}).items():
            yield f"{path}.{name}", child


@pytest.mark.parametrize("directory", CRD_DIRS, ids=lambda d: str(d.relative_to(REPO)))
def test_committed_crds_match_the_models(directory: Path) -> None:
    committed = {p.name: p.read_text() for p in directory.glob("*.yaml")}
    assert committed == RENDERED, f"{directory} drifted from operator/kubedistill/api/: run hack/gen-crds"


def test_cli_check_passes_and_stdout_is_a_yaml_stream(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["crds", "--check"]) == 0
    assert main(["crds", "--stdout"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["metadata"]["name"] for d in docs] == [
        "distillationjobs.kubedistill.io",
        "distilledmodels.kubedistill.io",
    ]


def test_cli_writes_and_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RENDERED)
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "kubedistill.io_distilledmodels.yaml").write_text("edited by hand\n")
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1
    assert "run hack/gen-crds" in capsys.readouterr().err


def test_hack_script_checks_drift() -> None:
    proc = subprocess.run(
        [str(REPO / "hack" / "gen-crds"), "--check"],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("file_name", sorted(CRDS))
def test_every_field_has_a_description(file_name: str) -> None:
    missing = [
        path
        for path, node in _fields(CRDS[file_name])
        if not node.get("description", "").strip() and path != ".metadata"  # the API server documents metadata
    ]
    assert not missing, f"fields without description (kubectl explain shows nothing): {missing}"
    assert _schema(CRDS[file_name])["description"]


@pytest.mark.parametrize("file_name", sorted(CRDS))
def test_schema_is_structural(file_name: str) -> None:
    for path, node in _walk(_schema(CRDS[file_name])):
        assert "type" in node, f"{path}: no type"
        for key in ("$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const", "nullable"):
            assert key not in node, f"{path}: {key}"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            assert not path.startswith(".status"), f"{path}: defaults under status"


@pytest.mark.parametrize("file_name", sorted(CRDS))
def test_metadata_is_a_plain_object(file_name: str) -> None:
    schema = _schema(CRDS[file_name])
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["required"] == ["spec"]


def test_distillation_job_crd() -> None:
    crd = CRDS["kubedistill.io_distillationjobs.yaml"]
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["dj", "djob"] and "kubedistill" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"] if not c.get("priority")}
    assert list(columns) == [
        "Phase", "Progress", "Teacher", "Agreement", "Spend", "Budget", "Speedup", "CostRatio", "Age"
    ]  # fmt: skip
    assert columns["Agreement"]["jsonPath"] == ".status.evaluation.teacherAgreement"
    assert columns["Agreement"]["type"] == "number"
    assert columns["Spend"]["jsonPath"] == ".status.teacherSpend.summary"
    assert columns["Budget"]["jsonPath"] == ".status.teacherSpend.budget.state"
    assert (columns["Speedup"]["jsonPath"], columns["Speedup"]["type"]) == (
        ".status.evaluation.speed.speedup",
        "number",
    )
    assert columns["CostRatio"]["jsonPath"] == ".status.evaluation.speed.costRatio"
    spec = _schema(crd)["properties"]["spec"]
    teacher = spec["properties"]["teacher"]
    assert teacher["x-kubernetes-validations"][0]["rule"] == "has(self.endpoint) != has(self.vllm)"
    status = _schema(crd)["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [phase.value for phase in JobPhase]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == ["type", "status", "reason", "lastTransitionTime"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_distillation_job_schema_details() -> None:
    spec = _schema(CRDS["kubedistill.io_distillationjobs.yaml"])["properties"]["spec"]["properties"]
    eval_fraction = spec["dataset"]["properties"]["evalFraction"]
    assert eval_fraction == {
        "description": eval_fraction["description"],
        "type": "number",
        "default": 0.1,
        "minimum": 0.0,
        "maximum": 1.0,
        "exclusiveMaximum": True,
        "exclusiveMinimum": True,
    }
    # optional fields are neither nullable nor defaulted (unset means "the operator's default")
    assert "default" not in spec["resources"]["properties"]["gpusPerNode"]
    # a nested model with a default factory defaults to {}; the API server fills in its fields
    assert spec["student"]["properties"]["lora"]["default"] == {}
    assert spec["student"]["properties"]["lora"]["properties"]["rank"]["default"] == 16
    assert spec["evaluation"]["properties"]["metrics"]["default"] == ["exactMatch", "tokenF1", "rougeL"]
    assert spec["resources"]["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}
    # a field's own description comes first, then its model's docstring
    assert spec["teacher"]["description"] == (
        "The large model whose answers the student learns.\n\nWho answers the prompts. Exactly one of endpoint or vllm."
    )


def test_distilled_model_crd() -> None:
    crd = CRDS["kubedistill.io_distilledmodels.yaml"]
    assert crd["spec"]["names"]["shortNames"] == ["dm"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.serving.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Replicas", "Endpoint", "Model", "Age"]
    spec = _schema(crd)["properties"]["spec"]
    assert spec["x-kubernetes-validations"][0]["rule"] == "has(self.model) != has(self.fromJob)"
    # the scale subresource reads .spec.serving.replicas: it must exist on every object
    assert spec["properties"]["serving"]["default"] == {}
    assert spec["properties"]["serving"]["properties"]["replicas"]["default"] == 1


def test_cel_rules_reference_existing_fields() -> None:
    """Every has(self.x) / self.x in a rule names a property of the node the rule sits on."""
    for crd in CRDS.values():
        for path, node in _walk(_schema(crd)):
            for validation in node.get("x-kubernetes-validations", []):
                assert validation["message"], path
                for name in re.findall(r"self\.([A-Za-z]+)\b(?!\()", validation["rule"]):  # fields, not methods
                    assert name in node.get("properties", {}), f"{path}: rule {validation['rule']!r} names {name}"


def test_unsupported_union_is_refused() -> None:
    with pytest.raises(ValueError, match="unions"):
        crdgen.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})


# Go's YAML (kubectl, the API server) reads these bare words as booleans or null: a field with
# such a name cannot be written in a kubectl manifest (`n: 2` arrives as `false: 2`).
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


@pytest.mark.parametrize("file_name", sorted(CRDS))
def test_no_field_name_is_a_yaml_boolean(file_name: str) -> None:
    bad = [path for path, _ in _fields(CRDS[file_name]) if path.rsplit(".", 1)[-1].lower() in _YAML11_WORDS]
    assert not bad, f"kubectl YAML turns these field names into booleans: {bad}"


def test_committed_yaml_reads_back_as_generated_by_a_yaml_1_1_reader() -> None:
    """The committed text parses to the generated dict even with YAML 1.1 booleans (y/n/on/off)."""

    class Yaml11Loader(yaml.SafeLoader):
        pass

    Yaml11Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
    for file_name, text in RENDERED.items():
        assert yaml.load(text, Loader=Yaml11Loader) == CRDS[file_name], file_name
