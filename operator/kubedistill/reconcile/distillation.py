"""DistillationJob decisions: (the CR, what exists) -> what to create, delete, publish, and the new status.

Level-based: nothing here remembers anything between calls. The current run is the
stage keys of the spec (reconcile/keys.py); each stage is *done* when the status records
its result under the Job name of the current key, *running* when that Job exists and has
not finished, and *to start* when its upstream is done and its Job does not exist. So
calling this twice, or after an operator restart, or after a spec edit, always lands on
the same answer, and a stage whose key did not change is never started again.

A decision may ask for more observation first (``need_terminations``: the pods of a
finished Job, read once to get the worker's termination message; ``need_estimates``: the
pods of a running generate Job, for the teacher spend its init container projected;
``need_model``: whether the DistilledModel to publish exists and who published it). The
orchestrator fetches those and decides again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kubedistill.api import conditions as c
from kubedistill.api.conditions import JobPhase, Reason, StagePhase, parse_rfc3339
from kubedistill.api.savings import TeacherSpend, savings_line, spend_summary
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import (
    DIGEST_PATTERN,
    Condition,
    DatasetStatus,
    DistillationJob,
    DistillationJobStatus,
    EvaluationStatus,
    ModelArtifact,
    RunRecord,
    StagesStatus,
    StageStatus,
    TrainingStatus,
)
from kubedistill.api.worker_config import (
    EXIT_FAILED,
    TERMINATION_LOG,
    EvaluateResult,
    GenerateResult,
    StageProgress,
    TrainResult,
    format_duration,
)
from kubedistill.builders.plan import STAGES, RunPlan, Stage
from kubedistill.builders.progress import build_progress_children
from kubedistill.builders.publish import build_distilled_model
from kubedistill.builders.stages import StagePlan, build_stage_children, plan_stage
from kubedistill.reconcile.observe import RESULT_MODELS, ObservedJob, Termination, parse_failure, parse_result
from kubedistill.reconcile.status import (
    NORMAL,
    WARNING,
    EventSpec,
    apply_conditions,
    clip,
    condition,
    get_condition,
    is_true,
)

_DIGEST = re.compile(DIGEST_PATTERN)
STAGE_PHASE: dict[Stage, JobPhase] = {
    "generate": JobPhase.GENERATING,
    "train": JobPhase.TRAINING,
    "evaluate": JobPhase.EVALUATING,
}


@dataclass(frozen=True)
class ModelObservation:
    """The DistilledModel ``spec.output.model.name`` as found in the namespace."""

    exists: bool
    published_by: str | None = None


@dataclass(frozen=True)
class JobObservation:
    """What exists of one DistillationJob's children."""

    jobs: Mapping[str, ObservedJob]  # its stage Jobs (owned by it), by name
    terminations: Mapping[str, Termination | None] = field(default_factory=dict)  # fetched, by Job name
    estimates: Mapping[str, TeacherSpend | None] = field(default_factory=dict)  # projections, by generate Job name
    model: ModelObservation | None = None  # None: not looked up
    progress: Mapping[str, StageProgress] = field(default_factory=dict)  # the latest report of each stage
    progress_ready: bool = True  # False: the progress ConfigMap (and its writers' RBAC) is missing


@dataclass(frozen=True)
class StageFinished:
    """A stage whose Job this decision saw finish (once per Job): what metrics count."""

    stage: Stage
    phase: StagePhase  # Succeeded or Failed (a success without a result is Failed)
    seconds: float | None  # start to completion of the Job, where both are known
    result: BaseModel | None  # the worker's result, when it reported one
    gate_passed: bool | None = None  # evaluate: whether the student passed the quality gate


@dataclass
class JobDecision:
    """What to do now. Complete unless it asks for more observation first."""

    status: DistillationJobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    publish: dict[str, Any] | None = None
    events: list[EventSpec] = field(default_factory=list)
    need_terminations: list[str] = field(default_factory=list)
    need_estimates: list[str] = field(default_factory=list)
    need_model: bool = False
    finished: list[StageFinished] = field(default_factory=list)
    prune: list[str] = field(default_factory=list)  # finished Jobs beyond the history: delete with their children

    @property
    def complete(self) -> bool:
        return not self.need_terminations and not self.need_estimates and not self.need_model


