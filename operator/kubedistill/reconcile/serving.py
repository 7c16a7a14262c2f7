"""DistilledModel decisions: (the CR, its Deployment, its source job) -> objects to apply and the new status.

The source is ``spec.model``, or for ``spec.fromJob`` the model of that
DistillationJob's latest *successful* run: while the job re-runs (or after it failed)
the pods keep serving what they serve. Status follows the Deployment: Ready when every
desired replica is available, Progressing while a rollout is under way, Degraded when a
model that was served has lost replicas or the rollout is stuck.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubedistill.api import conditions as c
from kubedistill.api.conditions import JobPhase, ModelPhase, Reason
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import (
    Condition,
    DistillationJob,
    DistilledModel,
    DistilledModelStatus,
    ModelArtifact,
    StorageSpec,
)
from kubedistill.api.worker_config import AdapterEntry
from kubedistill.builders import names
from kubedistill.builders.adapters import adapter_entry, build_adapters_config_map
from kubedistill.builders.integrations import Capabilities
from kubedistill.builders.serving import ServingPlan, build_serving_children
from kubedistill.reconcile.adapters import AdapterObservations, compute_adapter_status, pool_adapter_statuses
from kubedistill.reconcile.integrations import Ref, integration_conditions, stale_children
from kubedistill.reconcile.status import NORMAL, WARNING, EventSpec, apply_conditions, condition, get_condition, is_true


@dataclass(frozen=True)
class PoolMember:
    """An adapter DistilledModel naming a pool, with its source job (fromJob) when it has one."""

    model: Mapping[str, Any]
    source_job: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ModelObservations:
    """What exists: the vLLM Deployment and (fromJob) the source DistillationJob, raw; which integrations
    the cluster has and the optional children that exist; for a pool, its members and pods."""

    deployment: Mapping[str, Any] | None
    source_job: Mapping[str, Any] | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    optional_children: tuple[Ref, ...] = ()
    members: tuple[PoolMember, ...] = ()
    pods: tuple[Mapping[str, Any], ...] = ()


@dataclass
class ModelDecision:
    status: DistilledModelStatus
    apply: list[dict[str, Any]] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)
    # Once a rollout completes, fetch ConfigMaps of older versions can go (none but this one).
    keep_fetch_config: str | None = None
    # (apiVersion, kind, name) of children to delete before applying: an HPA whose
    # autoscaling was switched off would otherwise keep rescaling the Deployment.
    delete: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """The resolved source, or why there is none."""

    plan: ServingPlan | None
    reason: str | None = None  # SourcePending / SourceNotFound / SourceFailed
    message: str = ""


def resolve_source(dm: DistilledModel, obs: ModelObservations) -> Source:
    spec = dm.spec
    if spec.model is not None:
        storage = spec.storage or StorageSpec()
        return Source(ServingPlan(model=dm, source=spec.model, base_model=spec.base_model, storage=storage))
    job_name = spec.from_job.name if spec.from_job else ""
    if obs.source_job is None:
        return Source(None, Reason.SOURCE_NOT_FOUND, f"DistillationJob {job_name} not found")
    try:
        job = DistillationJob.model_validate(obs.source_job)
    except ValidationError:
        return Source(None, Reason.SOURCE_FAILED, f"DistillationJob {job_name} has an invalid spec")
    status = job.status
    if status is None or status.phase != JobPhase.SUCCEEDED or status.model is None:
        phase = status.phase if status is not None and status.phase is not None else "Pending"
        if phase == JobPhase.FAILED:
            return Source(None, Reason.SOURCE_FAILED, f"DistillationJob {job_name} failed")
        return Source(None, Reason.SOURCE_PENDING, f"DistillationJob {job_name} is {phase}")
    student = job.spec.student
    adapter = student.exports_adapter
    base = spec.base_model or (student.model if adapter else None)
    plan = ServingPlan(model=dm, source=status.model, base_model=base, storage=spec.storage or job.spec.storage)
    return Source(plan)


def _template_source(deployment: Mapping[str, Any]) -> tuple[str | None, str | None]:
    template = (deployment.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return annotations.get(names.ANNOTATION_MODEL_URI), annotations.get(names.ANNOTATION_MODEL_DIGEST) or None


def _deployment_condition(deployment: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for item in (deployment.get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return item  # type: ignore[no-any-return]
    return None


def _autoscaled(deployment: Mapping[str, Any] | None) -> bool:
    annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(names.ANNOTATION_AUTOSCALED) == "true")


def compute_model_decision(
    dm: DistilledModel, settings: OperatorSettings, obs: ModelObservations, now: str
) -> ModelDecision:
    """Objects to apply and the status of ``dm`` given its Deployment and source."""
    old = dm.status or DistilledModelStatus()
    name = dm.metadata.name or ""
    generation = dm.metadata.generation
    source = resolve_source(dm, obs)
    deployment = obs.deployment
    decision = ModelDecision(status=old)
    # Without a resolvable source, whatever is deployed keeps serving: nothing is applied.
    entries = pool_entries(obs.members) if dm.spec.serving.adapters is not None else []
    if source.plan is not None:
        decision.apply = build_serving_children(source.plan, settings, obs.capabilities)
        if dm.spec.serving.adapters is not None:
            plan = source.plan
            config = build_adapters_config_map(plan.name, plan.namespace, plan.owner_reference(), entries)
            decision.apply.insert(0, config)
        decision.delete = stale_children(obs.optional_children, decision.apply)
    elif dm.spec.serving.autoscaling is None and _autoscaled(obs.deployment):
        decision.delete.append(("autoscaling/v2", "HorizontalPodAutoscaler", names.model_hpa_name(name)))

    serving = dm.spec.serving
    desired = serving.replicas if serving.autoscaling is None else None
    dstatus: Mapping[str, Any] = (deployment or {}).get("status") or {}
    if deployment is not None:
        desired = (deployment.get("spec") or {}).get("replicas", desired)
    if desired is None:
        desired = serving.autoscaling.min_replicas if serving.autoscaling else serving.replicas
    available = int(dstatus.get("availableReplicas") or 0)
    ready = int(dstatus.get("readyReplicas") or 0)
    updated = int(dstatus.get("updatedReplicas") or 0)
    total = int(dstatus.get("replicas") or 0)

    rolled_out = False
    if deployment is not None and source.plan is not None:
        meta = deployment.get("metadata") or {}
        current_generation = int(dstatus.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        want = (source.plan.source.uri, source.plan.source.digest or None)
        rolled_out = (
            current_generation
            and _template_source(deployment) == want
            and updated >= desired
            and total == updated
            and available >= desired
        )
    current_model = source.plan.source if (rolled_out and source.plan is not None) else old.current_model
    served_before = old.current_model is not None
    progress = _deployment_condition(deployment, "Progressing") if deployment is not None else None
    stuck = progress is not None and progress.get("status") == "False"

    conditions: list[Condition] = []
    if source.plan is None and deployment is None:
        phase = ModelPhase.FAILED if source.reason == Reason.SOURCE_FAILED else ModelPhase.PENDING
        conditions.append(
            condition(c.READY, False, source.reason or Reason.SOURCE_PENDING, source.message, now, generation)
        )
    elif desired == 0:
        phase = ModelPhase.STOPPED
        conditions.append(condition(c.READY, False, Reason.SCALED_TO_ZERO, "scaled to zero replicas", now, generation))
    elif available >= desired and deployment is not None:
        phase = ModelPhase.READY
        message = f"{available}/{desired} replicas available"
        conditions.append(condition(c.READY, True, Reason.REPLICAS_AVAILABLE, message, now, generation))
    else:
        phase = ModelPhase.DEGRADED if (served_before or stuck) else ModelPhase.DEPLOYING
        message = f"{available}/{desired} replicas available"
        conditions.append(condition(c.READY, False, Reason.REPLICAS_UNAVAILABLE, message, now, generation))

    progressing = source.plan is not None and not rolled_out and desired != 0
    if progressing and source.plan is not None:
        message = f"rolling out {source.plan.source.uri}: {updated}/{desired} replicas updated, {available} available"
        conditions.append(condition(c.PROGRESSING, True, Reason.ROLLING_OUT, message, now, generation))
    else:
        served = current_model.uri if current_model else "nothing"
        conditions.append(
            condition(c.PROGRESSING, False, Reason.ROLLOUT_COMPLETE, f"serving {served}", now, generation)
        )

    if stuck and progress is not None:
        degraded_reason, degraded_message = Reason.REPLICAS_UNAVAILABLE, str(progress.get("message") or "rollout stuck")
    elif phase == ModelPhase.DEGRADED:
        degraded_reason, degraded_message = Reason.REPLICAS_UNAVAILABLE, f"{available}/{desired} replicas available"
    elif source.plan is None and served_before:
        degraded_reason, degraded_message = source.reason or Reason.SOURCE_PENDING, source.message
    else:
        degraded_reason, degraded_message = "", ""
    if degraded_reason and (stuck or phase == ModelPhase.DEGRADED or source.reason == Reason.SOURCE_FAILED):
        conditions.append(condition(c.DEGRADED, True, degraded_reason, degraded_message, now, generation))
    else:
        conditions.append(condition(c.DEGRADED, False, Reason.REPLICAS_AVAILABLE, "no problem seen", now, generation))

    conditions += integration_conditions(dm, settings, obs.capabilities, now)
    decision.status = DistilledModelStatus(
        phase=phase,
        observed_generation=generation,
        conditions=apply_conditions(old.conditions, conditions),
        endpoint=names.endpoint(name, dm.metadata.namespace or "default", settings.serving.port),
        served_model_name=dm.spec.served_model_name or name,
        replicas=total,
        ready_replicas=ready,
        selector=names.model_children_selector(name),
        current_model=current_model,
        adapters=pool_adapter_statuses(entries, obs.pods) if dm.spec.serving.adapters is not None else None,
    )
    if rolled_out and source.plan is not None and current_model != old.current_model:
        decision.keep_fetch_config = names.model_fetch_config_name(name, source.plan.source_hash)
    decision.events = _model_events(old, decision.status, current_model)
    return decision


def _model_events(
    old: DistilledModelStatus, new: DistilledModelStatus, current: ModelArtifact | None
) -> list[EventSpec]:
    events: list[EventSpec] = []
    if current is not None and current != old.current_model:
        events.append(EventSpec(NORMAL, Reason.ROLLOUT_COMPLETE, f"serving {current.uri} at {new.endpoint}"))
    if is_true(new.conditions, c.PROGRESSING) and not is_true(old.conditions, c.PROGRESSING):
        progressing = get_condition(new.conditions, c.PROGRESSING)
        events.append(EventSpec(NORMAL, Reason.ROLLING_OUT, progressing.message if progressing else "rolling out"))
    if is_true(new.conditions, c.DEGRADED) and not is_true(old.conditions, c.DEGRADED):
        degraded = get_condition(new.conditions, c.DEGRADED)
        reason = degraded.reason if degraded else Reason.REPLICAS_UNAVAILABLE
        events.append(EventSpec(WARNING, reason, degraded.message if degraded else "degraded"))
    if new.phase != old.phase and new.phase in (ModelPhase.READY, ModelPhase.FAILED, ModelPhase.PENDING):
        ready = get_condition(new.conditions, c.READY)
        kind = NORMAL if new.phase == ModelPhase.READY else WARNING
        reason = ready.reason if ready else str(new.phase)
        events.append(EventSpec(kind, reason, f"{new.phase}: {ready.message if ready else ''}"))
    return events


def pool_entries(members: tuple[PoolMember, ...]) -> list[AdapterEntry]:
    """A pool's adapter set: each member whose source resolves (an unresolved one has no place in it yet)."""
    entries: list[AdapterEntry] = []
    for member in members:
        try:
            dm = DistilledModel.model_validate(member.model)
        except ValidationError:
            continue
        entry = _adapter_entry(dm, member.source_job)
        if entry is not None:
            entries.append(entry)
    return entries


def _adapter_entry(dm: DistilledModel, source_job: Mapping[str, Any] | None) -> AdapterEntry | None:
    plan = resolve_source(dm, ModelObservations(deployment=None, source_job=source_job)).plan
    if plan is None:
        return None
    return adapter_entry(plan.served_model_name, plan.source.uri, plan.source.digest, plan.storage)


def compute_adapter_decision(
    dm: DistilledModel, settings: OperatorSettings, obs: AdapterObservations, now: str
) -> ModelDecision:
    """An adapter in a pool: nothing of its own to apply (the pool loads it), only its status."""
    status, events = compute_adapter_status(dm, _adapter_entry(dm, obs.source_job), settings, obs, now)
    return ModelDecision(status=status, events=events)
