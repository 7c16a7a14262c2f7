"""Process-wide state of a running operator: settings, the API client, and who reconciles what when.

kopf calls the handlers; this decides how reconciles of one resource line up:

* one at a time per resource (a lock per DistillationJob/DistilledModel), so two triggers
  never race on the same status;
* child events *kick* a reconcile in the background; kicks that arrive while one is
  already queued for that resource merge into it (a thousand Job events do not mean a
  thousand reconciles);
* at most ``reconcile.maxConcurrentReconciles`` in flight across all resources;
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

from kubedistill.builders import names
from kubedistill.builders.settings import OperatorSettings
from kubedistill.kube.client import KubeClient
from kubedistill.reconcile.loop import (
    InvalidSpec,
    Outcome,
    reconcile_distillation_job,
    reconcile_distilled_model,
)

log = logging.getLogger("kubedistill.runtime")
Key = tuple[str, str, str]  # (kind, namespace, name)
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Runtime:
    """Shared by every handler through kopf's ``memo``."""

    def __init__(self, settings: OperatorSettings, cluster: KubeClient) -> None:
        self.settings = settings
        self.cluster = cluster
        # kopf's indices (live watch caches), bound by the first handler call.
        self.jobs_index: Mapping[Any, Iterable[Mapping[str, Any]]] | None = None
        self.job_phases: Mapping[Any, Iterable[Any]] | None = None
        self.model_phases: Mapping[Any, Iterable[Any]] | None = None
        self.models_following: Mapping[Any, Iterable[str]] = {}
        self.pool_members: Mapping[Any, Iterable[str]] = {}
        self.job_phase_seen: dict[str, str] = {}
        self._locks: weakref.WeakValueDictionary[Key, asyncio.Lock] = weakref.WeakValueDictionary()
        self._queued: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.reconcile.max_concurrent_reconciles)
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

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: Key) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock, self._slots:
            yield

    def _kick(self, key: Key, run: Callable[[], Awaitable[Outcome]]) -> None:
        if key in self._queued:
            return  # a queued reconcile will read the latest state anyway
        self._queued.add(key)
        task = asyncio.create_task(self._run_kicked(key, run), name=f"reconcile {'/'.join(key)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_kicked(self, key: Key, run: Callable[[], Awaitable[Outcome]]) -> None:
        async with self._exclusive(key):
            self._queued.discard(key)  # from here on, a new kick queues another pass
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
                loop.call_later(delay, self._kick, key, run)
                return
        self._failures.pop(key, None)

    # ------------------------------------------------------------------ DistillationJob

    def _jobs_of(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        if self.jobs_index is None:
            return None
        return list(self.jobs_index.get((namespace, names.label_value(name)), ()))

    async def _reconcile_job(self, namespace: str, name: str) -> Outcome:
        start = time.monotonic()
        outcome = await reconcile_distillation_job(
            self.cluster, self.settings, namespace, name, self._jobs_of(namespace, name)
        )
        self._count(time.monotonic() - start)
        log.debug("reconciled DistillationJob %s/%s in %.3fs: %s", namespace, name, self.durations[-1], outcome)
        return outcome

    async def reconcile_job(self, namespace: str, name: str) -> Outcome:
        """Reconcile now (for kopf handlers: errors propagate)."""
        async with self._exclusive(("DistillationJob", namespace, name)):
            return await self._reconcile_job(namespace, name)

    def kick_job(self, namespace: str, name: str) -> None:
        """Reconcile soon, in the background (for child events)."""
        self._kick(("DistillationJob", namespace, name), lambda: self._reconcile_job(namespace, name))

    # ------------------------------------------------------------------ DistilledModel

    async def _reconcile_model(self, namespace: str, name: str) -> Outcome:
        start = time.monotonic()
        outcome = await reconcile_distilled_model(self.cluster, self.settings, namespace, name)
        self._count(time.monotonic() - start)
        return outcome

    async def reconcile_model(self, namespace: str, name: str) -> Outcome:
        async with self._exclusive(("DistilledModel", namespace, name)):
            return await self._reconcile_model(namespace, name)

    def kick_model(self, namespace: str, name: str) -> None:
        self._kick(("DistilledModel", namespace, name), lambda: self._reconcile_model(namespace, name))