@dataclass
class _Walk:
    """Accumulates one pass over the stages."""

    stages: dict[Stage, StageStatus | None] = field(default_factory=dict)
    conditions: list[Condition] = field(default_factory=list)
    dataset: DatasetStatus | None = None
    model: ModelArtifact | None = None
    training: TrainingStatus | None = None
    evaluation: EvaluationStatus | None = None
    adapter: bool = False
    blocked_at: Stage | None = None  # the first stage that is not done
    failure: tuple[str, str] | None = None  # (reason, message) of a run that stopped
    notes: list[tuple[Stage, EventSpec]] = field(default_factory=list)  # Events of a stage's new Job
    to_start: list[StagePlan] = field(default_factory=list)  # stages whose Job the walk decided to create
    teacher_spend: TeacherSpend | None = None


def _stage_summary(stage: Stage, status: StageStatus, walk: _Walk) -> str:
    if stage == "generate" and walk.dataset is not None:
        examples = "?" if walk.dataset.examples is None else walk.dataset.examples
        return f"dataset {walk.dataset.uri} ({examples} examples)"
    if stage == "train" and walk.model is not None:
        training = walk.training
        if training is not None and training.objective is not None and training.loss is not None:
            return f"model {walk.model.uri} ({training.objective}, final loss {training.loss:.4f})"
        return f"model {walk.model.uri}"
    if stage == "evaluate" and walk.evaluation is not None and walk.evaluation.teacher_agreement is not None:
        return walk.evaluation.summary or f"teacher agreement {walk.evaluation.teacher_agreement:.4f}"
    return f"Job {status.job} succeeded"


def _record_result(plan: RunPlan, result: BaseModel, walk: _Walk) -> None:
    """Fold a stage's result into the run's summaries."""
    if isinstance(result, GenerateResult):
        walk.dataset = DatasetStatus(
            uri=plan.dataset_uri,
            examples=result.examples,
            train_examples=result.train,
            eval_examples=result.eval,
            digest=result.digest,
        )
        walk.teacher_spend = _with_summary(result.spend) or walk.teacher_spend
    elif isinstance(result, TrainResult):
        digest = result.digest if _DIGEST.match(result.digest) else None
        walk.model = ModelArtifact(uri=plan.model_uri, digest=digest)
        walk.adapter = result.adapter
        walk.training = TrainingStatus(
            objective=result.objective,
            global_step=result.global_step,
            loss=result.losses.get("loss", result.train_loss),
            losses={k: v for k, v in result.losses.items() if k != "loss"} or None,
            teacher_tokens_scored=result.teacher_tokens_scored,
        )
    elif isinstance(result, EvaluateResult):
        evaluation = plan.job.spec.evaluation
        walk.evaluation = EvaluationStatus(
            teacher_agreement=result.teacher_agreement,
            metrics=dict(result.metrics),
            passed=evaluation.passes(result.teacher_agreement),
            examples=result.examples,
            report_uri=result.report_uri,
            speed=result.speed,
            summary=savings_line(result.teacher_agreement, evaluation.agreement_metric, result.speed),
        )


def _with_summary(spend: TeacherSpend | None) -> TeacherSpend | None:
    """The spend as the status shows it: with its one-phrase summary (the Spend column)."""
    return None if spend is None else spend.model_copy(update={"summary": spend_summary(spend)})


def _watch_spend(
    plan: RunPlan, name: str, job: ObservedJob, obs: JobObservation, decision: JobDecision, walk: _Walk
) -> None:
    """A running generate Job: its init container's projection, read once (a ready pod has run it)."""
    if job.phase != StagePhase.RUNNING or walk.teacher_spend is not None:
        return
    if name not in obs.estimates:
        decision.need_estimates.append(name)
        return
    # Recorded even when there is none (an older worker image), so the pods are read only once.
    walk.teacher_spend = _with_summary(obs.estimates[name]) or TeacherSpend(mode=plan.job.spec.teacher.mode)


