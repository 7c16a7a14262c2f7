"""Where a DistillationJob's stage pods report live progress, and the narrow right to do so.

Per DistillationJob ``<dj>`` (owned by it, so deleted with it):

* ConfigMap ``<dj>-progress``: one key per stage, the latest ``StageProgress`` JSON a worker
  wrote (api/worker_config.py); the operator watches it and folds it into the status;
* ServiceAccount ``<dj>-worker`` for the stage pods, unless the settings name one (cloud
  workload identity for the object store is bound to a ServiceAccount of the user's);
* Role and RoleBinding ``<dj>-progress-writer``: get and patch that one ConfigMap, by name.

Why a ConfigMap and not the operator polling the pods: the operator needs no network path to
pods and no object-store credentials, a pod gets exactly one write, and a report survives the
pod (a restarted operator reads the latest one from its watch cache).
"""

from __future__ import annotations

from typing import Any

from kubedistill.api.settings import OperatorSettings
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan


def _metadata(plan: RunPlan, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": plan.namespace,
        "labels": names.progress_labels(plan.name),
        "ownerReferences": [plan.owner_reference()],
    }


def worker_service_account(plan: RunPlan, settings: OperatorSettings) -> str:
    """The ServiceAccount the stage pods run as."""
    return settings.service_account_name or names.worker_service_account_name(plan.name)


def build_progress_children(plan: RunPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The progress ConfigMap and the RBAC of its writers, in creation order (the ConfigMap last)."""
    config_map = names.progress_config_name(plan.name)
    role = names.progress_role_name(plan.name)
    account = worker_service_account(plan, settings)
    children: list[dict[str, Any]] = []
    if settings.service_account_name is None:
        children.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _metadata(plan, account),
                "automountServiceAccountToken": False,
            }
        )
    children += [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(plan, role),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [config_map],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(plan, role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": plan.namespace}],
        },
        # Last: its existence is how the operator knows the set was created.
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(plan, config_map), "data": {}},
    ]
    return children
