"""kopf registrations, and nothing else: every handler is one call into the scheduler (reconcile/).

    kubedistill operator                       # every namespace
    kubedistill operator --namespace ml-team   # one namespace (repeatable)

What triggers a reconcile of a DistillationJob:

* create / update / resume (kopf's change detection, diff base in an annotation);
* an event on one of its Jobs that changes the Job's phase (pending, running, succeeded,
  failed, deleted): the Job carries ``kubedistill.io/job`` and the watch is filtered
  server-side by ``app.kubernetes.io/managed-by=kubedistill``, so the operator never sees
  anybody else's Jobs;
* a resync every ``reconcile.resyncSeconds`` for runs still in flight (one background
  task for all of them, not a timer per object: kopf timers need a finalizer on every
  resource, and a finalizer would make deleting a job wait for the operator).

DistilledModels likewise: create / update / resume, events on their Deployment, the
success of the DistillationJob they follow (``fromJob``), and the same resync. An adapter
pool also follows its members (a DistilledModel naming it in ``spec.pool`` that comes, changes
or goes rewrites the pool's adapter set) and its pods (their sidecars report what they loaded:
the pool and each member recount who serves what).

kopf's own bookkeeping stays out of our status: progress and the diff base go to
``kubedistill.io/*`` annotations, kopf posts Events only for warnings and errors, and no
handler returns a value (which kopf would store in the status).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from kubedistill.api.conditions import JobPhase, ModelPhase
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import GROUP, VERSION
from kubedistill.builders import names
from kubedistill.kube.client import KubeClient, KubeError
from kubedistill.kube.pacing import Priority
from kubedistill.reconcile.cycle import InvalidSpec
from kubedistill.reconcile.observe import compact_job
from kubedistill.scheduler import Scheduler
from kubedistill.telemetry import Health, OperatorMetrics

log = logging.getLogger("kubedistill.handlers")

DJ = (GROUP, VERSION, "distillationjobs")
DM = (GROUP, VERSION, "distilledmodels")
MANAGED = {names.LABEL_MANAGED_BY: names.MANAGED_BY}
SERVING_PODS = {**MANAGED, names.LABEL_COMPONENT: names.SERVING_COMPONENT}
PROGRESS_CONFIG_MAPS = {**MANAGED, names.LABEL_COMPONENT: names.PROGRESS_COMPONENT}
# Resources the resync visits: every phase but the settled ones (None: not reconciled yet).
ACTIVE_PHASES = frozenset({None} | {p.value for p in JobPhase if not p.terminal})
ACTIVE_MODEL_PHASES = frozenset(
    {None} | {p.value for p in ModelPhase} - {ModelPhase.READY, ModelPhase.STOPPED, ModelPhase.FAILED}
)
HEARTBEAT_SECONDS = 5.0


def configure_kopf(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf's knobs: bookkeeping in annotations, quiet Events, server-side child filters, pacing."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{names.GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubedistill-operator"
    settings.watching.label_selectors["batch", "jobs"] = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"
    settings.watching.label_selectors["apps", "deployments"] = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"
    settings.watching.label_selectors["pods"] = ",".join(f"{k}={v}" for k, v in SERVING_PODS.items())
    settings.watching.label_selectors["configmaps"] = ",".join(f"{k}={v}" for k, v in PROGRESS_CONFIG_MAPS.items())
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.execution.max_workers = max(4, ours.reconcile.api_threads)
    settings.networking.request_timeout = ours.reconcile.request_timeout_seconds * 2


async def _handled(call: Any) -> None:
    """Map outcomes to kopf: a bad spec is permanent, an API hiccup is retried soon."""
    try:
        await call
    except InvalidSpec as err:
        raise kopf.PermanentError(str(err)) from err
    except KubeError as err:
        raise kopf.TemporaryError(str(err), delay=5 if err.retryable else 30) from err


def _scheduler(memo: Any) -> Scheduler:
    scheduler: Scheduler = memo.scheduler
    return scheduler


async def _resync(scheduler: Scheduler, interval: float) -> None:
    """Kick every run in flight once per interval, spread out so that N runs do not arrive at once."""
    while True:
        jobs = [key for key, phases in (scheduler.job_phases or {}).items() if set(phases) & ACTIVE_PHASES]
        models = [key for key, phases in (scheduler.model_phases or {}).items() if set(phases) & ACTIVE_MODEL_PHASES]
        kicks = [(scheduler.kick_job, key) for key in jobs] + [(scheduler.kick_model, key) for key in models]
        if not kicks:
            await asyncio.sleep(interval)
            continue
        step = interval / len(kicks)
        for kick, (namespace, name) in kicks:
            kick(namespace, name, Priority.RESYNC)
            await asyncio.sleep(step)


async def _heartbeat(health: Health) -> None:
    """The event loop turns: what /healthz checks (a wedged loop stops this too)."""
    while True:
        health.beat()
        await asyncio.sleep(HEARTBEAT_SECONDS)


def register(
    ours: OperatorSettings,
    registry: kopf.OperatorRegistry | None = None,
    metrics: OperatorMetrics | None = None,
    health: Health | None = None,
) -> kopf.OperatorRegistry:
    """Register every handler (in a fresh registry unless one is given) for these settings."""
    registry = registry or kopf.OperatorRegistry()
    metrics = metrics or OperatorMetrics()
    health = health or Health()

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        # A registry of our own gets none of kopf's default login handlers: use the client's
        # config (in-cluster ServiceAccount, or $KUBECONFIG), as KubeClient does.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        configure_kopf(settings, ours)
        scheduler = Scheduler(ours, KubeClient(ours.reconcile), metrics)
        memo.scheduler = scheduler
        memo.resync = asyncio.create_task(_resync(scheduler, ours.reconcile.resync_seconds))
        memo.heartbeat = asyncio.create_task(_heartbeat(health))
        health.leading = True
        log.info(
            "kubedistill operator: namespaces %s, worker image %s, GPU pool %s",
            ours.namespaces or "all",
            ours.worker_image,
            ours.gpu_pool.node_selector,
        )

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(*, memo: Any, **_: Any) -> None:
        memo.resync.cancel()
        memo.heartbeat.cancel()
        scheduler = _scheduler(memo)
        log.info("kubedistill operator stops: %s", scheduler.summary())
        await scheduler.close()

    # ------------------------------------------------------------------ indices (watch caches)

    @kopf.index(*DJ, id="distillation_job_phases", registry=registry)
    def distillation_job_phases(*, namespace: str | None, name: str, status: Mapping[str, Any], **_: Any) -> Any:
        return {(namespace, name): (status or {}).get("phase")}

    @kopf.index(*DM, id="distilled_model_phases", registry=registry)
    def distilled_model_phases(*, namespace: str | None, name: str, status: Mapping[str, Any], **_: Any) -> Any:
        return {(namespace, name): (status or {}).get("phase")}

    @kopf.index(*DM, id="models_following", registry=registry)
    def models_following(*, namespace: str | None, name: str, spec: Mapping[str, Any], **_: Any) -> Any:
        source = (spec.get("fromJob") or {}).get("name")
        return {(namespace, source): name} if source else None

    @kopf.index(*DM, id="pool_members", registry=registry)
    def pool_members(*, namespace: str | None, name: str, spec: Mapping[str, Any], **_: Any) -> Any:
        pool = (spec.get("pool") or {}).get("name")
        return {(namespace, pool): name} if pool else None

    @kopf.index("", "v1", "configmaps", labels=PROGRESS_CONFIG_MAPS, id="stage_progress", registry=registry)
    def stage_progress(*, namespace: str | None, labels: Mapping[str, str], body: Any, **_: Any) -> Any:
        job = labels.get(names.LABEL_JOB)
        return {(namespace, job): dict(body.get("data") or {})} if job else None

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="stage_jobs", registry=registry)
    def stage_jobs(*, namespace: str | None, labels: Mapping[str, str], body: Any, **_: Any) -> Any:
        job = labels.get(names.LABEL_JOB)
        return {(namespace, job): compact_job(body)} if job else None

    def bind(memo: Any, kwargs: Mapping[str, Any]) -> Scheduler:
        scheduler = _scheduler(memo)
        scheduler.jobs_index = kwargs["stage_jobs"]
        scheduler.job_phases = kwargs["distillation_job_phases"]
        scheduler.model_phases = kwargs["distilled_model_phases"]
        scheduler.models_following = kwargs["models_following"]
        scheduler.progress_index = kwargs["stage_progress"]
        scheduler.pool_members = kwargs["pool_members"]
        return scheduler

    # ------------------------------------------------------------------ DistillationJob

    @kopf.on.resume(*DJ, id="distillation_job", registry=registry)
    @kopf.on.create(*DJ, id="distillation_job", registry=registry)
    @kopf.on.update(*DJ, id="distillation_job", registry=registry)
    async def distillation_job(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
        await _handled(bind(memo, kwargs).reconcile_job(namespace or "", name))

    @kopf.on.event(*DJ, id="distillation_job_event", registry=registry)
    async def distillation_job_event(
        *, namespace: str | None, name: str, status: Mapping[str, Any], memo: Any, **kwargs: Any
    ) -> None:
        # A run that just succeeded has a new model for the DistilledModels that follow it.
        if (status or {}).get("phase") != "Succeeded":
            return
        scheduler = bind(memo, kwargs)
        for model in scheduler.models_following.get((namespace, name), ()):
            scheduler.kick_model(namespace or "", model)

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED, id="stage_job_event", registry=registry)
    async def stage_job_event(
        *, type: str, namespace: str | None, labels: Mapping[str, str], body: Any, memo: Any, **kwargs: Any
    ) -> None:
        parent = labels.get(names.LABEL_JOB)
        if not parent:
            return
        bind(memo, kwargs).on_stage_job_event(type, namespace or "", parent, body)

    @kopf.on.event("", "v1", "configmaps", labels=PROGRESS_CONFIG_MAPS, id="stage_progress_event", registry=registry)
    async def stage_progress_event(
        *, type: str, namespace: str | None, labels: Mapping[str, str], memo: Any, **kwargs: Any
    ) -> None:
        job = labels.get(names.LABEL_JOB)
        if job and type in ("MODIFIED", None):  # a report (or the initial listing); not our own create
            bind(memo, kwargs).kick_progress(namespace or "", job)

    # ------------------------------------------------------------------ DistilledModel

    @kopf.on.resume(*DM, id="distilled_model", registry=registry)
    @kopf.on.create(*DM, id="distilled_model", registry=registry)
    @kopf.on.update(*DM, id="distilled_model", registry=registry)
    async def distilled_model(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
        await _handled(bind(memo, kwargs).reconcile_model(namespace or "", name))

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, id="serving_deployment_event", registry=registry)
    async def serving_deployment_event(
        *, namespace: str | None, labels: Mapping[str, str], memo: Any, **kwargs: Any
    ) -> None:
        model = labels.get(names.LABEL_MODEL)
        if model:
            bind(memo, kwargs).kick_model(namespace or "", model)

    @kopf.on.event(*DM, id="pool_member_event", registry=registry)
    async def pool_member_event(*, namespace: str | None, spec: Mapping[str, Any], memo: Any, **kwargs: Any) -> None:
        # Any change of a member (deletion included: no finalizer needed) rewrites its pool's adapter set.
        pool = ((spec or {}).get("pool") or {}).get("name")
        if pool:
            bind(memo, kwargs).kick_model(namespace or "", pool)

    @kopf.on.event("", "v1", "pods", labels=SERVING_PODS, id="serving_pod_event", registry=registry)
    async def serving_pod_event(*, namespace: str | None, labels: Mapping[str, str], memo: Any, **kwargs: Any) -> None:
        model = labels.get(names.LABEL_MODEL)
        if not model:
            return
        scheduler = bind(memo, kwargs)
        members = list(scheduler.pool_members.get((namespace, model), ()))
        if not members:
            return  # a plain model follows its Deployment; only pools count per-pod reports
        scheduler.kick_model(namespace or "", model)
        for member in members:
            scheduler.kick_model(namespace or "", member)

    return registry
