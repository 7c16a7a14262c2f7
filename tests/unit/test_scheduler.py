"""The operator's scheduler through a fake of the ``Cluster`` port: who reconciles what, when, in what order.

The real ``Scheduler`` and the real reconcile functions run against tests/support/fake_cluster.py
(in memory, paced like the API client): queued kicks merge, the per-resource lock holds,
failed reconciles back off, and the reaction to a finished stage goes before a backlog of
first reconciles (the N=1,000 case of bench/operator_scale.py, in miniature).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from kubedistill import scheduler as runtime_module
from kubedistill.api.settings import OperatorSettings, ReconcileSettings
from kubedistill.api.v1alpha1 import API_VERSION
from kubedistill.kube.pacing import Priority, PriorityRateLimiter, PrioritySemaphore
from kubedistill.scheduler import Scheduler
from tests.support.djobs import distillation_job, generate_result
from tests.support.fake_cluster import FakeCluster

DJ = "DistillationJob"


def settings(**reconcile: object) -> OperatorSettings:
    return OperatorSettings(reconcile=ReconcileSettings.model_validate(reconcile))


def jobs_of(cluster: FakeCluster, name: str) -> dict[str, str]:
    """stage -> Job name of DistillationJob ``name``."""
    return {
        j["metadata"]["labels"]["kubedistill.io/stage"]: j["metadata"]["name"]
        for j in cluster.of_kind("Job")
        if j["metadata"]["labels"]["kubedistill.io/job"] == name
    }


# --------------------------------------------------------------------------- the pacing primitives


async def test_semaphore_serves_waiters_by_priority_then_arrival():
    slots = PrioritySemaphore(1)
    await slots.acquire(Priority.FIRST)
    order: list[str] = []

    async def wait(label: str, priority: Priority) -> None:
        async with slots.slot(priority):
            order.append(label)

    tasks = [
        asyncio.create_task(wait(label, priority))
        for label, priority in [("resync", Priority.RESYNC), ("first-a", Priority.FIRST),
                                ("child", Priority.CHILD_EVENT), ("first-b", Priority.FIRST)]
    ]  # fmt: skip
    await asyncio.sleep(0)
    assert slots.waiting == 4
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["child", "first-a", "first-b", "resync"]


async def test_semaphore_skips_a_cancelled_waiter_and_never_loses_a_slot():
    slots = PrioritySemaphore(1)
    await slots.acquire(Priority.FIRST)
    cancelled = asyncio.create_task(slots.acquire(Priority.CHILD_EVENT))
    waiting = asyncio.create_task(slots.acquire(Priority.RESYNC))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    slots.release()
    await asyncio.wait_for(waiting, 1)
    slots.release()
    await asyncio.wait_for(slots.acquire(Priority.RESYNC), 1)  # the slot came back: nothing leaked


async def test_rate_limiter_keeps_its_rate_and_serves_urgent_requests_first():
    limiter = PriorityRateLimiter(rate=100, burst=5)
    granted: list[tuple[str, float]] = []
    started = time.monotonic()

    async def request(label: str, priority: Priority) -> None:
        await limiter.acquire(priority)
        granted.append((label, time.monotonic() - started))

    backlog = [asyncio.create_task(request(f"first-{i}", Priority.FIRST)) for i in range(30)]
    await asyncio.sleep(0.05)
    urgent = asyncio.create_task(request("child", Priority.CHILD_EVENT))
    await asyncio.gather(*backlog, urgent)
    labels = [label for label, _ in granted]
    assert labels.index("child") < 15, labels  # ahead of the backlog still waiting when it arrived
    # 31 tokens: 5 at once, 26 at 100/s -> at least 0.26 s; never faster than the rate allows.
    assert granted[-1][1] >= 0.25


# --------------------------------------------------------------------------- the scheduler


async def test_kicks_merge_while_one_is_queued():
    cluster = FakeCluster()
    cluster.put(distillation_job("merge"))
    scheduler = Scheduler(settings(maxConcurrentReconciles=1), cluster)  # type: ignore[arg-type]
    for _ in range(50):
        scheduler.kick_job("ns", "merge")
    await asyncio.wait_for(asyncio.gather(*list(scheduler._tasks)), 5)
    assert scheduler.reconciles == 1
    assert jobs_of(cluster, "merge").keys() == {"generate"}
    await scheduler.close()


async def test_an_urgent_kick_does_not_merge_into_a_queued_resync():
    cluster = FakeCluster()
    cluster.put(distillation_job("urgent"))
    scheduler = Scheduler(settings(maxConcurrentReconciles=1), cluster)  # type: ignore[arg-type]
    scheduler.kick_job("ns", "urgent", Priority.RESYNC)
    scheduler.kick_job("ns", "urgent", Priority.RESYNC)
    scheduler.kick_job("ns", "urgent", Priority.CHILD_EVENT)
    await asyncio.wait_for(asyncio.gather(*list(scheduler._tasks)), 5)
    assert scheduler.reconciles == 2
    await scheduler.close()


async def test_one_reconcile_at_a_time_per_resource():
    cluster = FakeCluster(latency=0.005)
    cluster.put(distillation_job("locked"))
    scheduler = Scheduler(settings(maxConcurrentReconciles=8), cluster)  # type: ignore[arg-type]
    active = peak = 0
    original = runtime_module.reconcile_distillation_job

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await original(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            active -= 1

    runtime_module.reconcile_distillation_job = counting  # type: ignore[assignment]
    try:
        await asyncio.gather(*(scheduler.reconcile_job("ns", "locked") for _ in range(5)))
    finally:
        runtime_module.reconcile_distillation_job = original
    assert scheduler.reconciles == 5 and peak == 1
    assert len(jobs_of(cluster, "locked")) == 1  # five passes, one Job
    await scheduler.close()


async def test_a_failed_kicked_reconcile_backs_off_and_retries(monkeypatch):
    monkeypatch.setattr(runtime_module, "RETRY_DELAYS", (0.05, 0.1))
    cluster = FakeCluster()
    cluster.put(distillation_job("flaky"))
    failures = [RuntimeError("API hiccup")] * 2
    original_get = cluster.get

    async def flaky_get(*args: str) -> object:
        if failures:
            raise failures.pop()
        return await original_get(*args)

    cluster.get = flaky_get  # type: ignore[method-assign]
    scheduler = Scheduler(settings(), cluster)  # type: ignore[arg-type]
    started = time.monotonic()
    scheduler.kick_job("ns", "flaky")
    while "generate" not in jobs_of(cluster, "flaky"):
        assert time.monotonic() - started < 5, "never retried"
        await asyncio.sleep(0.01)
    assert time.monotonic() - started >= 0.15  # 0.05 s, then 0.1 s of backoff
    assert scheduler._failures == {}
    await scheduler.close()


async def test_a_finished_stage_is_acted_on_before_a_backlog_of_first_reconciles():
    """N first reconciles queued (create handlers), one stage finishes: its reaction jumps the queue."""
    n = 100
    cluster = FakeCluster(qps=400, burst=10)  # the API server's pace, not the test's CPU, is the bottleneck
    names = [f"dj-{i:03d}" for i in range(n)]
    cluster.put(distillation_job("early"))
    for name in names:
        cluster.put(distillation_job(name))
    scheduler = Scheduler(settings(maxConcurrentReconciles=8), cluster)  # type: ignore[arg-type]
    await scheduler.reconcile_job("ns", "early")
    cluster.finish_job("ns", jobs_of(cluster, "early")["generate"], message=generate_result())

    before = len(cluster.calls)
    backlog = [asyncio.create_task(scheduler.reconcile_job("ns", name)) for name in names]
    while len(cluster.calls) < before + 20:  # the backlog holds every slot and queues for tokens
        await asyncio.sleep(0.001)
    scheduler.kick_job("ns", "early")  # the Job event
    while "train" not in jobs_of(cluster, "early"):
        await asyncio.sleep(0.001)
    done_before = sum(task.done() for task in backlog)
    await asyncio.gather(*backlog)
    assert done_before < n // 4, f"{done_before} of {n} first reconciles went before the reaction"
    urgent = [c for c in cluster.calls if c.priority == Priority.CHILD_EVENT]
    assert {c.verb for c in urgent} >= {"get", "list", "create", "patch_status"}
    assert cluster.peek(API_VERSION, DJ, "ns", "early")["status"]["phase"] == "Training"  # type: ignore[index]
    await scheduler.close()


@pytest.mark.parametrize("priority", [Priority.FIRST, Priority.RESYNC])
async def test_every_api_request_of_a_reconcile_carries_its_priority(priority):
    cluster = FakeCluster()
    cluster.put(distillation_job("tagged"))
    scheduler = Scheduler(settings(), cluster)  # type: ignore[arg-type]
    if priority == Priority.FIRST:
        await scheduler.reconcile_job("ns", "tagged")
    else:
        scheduler.kick_job("ns", "tagged", priority)
        await asyncio.gather(*list(scheduler._tasks))
    assert cluster.calls and {c.priority for c in cluster.calls} == {priority}
    await scheduler.close()


async def test_stage_job_events_kick_only_when_the_stage_phase_changes():
    cluster = FakeCluster()
    scheduler = Scheduler(settings(), cluster)  # type: ignore[arg-type]
    kicked: list[str] = []
    scheduler.kick_job = lambda namespace, name, priority=Priority.CHILD_EVENT: kicked.append(name)  # type: ignore[method-assign]

    def job(**status: object) -> dict:
        return {"metadata": {"name": "j", "uid": "u1", "labels": {}}, "status": status}

    scheduler.on_stage_job_event("ADDED", "ns", "dj", job())  # we created it: no reconcile
    scheduler.on_stage_job_event("MODIFIED", "ns", "dj", job(active=1))  # a pod count: still Pending
    assert kicked == []
    scheduler.on_stage_job_event("MODIFIED", "ns", "dj", job(active=1, ready=1))  # Running
    scheduler.on_stage_job_event("MODIFIED", "ns", "dj", job(active=1, ready=1, startTime="t"))  # a detail
    assert kicked == ["dj"]
    done = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    scheduler.on_stage_job_event("MODIFIED", "ns", "dj", job(**done))
    scheduler.on_stage_job_event(None, "ns", "dj", job(**done))  # the same, listed again at a restart
    scheduler.on_stage_job_event("DELETED", "ns", "dj", job(**done))
    assert kicked == ["dj", "dj", "dj"]
    assert scheduler.job_phase_seen == {}
    await scheduler.close()


async def test_a_reaction_finds_a_slot_kept_for_it_while_first_reconciles_hold_the_rest():
    """1 slot in 8 is for child events: a finished stage's reconcile starts at once, without
    waiting for any of a backlog of first reconciles (which hold every other slot) to end."""
    cluster = FakeCluster(latency=0.02)  # every request takes a while: the backlog holds its slots
    cluster.put(distillation_job("early"))
    names = [f"dj-{i:02d}" for i in range(30)]
    for name in names:
        cluster.put(distillation_job(name))
    scheduler = Scheduler(settings(maxConcurrentReconciles=8), cluster)  # type: ignore[arg-type]
    assert scheduler.reserved_slots == 1
    await scheduler.reconcile_job("ns", "early")
    cluster.finish_job("ns", jobs_of(cluster, "early")["generate"], message=generate_result())

    before = len(cluster.calls)
    backlog = [asyncio.create_task(scheduler.reconcile_job("ns", name)) for name in names]
    while len({c.name for c in cluster.calls[before:]}) < 7:  # 7 first reconciles in flight: all they may hold
        await asyncio.sleep(0.001)
    scheduler.kick_job("ns", "early")  # the Job event
    while "train" not in jobs_of(cluster, "early"):
        await asyncio.sleep(0.001)
    calls = cluster.calls[before:]
    first_reaction_call = next(i for i, c in enumerate(calls) if c.priority == Priority.CHILD_EVENT)
    finished_before = [c for c in calls[:first_reaction_call] if c.verb == "patch_status"]
    assert finished_before == [], f"the reaction waited for {len(finished_before)} first reconciles to end"
    assert scheduler.queue_depth > 0  # the backlog was still queued behind its 7 slots
    await asyncio.gather(*backlog)
    await scheduler.close()
