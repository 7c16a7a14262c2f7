"""examples/argocd: the Applications install the chart with valid values, and the Lua health checks
say Healthy / Progressing / Degraded for DistillationJobs and DistilledModels as the operator writes them.

The health scripts run in Lua 5.1 (lupa), the dialect of Argo CD's gopher-lua, with the object as
the global ``obj``, as Argo CD runs them. DistilledModel statuses come from the operator's own
decision function; DistillationJob statuses are samples checked against the API's status model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import lupa.lua51
import pytest
import yaml

from kubedistill.api.conditions import ModelPhase
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistillationJobStatus, DistilledModel
from kubedistill.builders import names
from kubedistill.reconcile.serving import ModelObservations, compute_model_decision
from tests.support.djobs import distillation_job

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "examples" / "argocd"
HEALTH_KEY = "resource.customizations.health.kubedistill.io_{kind}"
NOW = "2026-01-01T00:00:00Z"
URI = "s3://bkt/models/faq"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ARGOCD / name).read_text()) if d]


# --------------------------------------------------------------------------- the Applications


def test_chart_application_installs_the_chart_with_schema_valid_values() -> None:
    [app] = _docs("kubedistill.yaml")
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    assert source["path"] == "charts/kubedistill" and (REPO / source["path"] / "Chart.yaml").exists()
    # Deleting the Application must not cascade to the CRDs (and every resource of the cluster).
    assert "resources-finalizer.argocd.argoproj.io" not in app["metadata"].get("finalizers", [])
    schema = json.loads((REPO / source["path"] / "values.schema.json").read_text())
    values = source["helm"]["valuesObject"]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(values)) == []
    OperatorSettings.model_validate(values["settings"])


def test_team_application_syncs_a_folder_into_the_team_namespace() -> None:
    [app] = _docs("team-distillations.yaml")
    assert app["kind"] == "Application"
    assert app["spec"]["source"]["directory"]["recurse"] is True
    assert app["spec"]["destination"]["namespace"] == "ml-team"


def test_readme_lists_every_file() -> None:
    readme = (ARGOCD / "README.md").read_text()
    for path in ARGOCD.glob("*.yaml"):
        assert f"]({path.name})" in readme, path.name
    assert "](argocd/README.md)" in (REPO / "examples" / "README.md").read_text()


# --------------------------------------------------------------------------- the health checks


def _script(kind: str) -> str:
    [config_map] = _docs("argocd-cm-health.yaml")
    assert (config_map["kind"], config_map["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    script: str = config_map["data"][HEALTH_KEY.format(kind=kind)]
    return script


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of Argo CD's health check of ``obj``."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD hands the object over as JSON: no Python types beyond dict, list, str, number, bool.
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    result = lua.execute(_script(kind))
    assert result["status"] in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
    return str(result["status"]), str(result["message"])


def _condition(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": NOW,
        "observedGeneration": 1,
    }


def job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    if status is not None:
        DistillationJobStatus.model_validate(status)  # the shape the operator writes
    body: dict[str, Any] = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "faq", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        body["status"] = status
    return body


def run_status(phase: str, succeeded: bool, failed: bool, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    conditions = [_condition("Succeeded", succeeded, reason, message), _condition("Failed", failed, reason, message)]
    return {"phase": phase, "observedGeneration": 1, "conditions": conditions, **extra}


def test_a_new_job_is_progressing() -> None:
    assert health("DistillationJob", job(None)) == ("Progressing", "Waiting for the kubedistill operator")


def test_a_running_job_is_progressing_with_its_stage() -> None:
    status = run_status("Training", False, False, "StageRunning", "the train stage is running")
    assert health("DistillationJob", job(status)) == ("Progressing", "Training: the train stage is running")


def test_a_succeeded_job_is_healthy() -> None:
    status = run_status(
        "Succeeded",
        True,
        False,
        "RunSucceeded",
        "every stage succeeded",
        evaluation={"teacherAgreement": 0.97, "passed": True},
        distilledModel="faq-bot",
    )
    state, message = health("DistillationJob", job(status))
    assert state == "Healthy"
    assert "0.97" in message and "faq-bot" in message


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("StageFailed", "train: CUDA out of memory"),
        ("QualityGateFailed", "teacher agreement 0.80 < 0.95"),
        ("InvalidSpec", "invalid spec: spec.student.model: must be an s3:// URI"),
    ],
)
def test_a_failed_job_is_degraded_and_says_why(reason: str, message: str) -> None:
    status = run_status("Failed", False, True, reason, message)
    assert health("DistillationJob", job(status)) == ("Degraded", f"Failed ({reason}): {message}")


def test_an_edited_job_is_progressing_until_the_operator_catches_up() -> None:
    status = run_status("Succeeded", True, False, "RunSucceeded", "every stage succeeded")
    state, message = health("DistillationJob", job(status, generation=2))
    assert state == "Progressing" and "generation 2" in message


def model(spec: dict[str, Any] | None = None, generation: int = 1) -> DistilledModel:
    return DistilledModel.model_validate(
        {
            "metadata": {"name": "faq", "namespace": "ml", "uid": "u1", "generation": generation},
            "spec": spec or {"model": {"uri": URI}},
        }
    )


def deployment(uri: str = URI, desired: int = 2, available: int = 2, total: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": "faq-vllm", "generation": 1},
        "spec": {
            "replicas": desired,
            "template": {
                "metadata": {"annotations": {names.ANNOTATION_MODEL_URI: uri, names.ANNOTATION_MODEL_DIGEST: ""}}
            },
        },
        "status": {
            "observedGeneration": 1,
            "replicas": total,
            "updatedReplicas": total,
            "availableReplicas": available,
            "readyReplicas": available,
        },
    }


def served(dm: DistilledModel, deploy: dict[str, Any] | None, **observations: Any) -> dict[str, Any]:
    """The DistilledModel with the status the operator computes from its Deployment."""
    decision = compute_model_decision(dm, OperatorSettings(), ModelObservations(deployment=deploy, **observations), NOW)
    body = dm.model_dump(by_alias=True, mode="json", exclude_none=True)
    body["status"] = decision.status.to_wire()
    return body


def with_status(dm: DistilledModel, body: dict[str, Any]) -> DistilledModel:
    return DistilledModel.model_validate({**dm.model_dump(by_alias=True, exclude_none=True), "status": body["status"]})


def test_model_health_follows_the_operator_status() -> None:
    dm = model({"model": {"uri": URI}, "serving": {"replicas": 2}})
    assert health("DistilledModel", {"metadata": {"generation": 1}, "spec": {}}) == (
        "Progressing",
        "Waiting for the kubedistill operator",
    )

    deploying = served(dm, None)
    assert deploying["status"]["phase"] == ModelPhase.DEPLOYING
    state, message = health("DistilledModel", deploying)
    assert state == "Progressing" and "rolling out" in message

    ready = served(dm, deployment())
    assert ready["status"]["phase"] == ModelPhase.READY
    assert health("DistilledModel", ready) == (
        "Healthy",
        "2/2 replicas available, serving at http://faq.ml.svc:8000/v1",
    )

    # A replica down after it served: Degraded, with the operator's reason.
    degraded = served(with_status(dm, ready), deployment(available=1))
    assert degraded["status"]["phase"] == ModelPhase.DEGRADED
    assert health("DistilledModel", degraded) == ("Degraded", "1/2 replicas available")

    # A new model rolling out while the old one serves: Progressing (the Deployment convention).
    rolling = served(with_status(model({"model": {"uri": "s3://bkt/models/faq-v2"}, "serving": {"replicas": 2}}),
                                 ready), deployment())  # fmt: skip
    assert rolling["status"]["phase"] == ModelPhase.READY
    state, message = health("DistilledModel", rolling)
    assert state == "Progressing" and "faq-v2" in message

    stopped = served(model({"model": {"uri": URI}, "serving": {"replicas": 0}}), deployment(desired=0))
    assert stopped["status"]["phase"] == ModelPhase.STOPPED
    assert health("DistilledModel", stopped) == ("Healthy", "scaled to zero replicas")


def test_a_model_whose_job_has_not_succeeded_is_progressing_and_one_whose_job_failed_is_degraded() -> None:
    follower = model({"fromJob": {"name": "faq"}})
    source = distillation_job("faq") | {"status": {"phase": "Training"}}
    pending = served(follower, None, source_job=source)
    assert pending["status"]["phase"] == ModelPhase.PENDING
    assert health("DistilledModel", pending) == ("Progressing", "Pending: DistillationJob faq is Training")

    failed = served(follower, None, source_job=source | {"status": {"phase": "Failed"}})
    assert failed["status"]["phase"] == ModelPhase.FAILED
    assert health("DistilledModel", failed) == ("Degraded", "DistillationJob faq failed")


def test_an_edited_model_is_progressing_until_the_operator_catches_up() -> None:
    ready = served(model(), deployment(desired=1, available=1, total=1))
    ready["metadata"]["generation"] = 2
    state, message = health("DistilledModel", ready)
    assert state == "Progressing" and "generation 2" in message
