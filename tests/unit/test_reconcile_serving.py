"""DistilledModel decisions: source resolution, status from the Deployment, zero-downtime rollouts."""

from __future__ import annotations

from typing import Any

from kubedistill.api import conditions as c
from kubedistill.api.conditions import ModelPhase, Reason
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel
from kubedistill.builders import names
from kubedistill.reconcile.serving import ModelObservations, compute_model_decision
from kubedistill.reconcile.status import get_condition

SETTINGS = OperatorSettings()
NOW = "2026-01-01T00:00:00Z"
URI = "s3://bkt/models/faq"


def dm(status: dict[str, Any] | None = None, **spec: Any) -> DistilledModel:
    body: dict[str, Any] = {
        "metadata": {"name": "faq", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": spec or {"model": {"uri": URI}},
    }
    if status:
        body["status"] = status
    return DistilledModel.model_validate(body)


def deployment(uri: str = URI, replicas: int = 1, available: int = 1, updated: int = 1, total: int = 1,
               generation: int = 1, observed: int = 1) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": "faq-vllm", "generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"annotations": {names.ANNOTATION_MODEL_URI: uri, names.ANNOTATION_MODEL_DIGEST: ""}}
            },
        },
        "status": {
            "observedGeneration": observed,
            "replicas": total,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "readyReplicas": available,
        },
    }


def cond(status: Any, type_: str) -> Any:
    return get_condition(status.conditions, type_)