def _carry_summaries(old: DistillationJobStatus, stage: Stage, walk: _Walk, plan: RunPlan) -> None:
    """A stage done earlier keeps the summary recorded when it finished."""
    if stage == "generate":
        walk.dataset = old.dataset or DatasetStatus(uri=plan.dataset_uri)
    elif stage == "train":
        walk.model = old.model or ModelArtifact(uri=plan.model_uri)
        walk.training = old.training
        walk.adapter = plan.job.spec.student.exports_adapter
    else:
        walk.evaluation = old.evaluation


def _walk_stages(
    dj: DistillationJob, plan: RunPlan, settings: OperatorSettings, obs: JobObservation, now: str, decision: JobDecision
) -> _Walk:
    """Each stage in order: where it stands, what it needs (a new Job, its pods' messages), its condition."""
    walker = _Walker(dj, plan, settings, obs, now, decision)
    for stage in STAGES:
        walker.step(stage)
    return walker.walk


class _Walker:
    """One walk over the stages of ``plan``: each stage is in exactly one of the states the methods name."""

    def __init__(
        self, dj: DistillationJob, plan: RunPlan, settings: OperatorSettings, obs: JobObservation, now: str,
        decision: JobDecision,
    ) -> None:  # fmt: skip
        self.old = dj.status or DistillationJobStatus()
        self.old_stages = self.old.stages or StagesStatus()
        self.plan, self.settings, self.obs, self.now, self.decision = plan, settings, obs, now, decision
        self.new_run = self.old.run_id != plan.run_id
        self.generation = dj.metadata.generation
        self.walk = _Walk()
        # The spend recorded for this generate Job (projected, spent, stopped at the budget) stays until replaced.
        if self.old_stages.generate is not None and self.old_stages.generate.job == plan.job_name("generate"):
            self.walk.teacher_spend = self.old.teacher_spend

    def cond(self, stage: Stage, ok: bool, reason: str, message: str) -> None:
        self.walk.conditions.append(
            condition(c.STAGE_CONDITIONS[stage], ok, reason, message, self.now, self.generation)
        )

    def step(self, stage: Stage) -> None:
        walk, name = self.walk, self.plan.job_name(stage)
        old_stage: StageStatus | None = getattr(self.old_stages, stage)
        prev = old_stage if old_stage is not None and old_stage.job == name else None
        job = self.obs.jobs.get(name)
        reset = Reason.SPEC_CHANGED if self.new_run and old_stage is not None and prev is None else None
        if walk.blocked_at is not None:
            walk.stages[stage] = None
            self.cond(stage, False, reset or Reason.STAGE_PENDING, f"waiting for the {walk.blocked_at} stage")
        elif prev is not None and prev.phase == StagePhase.SUCCEEDED:
            self.succeeded_before(stage, prev)
        else:
            walk.blocked_at = stage
            if prev is not None and prev.phase == StagePhase.FAILED and job is not None and job.finished:
                self.failed_before(stage, prev, name)
            elif job is None or job.deleting:
                self.start(stage, name, job, reset)
            elif job.phase in (StagePhase.PENDING, StagePhase.RUNNING):
                self.in_flight(stage, name, job, reset)
            elif name not in self.obs.terminations:
                self.decision.need_terminations.append(name)  # its pods' messages first
                walk.stages[stage] = prev or StageStatus(job=name, phase=StagePhase.RUNNING, start_time=job.start_time)
            elif job.phase == StagePhase.FAILED:
                self.failed(stage, name, job, self.obs.terminations[name])
            else:
                termination = self.obs.terminations[name]
                self.finished(stage, name, job, termination.message if termination else None)

    def succeeded_before(self, stage: Stage, prev: StageStatus) -> None:
        """Succeeded in an earlier reconcile (or run): its summaries carry over."""
        walk, old = self.walk, self.old
        walk.stages[stage] = prev
        _carry_summaries(old, stage, walk, self.plan)
        if stage == "evaluate" and walk.evaluation is not None and walk.evaluation.passed is False:
            walk.failure = (Reason.QUALITY_GATE_FAILED, _gate_message(self.plan, walk.evaluation))
            walk.blocked_at = stage
            self.cond(stage, False, Reason.QUALITY_GATE_FAILED, walk.failure[1])
            return
        existing = get_condition(old.conditions, c.STAGE_CONDITIONS[stage])
        if self.new_run and old.run_id is not None:
            summary = _stage_summary(stage, prev, walk)
            self.cond(stage, True, Reason.ARTIFACT_REUSED, f"reused from an earlier run: {summary}")
        elif existing is not None and existing.status == c.ConditionStatus.TRUE:
            self.cond(stage, True, existing.reason, existing.message)
        else:
            self.cond(stage, True, Reason.STAGE_SUCCEEDED, _stage_summary(stage, prev, self.walk))

    def failed_before(self, stage: Stage, prev: StageStatus, name: str) -> None:
        """Failed, and recorded already: no need to read the pods again."""
        self.walk.stages[stage] = prev
        message = prev.message or f"Job {name} failed"
        reason = prev.reason or Reason.STAGE_FAILED
        self.walk.failure = (reason, f"{stage} failed: {message}")
        self.cond(stage, False, reason, message)

    def start(self, stage: Stage, name: str, job: ObservedJob | None, reset: str | None) -> None:
        """No Job (never started, or someone deleted a failed one to retry): start it; or wait for a deletion."""
        if job is None:
            self.walk.to_start.append(plan_stage(self.plan, stage, self.settings))
            message = f"Job {name} is waiting for its pods"
        else:
            message = f"waiting for the old Job {name} to be deleted"
        self.walk.stages[stage] = StageStatus(job=name, phase=StagePhase.PENDING)
        self.cond(stage, False, reset or Reason.STAGE_PENDING, message)

    def in_flight(self, stage: Stage, name: str, job: ObservedJob, reset: str | None) -> None:
        status = StageStatus(job=name, phase=job.phase, start_time=job.start_time)
        self.walk.stages[stage] = _with_progress(status, self.obs.progress.get(stage))
        if stage == "generate":
            _watch_spend(self.plan, name, job, self.obs, self.decision, self.walk)
        if job.phase == StagePhase.RUNNING:
            self.cond(stage, False, Reason.STAGE_RUNNING, f"Job {name} is running")
        else:
            self.cond(stage, False, reset or Reason.STAGE_PENDING, f"Job {name} is waiting for its pods")

    def failed(self, stage: Stage, name: str, job: ObservedJob, termination: Termination | None) -> None:
        """Failed now: a group restarts from its checkpoint while restarts are left; otherwise the run fails."""
        walk, plan = self.walk, self.plan
        reported = termination.message if termination else None
        # A structured failure (BudgetExceeded) has its own reason and carries what was spent.
        stopped = parse_failure(reported)
        code = stopped.reason if stopped is not None else Reason.STAGE_FAILED
        if stopped is not None:
            reported = stopped.message
            walk.teacher_spend = _with_summary(stopped.spend) or walk.teacher_spend
        reason = clip(reported or job.message or f"Job {name} failed ({job.reason or 'unknown reason'})")
        if job.group and _restartable(termination):
            attempt, limit = plan.attempts.get(stage, 0), plan.job.spec.resources.max_restarts
            if attempt < limit:
                self.restart_group(stage, name, attempt, limit, reason)
                return
            reason = clip(f"{reason} (after {attempt} whole-group restarts: spec.resources.maxRestarts is {limit})")
        walk.stages[stage] = StageStatus(
            job=name, phase=StagePhase.FAILED, start_time=job.start_time,
            completion_time=job.completion_time, reason=code, message=reason,
        )  # fmt: skip
        walk.failure = (code, f"{stage} failed: {reason}")
        self.cond(stage, False, code, reason)
        self.decision.finished.append(_finished(stage, walk.stages[stage], None))

    def restart_group(self, stage: Stage, name: str, attempt: int, limit: int, reason: str) -> None:
        again = self.plan.with_attempt(stage, attempt + 1)
        self.walk.to_start.append(plan_stage(again, stage, self.settings))
        message = clip(
            f"restarting the whole group from the last checkpoint (restart {attempt + 1} of {limit}): "
            f"Job {name} failed: {reason}"
        )
        self.walk.stages[stage] = StageStatus(
            job=again.job_name(stage), phase=StagePhase.PENDING, restarts=attempt + 1, message=message
        )
        self.cond(stage, False, Reason.GROUP_RESTARTED, message)
        self.walk.notes.append((stage, EventSpec(WARNING, Reason.GROUP_RESTARTED, f"{stage}: {message}")))

    def finished(self, stage: Stage, name: str, job: ObservedJob, reported: str | None) -> None:
        """Succeeded: a stage proves it with its result, or the run fails."""
        walk, plan = self.walk, self.plan
        result = parse_result(stage, reported)
        done = StageStatus(
            job=name, phase=StagePhase.SUCCEEDED, start_time=job.start_time,
            completion_time=job.completion_time or self.now, progress=1.0,
        )  # fmt: skip
        if result is None:
            problem = clip(_missing_result_message(stage, name, reported))
            walk.stages[stage] = done.model_copy(
                update={"phase": StagePhase.FAILED, "reason": Reason.STAGE_RESULT_MISSING, "message": problem}
            )
            walk.failure = (Reason.STAGE_RESULT_MISSING, f"{stage} failed: {problem}")
            self.cond(stage, False, Reason.STAGE_RESULT_MISSING, problem)
            self.decision.finished.append(_finished(stage, walk.stages[stage], None))
            return
        walk.stages[stage] = done
        _record_result(plan, result, walk)
        passed = walk.evaluation.passed if stage == "evaluate" and walk.evaluation is not None else None
        self.decision.finished.append(_finished(stage, done, result, passed))
        if stage == "evaluate" and walk.evaluation is not None and walk.evaluation.passed is False:
            walk.failure = (Reason.QUALITY_GATE_FAILED, _gate_message(plan, walk.evaluation))
            self.cond(stage, False, Reason.QUALITY_GATE_FAILED, walk.failure[1])
            return
        walk.blocked_at = None
        self.cond(stage, True, Reason.STAGE_SUCCEEDED, _stage_summary(stage, done, walk))


