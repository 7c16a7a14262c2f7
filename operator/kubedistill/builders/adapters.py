"""Adapter pools: a DistilledModel whose replicas host the LoRA adapters of other DistilledModels.

How an adapter reaches a replica the operator cannot reach over the network: the operator
writes the pool's adapter set into one ConfigMap (``<pool>-adapters``), mounted into every pod
of the pool; an ``adapter-sync`` sidecar per pod (``kubedistill-worker adapter-sync``) watches
the mounted file, fetches each adapter from the object store into a volume it shares with
vLLM, loads it through vLLM's runtime LoRA API (``/v1/load_lora_adapter``, ``load_inplace`` for
a new version), unloads what left the set, and

* answers its readiness probe only once vLLM has held every adapter of the set: a new replica
  is never Ready without them (pod readiness is every container's); later, only while vLLM
  still holds what it held (a restarted vLLM is unready until its adapters are back);
* reports what vLLM holds as a pod condition (``kubedistill.io/adapters``), which the operator
  reads to count, per adapter, the ready replicas that serve its current version.

The ConfigMap is not immutable and not part of the pod template: adding, promoting or
removing an adapter changes no Deployment, so the pool never restarts for it. The kubelet
refreshes mounted ConfigMaps within its sync period (about a minute by default), which
bounds how fast a change reaches every replica. Pure: models in, manifests out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import AdapterPoolSpec, StorageSpec
from kubedistill.api.worker_config import CONFIG_DIR, AdapterEntry, AdapterSet, StorageSettings
from kubedistill.builders import names
from kubedistill.builders.resources import api_token_mount, api_token_volume, container_security_context, storage_env

ADAPTERS_DIR = "/adapters"
ADAPTERS_CONFIG_DIR = f"{CONFIG_DIR}/adapters"


def adapter_revision(name: str, uri: str, digest: str | None) -> str:
    """Identifies one version of one adapter: what the sidecar reports, what the operator counts."""
    return names.short_hash(f"{name}|{uri}|{digest or ''}", 12)


def adapter_entry(name: str, uri: str, digest: str | None, storage: StorageSpec) -> AdapterEntry:
    return AdapterEntry(
        name=name,
        uri=uri,
        digest=digest.removeprefix("sha256:") if digest else None,
        revision=adapter_revision(name, uri, digest),
        storage=StorageSettings(
            endpoint=storage.endpoint, region=storage.region, addressing_style=storage.addressing_style
        ),
    )


def _metadata(name: str, namespace: str, pool: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": names.model_labels(pool), "ownerReferences": [owner]}


def build_adapters_config_map(
    pool: str, namespace: str, owner: dict[str, Any], entries: Sequence[AdapterEntry]
) -> dict[str, Any]:
    """``<pool>-adapters``: the adapter set, sorted by name so that an unchanged set is an unchanged object."""
    adapter_set = AdapterSet(adapters=sorted(entries, key=lambda e: e.name))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(names.pool_adapters_config_name(pool), namespace, pool, owner),
        "data": {names.ADAPTERS_KEY: yaml.safe_dump(adapter_set.to_wire(), sort_keys=True)},
    }


def build_adapter_sync_rbac(
    pool: str, namespace: str, owner: dict[str, Any], settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The sidecar may read pods and write pod status conditions in its namespace, nothing else."""
    name = names.adapter_sync_name(pool)
    account = settings.service_account_name or name
    objects: list[dict[str, Any]] = []
    if settings.service_account_name is None:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _metadata(name, namespace, pool, owner),
                "automountServiceAccountToken": False,
            }
        )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(name, namespace, pool, owner),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
            ],
        }
    )
    objects.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(name, namespace, pool, owner),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        }
    )
    return objects


def pool_service_account(pool: str, settings: OperatorSettings) -> str:
    return settings.service_account_name or names.adapter_sync_name(pool)


def pool_vllm_args(adapters: AdapterPoolSpec) -> list[str]:
    return ["--enable-lora", "--max-loras", str(adapters.max_adapters), "--max-lora-rank", str(adapters.max_rank)]


POOL_VLLM_ENV: list[dict[str, str]] = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]
POOL_VLLM_MOUNT: dict[str, Any] = {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True}


def build_adapter_sync_container(storage: StorageSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The sidecar that loads the pool's adapter set into the vLLM container next to it."""
    port = settings.serving.adapter_sync_port
    field = [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]
    return {
        "name": names.ADAPTER_SYNC_CONTAINER,
        "image": settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubedistill-worker", "adapter-sync"],
        "args": [
            *("--adapters", f"{ADAPTERS_CONFIG_DIR}/{names.ADAPTERS_KEY}", "--dir", ADAPTERS_DIR),
            *("--vllm-url", f"http://127.0.0.1:{settings.serving.port}", "--port", str(port)),
        ],
        "env": [
            {"name": "KUBEDISTILL_LOG_LEVEL", "value": settings.log_level},
            *[{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in field],
            *storage_env(storage),
        ],
        "ports": [{"name": "adapter-sync", "containerPort": port, "protocol": "TCP"}],
        # /ready asks vLLM what it holds: allow for a busy server (the kubelet's default timeout is 1 s).
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [
            {"name": "adapters-config", "mountPath": ADAPTERS_CONFIG_DIR, "readOnly": True},
            {"name": "adapters", "mountPath": ADAPTERS_DIR},
            api_token_mount("adapter-sync-token"),
        ],
        "securityContext": container_security_context(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def pool_volumes(pool: str) -> list[dict[str, Any]]:
    """The adapter set (live ConfigMap), the adapters' files, and a token for the sidecar alone."""
    return [
        {"name": "adapters-config", "configMap": {"name": names.pool_adapters_config_name(pool)}},
        {"name": "adapters", "emptyDir": {}},
        api_token_volume("adapter-sync-token"),
    ]
