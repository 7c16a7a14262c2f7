"""The reconcile cycle: read -> decide -> act -> write status -> post events.

``reconcile_distillation_job`` and ``reconcile_distilled_model`` orchestrate; the
decisions themselves are the pure ``compute_*`` functions next door. The cluster is
reached only through the ``Cluster`` port (kube/ implements it), so this module imports
no Kubernetes client and the handlers stay one call deep.

Contract of the port: ``get`` returns None for a missing object, ``create`` returns
False when the object already exists (409 is success: deterministic names make a
second create a no-op), ``delete`` ignores a missing object; anything else raises, and
the caller retries the whole cycle, which is safe because every step is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import ValidationError

from kubedistill.api import conditions as c
from kubedistill.api.base import describe_validation_error
from kubedistill.api.conditions import JobPhase, Reason, now_rfc3339
from kubedistill.api.savings import TeacherSpend
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import API_VERSION, DistillationJob, DistillationJobStatus, DistilledModel
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan
from kubedistill.reconcile.distillation import (
    JobDecision,
    JobObservation,
    ModelObservation,
    StageFinished,
    compute_job_decision,
)
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.reconcile.observe import (
    ObservedJob,
    Termination,
    observe_job,
    parse_progress,
    pick_estimate,
    pick_termination,
)
from kubedistill.reconcile.serving import ModelObservations, compute_model_decision
from kubedistill.reconcile.serving_io import decide_adapter, observe_serving
from kubedistill.reconcile.status import WARNING, EventSpec, apply_conditions, clip, condition, is_true, merge_patch

log = logging.getLogger("kubedistill.reconcile")

DJ_KIND = "DistillationJob"
DM_KIND = "DistilledModel"
MAX_PASSES = 4  # decide, fetch what the decision asked for, decide again


class Cluster(Protocol):
    """What the reconcile cycle needs from the API server (implemented in kube/)."""

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...

    async def create(self, obj: Mapping[str, Any]) -> bool: ...

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> None: ...

    async def post_event(self, regarding: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...

    async def discover(self, api_version: str) -> frozenset[str] | None: ...


class InvalidSpec(Exception):
    """The resource cannot be acted on as written; the message says what to fix."""


@dataclass(frozen=True)
class Outcome:
    """How a reconcile ended: the phase written and the stages it saw finish."""

    phase: str | None
    finished: tuple[StageFinished, ...] = ()


async def _write_status(
    cluster: Cluster, kind: str, raw: Mapping[str, Any], new_status: dict[str, Any], events: Iterable[EventSpec]
) -> bool:
    """Patch the status subresource if anything changed, then post the events (after: no event without status)."""
    meta = raw.get("metadata") or {}
    patch = merge_patch(raw.get("status") or {}, new_status)
    if patch is not None:
        await cluster.patch_status(API_VERSION, kind, meta.get("namespace", ""), meta.get("name", ""), patch)
    for event in events:
        await cluster.post_event(raw, event.type, event.reason, event.message)
    return patch is not None


# --------------------------------------------------------------------------- DistillationJob


async def _invalid_job(cluster: Cluster, raw: Mapping[str, Any], message: str) -> None:
    now = now_rfc3339()
    generation = (raw.get("metadata") or {}).get("generation")
    try:
        old = DistillationJobStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        old = DistillationJobStatus()
    message = clip(f"invalid spec: {message}")
    status = old.model_copy(
        update={
            "phase": JobPhase.FAILED,
            "observed_generation": generation,
            "conditions": apply_conditions(
                old.conditions,
                [
                    condition(c.SUCCEEDED, False, Reason.INVALID_SPEC, message, now, generation),
                    condition(c.FAILED, True, Reason.INVALID_SPEC, message, now, generation),
                ],
            ),
        }
    )
    already = (
        old.phase == JobPhase.FAILED and is_true(old.conditions, c.FAILED) and old.observed_generation == generation
    )
    events = [] if already else [EventSpec(WARNING, Reason.INVALID_SPEC, message)]
    await _write_status(cluster, DJ_KIND, raw, status.to_wire(), events)


async def _observe_jobs(
    cluster: Cluster, dj: DistillationJob, jobs: Iterable[Mapping[str, Any]] | None
) -> dict[str, ObservedJob]:
    namespace = dj.metadata.namespace or ""
    if jobs is None:
        jobs = await cluster.list("batch/v1", "Job", namespace, names.children_selector(dj.metadata.name or ""))
    observed = (observe_job(j) for j in jobs)
    return {j.name: j for j in observed if j.owner_uid == dj.metadata.uid}


async def _termination(cluster: Cluster, namespace: str, job: ObservedJob) -> Termination | None:
    pods = await cluster.list("v1", "Pod", namespace, f"batch.kubernetes.io/controller-uid={job.uid}")
    return pick_termination(pods, succeeded=job.phase == c.StagePhase.SUCCEEDED, group=job.group)


async def _estimate(cluster: Cluster, namespace: str, job: ObservedJob) -> TeacherSpend | None:
    pods = await cluster.list("v1", "Pod", namespace, f"batch.kubernetes.io/controller-uid={job.uid}")
    return pick_estimate(pods)


async def _observe_model(cluster: Cluster, namespace: str, name: str) -> ModelObservation:
    existing = await cluster.get(API_VERSION, DM_KIND, namespace, name)
    if existing is None:
        return ModelObservation(exists=False)
    labels = (existing.get("metadata") or {}).get("labels") or {}
    return ModelObservation(exists=True, published_by=labels.get(names.LABEL_PUBLISHED_BY))


@dataclass(frozen=True)
class ProgressSeen:
    """The DistillationJob's progress ConfigMap as a watch cache holds it."""

    exists: bool
    data: Mapping[str, Any]


