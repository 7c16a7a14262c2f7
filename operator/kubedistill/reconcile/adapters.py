"""Adapter pools: which adapters a pool loads, and how many of its replicas serve each one.

A pool (a DistilledModel with ``serving.adapters``) loads every DistilledModel whose
``spec.pool`` names it; the sidecar in each pod reports what it loaded as the pod condition
``kubedistill.io/adapters`` (``{adapter: revision}`` as JSON). A replica serves an adapter
when it is Ready and reports the adapter's current revision. Pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubedistill.api import conditions as c
from kubedistill.api.conditions import ModelPhase, Reason
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import AdapterStatus, Condition, DistilledModel, DistilledModelStatus, ModelArtifact
from kubedistill.api.worker_config import AdapterEntry
from kubedistill.builders import names
from kubedistill.reconcile.status import NORMAL, WARNING, EventSpec, apply_conditions, condition

Raw = Mapping[str, Any]


def _pod_condition(pod: Raw, type_: str) -> Mapping[str, Any] | None:
    for item in (pod.get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return item  # type: ignore[no-any-return]
    return None


def ready_reports(pods: Sequence[Raw]) -> list[dict[str, str]]:
    """What each Ready, not terminating pod of a pool reports loaded ({} when it reports nothing yet)."""
    reports: list[dict[str, str]] = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        ready = _pod_condition(pod, "Ready")
        if ready is None or ready.get("status") != "True":
            continue
        loaded = _pod_condition(pod, names.CONDITION_ADAPTERS)
        try:
            report = json.loads((loaded or {}).get("message") or "{}")
        except ValueError:
            report = {}
        reports.append({str(k): str(v) for k, v in report.items()} if isinstance(report, dict) else {})
    return reports


def serving_count(reports: Sequence[Mapping[str, str]], entry: AdapterEntry) -> int:
    return sum(1 for report in reports if report.get(entry.name) == entry.revision)


def pool_adapter_statuses(entries: Sequence[AdapterEntry], pods: Sequence[Raw]) -> list[AdapterStatus]:
    reports = ready_reports(pods)
    return [AdapterStatus(name=e.name, uri=e.uri, ready_replicas=serving_count(reports, e)) for e in entries]


# --------------------------------------------------------------------------- one adapter's status


@dataclass(frozen=True)
class AdapterObservations:
    """What an adapter's status depends on: its pool's DistilledModel, Deployment and pods."""

    pool: Raw | None
    pool_deployment: Raw | None = None
    pods: Sequence[Raw] = field(default_factory=tuple)
    source_job: Raw | None = None


def compute_adapter_status(
    dm: DistilledModel, entry: AdapterEntry | None, settings: OperatorSettings, obs: AdapterObservations, now: str
) -> tuple[DistilledModelStatus, list[EventSpec]]:
    """Ready when every ready replica of the pool serves ``entry``, this adapter's current version
    (None: its source is not resolved)."""
    old = dm.status or DistilledModelStatus()
    generation = dm.metadata.generation
    name = dm.metadata.name or ""
    pool_name = dm.spec.pool.name if dm.spec.pool else ""
    namespace = dm.metadata.namespace or "default"
    pool_ok, reason, message = _pool_state(obs.pool, pool_name)
    reports = ready_reports(obs.pods)
    serving = serving_count(reports, entry) if entry is not None and pool_ok else 0
    total = int(((obs.pool_deployment or {}).get("status") or {}).get("replicas") or 0)
    if not pool_ok:
        phase, ready = ModelPhase.PENDING, condition(c.READY, False, reason, message, now, generation)
    elif entry is None:
        phase = ModelPhase.PENDING
        ready = condition(
            c.READY, False, Reason.SOURCE_PENDING, "the adapter's source is not resolved", now, generation
        )
    elif reports and serving == len(reports):
        phase = ModelPhase.READY
        message = f"{serving}/{len(reports)} ready replicas of pool {pool_name} serve it"
        ready = condition(c.READY, True, Reason.ADAPTER_SERVED, message, now, generation)
    else:
        phase = ModelPhase.DEGRADED if old.current_model is not None else ModelPhase.DEPLOYING
        message = f"{serving}/{len(reports)} ready replicas of pool {pool_name} serve it"
        ready = condition(c.READY, False, Reason.ADAPTER_LOADING, message, now, generation)
    served = phase == ModelPhase.READY and entry is not None
    current = dm.spec.model if served and dm.spec.model else old.current_model
    if served and entry is not None and dm.spec.model is None:
        current = ModelArtifact(uri=entry.uri, digest=f"sha256:{entry.digest}" if entry.digest else None)
    loading = ready.status != "True" and pool_ok and entry is not None
    progressing = condition(
        c.PROGRESSING,
        loading,
        Reason.ADAPTER_LOADING if loading else Reason.ROLLOUT_COMPLETE,
        ready.message,
        now,
        generation,
    )
    conditions: list[Condition] = [ready, progressing]
    status = DistilledModelStatus(
        phase=phase,
        observed_generation=generation,
        conditions=apply_conditions(old.conditions, conditions),
        endpoint=names.endpoint(pool_name, namespace, settings.serving.port) if pool_name else None,
        served_model_name=dm.spec.served_model_name or name,
        replicas=total,
        ready_replicas=serving,
        selector=names.model_children_selector(pool_name) if pool_name else None,
        current_model=current,
        pool=pool_name,
    )
    events: list[EventSpec] = []
    if current is not None and current != old.current_model:
        events.append(
            EventSpec(NORMAL, Reason.ADAPTER_SERVED, f"every ready replica of pool {pool_name} serves {current.uri}")
        )
    if not pool_ok and old.phase != phase:
        events.append(EventSpec(WARNING, reason, message))
    return status, events


def _pool_state(pool: Raw | None, pool_name: str) -> tuple[bool, str, str]:
    if pool is None:
        return False, Reason.POOL_NOT_FOUND, f"spec.pool names DistilledModel {pool_name}, which does not exist"
    serving = (pool.get("spec") or {}).get("serving") or {}
    if serving.get("adapters") is None:
        return (
            False,
            Reason.NOT_AN_ADAPTER_POOL,
            f"DistilledModel {pool_name} hosts no adapters: set its spec.serving.adapters",
        )
    return True, "", ""
