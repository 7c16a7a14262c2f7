"""The only code that talks to the API server: a small async facade over the kubernetes client.

It implements the ``Cluster`` port of reconcile/cycle.py with plain dicts in and out:
create (409 = it exists = success), server-side apply with field manager ``kubedistill``,
get (404 = None), list by label selector, delete, status merge patches and Events.

The kubernetes client is synchronous; calls run on a dedicated thread pool (one
connection per thread) behind a token bucket (``reconcile.apiQps``/``apiBurst``), so a
burst of a thousand DistillationJobs queues here instead of flooding the API server. The
bucket serves requests by the priority of the reconcile that makes them (kube/pacing.py):
the reaction to a finished stage never queues behind a thousand first reconciles.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from kubedistill.api.settings import ReconcileSettings
from kubedistill.api.v1alpha1 import API_VERSION
from kubedistill.builders.names import FIELD_MANAGER
from kubedistill.kube.pacing import PriorityRateLimiter

log = logging.getLogger("kubedistill.kube")

# (apiVersion, kind) -> plural of every resource the operator touches.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepools",
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): "inferenceobjectives",
    (API_VERSION, "DistillationJob"): "distillationjobs",
    (API_VERSION, "DistilledModel"): "distilledmodels",
}
REPORTING_COMPONENT = "kubedistill-operator"
# How long a discovery answer is trusted: a CRD installed later is seen within this time.
DISCOVERY_TTL_SECONDS = 30.0


class KubeError(RuntimeError):
    """An API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


def load_api_client(threads: int) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    configuration = k8s.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = threads
    return k8s.ApiClient(configuration)


def _describe(err: ApiException) -> str:
    body = err.body.decode(errors="replace") if isinstance(err.body, bytes) else str(err.body or "")
    try:
        message = json.loads(body).get("message") or body
    except ValueError:
        message = body
    return f"HTTP {err.status} {err.reason}: {message}"[:1000]


class KubeClient:
    """Async, rate-limited access to the API server for the reconcile cycle."""

    def __init__(self, settings: ReconcileSettings, api_client: k8s.ApiClient | None = None) -> None:
        self.settings = settings
        self.api = api_client or load_api_client(settings.api_threads)
        self._pool = ThreadPoolExecutor(max_workers=settings.api_threads, thread_name_prefix="kube")
        # A token bucket (burst tokens refilled at qps) serving the reconcile of highest priority first.
        self.limiter = PriorityRateLimiter(settings.api_qps, settings.api_burst)
        self.requests = 0
        self.instance = os.environ.get("POD_NAME") or os.uname().nodename
        self._discovery: dict[str, tuple[float, frozenset[str] | None]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        await self.limiter.acquire()
        self.requests += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call_sync, method, path, query, body, content_type)

    def _call_sync(
        self, method: str, path: str, query: list[tuple[str, str]] | None, body: Any, content_type: str
    ) -> dict[str, Any]:
        try:
            response = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self.settings.request_timeout_seconds,
            )
        except ApiException as err:
            raise KubeError(err.status or 0, f"{method} {path}: {_describe(err)}") from None
        except OSError as err:  # urllib3 wraps connection problems in OSError subclasses
            raise KubeError(0, f"{method} {path}: {type(err).__name__}: {err}") from None
        data = response.data
        return json.loads(data) if data else {}

    # ------------------------------------------------------------------ the Cluster port

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", resource_path(api_version, kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._call("GET", resource_path(api_version, kind, namespace), query=query)
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def create(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        try:
            await self._call("POST", path, query=[("fieldManager", FIELD_MANAGER)], body=dict(obj))
        except KubeError as err:
            if err.status == 409:
                return False  # deterministic names: it exists, which is what we wanted
            raise
        return True

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return await self._call(
            "PATCH",
            path,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self._call("DELETE", resource_path(api_version, kind, namespace, name), body=body)
        except KubeError as err:
            if err.status != 404:
                raise

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> None:
        path = resource_path(api_version, kind, namespace, name) + "/status"
        try:
            await self._call("PATCH", path, body={"status": dict(patch)}, content_type="application/merge-patch+json")
        except KubeError as err:
            if err.status != 404:  # deleted meanwhile: nothing left to report on
                raise

    async def discover(self, api_version: str) -> frozenset[str] | None:
        """Kinds the API server serves in ``api_version`` (None: not served), cached for a short while."""
        now = time.monotonic()
        cached = self._discovery.get(api_version)
        if cached is not None and now - cached[0] < DISCOVERY_TTL_SECONDS:
            return cached[1]
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            found = await self._call("GET", prefix)
            kinds: frozenset[str] | None = frozenset(
                r["kind"] for r in found.get("resources") or [] if "/" not in r.get("name", "")
            )
        except KubeError as err:
            if err.status not in (404, 503):  # 503: an aggregated API (custom metrics) that is down
                raise
            kinds = None
        self._discovery[api_version] = (now, kinds)
        return kinds

    async def post_event(self, regarding: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on ``regarding`` (what `kubectl describe` shows). Best effort: never raises."""
        meta = regarding.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": regarding.get("apiVersion"),
                "kind": regarding.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._call("POST", resource_path("v1", "Event", namespace), body=event)
        except KubeError as err:
            log.warning("event %s on %s/%s not posted: %s", reason, namespace, meta.get("name"), err)
