"""The I/O half of serving reconciles beyond the Deployment: integrations, pools and adapters.

``observe_serving`` completes a model's observations (which integration CRDs exist, which
optional children exist, a pool's members and pods); ``decide_adapter`` reads what an
adapter's status depends on. Both only read, through the ``Cluster`` port of cycle.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from kubedistill.api.conditions import now_rfc3339
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import API_VERSION, DistilledModel
from kubedistill.builders import integrations, names
from kubedistill.builders.integrations import Capabilities
from kubedistill.reconcile.adapters import AdapterObservations
from kubedistill.reconcile.integrations import Ref
from kubedistill.reconcile.serving import ModelDecision, ModelObservations, PoolMember, compute_adapter_decision

if TYPE_CHECKING:
    from kubedistill.reconcile.cycle import Cluster

CUSTOM_METRICS_VERSIONS = ("custom.metrics.k8s.io/v1beta2", "custom.metrics.k8s.io/v1beta1")


async def discover_capabilities(cluster: Cluster) -> Capabilities:
    kinds: set[tuple[str, str]] = set()
    for api_version, kind in integrations.OPTIONAL_KINDS:
        served = await cluster.discover(api_version)
        if served is not None and kind in served:
            kinds.add((api_version, kind))
    custom = False
    for api_version in CUSTOM_METRICS_VERSIONS:
        custom = custom or await cluster.discover(api_version) is not None
    return Capabilities(kinds=frozenset(kinds), custom_metrics=custom)


async def _optional_children(cluster: Cluster, caps: Capabilities, namespace: str, name: str) -> tuple[Ref, ...]:
    found: list[Ref] = []
    selector = names.model_children_selector(name)
    for api_version, kind in integrations.OPTIONAL_KINDS:
        if not caps.has((api_version, kind)):
            continue
        for obj in await cluster.list(api_version, kind, namespace, selector):
            found.append((api_version, kind, (obj.get("metadata") or {}).get("name", "")))
    return tuple(found)


async def _members(cluster: Cluster, namespace: str, pool: str) -> tuple[PoolMember, ...]:
    members: list[PoolMember] = []
    for model in await cluster.list(API_VERSION, "DistilledModel", namespace, ""):
        spec = model.get("spec") or {}
        if (spec.get("pool") or {}).get("name") != pool or (model.get("metadata") or {}).get("deletionTimestamp"):
            continue
        job = None
        if (spec.get("fromJob") or {}).get("name"):
            job = await cluster.get(API_VERSION, "DistillationJob", namespace, spec["fromJob"]["name"])
        members.append(PoolMember(model=model, source_job=job))
    return tuple(members)


async def observe_serving(cluster: Cluster, dm: DistilledModel, obs: ModelObservations) -> ModelObservations:
    namespace, name = dm.metadata.namespace or "", dm.metadata.name or ""
    caps = await discover_capabilities(cluster)
    extra: dict[str, Any] = {
        "capabilities": caps,
        "optional_children": await _optional_children(cluster, caps, namespace, name),
    }
    if dm.spec.serving.adapters is not None:
        extra["members"] = await _members(cluster, namespace, name)
        extra["pods"] = tuple(await cluster.list("v1", "Pod", namespace, names.model_children_selector(name)))
    return dataclasses.replace(obs, **extra)


async def decide_adapter(
    cluster: Cluster, settings: OperatorSettings, dm: DistilledModel, source_job: dict[str, Any] | None
) -> ModelDecision:
    namespace = dm.metadata.namespace or ""
    pool = dm.spec.pool.name if dm.spec.pool else ""
    pool_model = await cluster.get(API_VERSION, "DistilledModel", namespace, pool)
    deployment = await cluster.get("apps/v1", "Deployment", namespace, names.model_deployment_name(pool))
    pods = await cluster.list("v1", "Pod", namespace, names.model_children_selector(pool)) if pool_model else []
    obs = AdapterObservations(pool=pool_model, pool_deployment=deployment, pods=tuple(pods), source_job=source_job)
    return compute_adapter_decision(dm, settings, obs, now_rfc3339())
