"""Pod-level building blocks shared by stage Jobs and serving Deployments: security, quantities, volumes."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import QUANTITY_PATTERN, SecretKeyRef, StorageSpec, Toleration

_QUANTITY = re.compile(QUANTITY_PATTERN)
_SPLIT = re.compile(r"^([+]?[0-9.]+)(.*)$")

AWS_KEY_ID_ENV = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ENV = "AWS_SECRET_ACCESS_KEY"


def scale_quantity(quantity: str, factor: int) -> str:
    """``"12"`` x 8 -> ``"96"``, ``"120Gi"`` x 2 -> ``"240Gi"`` (same suffix; exponents are left alone)."""
    if factor == 1 or not _QUANTITY.match(quantity):
        return quantity
    match = _SPLIT.match(quantity)
    if match is None or "e" in match.group(2).lower():
        return quantity
    number = Decimal(match.group(1)) * factor
    text = format(number.normalize(), "f")
    return f"{text}{match.group(2)}"


def pod_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """Pod-level half of the `restricted` Pod Security Standard."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.security.run_as_user,
        "runAsGroup": settings.security.run_as_group,
        "fsGroup": settings.security.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(settings: OperatorSettings) -> dict[str, Any]:
    """Container-level half: no privilege escalation, every capability dropped; and a read-only root."""
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.security.run_as_user,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": settings.security.read_only_root_filesystem,
    }


# Every container writes only here (an emptyDir): scratch, and the caches that Hugging Face,
# torch.compile and vLLM keep under HOME. The images set HOME=/tmp too; the pods say it again
# for images that do not (vLLM's own image, a team's worker image).
TMP_DIR = "/tmp"
HOME_ENV: list[dict[str, str]] = [{"name": "HOME", "value": TMP_DIR}, {"name": "HF_HOME", "value": f"{TMP_DIR}/hf"}]
TMP_VOLUME: dict[str, Any] = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT: dict[str, Any] = {"name": "tmp", "mountPath": TMP_DIR}


def tolerations(items: list[Toleration]) -> list[dict[str, Any]]:
    return [t.to_wire() for t in items]


def secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    """An environment variable read from a Secret key: the only way a secret reaches a pod."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def storage_env(storage: StorageSpec) -> list[dict[str, Any]]:
    """S3 credentials from the storage Secret (none: workload identity / instance role)."""
    ref = storage.credentials_secret_ref
    if ref is None:
        return []
    return [
        secret_env(AWS_KEY_ID_ENV, SecretKeyRef(name=ref.name, key=AWS_KEY_ID_ENV)),
        secret_env(AWS_SECRET_ENV, SecretKeyRef(name=ref.name, key=AWS_SECRET_ENV)),
    ]


def shm_volume(size: str) -> dict[str, Any]:
    """A memory-backed /dev/shm: NCCL and dataloader workers need far more than the runtime's 64Mi."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


SHM_MOUNT: dict[str, Any] = {"name": "dshm", "mountPath": "/dev/shm"}


def image_pull_secrets(settings: OperatorSettings) -> list[dict[str, str]]:
    return [{"name": name} for name in settings.image_pull_secrets]


# The pod's ServiceAccount token, projected into one container only (pods set
# automountServiceAccountToken: false): the worker that reports progress, the adapter sidecar.
# Mounted where in-cluster clients look for it.
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_SECONDS = 3600  # the kubelet refreshes it before it expires


def api_token_volume(name: str) -> dict[str, Any]:
    """A projected volume with the pod's token, the cluster CA and the namespace."""
    sources: list[dict[str, Any]] = [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": API_TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]
    return {"name": name, "projected": {"sources": sources}}


def api_token_mount(name: str) -> dict[str, Any]:
    return {"name": name, "mountPath": API_TOKEN_DIR, "readOnly": True}
