"""An in-memory API server behind the reconcile cycle's ``Cluster`` port, for the fast unit tier.

kopf's own advice (examples/09-testing): test the runtime through a fake of the boundary, and
the boundary itself for real. Here the boundary is ``reconcile.cycle.Cluster``: the real
reconcile functions and the real ``Scheduler`` run against this fake, in milliseconds; the real
API server is the cluster tier's job. The fake keeps the port's contract (``get`` returns None
for a missing object, ``create`` returns False for an existing one, ``delete`` ignores a
missing one, status patches are merge patches), paces requests like ``KubeClient`` does
(the same priority token bucket, optional per-request latency) and records every request.

    cluster = FakeCluster(qps=100, latency=0.002)
    cluster.put(distillation_job_manifest)
    outcome = await reconcile_distillation_job(cluster, settings, "ns", "name")
    cluster.finish_job("ns", job_name, message=generate_result())
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubedistill.kube.pacing import PriorityRateLimiter, reconcile_priority

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _matches(obj: Mapping[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        name, _, value = term.partition("=")
        if labels.get(name) != value:
            return False
    return True


@dataclass
class Request:
    verb: str
    kind: str
    name: str
    priority: int


@dataclass
class FakeCluster:
    """Objects by (apiVersion, kind, namespace, name); every request is recorded in ``calls``."""

    qps: float = 1e9
    burst: int = 1_000_000
    latency: float = 0.0
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    calls: list[Request] = field(default_factory=list)
    served: dict[str, frozenset[str]] = field(default_factory=dict)  # api_version -> kinds that discover() finds
    events: list[tuple[str, str, str, str]] = field(default_factory=list)  # (object name, type, reason, message)
    _uids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.limiter = PriorityRateLimiter(self.qps, self.burst)

    async def _request(self, verb: str, kind: str, name: str) -> None:
        await self.limiter.acquire()
        self.calls.append(Request(verb, kind, name, int(reconcile_priority.get())))
        if self.latency:
            await asyncio.sleep(self.latency)

    @property
    def requests(self) -> int:
        """How many requests were made (KubeClient's counter)."""
        return len(self.calls)

    def close(self) -> None:
        """KubeClient's: nothing to release here."""

    # ------------------------------------------------------------------ test helpers

    def put(self, obj: Mapping[str, Any], namespace: str = "ns") -> dict[str, Any]:
        body = copy.deepcopy(dict(obj))
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("generation", 1)
        self.objects[(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])] = body
        return body

    def peek(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((api_version, kind, namespace, name))

    def of_kind(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [o for (_, k, ns, _), o in self.objects.items() if k == kind and namespace in (None, ns)]

    def finish_job(self, namespace: str, name: str, *, message: str | None, ok: bool = True) -> None:
        """The Job controller and kubelet in one step: the Job completes (or fails), its pod leaves ``message``."""
        job = self.objects[("batch/v1", "Job", namespace, name)]
        now = "2026-01-01T00:00:00Z"
        condition = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": now}
        job["status"] = {"startTime": now, "conditions": [condition], **({"completionTime": now} if ok else {})}
        phase = "Succeeded" if ok else "Failed"
        terminated = {"exitCode": 0 if ok else 1, "message": message or "", "finishedAt": now}
        self.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-pod",
                    "namespace": namespace,
                    "labels": {"batch.kubernetes.io/controller-uid": job["metadata"]["uid"]},
                },
                "status": {
                    "phase": phase,
                    "containerStatuses": [{"name": "worker", "state": {"terminated": terminated}}],
                },
            }
        )

    # ------------------------------------------------------------------ the Cluster port

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        await self._request("get", kind, name)
        found = self.objects.get((api_version, kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        await self._request("list", kind, label_selector)
        return [
            copy.deepcopy(o)
            for (v, k, ns, _), o in self.objects.items()
            if (v, k, ns) == (api_version, kind, namespace) and _matches(o, label_selector)
        ]

    async def create(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        await self._request("create", obj["kind"], meta["name"])
        if (obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]) in self.objects:
            return False
        self.put(obj, meta["namespace"])
        return True

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        await self._request("apply", obj["kind"], meta["name"])
        key = (obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        existing = self.objects.get(key)
        if existing is None:
            return self.put(obj, meta["namespace"])
        _merge(existing, obj)
        return copy.deepcopy(existing)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        await self._request("delete", kind, name)
        self.objects.pop((api_version, kind, namespace, name), None)

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> None:
        await self._request("patch_status", kind, name)
        found = self.objects.get((api_version, kind, namespace, name))
        if found is not None:
            _merge(found.setdefault("status", {}), patch)

    async def discover(self, api_version: str) -> frozenset[str] | None:
        await self._request("discover", api_version, "")
        return self.served.get(api_version)

    async def post_event(self, regarding: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await self._request("event", "Event", reason)
        self.events.append(((regarding.get("metadata") or {}).get("name", ""), type_, reason, message))
