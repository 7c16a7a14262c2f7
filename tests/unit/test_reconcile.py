"""Reconcile decisions as plain functions: a DistillationJob walked through every stage on paper.

`World` plays the cluster: it holds the Jobs that "exist" (as the API server returns them)
and the termination message each finished Job's pod left. Each `step` decides like the
operator does (deciding again when the decision asks for pod messages or the model), then
applies the decision: created Jobs appear, the status is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubedistill.api import conditions as c
from kubedistill.api.conditions import JobPhase, Reason, StagePhase
from kubedistill.api.savings import TeacherSpend
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistillationJob
from kubedistill.builders.plan import RunPlan
from kubedistill.reconcile.distillation import (
    JobDecision,
    JobObservation,
    ModelObservation,
    compute_job_decision,
)
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.reconcile.observe import (
    Termination,
    observe_job,
    parse_failure,
    parse_result,
    pick_estimate,
    pick_termination,
)
from kubedistill.reconcile.status import merge_patch
from tests.support.djobs import (
    PRICES,
    budget_exceeded,
    distillation_job,
    estimate_message,
    evaluate_result,
    generate_result,
    speed_comparison,
    train_result,
)
from tests.support.djobs import spend as spend_doc

SETTINGS = OperatorSettings()
NOW = "2026-01-01T00:00:00Z"


@dataclass
class World:
    manifest: dict[str, Any]
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, str | None] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    estimates: dict[str, TeacherSpend | None] = field(default_factory=dict)  # init container projections
    model: ModelObservation = field(default_factory=lambda: ModelObservation(exists=False))
    status: dict[str, Any] | None = None
    generation: int = 1
    fetched: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    settings: OperatorSettings = field(default_factory=lambda: SETTINGS)

    def dj(self) -> DistillationJob:
        body = copy.deepcopy(self.manifest)
        body["metadata"] |= {"namespace": "ml", "uid": "uid-1", "generation": self.generation}
        if self.status is not None:
            body["status"] = self.status
        return DistillationJob.model_validate(body)

    def plan(self) -> RunPlan:
        dj = self.dj()
        return RunPlan(job=dj, keys=compute_stage_keys(dj.spec))

    def step(self) -> JobDecision:
        dj = self.dj()
        plan = RunPlan(job=dj, keys=compute_stage_keys(dj.spec))
        observed = {name: observe_job(body) for name, body in self.jobs.items()}
        terminations: dict[str, Termination | None] = {}
        estimates: dict[str, TeacherSpend | None] = {}
        model = None
        for _ in range(4):
            obs = JobObservation(jobs=observed, terminations=terminations, estimates=estimates, model=model)
            decision = compute_job_decision(dj, plan, self.settings, obs, NOW)
            if decision.complete:
                break
            for name in decision.need_terminations:
                self.fetched.append(name)
                message = self.messages.get(name)
                code = self.exit_codes.get(name, 0)
                terminations[name] = Termination(pod=f"{name}-x", exit_code=code, reason=None, message=message)
            for name in decision.need_estimates:
                self.fetched.append(f"estimate:{name}")
                estimates[name] = self.estimates.get(name)
            if decision.need_model:
                model = self.model
        assert decision.complete
        for child in decision.create:
            if child["kind"] == "Job":
                self.created.append(child["metadata"]["name"])
                self.jobs.setdefault(child["metadata"]["name"], copy.deepcopy(child))
        for name in decision.delete_jobs:
            self.deleted.append(name)
            self.jobs.pop(name, None)
        for name in decision.prune:
            self.pruned.append(name)
            self.jobs.pop(name, None)
        if decision.publish:
            self.published.append(decision.publish)
        self.status = decision.status.to_wire()
        return decision

    def finish(self, stage: str, message: str | None, ok: bool = True, exit_code: int | None = None) -> str:
        name = self.current_job(stage)
        job = self.jobs[name]
        kind = "Complete" if ok else "Failed"
        job["status"] = {
            "startTime": NOW,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": NOW, "reason": "X", "message": "m"}],
        }
        if ok:
            job["status"]["completionTime"] = NOW
        self.messages[name] = message
        self.exit_codes[name] = (0 if ok else 1) if exit_code is None else exit_code
        return name

    def current_job(self, stage: str) -> str:
        """The Job the status names for ``stage`` (its latest attempt)."""
        assert self.status is not None
        return str(self.status["stages"][stage]["job"])

    def run_pods(self, stage: str) -> None:
        self.jobs[self.plan().job_name(stage)]["status"] = {"startTime": NOW, "active": 1, "ready": 1}  # type: ignore[arg-type]

    def condition(self, type_: str) -> dict[str, Any]:
        assert self.status is not None
        return next(x for x in self.status["conditions"] if x["type"] == type_)


def success_path(world: World, agreement: float = 0.97) -> None:
    world.step()
    world.finish("generate", generate_result())
    world.step()
    world.finish("train", train_result())
    world.step()
    world.finish("evaluate", evaluate_result(agreement))
    world.step()


def reasons(decision: JobDecision) -> list[str]:
    return [e.reason for e in decision.events]


def test_a_new_job_starts_generate_only() -> None:
    world = World(distillation_job("demo"))
    decision = world.step()
    assert [c["kind"] for c in decision.create] == ["ConfigMap", "Job"]
    assert world.created == [world.plan().job_name("generate")]
    assert world.status is not None
    assert world.status["phase"] == "Generating"
    assert world.status["stages"]["generate"] == {"job": world.created[0], "phase": "Pending"}
    assert "train" not in world.status["stages"]
    assert world.status["teacher"] == "big-teacher"
    assert world.status["runId"] == world.plan().keys.run
    assert world.condition("Generated")["status"] == "False"
    assert world.condition("Succeeded")["status"] == "False"
    assert reasons(decision) == [Reason.STAGE_PENDING]


def test_reconciling_twice_changes_nothing() -> None:
    world = World(distillation_job("demo"))
    world.step()
    before = copy.deepcopy(world.status)
    decision = world.step()
    assert decision.events == []
    assert merge_patch(before, decision.status.to_wire()) is None
    assert world.created == [world.plan().job_name("generate")]  # the second create is only a 409


def test_running_job_sets_stage_running_with_one_event() -> None:
    world = World(distillation_job("demo"))
    world.step()
    world.run_pods("generate")
    decision = world.step()
    assert world.status is not None and world.status["stages"]["generate"]["phase"] == "Running"
    assert reasons(decision) == [Reason.STAGE_RUNNING]
    assert world.condition("Generated")["reason"] == Reason.STAGE_RUNNING
    assert world.step().events == []


def test_full_run_to_published_model() -> None:
    world = World(distillation_job("demo", model_name="demo-bot"))
    world.step()
    generate = world.finish("generate", generate_result(100))
    decision = world.step()
    assert world.fetched == [generate]
    assert world.status is not None and world.status["phase"] == "Training"
    assert world.status["dataset"]["uri"] == world.plan().dataset_uri
    assert world.status["dataset"]["examples"] == 100
    assert Reason.STAGE_SUCCEEDED in reasons(decision)
    assert world.condition("Generated")["status"] == "True"
    world.finish("train", train_result())
    world.step()
    assert world.status["model"] == {"uri": world.plan().model_uri, "digest": "a" * 64}
    world.finish("evaluate", evaluate_result(0.97))
    decision = world.step()
    assert world.status["phase"] == "Succeeded"
    assert world.status["evaluation"]["teacherAgreement"] == 0.97 and world.status["evaluation"]["passed"] is True
    assert world.status["distilledModel"] == "demo-bot"
    assert [p["metadata"]["name"] for p in world.published] == ["demo-bot"]
    assert world.published[0]["spec"]["model"]["uri"] == world.plan().model_uri
    for type_ in ("Generated", "Trained", "Evaluated", "Published", "Succeeded"):
        assert world.condition(type_)["status"] == "True", type_
    assert world.condition("Failed")["status"] == "False"
    assert {Reason.QUALITY_GATE_PASSED, Reason.MODEL_PUBLISHED, Reason.RUN_SUCCEEDED} <= set(reasons(decision))
    assert world.status["completionTime"] == NOW
    # Settled: no more work, no re-publication, no pods read again.
    fetched = list(world.fetched)
    decision = world.step()
    assert decision.events == [] and decision.create == [] and decision.publish is None
    assert world.fetched == fetched and len(world.published) == 1


def test_every_job_is_created_once() -> None:
    world = World(distillation_job("demo"))
    success_path(world)
    plan = world.plan()
    assert world.created == [plan.job_name("generate"), plan.job_name("train"), plan.job_name("evaluate")]


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
def test_a_failed_stage_fails_the_run_with_the_worker_message(stage: str) -> None:
    world = World(distillation_job("demo"))
    world.step()
    for earlier, result in (("generate", generate_result()), ("train", train_result())):
        if earlier == stage:
            break
        world.finish(earlier, result)
        world.step()
    world.finish(stage, "teacher returned 401 Unauthorized: check the API key Secret", ok=False)
    decision = world.step()
    assert world.status is not None and world.status["phase"] == "Failed"
    assert world.status["stages"][stage]["message"] == "teacher returned 401 Unauthorized: check the API key Secret"
    failed = world.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == Reason.STAGE_FAILED
    assert "401 Unauthorized" in failed["message"]
    assert (c.STAGE_CONDITIONS[stage], "StageFailed") in [(x["type"], x["reason"]) for x in world.status["conditions"]]
    assert any(e.type == "Warning" and "401" in e.message for e in decision.events)
    assert world.published == []
    # Settled without reading the pods again.
    fetched = len(world.fetched)
    assert world.step().events == [] and len(world.fetched) == fetched


def test_failed_job_without_a_message_reports_the_job_condition() -> None:
    world = World(distillation_job("demo"))
    world.step()
    world.finish("generate", None, ok=False)
    world.step()
    assert world.condition("Failed")["message"] == "generate failed: m"


def test_gate_miss_fails_with_quality_gate_failed_and_publishes_nothing() -> None:
    world = World(distillation_job("demo", min_agreement=0.95))
    success_path(world, agreement=0.81)
    assert world.status is not None and world.status["phase"] == "Failed"
    failed = world.condition("Failed")
    assert failed["reason"] == Reason.QUALITY_GATE_FAILED
    assert "0.81" in failed["message"] and "0.95" in failed["message"]
    assert world.condition("Evaluated")["reason"] == Reason.QUALITY_GATE_FAILED
    assert world.status["evaluation"]["passed"] is False
    assert world.published == [] and "distilledModel" not in world.status
    assert world.step().events == []


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
@pytest.mark.parametrize("message", [None, "not json", '{"examples": "many"}'])
def test_a_stage_that_succeeds_without_its_result_fails_the_run(stage: str, message: str | None) -> None:
    """No silent success: the same rule for every stage, whatever is missing or unreadable."""
    world = World(distillation_job("demo"))
    results = {"generate": generate_result(), "train": train_result()}
    world.step()
    for upstream in ("generate", "train"):
        if upstream == stage:
            break
        world.finish(upstream, results[upstream])
        world.step()
    job = world.finish(stage, message)
    world.step()
    assert world.status is not None and world.status["phase"] == "Failed"
    failed = world.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == Reason.STAGE_RESULT_MISSING
    assert f"Job {job} exited 0 without a result" in failed["message"]
    assert "kubedistill-worker" in failed["message"] and f"delete Job {job}" in failed["message"]
    assert world.status["stages"][stage]["phase"] == "Failed"
    assert world.status["stages"][stage]["reason"] == Reason.STAGE_RESULT_MISSING
    assert world.published == []
    assert world.status.get("distilledModel") is None
    # Recorded once: later reconciles neither read the pods again nor repeat the Event.
    fetched = len(world.fetched)
    assert world.step().events == []
    assert len(world.fetched) == fetched and world.condition("Failed")["reason"] == Reason.STAGE_RESULT_MISSING
    # Deleting the Job runs the stage again.
    world.jobs.pop(job)
    world.step()
    assert job in world.created[-1:] and world.status["phase"] != "Failed"


def test_model_owned_by_someone_else_is_a_conflict() -> None:
    world = World(distillation_job("demo"), model=ModelObservation(exists=True, published_by=None))
    success_path(world)
    assert world.status is not None and world.status["phase"] == "Failed"
    assert world.condition("Failed")["reason"] == Reason.MODEL_CONFLICT
    assert world.published == []


def test_own_model_is_updated() -> None:
    world = World(distillation_job("demo"), model=ModelObservation(exists=True, published_by="demo"))
    success_path(world)
    assert world.status is not None and world.status["phase"] == "Succeeded" and len(world.published) == 1


def test_serve_false_succeeds_without_a_model() -> None:
    world = World(distillation_job("demo", serve=False))
    success_path(world)
    assert world.status is not None and world.status["phase"] == "Succeeded"
    assert world.condition("Published")["reason"] == Reason.PUBLISH_DISABLED
    assert world.published == []


def test_editing_epochs_starts_a_new_run_that_reuses_the_dataset() -> None:
    world = World(distillation_job("demo", epochs=1))
    success_path(world)
    old = world.plan()
    first_run = world.status["runId"] if world.status else None
    world.manifest = distillation_job("demo", epochs=2)
    world.generation = 2
    decision = world.step()
    new = world.plan()
    assert new.keys.generate == old.keys.generate
    assert new.keys.train != old.keys.train and new.keys.evaluate != old.keys.evaluate
    assert world.status is not None and world.status["runId"] != first_run
    assert world.status["phase"] == "Training"
    assert world.created[-1] == new.job_name("train")
    assert new.job_name("generate") not in world.created[3:]
    assert world.status["stages"]["generate"]["job"] == old.job_name("generate")
    assert world.status["dataset"]["uri"] == old.dataset_uri
    assert "model" not in world.status and "evaluation" not in world.status
    assert world.condition("Generated")["reason"] == Reason.ARTIFACT_REUSED
    assert world.condition("Trained")["status"] == "False"
    assert world.condition("Trained")["reason"] == Reason.SPEC_CHANGED
    assert world.status["observedGeneration"] == 2
    assert {Reason.SPEC_CHANGED, Reason.ARTIFACT_REUSED, Reason.STAGE_PENDING} <= set(reasons(decision))
    world.finish("train", train_result())
    world.step()
    world.finish("evaluate", evaluate_result())
    world.step()
    assert world.status["phase"] == "Succeeded"
    assert [n for n in world.created if "generate" in n] == [old.job_name("generate")]
    assert len(world.published) == 2


def test_a_spec_edit_stops_the_superseded_running_stage() -> None:
    world = World(distillation_job("demo", epochs=1))
    world.step()
    world.finish("generate", generate_result())
    world.step()
    world.run_pods("train")
    old_train = world.plan().job_name("train")
    world.manifest = distillation_job("demo", epochs=5)
    world.step()
    assert world.deleted == [old_train]
    assert world.created[-1] == world.plan().job_name("train") != old_train


def test_deleting_a_failed_job_retries_the_stage() -> None:
    world = World(distillation_job("demo"))
    world.step()
    name = world.finish("generate", "teacher down", ok=False)
    world.step()
    del world.jobs[name]
    world.step()
    assert world.status is not None and world.status["phase"] == "Generating"
    assert world.created == [name, name]
    assert world.condition("Failed")["status"] == "False"


def test_keys_ignore_operational_knobs_and_defaults() -> None:
    base = DistillationJob.model_validate(distillation_job("demo")).spec
    keys = compute_stage_keys(base)
    tuned = distillation_job("demo", api_key_secret="other")
    tuned["spec"]["teacher"]["endpoint"] |= {"maxConcurrency": 512, "requestsPerMinute": 100, "timeoutSeconds": 5}
    tuned["spec"]["storage"]["credentialsSecretRef"] = {"name": "s3"}
    tuned["spec"]["student"]["training"] = {"epochs": 3.0}  # the default, spelled out
    assert compute_stage_keys(DistillationJob.model_validate(tuned).spec).run == keys.run
    hotter = distillation_job("demo")
    hotter["spec"]["teacher"]["sampling"]["temperature"] = 0.7
    assert compute_stage_keys(DistillationJob.model_validate(hotter).spec).generate != keys.generate
    bigger = distillation_job("demo", nodes=2)
    changed = compute_stage_keys(DistillationJob.model_validate(bigger).spec)
    assert changed.generate == keys.generate and changed.train != keys.train


def test_publish_settings_change_the_run_only() -> None:
    base = compute_stage_keys(DistillationJob.model_validate(distillation_job("demo")).spec)
    other = compute_stage_keys(DistillationJob.model_validate(distillation_job("demo", model_name="x")).spec)
    assert (other.generate, other.train, other.evaluate) == (base.generate, base.train, base.evaluate)
    assert other.run != base.run


# --------------------------------------------------------------------------- observation


def _job(conditions: list[dict[str, str]] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "j",
            "uid": "u",
            "labels": {"kubedistill.io/stage": "train", "kubedistill.io/stage-key": "k"},
            "ownerReferences": [{"uid": "owner", "controller": True}],
        },
        "status": {"conditions": conditions or [], **status},
    }


def test_observe_job_phases() -> None:
    assert observe_job(_job()).phase == StagePhase.PENDING
    assert observe_job(_job(active=1, ready=0)).phase == StagePhase.PENDING
    assert observe_job(_job(active=1, ready=1)).phase == StagePhase.RUNNING
    done = observe_job(_job([{"type": "Complete", "status": "True"}], completionTime=NOW))
    assert done.phase == StagePhase.SUCCEEDED and done.completion_time == NOW
    failed = observe_job(_job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "x"}]))
    assert (failed.phase, failed.reason, failed.message) == (StagePhase.FAILED, "PodFailurePolicy", "x")
    assert failed.owner_uid == "owner" and failed.stage == "train" and failed.key == "k"
    # FailureTarget/SuccessCriteriaMet come before the terminal conditions: not final yet.
    assert observe_job(_job([{"type": "FailureTarget", "status": "True"}], ready=1)).phase == StagePhase.RUNNING


def _pod(phase: str, message: str | None, index: str = "0", finished: str = NOW, code: int = 0) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": code, "finishedAt": finished}
    if message is not None:
        terminated["message"] = message
    return {
        "metadata": {"name": f"p{index}{finished}", "annotations": {"batch.kubernetes.io/job-completion-index": index}},
        "status": {"phase": phase, "containerStatuses": [{"name": "worker", "state": {"terminated": terminated}}]},
    }


def test_pick_termination() -> None:
    assert pick_termination([], succeeded=True) is None
    ok = pick_termination([_pod("Succeeded", "b", index="1"), _pod("Succeeded", "a")], succeeded=True)
    assert ok is not None and ok.message == "a"
    failed = pick_termination(
        [
            _pod("Failed", "first", finished="2026-01-01T00:00:00Z", code=2),
            _pod("Failed", "second", finished="2026-01-01T00:01:00Z", code=1),
            _pod("Failed", None, finished="2026-01-01T00:02:00Z", code=137),
            _pod("Succeeded", "nope"),
        ],
        succeeded=False,
    )
    assert failed is not None and failed.message == "second" and failed.exit_code == 1


def test_the_estimate_and_a_failed_init_container_are_read_from_the_pods() -> None:
    def pod(state: dict[str, Any], worker: dict[str, Any] | None = None) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": "Running", "initContainerStatuses": [{"name": "estimate", "state": state}]}
        status["containerStatuses"] = [{"name": "worker", "state": worker or {"running": {}}}]
        return {"metadata": {"name": "p"}, "status": status}

    done = {"terminated": {"exitCode": 0, "message": estimate_message(cost=0.5)}}
    spend = pick_estimate([pod({"running": {}}), pod(done)])
    assert spend is not None and spend.projected is not None and spend.projected.cost == 0.5
    assert pick_estimate([pod({"terminated": {"exitCode": 0, "message": "not json"}})]) is None
    crashed = pod({"terminated": {"exitCode": 1, "message": "cannot read prompts: NoSuchKey"}}, {"waiting": {}})
    crashed["status"]["phase"] = "Failed"
    termination = pick_termination([crashed], succeeded=False)
    assert termination is not None and (termination.exit_code, termination.message) == (
        1,
        "cannot read prompts: NoSuchKey",
    )


def test_parse_failure() -> None:
    failure = parse_failure(budget_exceeded(100))
    assert failure is not None and failure.reason == "BudgetExceeded" and failure.spend is not None
    assert parse_failure("plain reason") is None and parse_failure('{"reason": "Other", "message": "x"}') is None
    assert parse_failure(None) is None


def test_parse_result() -> None:
    assert parse_result("evaluate", evaluate_result(0.5)).teacher_agreement == 0.5  # type: ignore[union-attr]
    assert parse_result("evaluate", "oops") is None
    assert parse_result("evaluate", '{"teacherAgreement": 2}') is None
    assert parse_result("train", None) is None


def test_merge_patch() -> None:
    assert merge_patch({"a": 1}, {"a": 1}) is None
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 2, "b": {"c": 1}}) == {"a": 2, "b": {"d": None}}
    assert merge_patch(None, {"x": [1]}) == {"x": [1]}
    assert merge_patch({"x": [1], "y": 1}, {"x": [2]}) == {"x": [2], "y": None}


def test_phase_enum_is_written_as_a_string() -> None:
    world = World(distillation_job("demo"))
    world.step()
    assert world.status is not None and world.status["phase"] == JobPhase.GENERATING.value


# --------------------------------------------------------------------------- whole-group restarts


def two_node_world(max_restarts: int | None = None) -> World:
    manifest = distillation_job("group", nodes=2)
    if max_restarts is not None:
        manifest["spec"]["resources"]["maxRestarts"] = max_restarts
    world = World(manifest)
    world.step()
    world.finish("generate", generate_result())
    world.step()
    return world


def test_a_lost_rank_restarts_the_whole_group_from_the_checkpoint() -> None:
    world = two_node_world()
    first = world.current_job("train")
    assert world.jobs[first]["spec"]["completions"] == 2 and world.jobs[first]["spec"]["backoffLimit"] == 0
    world.finish("train", "CUDA error: an illegal memory access", ok=False, exit_code=137)
    decision = world.step()

    second = world.current_job("train")
    assert second == f"{first}-r1" and world.created[-1] == second
    kinds = [(c["kind"], c["metadata"]["name"]) for c in decision.create]
    assert kinds == [("ConfigMap", second), ("Service", second), ("Job", second)]
    assert world.jobs[second]["metadata"]["labels"]["kubedistill.io/attempt"] == "1"
    service = next(c for c in decision.create if c["kind"] == "Service")
    assert service["spec"]["selector"]["kubedistill.io/attempt"] == "1"  # rendezvous among the new pods only
    config = next(c for c in decision.create if c["kind"] == "ConfigMap")
    assert world.plan().checkpoint_uri in config["data"]["train.yaml"]  # the same checkpoints: resume, not redo
    train = world.status["stages"]["train"]  # type: ignore[index]
    assert (train["phase"], train["restarts"]) == ("Pending", 1)
    condition = world.condition("Trained")
    assert condition["reason"] == Reason.GROUP_RESTARTED and "restart 1 of 3" in condition["message"]
    assert "illegal memory access" in condition["message"]
    assert [e.reason for e in decision.events].count(Reason.GROUP_RESTARTED) == 1
    assert world.step().events == []  # said once

    world.run_pods("train")
    world.step()
    assert world.status["stages"]["train"]["restarts"] == 1  # type: ignore[index]
    world.finish("train", train_result())
    world.step()
    world.finish("evaluate", evaluate_result())
    world.step()
    assert world.status["phase"] == "Succeeded"  # type: ignore[index]
    assert world.status["stages"]["train"]["restarts"] == 1  # type: ignore[index]


def test_a_worker_error_is_not_restarted() -> None:
    world = two_node_world()
    world.finish("train", "dataset has no train split", ok=False, exit_code=1)
    world.step()
    assert world.status["phase"] == "Failed"  # type: ignore[index]
    assert world.condition("Failed")["reason"] == Reason.STAGE_FAILED
    assert len([n for n in world.created if "-train-" in n]) == 1


def test_the_restart_limit_ends_the_run_and_says_which_setting() -> None:
    world = two_node_world(max_restarts=1)
    world.finish("train", "preempted", ok=False, exit_code=143)
    world.step()
    world.finish("train", "node lost", ok=False, exit_code=137)
    world.step()
    assert world.status["phase"] == "Failed"  # type: ignore[index]
    failed = world.condition("Failed")
    assert "node lost" in failed["message"] and "spec.resources.maxRestarts is 1" in failed["message"]
    assert world.status["stages"]["train"]["restarts"] == 1  # type: ignore[index]
    assert len([n for n in world.created if "-train-" in n]) == 2


def test_a_single_node_stage_is_left_to_the_job_controller() -> None:
    world = World(distillation_job("single"))
    world.step()
    world.finish("generate", generate_result())
    world.step()
    job = world.jobs[world.current_job("train")]
    assert job["spec"]["backoffLimit"] == SETTINGS.jobs.backoff_limit
    world.finish("train", "OOM", ok=False, exit_code=137)
    world.step()
    assert world.status["phase"] == "Failed"  # type: ignore[index]


# --------------------------------------------------------------------------- bounded history


def edit(world: World, epochs: int) -> None:
    world.manifest = distillation_job("hist", epochs=epochs)
    world.generation += 1
    world.step()


def finish_run(world: World, agreement: float) -> None:
    world.finish("train", train_result())
    world.step()
    world.finish("evaluate", evaluate_result(agreement))
    world.step()


def test_history_keeps_the_latest_runs_and_the_latest_success_and_deletes_the_rest() -> None:
    world = World(
        distillation_job("hist", epochs=1), settings=OperatorSettings.model_validate({"jobs": {"historyLimit": 1}})
    )
    success_path(world)  # run 1 succeeds: g1 t1 e1
    run1 = world.status["history"][0]  # type: ignore[index]
    assert (run1["phase"], len(run1["jobs"])) == ("Succeeded", 3)
    generate_job = world.current_job("generate")

    edit(world, 2)  # run 2 reuses g1, fails the gate
    finish_run(world, 0.5)
    run2_jobs = set(world.status["history"][0]["jobs"])  # type: ignore[index]
    assert generate_job in run2_jobs and world.status["phase"] == "Failed"  # type: ignore[index]
    edit(world, 3)  # run 3: run 2 is the one earlier run the limit keeps, run 1 the latest success
    finish_run(world, 0.5)
    assert world.pruned == []
    assert [r["phase"] for r in world.status["history"]] == ["Failed", "Failed", "Succeeded"]  # type: ignore[index]

    edit(world, 4)  # run 4: run 3 is kept, run 1 (latest success) is kept, run 2 goes
    assert sorted(world.pruned) == sorted(run2_jobs - {generate_job})  # g1 is still used by every run
    history = world.status["history"]  # type: ignore[index]
    assert [r["runId"] for r in history][2] == run1["runId"] and len(history) == 3
    assert all(name in world.jobs for record in history for name in record["jobs"] if name in world.created)
    pruned = len(world.pruned)
    world.step()
    assert len(world.pruned) == pruned  # level-based: nothing more to delete


def test_a_running_job_is_never_pruned() -> None:
    world = World(
        distillation_job("hist", epochs=1), settings=OperatorSettings.model_validate({"jobs": {"historyLimit": 0}})
    )
    world.step()
    world.finish("generate", generate_result())
    world.step()
    world.run_pods("train")
    world.step()
    edit(world, 2)  # the old train Job is superseded while it runs: stopped (deleted), not pruned
    assert world.deleted and not world.pruned


def test_status_says_which_objective_trained_and_its_final_losses() -> None:
    world = World(distillation_job("demo"))
    world.step()
    world.finish("generate", generate_result())
    world.step()
    world.finish("train", train_result(objective="kd", losses={"ce": 0.4, "kl": 0.6}))
    world.step()
    assert world.status is not None
    training = {"objective": "kd", "globalStep": 42, "loss": 0.5, "losses": {"ce": 0.4, "kl": 0.6}}
    assert world.status["training"] == training
    assert "(kd, final loss 0.5000)" in world.condition("Trained")["message"]
    world.finish("evaluate", evaluate_result())
    world.step()
    assert world.status["phase"] == "Succeeded"
    assert world.status["training"]["objective"] == "kd"  # kept once the run moved on


# --------------------------------------------------------------------------- spend, budget, savings


def test_the_projection_shows_while_generate_runs_then_the_spend_replaces_it() -> None:
    world = World(distillation_job("demo", pricing=PRICES, budget={"maxCost": 1.0}))
    world.step()
    name = world.plan().job_name("generate")
    world.estimates[name] = TeacherSpend.model_validate_json(estimate_message(cost=0.21))
    world.run_pods("generate")
    world.step()
    assert world.fetched == [f"estimate:{name}"]
    spend = world.status["teacherSpend"]
    assert spend["projected"]["cost"] == 0.21 and spend["summary"] == "~$0.21 projected"
    world.step()
    assert world.fetched == [f"estimate:{name}"]  # read once
    world.finish("generate", generate_result(spent=spend_doc(cost=0.1234, budget={"maxCost": 1.0})))
    world.step()
    spend = world.status["teacherSpend"]
    assert spend["spent"]["cost"] == 0.1234 and spend["budget"]["state"] == "Within"
    assert spend["summary"] == "$0.12 of $1.00"
    world.finish("train", train_result())
    world.step()
    assert world.status["teacherSpend"]["summary"] == "$0.12 of $1.00"  # kept with the generate stage


def test_a_running_generate_without_a_projection_reads_its_pods_once() -> None:
    world = World(distillation_job("demo"))
    world.step()
    world.run_pods("generate")
    world.step()
    world.step()
    assert world.fetched == [f"estimate:{world.plan().job_name('generate')}"]
    assert world.status["teacherSpend"] == {"mode": "online"}


def test_budget_exceeded_fails_the_run_saying_what_was_spent_and_what_to_raise() -> None:
    world = World(distillation_job("demo", budget={"maxTokens": 5000}))
    world.step()
    world.finish("generate", budget_exceeded(5000), ok=False)
    decision = world.step()
    assert world.status["phase"] == "Failed"
    failed = world.condition("Failed")
    assert failed["reason"] == Reason.BUDGET_EXCEEDED == "BudgetExceeded"
    assert (
        "4,920 tokens" in failed["message"]
        and "raise spec.teacher.budget.maxTokens to at least 15,694" in (failed["message"])
    )
    assert not failed["message"].startswith("generate failed: {")  # the message, not the JSON
    assert world.condition("Generated")["reason"] == "BudgetExceeded"
    assert world.status["stages"]["generate"]["reason"] == "BudgetExceeded"
    spend = world.status["teacherSpend"]
    assert spend["budget"] == {"maxTokens": 5000, "state": "Exceeded", "remainingAnswers": 59}
    assert spend["spent"]["requests"] == 41 and spend["summary"] == "$0.0301, 4,920 of 5,000 tokens"
    assert [e.reason for e in decision.events if e.type == "Warning"] == ["BudgetExceeded", Reason.RUN_FAILED]
    fetched = len(world.fetched)
    world.step()
    assert len(world.fetched) == fetched and world.status["teacherSpend"] == spend  # recorded, kept

    # Raising the budget starts a new generate Job (it asks only for the rest); nothing else changes.
    plan = world.plan()
    world.manifest["spec"]["teacher"]["budget"]["maxTokens"] = 20000
    world.generation = 2
    world.step()
    raised = world.plan()
    assert raised.job_name("generate") != plan.job_name("generate") and raised.dataset_uri == plan.dataset_uri
    assert raised.job_name("train") == plan.job_name("train") and raised.run_id == plan.run_id
    assert world.status["phase"] == "Generating" and world.created[-1] == raised.job_name("generate")
    assert "teacherSpend" not in world.status  # this Job's spend is yet to come


def test_the_evaluation_says_what_the_student_keeps_and_saves() -> None:
    world = World(distillation_job("demo"))
    world.step()
    world.finish("generate", generate_result())
    world.step()
    world.finish("train", train_result())
    world.step()
    world.finish("evaluate", evaluate_result(0.97, speed=speed_comparison(11.2, 14.3)))
    decision = world.step()
    evaluation = world.status["evaluation"]
    line = "keeps 97% of the teacher's tokenF1, 11\u00d7 faster, 14\u00d7 cheaper per 1M answers"
    assert evaluation["summary"] == line
    assert (evaluation["speed"]["speedup"], evaluation["speed"]["costRatio"]) == (11.2, 14.3)
    assert world.condition("Evaluated")["message"] == line
    assert any(e.reason == Reason.STAGE_SUCCEEDED and line in e.message for e in decision.events)


def test_a_started_stage_is_planned_once_and_built_from_that_plan(monkeypatch) -> None:
    """Decide first, build once: the walk decides which stages start; each one's placement is
    computed once, and its ConfigMap, rendezvous Service and Job are all built from it."""
    from kubedistill.builders import stages

    planned: list[str] = []
    real = stages.stage_placement

    def counting(plan: RunPlan, stage: str, settings: OperatorSettings) -> stages.Placement:
        planned.append(stage)
        return real(plan, stage, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(stages, "stage_placement", counting)
    world = World(distillation_job("group", nodes=2))
    world.step()
    world.finish("generate", generate_result())
    planned.clear()
    decision = world.step()
    assert planned == ["train"]
    assert [c["kind"] for c in decision.create] == ["ConfigMap", "Service", "Job"]
