"""Every manifest in examples/ is valid for the models (the cluster tier checks the API server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubedistill.api.v1alpha1 import API_VERSION, DistillationJob, DistilledModel

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
MODELS: dict[str, type[BaseModel]] = {"DistillationJob": DistillationJob, "DistilledModel": DistilledModel}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_examples_the_design_promises_exist() -> None:
    names = {p.name for p in EXAMPLES}
    for required in (
        "quickstart.yaml",
        "openai-teacher.yaml",
        "vllm-teacher.yaml",
        "multi-node.yaml",
        "distilledmodel.yaml",
        "distilledmodel-from-job.yaml",
    ):
        assert required in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    docs = _docs(path)
    ours = [d for d in docs if d.get("apiVersion") == API_VERSION]
    assert ours, f"{path.name} holds no kubedistill.io resource"
    for doc in ours:
        model = MODELS[doc["kind"]].model_validate(doc)
        # the model keeps everything the file says (no field silently dropped)
        assert _subset(doc, model.model_dump(by_alias=True, mode="json")), doc["metadata"]["name"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_listed_in_readme(path: Path) -> None:
    assert f"]({path.name})" in (REPO / "examples" / "README.md").read_text()


def test_example_names_are_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for path in EXAMPLES:
        for doc in _docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{key} twice in examples/: they could not be applied together"
            seen.add(key)


def test_from_job_example_names_an_example_job() -> None:
    jobs = {d["metadata"]["name"] for p in EXAMPLES for d in _docs(p) if d["kind"] == "DistillationJob"}
    refs = [d["spec"]["fromJob"]["name"] for p in EXAMPLES for d in _docs(p) if "fromJob" in d.get("spec", {})]
    assert refs and set(refs) <= jobs


def test_multi_node_example_uses_two_nodes() -> None:
    (doc,) = _docs(REPO / "examples" / "multi-node.yaml")
    assert DistillationJob.model_validate(doc).spec.resources.nodes == 2


def test_openai_example_references_its_key() -> None:
    (doc,) = _docs(REPO / "examples" / "openai-teacher.yaml")
    endpoint = DistillationJob.model_validate(doc).spec.teacher.endpoint
    assert endpoint is not None and endpoint.api_key_secret_ref is not None


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return bool(small == big)