def test_first_deploy_then_ready() -> None:
    decision = compute_model_decision(dm(), SETTINGS, ModelObservations(deployment=None), NOW)
    assert {x["kind"] for x in decision.apply} >= {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"}
    assert decision.status.phase == ModelPhase.DEPLOYING
    assert decision.status.endpoint == "http://faq.ml.svc:8000/v1"
    assert cond(decision.status, c.PROGRESSING).status == "True"
    ready = compute_model_decision(
        dm(decision.status.to_wire()), SETTINGS, ModelObservations(deployment=deployment()), NOW
    )
    assert ready.status.phase == ModelPhase.READY
    assert cond(ready.status, c.READY).status == "True"
    assert cond(ready.status, c.PROGRESSING).status == "False"
    assert ready.status.current_model is not None and ready.status.current_model.uri == URI
    assert ready.status.ready_replicas == 1 and ready.status.replicas == 1
    assert Reason.ROLLOUT_COMPLETE in [e.reason for e in ready.events]


def test_rolling_to_a_new_model_keeps_serving_the_old_one() -> None:
    served = dm().model_copy()
    old = compute_model_decision(served, SETTINGS, ModelObservations(deployment=deployment()), NOW).status
    new = dm(old.to_wire(), model={"uri": "s3://bkt/models/faq-v2"})
    # The Deployment still shows the old template: rolling, not done; the old model still serves.
    decision = compute_model_decision(new, SETTINGS, ModelObservations(deployment=deployment()), NOW)
    assert decision.status.phase == ModelPhase.READY
    assert cond(decision.status, c.PROGRESSING).status == "True"
    assert decision.status.current_model is not None and decision.status.current_model.uri == URI
    surge = deployment("s3://bkt/models/faq-v2", available=1, updated=1, total=2, generation=2, observed=2)
    decision = compute_model_decision(new, SETTINGS, ModelObservations(deployment=surge), NOW)
    assert decision.status.current_model is not None and decision.status.current_model.uri == URI
    assert decision.keep_fetch_config is None
    done = deployment("s3://bkt/models/faq-v2", generation=2, observed=2)
    decision = compute_model_decision(new, SETTINGS, ModelObservations(deployment=done), NOW)
    assert decision.status.current_model is not None and decision.status.current_model.uri == "s3://bkt/models/faq-v2"
    fetch = next(x for x in decision.apply if x["kind"] == "ConfigMap")
    assert decision.keep_fetch_config == fetch["metadata"]["name"]


def test_lost_replicas_are_degraded() -> None:
    full = deployment(replicas=2, available=2, updated=2, total=2)
    ready = compute_model_decision(dm(), SETTINGS, ModelObservations(deployment=full), NOW)
    decision = compute_model_decision(
        dm(ready.status.to_wire()),
        SETTINGS,
        ModelObservations(deployment=deployment(replicas=2, available=1, updated=2, total=2)),
        NOW,
    )
    assert decision.status.phase == ModelPhase.DEGRADED
    assert cond(decision.status, c.DEGRADED).status == "True"
    assert cond(decision.status, c.READY).status == "False"


def test_scaled_to_zero_is_stopped() -> None:
    decision = compute_model_decision(
        dm(model={"uri": URI}, serving={"replicas": 0}),
        SETTINGS,
        ModelObservations(deployment=deployment(replicas=0, available=0, updated=0, total=0)),
        NOW,
    )
    assert decision.status.phase == ModelPhase.STOPPED


def _job(phase: str, model: dict[str, Any] | None) -> dict[str, Any]:
    from tests.support.djobs import distillation_job

    body = distillation_job("src")
    body["metadata"] |= {"namespace": "ml", "uid": "j1"}
    body["status"] = {"phase": phase, **({"model": model} if model else {})}
    return body


def test_from_job_waits_for_a_successful_run_and_uses_the_job_storage() -> None:
    follower = dm(fromJob={"name": "src"})
    missing = compute_model_decision(follower, SETTINGS, ModelObservations(deployment=None, source_job=None), NOW)
    assert missing.apply == [] and missing.status.phase == ModelPhase.PENDING
    assert cond(missing.status, c.READY).reason == Reason.SOURCE_NOT_FOUND
    running = compute_model_decision(
        follower, SETTINGS, ModelObservations(deployment=None, source_job=_job("Training", None)), NOW
    )
    assert running.apply == [] and cond(running.status, c.READY).reason == Reason.SOURCE_PENDING
    failed = compute_model_decision(
        follower, SETTINGS, ModelObservations(deployment=None, source_job=_job("Failed", None)), NOW
    )
    assert failed.status.phase == ModelPhase.FAILED
    done = compute_model_decision(
        follower, SETTINGS, ModelObservations(deployment=None, source_job=_job("Succeeded", {"uri": URI})), NOW
    )
    config_map = next(x for x in done.apply if x["kind"] == "ConfigMap")
    assert "http://s3.storage.svc:9000" in config_map["data"]["fetch.yaml"]


def test_from_job_rerunning_keeps_what_is_served() -> None:
    follower = dm(fromJob={"name": "src"})
    served = compute_model_decision(
        follower, SETTINGS, ModelObservations(deployment=deployment(), source_job=_job("Succeeded", {"uri": URI})), NOW
    )
    rerun = compute_model_decision(
        dm(served.status.to_wire(), fromJob={"name": "src"}),
        SETTINGS,
        ModelObservations(deployment=deployment(), source_job=_job("Training", None)),
        NOW,
    )
    assert rerun.apply == []
    assert rerun.status.phase == ModelPhase.READY
    assert rerun.status.current_model is not None and rerun.status.current_model.uri == URI


def test_switching_autoscaling_off_deletes_the_hpa() -> None:
    autoscaled = dm(model={"uri": URI}, serving={"autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
    on = compute_model_decision(autoscaled, SETTINGS, ModelObservations(deployment=None), NOW)
    applied = {x["kind"]: x for x in on.apply}
    assert "HorizontalPodAutoscaler" in applied and on.delete == []
    assert applied["Deployment"]["metadata"]["annotations"] == {names.ANNOTATION_AUTOSCALED: "true"}
    assert "replicas" not in applied["Deployment"]["spec"]  # the HPA owns replicas

    observed = deployment()
    observed["metadata"]["annotations"] = {names.ANNOTATION_AUTOSCALED: "true"}
    hpa = ("autoscaling/v2", "HorizontalPodAutoscaler", names.model_hpa_name("faq"))
    off = compute_model_decision(
        dm(model={"uri": URI}), SETTINGS, ModelObservations(deployment=observed, optional_children=(hpa,)), NOW
    )
    assert off.delete == [hpa]
    deployment_off = next(x for x in off.apply if x["kind"] == "Deployment")
    assert "annotations" not in deployment_off["metadata"] and deployment_off["spec"]["replicas"] == 1
    # Never autoscaled: nothing to delete.
    never = compute_model_decision(dm(), SETTINGS, ModelObservations(deployment=deployment()), NOW)
    assert never.delete == []
