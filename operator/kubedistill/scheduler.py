"""The scheduler of a running operator: which reconcile runs when, and the process-wide state it needs.

kopf calls the handlers; this decides how reconciles of one resource line up:

* one at a time per resource (a lock per DistillationJob/DistilledModel), so two triggers
  never race on the same status;
* child events *kick* a reconcile in the background; kicks that arrive while one is
  already queued for that resource merge into it (a thousand Job events do not mean a
  thousand reconciles), unless the new kick has a higher priority;
* at most ``reconcile.maxConcurrentReconciles`` in flight across all resources, and the
  API client's token bucket, both served by priority (kube/pacing.py): child events
  first, then kopf's create/update/resume, then resyncs; 1 slot in 8 is kept for child
  events, so a reaction never waits for a slot behind a backlog of first reconciles;
* a kicked reconcile that fails is retried with backoff (a handler-driven one is retried
  by kopf).

It also keeps the small timing record bench/operator_scale.py reads from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from kubedistill.api.settings import OperatorSettings
from kubedistill.builders import names
from kubedistill.kube.client import KubeClient
from kubedistill.kube.pacing import Priority, PrioritySemaphore, reconcile_priority
from kubedistill.reconcile.cycle import (
    InvalidSpec,
    Outcome,
    ProgressSeen,
    reconcile_distillation_job,
    reconcile_distilled_model,
)
from kubedistill.reconcile.observe import observe_job
from kubedistill.telemetry import OperatorMetrics

log = logging.getLogger("kubedistill.scheduler")
Key = tuple[str, str, str]  # (kind, namespace, name)
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def reserved_for_reactions(slots: int) -> int:
    """Slots only child events (a stage finished, a Deployment changed) may take: 1 in 8, at least 1."""
    return max(1, slots // 8) if slots > 1 else 0


class Scheduler:
    """Shared by every handler through kopf's ``memo``."""

    def __init__(self, settings: OperatorSettings, cluster: KubeClient, metrics: OperatorMetrics | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics or OperatorMetrics()
        self.metrics.bind(self)
        # kopf's indices (live watch caches), bound by the first handler call.
        self.jobs_index: Mapping[Any, Iterable[Mapping[str, Any]]] | None = None
        self.job_phases: Mapping[Any, Iterable[Any]] | None = None
        self.model_phases: Mapping[Any, Iterable[Any]] | None = None
        self.models_following: Mapping[Any, Iterable[str]] = {}
        self.progress_index: Mapping[Any, Iterable[Mapping[str, Any]]] | None = None
        self._progress_due: dict[Key, float] = {}  # monotonic time before which no progress pass runs
        self._progress_later: set[Key] = set()  # a progress pass is scheduled for then
        self.pool_members: Mapping[Any, Iterable[str]] = {}
        self.job_phase_seen: dict[str, str] = {}
        self._locks: weakref.WeakValueDictionary[Key, asyncio.Lock] = weakref.WeakValueDictionary()
        self._queued: dict[Key, set[Priority]] = {}
        self._failures: dict[Key, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        slots = settings.reconcile.max_concurrent_reconciles
        self._slots = PrioritySemaphore(slots)
        # Headroom for reactions: the other reconciles (first, progress, resync) may hold all but
        # these slots, so a finished stage never waits for a slot behind a backlog of them.
        self.reserved_slots = reserved_for_reactions(slots)
        self._bulk = PrioritySemaphore(slots - self.reserved_slots)
        self.reconciles = 0
        self.durations: list[float] = []  # seconds per reconcile, for the stop log line (bench/)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.cluster.close()

    def _count(self, seconds: float) -> None:
        self.reconciles += 1
        if len(self.durations) < 100_000:
            self.durations.append(seconds)

    def summary(self) -> str:
        """One line for the log: reconciles, API requests, reconcile wall time p50/p99."""
        ordered = sorted(self.durations) or [0.0]
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{self.reconciles} reconciles, {self.cluster.requests} API requests, "
            f"reconcile p50 {p50:.3f}s p99 {p99:.3f}s"
        )

    # ------------------------------------------------------------------ serialisation

    @property
    def queue_depth(self) -> int:
        """Reconciles waiting for a slot (kicked or handler-driven)."""
        return self._slots.waiting + self._bulk.waiting

    @property
    def api_queue_depth(self) -> int:
        """API requests waiting for a token of the client's rate limit."""
        return self.cluster.limiter.waiting

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: Key, priority: Priority) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        bulk = self._bulk.slot(priority) if priority != Priority.CHILD_EVENT else contextlib.nullcontext()
        async with lock, bulk, self._slots.slot(priority):
            token = reconcile_priority.set(priority)  # the API requests of this reconcile wait at it too
            try:
                yield
            finally:
                reconcile_priority.reset(token)

    def _kick(self, key: Key, run: Callable[[], Awaitable[Outcome]], priority: Priority) -> None:
        queued = self._queued.setdefault(key, set())
        if any(p <= priority for p in queued):
            return  # a queued reconcile, as urgent or more, will read the latest state anyway
        queued.add(priority)
        task = asyncio.create_task(self._run_kicked(key, run, priority), name=f"reconcile {'/'.join(key)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_kicked(self, key: Key, run: Callable[[], Awaitable[Outcome]], priority: Priority) -> None:
        async with self._exclusive(key, priority):
            queued = self._queued.get(key)
            if queued is not None:  # from here on, a new kick queues another pass
                queued.discard(priority)
                if not queued:
                    del self._queued[key]
            try:
                await run()
            except InvalidSpec:
                return  # recorded in the status; nothing to retry until the spec changes
            except Exception as err:
                attempt = self._failures.get(key, 0)
                self._failures[key] = attempt + 1
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.warning("reconcile of %s failed (%s); retrying in %.0fs", "/".join(key), err, delay)
                loop = asyncio.get_running_loop()
                loop.call_later(delay, self._kick, key, run, priority)
                return
        self._failures.pop(key, None)

    # ------------------------------------------------------------------ DistillationJob

    def _jobs_of(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        if self.jobs_index is None:
            return None
        return list(self.jobs_index.get((namespace, names.label_value(name)), ()))

    def _progress_of(self, namespace: str, name: str) -> ProgressSeen | None:
        if self.progress_index is None:
            return None  # no watch cache (tests, start-up): the reconcile reads the ConfigMap
        found = list(self.progress_index.get((namespace, names.label_value(name)), ()))
        return ProgressSeen(exists=bool(found), data=found[0] if found else {})

    async def _measured(self, kind: str, namespace: str, name: str, reconcile: Awaitable[Outcome]) -> Outcome:
        """One reconcile, its time and finished stages counted; an error counted unless it is the spec's."""
        start = time.monotonic()
        try:
            outcome = await reconcile
        except InvalidSpec:
            raise
        except Exception:
            self.metrics.observe_error(kind)
            raise
        seconds = time.monotonic() - start
        self._count(seconds)
        self.metrics.observe_reconcile(kind, seconds, outcome.finished)
        log.debug("reconciled %s %s/%s in %.3fs: %s", kind, namespace, name, seconds, outcome)
        return outcome

    async def _reconcile_job(self, namespace: str, name: str) -> Outcome:
        jobs, progress = self._jobs_of(namespace, name), self._progress_of(namespace, name)
        reconcile = reconcile_distillation_job(self.cluster, self.settings, namespace, name, jobs, progress)
        return await self._measured("DistillationJob", namespace, name, reconcile)

    async def reconcile_job(self, namespace: str, name: str) -> Outcome:
        """Reconcile now (for kopf handlers: errors propagate)."""
        async with self._exclusive(("DistillationJob", namespace, name), Priority.FIRST):
            return await self._reconcile_job(namespace, name)

    def kick_job(self, namespace: str, name: str, priority: Priority = Priority.CHILD_EVENT) -> None:
        """Reconcile soon, in the background (child events; resyncs at a lower priority)."""
        self._kick(("DistillationJob", namespace, name), lambda: self._reconcile_job(namespace, name), priority)

    def on_stage_job_event(self, type_: str | None, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """A stage Job of DistillationJob ``name`` changed: kick its reconcile if the stage's phase did.

        Most Job events are details (a pod count, a ready count): the phase they map to is
        remembered per Job, and only a new phase (or a deletion) is worth a reconcile. The Job
        this operator just created (ADDED, Pending) was accounted for when it was created.
        """
        uid = (body.get("metadata") or {}).get("uid", "")
        phase = "Deleted" if type_ == "DELETED" else observe_job(body).phase.value
        if self.job_phase_seen.get(uid) == phase:
            return
        if type_ == "DELETED":
            self.job_phase_seen.pop(uid, None)
        else:
            self.job_phase_seen[uid] = phase
        if type_ == "ADDED" and phase == "Pending":
            return
        self.kick_job(namespace, name)

    def kick_progress(self, namespace: str, name: str) -> None:
        """A running stage reported: fold it into the status, at most once per ``progress.statusSeconds``.

        Reports that arrive meanwhile wait for the next pass, which reads the latest one: at 1,000
        running jobs the status writes stay at 1,000 per interval, whatever the workers send.
        """
        key: Key = ("DistillationJob", namespace, name)
        now = time.monotonic()
        due = self._progress_due.get(key, 0.0)
        if now >= due:
            self._progress_due[key] = now + self.settings.progress.status_seconds
            self.kick_job(namespace, name, Priority.PROGRESS)
        elif key not in self._progress_later:
            self._progress_later.add(key)
            asyncio.get_running_loop().call_later(due - now, self._progress_later_due, key)

    def _progress_later_due(self, key: Key) -> None:
        self._progress_later.discard(key)
        _, namespace, name = key
        self.kick_progress(namespace, name)

    # ------------------------------------------------------------------ DistilledModel

    async def _reconcile_model(self, namespace: str, name: str) -> Outcome:
        reconcile = reconcile_distilled_model(self.cluster, self.settings, namespace, name)
        return await self._measured("DistilledModel", namespace, name, reconcile)

    async def reconcile_model(self, namespace: str, name: str) -> Outcome:
        async with self._exclusive(("DistilledModel", namespace, name), Priority.FIRST):
            return await self._reconcile_model(namespace, name)

    def kick_model(self, namespace: str, name: str, priority: Priority = Priority.CHILD_EVENT) -> None:
        self._kick(("DistilledModel", namespace, name), lambda: self._reconcile_model(namespace, name), priority)