def _with_progress(status: StageStatus, report: StageProgress | None) -> StageStatus:
    """A running stage's status with its pod's latest report (a report of another Job is stale: ignored)."""
    if report is None or report.job != status.job:
        return status
    return status.model_copy(
        update={
            "progress": report.fraction,
            "progress_message": clip(report.summary(), 256),
            "progress_time": report.updated_at,
        }
    )


def progress_line(
    stages: Mapping[Stage, StageStatus | None], blocked_at: Stage | None, reports: Mapping[str, StageProgress]
) -> str | None:
    """The Progress column: the stage in flight, its percentage and ETA ('train 41%, ETA 12m07s')."""
    status = stages.get(blocked_at) if blocked_at is not None else None
    if blocked_at is None or status is None or status.phase not in (StagePhase.PENDING, StagePhase.RUNNING):
        return None
    report = reports.get(blocked_at)
    if report is None or report.job != status.job:
        return f"{blocked_at} {status.phase.value.lower()}"
    line = blocked_at if report.fraction is None else f"{blocked_at} {report.fraction:.0%}"
    return line if report.eta_seconds is None else f"{line}, ETA {format_duration(report.eta_seconds)}"


def _restartable(termination: Termination | None) -> bool:
    """A rank lost to preemption, a node or a crash: worth a restart. A worker error (exit 1) is not."""
    return termination is None or termination.exit_code != EXIT_FAILED