async def _observe_progress(cluster: Cluster, dj: DistillationJob, seen: ProgressSeen | None) -> ProgressSeen:
    if seen is not None:
        return seen
    config_map = await cluster.get(
        "v1", "ConfigMap", dj.metadata.namespace or "", names.progress_config_name(dj.metadata.name or "")
    )
    return ProgressSeen(exists=config_map is not None, data=(config_map or {}).get("data") or {})


async def decide_distillation_job(
    cluster: Cluster,
    settings: OperatorSettings,
    dj: DistillationJob,
    jobs: Iterable[Mapping[str, Any]] | None = None,
    progress: ProgressSeen | None = None,
) -> JobDecision:
    """Observe, decide, and observe again whatever the decision needs, until it is complete."""
    plan = RunPlan(job=dj, keys=compute_stage_keys(dj.spec))
    namespace = plan.namespace
    seen = await _observe_progress(cluster, dj, progress)
    obs = JobObservation(
        jobs=await _observe_jobs(cluster, dj, jobs), progress=parse_progress(seen.data), progress_ready=seen.exists
    )
    terminations: dict[str, Termination | None] = {}
    estimates: dict[str, TeacherSpend | None] = {}
    model: ModelObservation | None = None
    for _ in range(MAX_PASSES):
        decision = compute_job_decision(dj, plan, settings, obs, now_rfc3339())
        if decision.complete:
            return decision
        for name in decision.need_terminations:
            terminations[name] = await _termination(cluster, namespace, obs.jobs[name])
        for name in decision.need_estimates:
            estimates[name] = await _estimate(cluster, namespace, obs.jobs[name])
        if decision.need_model:
            model = await _observe_model(cluster, namespace, dj.spec.output.model.name)
        obs = replace(obs, terminations=dict(terminations), estimates=dict(estimates), model=model)
    raise RuntimeError(f"DistillationJob {namespace}/{dj.metadata.name}: the decision did not settle")


