"""The v1alpha1 models: defaults, wire format, status, conditions, and the same invalid
manifests the API server refuses (tests/support/api_cases.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubedistill.api import conditions as c
from kubedistill.api.conditions import ConditionStatus, JobPhase, ModelPhase, Reason
from kubedistill.api.v1alpha1 import (
    Condition,
    DistillationJob,
    DistillationJobStatus,
    DistilledModel,
    DistilledModelStatus,
    ModelArtifact,
    StagesStatus,
    StageStatus,
)
from kubedistill.reconcile.status import get_condition, is_true, set_condition
from tests.support.api_cases import INVALID, Invalid, valid_job, valid_model

MODELS = {"DistillationJob": DistillationJob, "DistilledModel": DistilledModel}


def test_at_least_twelve_distinct_invalid_manifests() -> None:
    assert len(INVALID) >= 12
    assert len({case.id for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case", INVALID, ids=lambda case: case.id)
def test_pydantic_refuses_invalid_manifest(case: Invalid) -> None:
    manifest = case.manifest()
    with pytest.raises(ValidationError) as raised:
        MODELS[manifest["kind"]].model_validate(manifest)
    text = str(raised.value)
    for expected in case.pydantic:
        assert expected in text, f"{expected!r} not in:\n{text}"


def test_valid_bases_are_valid() -> None:
    job = DistillationJob.model_validate(valid_job())
    model = DistilledModel.model_validate(valid_model())
    assert job.metadata.name == "demo" and model.metadata.name == "demo-model"


def test_job_defaults_and_wire_format_round_trip() -> None:
    job = DistillationJob.model_validate(valid_job())
    spec = job.spec
    assert spec.teacher.model_name == "big"
    assert spec.student.method == "lora" and spec.student.lora.rank == 16
    assert spec.evaluation.min_teacher_agreement == 0.95
    assert spec.resources.nodes == 1 and spec.resources.node_selector is None  # operator default applies
    wire = job.to_wire()
    assert wire["apiVersion"] == "kubedistill.io/v1alpha1" and wire["kind"] == "DistillationJob"
    assert wire["spec"]["teacher"]["endpoint"]["baseURL"] == "http://teacher.models.svc:8000/v1"
    assert "status" not in wire
    assert DistillationJob.model_validate(wire) == job


def test_metadata_keeps_fields_it_does_not_model() -> None:
    manifest = valid_job()
    manifest["metadata"].update({"namespace": "ml", "generation": 3, "finalizers": ["x"], "uid": "u-1"})
    job = DistillationJob.model_validate(manifest)
    assert job.metadata.generation == 3 and job.metadata.namespace == "ml"
    assert job.to_wire()["metadata"]["finalizers"] == ["x"]


def test_job_status_round_trip_from_api_server_shape() -> None:
    status = {
        "phase": "Evaluating",
        "observedGeneration": 2,
        "specHash": "abc123",
        "runId": "abc123",
        "teacher": "big",
        "student": "Qwen/Qwen2.5-0.5B-Instruct",
        "conditions": [
            {
                "type": "Generated",
                "status": "True",
                "reason": "ArtifactReused",
                "message": "dataset reused",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 2,
            }
        ],
        "stages": {
            "generate": {"job": "demo-generate", "phase": "Succeeded", "progress": 1.0},
            "train": {"job": "demo-train", "phase": "Succeeded", "startTime": "2026-01-02T03:04:05Z"},
            "evaluate": {"job": "demo-evaluate", "phase": "Running"},
        },
        "dataset": {"uri": "s3://artifacts/demo/datasets/k", "examples": 100, "digest": "d"},
        "model": {"uri": "s3://artifacts/demo/runs/abc123/model", "digest": "a" * 64},
        "evaluation": {"teacherAgreement": 0.97, "metrics": {"tokenF1": 0.97}, "passed": True},
        "distilledModel": "demo-student",
        "somethingANewerOperatorWrote": {"x": 1},  # ignored, not an error: status is ours to evolve
    }
    job = DistillationJob.model_validate({**valid_job(), "status": status})
    assert job.status is not None
    assert job.status.phase is JobPhase.EVALUATING
    assert job.status.stages and job.status.stages.train and job.status.stages.train.job == "demo-train"
    wire = job.to_wire()["status"]
    assert "somethingANewerOperatorWrote" not in wire
    assert wire == {k: v for k, v in status.items() if k != "somethingANewerOperatorWrote"} | {
        "stages": {
            "generate": {"job": "demo-generate", "phase": "Succeeded", "progress": 1.0},
            "train": {"job": "demo-train", "phase": "Succeeded", "startTime": "2026-01-02T03:04:05Z"},
            "evaluate": {"job": "demo-evaluate", "phase": "Running"},
        }
    }


def test_model_status_and_scale_fields() -> None:
    status = DistilledModelStatus(
        phase=ModelPhase.READY,
        endpoint="http://demo-model.ml.svc:8000/v1",
        served_model_name="demo-model",
        replicas=2,
        ready_replicas=2,
        selector="app.kubernetes.io/instance=demo-model",
        current_model=ModelArtifact(uri="s3://artifacts/demo/model"),
    )
    model = DistilledModel.model_validate({**valid_model(), "status": status.to_wire()})
    assert model.spec.serving.replicas == 1  # the scale subresource's specReplicasPath has a default
    assert model.status == status
    assert status.to_wire()["readyReplicas"] == 2


def test_model_from_job() -> None:
    manifest = valid_model()
    manifest["spec"] = {"fromJob": {"name": "demo"}, "baseModel": "s3://models/base"}
    model = DistilledModel.model_validate(manifest)
    assert model.spec.from_job is not None and model.spec.from_job.name == "demo"


def test_job_name_may_be_unset_for_generate_name() -> None:
    manifest = valid_job()
    manifest["metadata"] = {"generateName": "demo-"}
    assert DistillationJob.model_validate(manifest).metadata.name is None


def test_job_name_length_limit() -> None:
    with pytest.raises(ValidationError, match="at most 50 characters"):
        DistillationJob.model_validate(valid_job("a" * 51))
    DistillationJob.model_validate(valid_job("a" * 50))


# --------------------------------------------------------------------------- conditions


def _cond(status: str, reason: str = Reason.STAGE_RUNNING, at: str = "2026-01-01T00:00:00Z") -> Condition:
    return Condition(type=c.GENERATED, status=ConditionStatus(status), reason=reason, last_transition_time=at)


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    first = [_cond("False", at="2026-01-01T00:00:00Z")]
    same = set_condition(first, _cond("False", Reason.STAGE_PENDING, at="2026-01-01T01:00:00Z"))
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert same[0].reason == Reason.STAGE_PENDING
    flipped = set_condition(same, _cond("True", Reason.STAGE_SUCCEEDED, at="2026-01-01T02:00:00Z"))
    assert flipped[0].last_transition_time == "2026-01-01T02:00:00Z"
    assert first[0].reason == Reason.STAGE_RUNNING  # inputs are not mutated


def test_set_condition_appends_new_types_in_order() -> None:
    conditions = set_condition([], _cond("True"))
    failed = Condition(
        type=c.FAILED, status=ConditionStatus.TRUE, reason=Reason.INVALID_SPEC, last_transition_time=c.now_rfc3339()
    )
    conditions = set_condition(conditions, failed)
    assert [x.type for x in conditions] == [c.GENERATED, c.FAILED]
    assert is_true(conditions, c.FAILED) and not is_true(conditions, c.TRAINED)
    assert get_condition(conditions, c.TRAINED) is None


def test_set_condition_twice_is_a_no_op() -> None:
    once = set_condition([], _cond("True"))
    assert set_condition(once, _cond("True", at="2030-01-01T00:00:00Z")) == once


def test_condition_reason_must_be_camel_case() -> None:
    with pytest.raises(ValidationError):
        Condition(
            type="Ready", status=ConditionStatus.TRUE, reason="not a reason", last_transition_time=c.now_rfc3339()
        )


def test_now_is_rfc3339_whole_seconds() -> None:
    Condition(type="Ready", status=ConditionStatus.TRUE, reason="X", last_transition_time=c.now_rfc3339())
    assert c.now_rfc3339().endswith("Z") and len(c.now_rfc3339()) == 20


def test_phases_and_condition_sets() -> None:
    assert [p.value for p in JobPhase] == [
        "Pending",
        "Generating",
        "Training",
        "Evaluating",
        "Publishing",
        "Succeeded",
        "Failed",
    ]
    assert JobPhase.SUCCEEDED.terminal and JobPhase.FAILED.terminal and not JobPhase.TRAINING.terminal
    assert set(c.STAGE_CONDITIONS.values()) <= set(c.JOB_CONDITION_TYPES)
    assert set(c.MODEL_CONDITION_TYPES) == {"Ready", "Progressing", "Degraded", "Autoscaling", "Monitoring", "Routing"}
    reasons = [v for k, v in vars(Reason).items() if k.isupper()]
    assert len(reasons) == len(set(reasons))
    assert all(r[0].isupper() and r.isalnum() for r in reasons)


def test_status_defaults_are_empty() -> None:
    assert DistillationJobStatus().to_wire() == {"conditions": []}
    assert StagesStatus(train=StageStatus(job="x")).to_wire() == {"train": {"job": "x", "phase": "Pending"}}


# --------------------------------------------------------------------------- objectives


def _with(manifest: dict, **student: object) -> dict:
    manifest["spec"]["student"].update(student)
    return manifest


def test_objective_defaults_to_sft_and_its_settings_default_when_unset() -> None:
    student = DistillationJob.model_validate(valid_job()).spec.student
    assert student.objective == "sft" and student.kd is None and student.on_policy is None
    assert student.kd_settings.alpha == 0.5 and student.kd_settings.temperature == 1.0
    policy = student.on_policy_settings
    assert (policy.divergence, policy.top_k, policy.max_new_tokens, policy.temperature) == ("reverseKL", None, 256, 1.0)


def test_kd_with_teacher_logprobs_is_valid() -> None:
    manifest = _with(valid_job(), objective="kd", kd={"alpha": 0.7, "temperature": 2.0})
    manifest["spec"]["teacher"]["logprobs"] = 20
    student = DistillationJob.model_validate(manifest).spec.student
    assert student.objective == "kd" and student.kd_settings.alpha == 0.7 and student.kd_settings.temperature == 2.0


def test_on_policy_accepts_an_in_cluster_teacher_or_a_scoring_endpoint() -> None:
    scoring = _with(valid_job(), objective="onPolicy", onPolicy={"divergence": "forwardKL", "topK": 8})
    scoring["spec"]["teacher"]["endpoint"]["promptLogprobs"] = True
    policy = DistillationJob.model_validate(scoring).spec.student.on_policy_settings
    assert policy.divergence == "forwardKL" and policy.top_k == 8

    in_cluster = _with(valid_job(), objective="onPolicy")
    in_cluster["spec"]["teacher"] = {"vllm": {"model": "s3://models/big"}}
    assert DistillationJob.model_validate(in_cluster).spec.student.objective == "onPolicy"