def _current_attempts(plan: RunPlan, obs: JobObservation) -> RunPlan:
    """The plan with each stage's latest attempt as the Jobs show it (whole-group restarts)."""
    for stage in STAGES:
        key = plan.keys.of(stage)
        attempts = [j.attempt for j in obs.jobs.values() if j.stage == stage and j.key == key]
        if attempts and max(attempts) > 0:
            plan = plan.with_attempt(stage, max(attempts))
    return plan


def _finished(
    stage: Stage, status: StageStatus | None, result: BaseModel | None, gate_passed: bool | None = None
) -> StageFinished:
    assert status is not None
    seconds = None
    if status.start_time and status.completion_time:
        seconds = max(0.0, (parse_rfc3339(status.completion_time) - parse_rfc3339(status.start_time)).total_seconds())
    return StageFinished(stage, status.phase, seconds, result, gate_passed)


def _missing_result_message(stage: Stage, job_name: str, reported: str | None) -> str:
    model = RESULT_MODELS[stage]
    fields = ", ".join(f.alias or n for n, f in model.model_fields.items() if f.is_required())
    found = f"found {reported[:200]!r}" if reported else "found none"
    return (
        f"Job {job_name} exited 0 without a result: a {stage} worker writes its {model.__name__} as one line of "
        f"JSON ({fields}) to {TERMINATION_LOG}; {found}. Check that the stage image runs kubedistill-worker, "
        f"then delete Job {job_name} to run the stage again"
    )