async def reconcile_distillation_job(
    cluster: Cluster,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    jobs: Iterable[Mapping[str, Any]] | None = None,
    progress: ProgressSeen | None = None,
) -> Outcome:
    """One level-based pass over a DistillationJob. ``jobs`` (its Jobs) and ``progress`` (its progress
    ConfigMap) come from watch caches when the caller has them; else they are read.

    Raises InvalidSpec for a spec the operator refuses (after recording why in the status).
    """
    raw = await cluster.get(API_VERSION, DJ_KIND, namespace, name)
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return Outcome(phase=None)
    try:
        dj = DistillationJob.model_validate(raw)
    except ValidationError as err:
        message = describe_validation_error(err)
        await _invalid_job(cluster, raw, message)
        raise InvalidSpec(message) from err

    decision = await decide_distillation_job(cluster, settings, dj, jobs, progress)
    for child in decision.create:
        created = await cluster.create(child)
        if created:
            log.info("created %s %s/%s", child["kind"], namespace, child["metadata"]["name"])
    for job_name in decision.delete_jobs:
        log.info("deleting superseded Job %s/%s", namespace, job_name)
        await cluster.delete("batch/v1", "Job", namespace, job_name)
    for job_name in decision.prune:
        log.info("deleting Job %s/%s and its ConfigMap and Service: beyond the run history", namespace, job_name)
        await cluster.delete("batch/v1", "Job", namespace, job_name)
        # Named after their Job (builders/names.py); a Service exists for multi-node stages only.
        await cluster.delete("v1", "ConfigMap", namespace, names.stage_config_name(job_name))
        await cluster.delete("v1", "Service", namespace, names.rendezvous_service_name(job_name))
    if decision.publish is not None:
        await cluster.apply(decision.publish)
        log.info("published DistilledModel %s/%s", namespace, decision.publish["metadata"]["name"])
    await _write_status(cluster, DJ_KIND, raw, decision.status.to_wire(), decision.events)
    phase = decision.status.phase
    return Outcome(
        phase=phase.value if phase else None,
        finished=tuple(decision.finished),
    )


# --------------------------------------------------------------------------- DistilledModel


async def reconcile_distilled_model(cluster: Cluster, settings: OperatorSettings, namespace: str, name: str) -> Outcome:
    """One level-based pass over a DistilledModel: resolve its source, apply the serving objects, report."""
    raw = await cluster.get(API_VERSION, DM_KIND, namespace, name)
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return Outcome(phase=None)
    try:
        dm = DistilledModel.model_validate(raw)
    except ValidationError as err:
        raise InvalidSpec(describe_validation_error(err)) from err

    source_job: dict[str, Any] | None = None
    if dm.spec.from_job is not None:
        source_job = await cluster.get(API_VERSION, DJ_KIND, namespace, dm.spec.from_job.name)
    if dm.spec.pool is not None:  # an adapter: its pool loads it, only its status is ours to write
        decision = await decide_adapter(cluster, settings, dm, source_job)
        await _write_status(cluster, DM_KIND, raw, decision.status.to_wire(), decision.events)
        return Outcome(phase=decision.status.phase.value if decision.status.phase else None)
    deployment = await cluster.get("apps/v1", "Deployment", namespace, names.model_deployment_name(name))
    obs = await observe_serving(cluster, dm, ModelObservations(deployment=deployment, source_job=source_job))
    decision = compute_model_decision(dm, settings, obs, now_rfc3339())
    for api_version, kind, child_name in decision.delete:
        await cluster.delete(api_version, kind, namespace, child_name)
    for child in decision.apply:
        await cluster.apply(child)
    if decision.keep_fetch_config is not None:
        for config_map in await cluster.list("v1", "ConfigMap", namespace, names.model_children_selector(name)):
            stale = (config_map.get("metadata") or {}).get("name", "")
            if stale and stale != decision.keep_fetch_config:
                await cluster.delete("v1", "ConfigMap", namespace, stale)
    await _write_status(cluster, DM_KIND, raw, decision.status.to_wire(), decision.events)
    phase = decision.status.phase
    return Outcome(phase=phase.value if phase else None)
