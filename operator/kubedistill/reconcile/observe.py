"""What the operator reads back from the cluster, reduced to what decisions need.

Pure functions over the plain dicts the API server returns: a stage Job becomes an
``ObservedJob`` (its phase in our vocabulary), its pods a ``Termination`` (the worker's
exit code and one-line termination message), and that message a stage result
(GenerateResult / TrainResult / EvaluateResult, the worker contract).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from kubedistill.api.conditions import StagePhase
from kubedistill.api.savings import TeacherSpend
from kubedistill.api.worker_config import EvaluateResult, GenerateResult, StageFailure, StageProgress, TrainResult
from kubedistill.builders import names

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RESULT_MODELS: dict[str, type[BaseModel]] = {
    "generate": GenerateResult,
    "train": TrainResult,
    "evaluate": EvaluateResult,
}


@dataclass(frozen=True)
class ObservedJob:
    """A stage Job as the decisions see it."""

    name: str
    uid: str
    owner_uid: str | None
    stage: str | None
    key: str | None
    phase: StagePhase
    attempt: int = 0  # whole-group restarts before this Job (multi-node training)
    group: bool = False  # several pods that stand or fall together (an Indexed Job of a multi-node stage)
    start_time: str | None = None
    completion_time: str | None = None
    reason: str | None = None  # of the Failed condition: BackoffLimitExceeded, PodFailurePolicy, ...
    message: str | None = None  # of the Failed condition
    deleting: bool = False

    @property
    def finished(self) -> bool:
        return self.phase in (StagePhase.SUCCEEDED, StagePhase.FAILED)


@dataclass(frozen=True)
class Termination:
    """How the worker container of a finished pod ended."""

    pod: str
    exit_code: int | None
    reason: str | None
    message: str | None


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    status = obj.get("status") or {}
    return {c.get("type", ""): c for c in status.get("conditions") or [] if c.get("status") == "True"}


def compact_job(body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Job worth keeping in memory (an operator may watch thousands)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    keep_status = ("conditions", "startTime", "completionTime", "active", "ready", "succeeded", "failed")
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": list(meta.get("ownerReferences") or []),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"completions": (body.get("spec") or {}).get("completions")},
        "status": {k: status[k] for k in keep_status if k in status},
    }


def observe_job(body: Mapping[str, Any]) -> ObservedJob:
    """A Job's phase: Succeeded/Failed from its terminal condition, Running once a pod is ready."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    labels = meta.get("labels") or {}
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    conditions = _conditions(body)
    reason = message = completion = None
    if "Complete" in conditions:
        phase = StagePhase.SUCCEEDED
        completion = status.get("completionTime") or conditions["Complete"].get("lastTransitionTime")
    elif "Failed" in conditions:
        phase = StagePhase.FAILED
        failed = conditions["Failed"]
        reason, message = failed.get("reason"), failed.get("message")
        completion = failed.get("lastTransitionTime")
    elif (status.get("ready") or 0) > 0:
        phase = StagePhase.RUNNING
    else:
        phase = StagePhase.PENDING
    return ObservedJob(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        owner_uid=owner,
        stage=labels.get(names.LABEL_STAGE),
        key=labels.get(names.LABEL_STAGE_KEY),
        phase=phase,
        attempt=int(labels.get(names.LABEL_ATTEMPT, "0") or 0),
        # Several pods that stand or fall together: multi-node training. Generate shards are
        # independent (each resumes alone), so their Indexed Job is no group.
        group=((body.get("spec") or {}).get("completions") or 1) > 1 and labels.get(names.LABEL_STAGE) != "generate",
        start_time=status.get("startTime"),
        completion_time=completion,
        reason=reason,
        message=message,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _terminated(status: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if status is None:
        return None
    terminated = (status.get("state") or {}).get("terminated")
    if terminated is None:
        terminated = (status.get("lastState") or {}).get("terminated")
    return terminated if isinstance(terminated, Mapping) else None


def _worker_state(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """How the worker container ended; else an init container that failed (the worker never ran)."""
    pod_status = pod.get("status") or {}
    statuses = pod_status.get("containerStatuses") or []
    status = next((s for s in statuses if s.get("name") == names.WORKER_CONTAINER), None)
    if status is None and statuses:
        status = statuses[0]
    state = _terminated(status)
    if state is not None:
        return state
    for init in pod_status.get("initContainerStatuses") or []:
        failed = _terminated(init)
        if failed is not None and failed.get("exitCode") not in (0, None):
            return failed
    return None


def pick_estimate(pods: Iterable[Mapping[str, Any]]) -> TeacherSpend | None:
    """The projection a generate pod's ``estimate`` init container reported, from any pod that has one."""
    for pod in pods:
        for init in (pod.get("status") or {}).get("initContainerStatuses") or []:
            state = _terminated(init)
            if init.get("name") != names.ESTIMATE_CONTAINER or state is None or state.get("exitCode") != 0:
                continue
            try:
                spend = TeacherSpend.model_validate_json(state.get("message") or "")
            except ValidationError:
                continue
            if spend.projected is not None:
                return spend
    return None


def parse_failure(message: str | None) -> StageFailure | None:
    """A structured failure (e.g. BudgetExceeded with the spend) from a failed stage's termination message."""
    if not message or not message.startswith("{"):
        return None
    try:
        return StageFailure.model_validate_json(message)
    except ValidationError:
        return None


def pick_termination(pods: Iterable[Mapping[str, Any]], succeeded: bool, group: bool = False) -> Termination | None:
    """The pod whose termination message speaks for the Job.

    On success: the pod of completion index 0 (rank 0 reports for a multi-node run).
    On failure: the most recent failed pod, preferring one that left a message; for a group
    (multi-node) Job the *first* to fail, since the others were stopped because of it.
    """
    candidates: list[tuple[tuple[int, int, str], Termination]] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        phase = (pod.get("status") or {}).get("phase")
        if phase != ("Succeeded" if succeeded else "Failed"):
            continue
        state = _worker_state(pod)
        if state is None:
            continue
        index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0")
        message = (state.get("message") or "").strip() or None
        termination = Termination(
            pod=meta.get("name", ""), exit_code=state.get("exitCode"), reason=state.get("reason"), message=message
        )
        finished = str(state.get("finishedAt") or "")
        if group and not succeeded:
            # Earliest first: max() over the negated order of finishedAt (RFC 3339 sorts as text).
            rank: tuple[Any, ...] = (1 if message else 0, _descending(finished))
        else:
            rank = (1 if index == "0" else 0, 1 if message else 0, finished)
        candidates.append((rank, termination))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def _descending(text: str) -> tuple[int, ...]:
    return tuple(-ord(ch) for ch in text)


def parse_result(stage: str, message: str | None) -> BaseModel | None:
    """The stage's success summary from its termination message, or None when it has none."""
    model = RESULT_MODELS.get(stage)
    if model is None or not message:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def parse_progress(data: Mapping[str, Any] | None) -> dict[str, StageProgress]:
    """The progress ConfigMap's reports by stage; a key that does not parse is ignored (a worker's bug).

    The shards of a sharded stage report under '<stage>.<shard>': their latest reports of the
    same Job are combined into one (StageProgress.combined).
    """
    reports: dict[str, StageProgress] = {}
    shards: dict[str, list[StageProgress]] = {}
    for key, text in (data or {}).items():
        try:
            report = StageProgress.model_validate_json(str(text))
        except ValidationError:
            continue
        if report.key != key:
            continue
        if report.shard is None:
            reports[report.stage] = report
        else:
            shards.setdefault(report.stage, []).append(report)
    for stage, parts in shards.items():
        newest = max(parts, key=lambda r: r.updated_at).job
        reports[stage] = StageProgress.combined([r for r in parts if r.job == newest])
    return reports
