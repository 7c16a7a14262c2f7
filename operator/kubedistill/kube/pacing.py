"""Who goes first when the operator is busy: child events before first reconciles and resyncs.

At a thousand DistillationJobs created at once, a thousand first reconciles queue for
reconcile slots and for API requests. A stage Job that finishes meanwhile must not wait
behind them: the next stage (and the user watching ``kubectl get dj``) are waiting on it,
while a first reconcile a few seconds later changes nothing for anyone. So both queues
order their waiters by ``Priority``, first come first served within a priority:

* ``PrioritySemaphore``: the reconcile slots (``reconcile.maxConcurrentReconciles``);
* ``PriorityRateLimiter``: the API token bucket (``reconcile.apiQps`` / ``apiBurst``).

The priority of the reconcile in progress travels in a context variable
(``reconcile_priority``), so every API request it makes waits at its priority without
the reconcile code knowing. A freed slot or token goes straight to the best waiter: a
newcomer never barges past one already waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from enum import IntEnum


class Priority(IntEnum):
    """Lower goes first."""

    CHILD_EVENT = 0  # a child (stage Job, Deployment) changed: a run waits on the reaction
    FIRST = 1  # create, update or resume of the resource itself (kopf handlers)
    PROGRESS = 2  # a running stage reported progress: worth showing, never worth delaying work for
    RESYNC = 3  # the safety-net pass over runs in flight


reconcile_priority: ContextVar[Priority] = ContextVar("reconcile_priority", default=Priority.FIRST)

_Waiter = tuple[int, int, "asyncio.Future[None]"]


class _PriorityQueue:
    """Waiting futures by (priority, arrival); cancelled ones are skipped when their turn comes."""

    def __init__(self) -> None:
        self._heap: list[_Waiter] = []
        self._arrival = itertools.count()

    def push(self, priority: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._arrival), future))
        return future

    def pop(self) -> asyncio.Future[None] | None:
        """The best waiter still waiting, or None."""
        while self._heap:
            _, _, future = heapq.heappop(self._heap)
            if not future.done():
                return future
        return None

    def __bool__(self) -> bool:
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        return bool(self._heap)

    def __len__(self) -> int:
        return sum(1 for _, _, future in self._heap if not future.done())


class PrioritySemaphore:
    """``asyncio.Semaphore`` whose waiters are served by priority."""

    def __init__(self, value: int) -> None:
        self._free = value
        self._waiters = _PriorityQueue()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future = self._waiters.push(priority)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        future = self._waiters.pop()
        if future is None:
            self._free += 1
        else:
            future.set_result(None)  # handed over: the slot never becomes free for a newcomer

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()


class PriorityRateLimiter:
    """A token bucket (``rate`` per second, ``burst`` at most) whose waiters are served by priority."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()
        self._waiters = _PriorityQueue()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self, priority: int | None = None) -> None:
        """Wait for a token at ``priority`` (default: the reconcile's, from ``reconcile_priority``)."""
        self._refill()
        if self._tokens >= 1 and not self._waiters:
            self._tokens -= 1
            return
        future = self._waiters.push(reconcile_priority.get() if priority is None else priority)
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._tokens += 1  # granted just as we were cancelled: give it back
            raise

    def _on_timer(self) -> None:
        self._timer = None
        self._grant()

    def _grant(self) -> None:
        self._refill()
        while self._tokens >= 1 and (future := self._waiters.pop()) is not None:
            self._tokens -= 1
            future.set_result(None)
        if self._waiters and self._timer is None:
            delay = max(0.0, (1 - self._tokens) / self.rate)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