def _count_restarts(plan: RunPlan, walk: _Walk) -> None:
    """A stage on its n-th whole-group restart says so in its status, whatever state the attempt is in."""
    for stage, status in walk.stages.items():
        attempt = plan.attempts.get(stage, 0)
        if status is not None and attempt and status.restarts is None and status.job == plan.job_name(stage):
            walk.stages[stage] = status.model_copy(update={"restarts": attempt})


def _gate_message(plan: RunPlan, evaluation: EvaluationStatus) -> str:
    gate = plan.job.spec.evaluation.min_teacher_agreement
    return (
        f"teacher agreement {evaluation.teacher_agreement:.4f} is below minTeacherAgreement {gate}: "
        "the student is not published; improve the data or training and edit the spec to run again"
    )


def compute_job_decision(
    dj: DistillationJob, plan: RunPlan, settings: OperatorSettings, obs: JobObservation, now: str
) -> JobDecision:
    """Everything to do for ``dj`` given what exists (``obs``), and its new status."""
    old = dj.status or DistillationJobStatus()
    new_run = old.run_id != plan.run_id
    generation = dj.metadata.generation
    decision = JobDecision(status=old)
    if not obs.progress_ready:
        decision.create.extend(build_progress_children(plan, settings))
    plan = _current_attempts(plan, obs)
    walk = _walk_stages(dj, plan, settings, obs, now, decision)
    _count_restarts(plan, walk)
    for stage_plan in walk.to_start:  # decided first; each stage's children built once, from its plan
        decision.create.extend(build_stage_children(stage_plan, settings))

    # Jobs of an older run that are still running are wasting GPUs: stop them.
    current = {plan.job_name(stage) for stage in STAGES}
    decision.delete_jobs = sorted(
        j.name for j in obs.jobs.values() if j.name not in current and not j.finished and not j.deleting
    )

    output = dj.spec.output.model
    published = False
    publish_condition: Condition
    if walk.failure is not None or walk.blocked_at is not None:
        publish_condition = condition(
            c.PUBLISHED, False, Reason.STAGE_PENDING, "waiting for a successful evaluation", now, generation
        )
    elif not output.serve:
        publish_condition = condition(
            c.PUBLISHED, False, Reason.PUBLISH_DISABLED, "spec.output.model.serve is false", now, generation
        )
        published = True
    elif not new_run and old.distilled_model == output.name and is_true(old.conditions, c.PUBLISHED):
        existing = get_condition(old.conditions, c.PUBLISHED)
        assert existing is not None
        publish_condition = existing
        published = True
    elif obs.model is None:
        decision.need_model = True
        publish_condition = condition(c.PUBLISHED, False, Reason.STAGE_PENDING, "publishing", now, generation)
    elif obs.model.exists and obs.model.published_by != plan.name:
        owner = (
            f"published by DistillationJob {obs.model.published_by}"
            if obs.model.published_by
            else "not published by a DistillationJob"
        )
        message = (
            f"DistilledModel {output.name} already exists ({owner}); choose another spec.output.model.name "
            "or delete that DistilledModel"
        )
        walk.failure = (Reason.MODEL_CONFLICT, message)
        publish_condition = condition(c.PUBLISHED, False, Reason.MODEL_CONFLICT, message, now, generation)
    else:
        assert walk.model is not None
        decision.publish = build_distilled_model(plan, walk.model, walk.adapter)
        publish_condition = condition(
            c.PUBLISHED, True, Reason.MODEL_PUBLISHED, f"DistilledModel {output.name} serves {walk.model.uri}",
            now, generation,
        )  # fmt: skip
        published = True

    if walk.failure is not None:
        phase = JobPhase.FAILED
    elif walk.blocked_at is not None:
        phase = STAGE_PHASE[walk.blocked_at]
    elif published:
        phase = JobPhase.SUCCEEDED
    else:
        phase = JobPhase.PUBLISHING

    run_conditions = _run_conditions(phase, walk, now, generation)
    conditions = apply_conditions(old.conditions, [*walk.conditions, publish_condition, *run_conditions])

    terminal = phase in (JobPhase.SUCCEEDED, JobPhase.FAILED)
    completion = None
    if terminal:
        completion = old.completion_time if (not new_run and old.phase == phase and old.completion_time) else now
    decision.status = DistillationJobStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conditions,
        spec_hash=plan.keys.spec,
        run_id=plan.run_id,
        start_time=old.start_time if (not new_run and old.start_time) else now,
        completion_time=completion,
        progress=progress_line(walk.stages, walk.blocked_at, obs.progress) if walk.failure is None else None,
        teacher=dj.spec.teacher.model_name,
        student=dj.spec.student.model,
        stages=StagesStatus(
            generate=walk.stages.get("generate"), train=walk.stages.get("train"), evaluate=walk.stages.get("evaluate")
        ),
        dataset=walk.dataset,
        model=walk.model,
        training=walk.training,
        evaluation=walk.evaluation,
        teacher_spend=walk.teacher_spend,
        distilled_model=output.name if (published and output.serve) else (old.distilled_model if not new_run else None),
    )
    decision.status.history, decision.prune = compute_history(
        decision.status, old.history or [], _current_jobs(plan, obs, decision), obs, settings.jobs.history_limit
    )
    decision.events = _events(old, decision.status, walk, new_run, plan)
    return decision


def _current_jobs(plan: RunPlan, obs: JobObservation, decision: JobDecision) -> set[str]:
    """Every Job of the current run: the stages' Jobs (reused ones too), their restarts, those created now."""
    keys = {(stage, plan.keys.of(stage)) for stage in STAGES}
    names = {j.name for j in obs.jobs.values() if (j.stage, j.key) in keys}
    names |= {c["metadata"]["name"] for c in decision.create if c["kind"] == "Job"}
    stages = decision.status.stages or StagesStatus()
    names |= {s.job for s in (stages.generate, stages.train, stages.evaluate) if s is not None and s.job}
    return names


def compute_history(
    status: DistillationJobStatus,
    old_history: list[RunRecord],
    current_jobs: set[str],
    obs: JobObservation,
    limit: int,
) -> tuple[list[RunRecord], list[str]]:
    """The runs to remember (current first, ``limit`` earlier ones, the latest success) and the Jobs to delete.

    A finished Job that no remembered run uses is deleted with its ConfigMap and Service; a Job
    still running is never (a superseded run's running Jobs are stopped elsewhere, and their
    records go once they finish).
    """
    assert status.run_id is not None
    current = RunRecord(
        run_id=status.run_id,
        phase=status.phase,
        start_time=status.start_time,
        completion_time=status.completion_time,
        jobs=sorted(current_jobs),
    )
    earlier = [r for r in old_history if r.run_id != current.run_id]
    kept = earlier[:limit]
    latest_success = next((r for r in earlier if r.phase == JobPhase.SUCCEEDED), None)
    if current.phase != JobPhase.SUCCEEDED and latest_success is not None and latest_success not in kept:
        kept.append(latest_success)
    history = [current, *kept]
    used = {name for record in history for name in record.jobs}
    prune = sorted(j.name for j in obs.jobs.values() if j.name not in used and j.finished and not j.deleting)
    return history, prune


def _run_conditions(phase: JobPhase, walk: _Walk, now: str, generation: int | None) -> list[Condition]:
    if phase == JobPhase.SUCCEEDED:
        reason, message = Reason.RUN_SUCCEEDED, "every stage succeeded"
    elif walk.failure is not None:
        reason, message = walk.failure
    else:
        stage = walk.blocked_at or "evaluate"
        state = walk.stages.get(stage) if walk.blocked_at else None
        running = state is not None and state.phase == StagePhase.RUNNING
        reason = Reason.STAGE_RUNNING if running else Reason.STAGE_PENDING
        message = f"the {stage} stage is {'running' if running else 'pending'}" if walk.blocked_at else "publishing"
    failed = phase == JobPhase.FAILED
    return [
        condition(c.SUCCEEDED, phase == JobPhase.SUCCEEDED, reason, message, now, generation),
        condition(c.FAILED, failed, reason, message, now, generation),
    ]


def _events(
    old: DistillationJobStatus, new: DistillationJobStatus, walk: _Walk, new_run: bool, plan: RunPlan
) -> list[EventSpec]:
    """One Event per transition between ``old`` and ``new`` status."""
    events: list[EventSpec] = []
    if new_run and old.run_id is not None:
        events.append(EventSpec(NORMAL, Reason.SPEC_CHANGED, f"the spec changed: run {plan.run_id} starts"))
    old_stages = old.stages or StagesStatus()
    new_stages = new.stages or StagesStatus()
    for stage, note in walk.notes:  # once: when the stage moves to its new Job
        before_job = getattr(old_stages, stage).job if getattr(old_stages, stage) is not None else None
        after_job = getattr(new_stages, stage).job if getattr(new_stages, stage) is not None else None
        if before_job != after_job:
            events.append(note)
    for stage in STAGES:
        before: StageStatus | None = getattr(old_stages, stage)
        after: StageStatus | None = getattr(new_stages, stage)
        if after is None:
            continue
        same_job = before is not None and before.job == after.job
        if same_job and before is not None and before.phase == after.phase:
            if new_run and after.phase == StagePhase.SUCCEEDED and old.run_id is not None:
                events.append(
                    EventSpec(NORMAL, Reason.ARTIFACT_REUSED, f"{stage}: {_stage_summary(stage, after, walk)} reused")
                )
            continue
        if after.phase == StagePhase.PENDING:
            if not same_job:
                events.append(EventSpec(NORMAL, Reason.STAGE_PENDING, f"{stage}: created Job {after.job}"))
        elif after.phase == StagePhase.RUNNING:
            events.append(EventSpec(NORMAL, Reason.STAGE_RUNNING, f"{stage}: Job {after.job} is running"))
        elif after.phase == StagePhase.SUCCEEDED:
            events.append(EventSpec(NORMAL, Reason.STAGE_SUCCEEDED, f"{stage}: {_stage_summary(stage, after, walk)}"))
        elif after.phase == StagePhase.FAILED:
            reason = after.reason or Reason.STAGE_FAILED
            events.append(EventSpec(WARNING, reason, f"{stage}: {after.message or 'failed'}"))
    if new.evaluation is not None and new.evaluation.passed is not None:
        before_passed = old.evaluation.passed if (old.evaluation is not None and not new_run) else None
        if before_passed != new.evaluation.passed:
            if new.evaluation.passed:
                agreement = new.evaluation.teacher_agreement or 0.0
                events.append(EventSpec(NORMAL, Reason.QUALITY_GATE_PASSED, f"teacher agreement {agreement:.4f}"))
            else:
                events.append(EventSpec(WARNING, Reason.QUALITY_GATE_FAILED, _gate_message(plan, new.evaluation)))
    published_before = is_true(old.conditions, c.PUBLISHED) and not new_run
    if is_true(new.conditions, c.PUBLISHED) and not published_before:
        condition_ = get_condition(new.conditions, c.PUBLISHED)
        events.append(EventSpec(NORMAL, Reason.MODEL_PUBLISHED, condition_.message if condition_ else "published"))
    if new.phase != old.phase or new_run:
        if new.phase == JobPhase.SUCCEEDED:
            events.append(EventSpec(NORMAL, Reason.RUN_SUCCEEDED, f"run {plan.run_id} succeeded"))
        elif new.phase == JobPhase.FAILED and walk.failure is not None:
            events.append(EventSpec(WARNING, Reason.RUN_FAILED, walk.failure[1]))
    return events
