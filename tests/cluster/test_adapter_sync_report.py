"""The adapter-sync sidecar's report through the real API server, with the RBAC the operator creates.

kwok plays the kubelet: it runs no container, so the pool's pod is Running and Ready but nothing
in it reports what it loaded. Here a real adapter-sync process plays that pod's sidecar, next to
a real vLLM CPU server started with the pool container's LoRA arguments: it reads the operator's
``<pool>-adapters`` ConfigMap (copied in as the kubelet would), and reports as that pod
(POD_NAME/POD_NAMESPACE) with a token of the ServiceAccount the operator created for the pool
(TokenRequest, as the pod's projected token is made). The loop under test:

    sidecar loads the adapter -> patches the pod condition kubedistill.io/adapters (restricted Role)
    -> the operator sees the pod event -> the adapter's DistilledModel: Ready, readyReplicas 1/1,
    and the pool's status.adapters

and the same loop again for a promotion (a new model URI of the adapter's DistilledModel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.api.worker_config import StorageSettings
from kubedistill.storage.objectstore import S3Store, upload_dir
from tests.support import operator_proc
from tests.support.adapter_pool import PoolRendering, Replica, make_adapter
from tests.support.cluster import Cluster, wait_for
from tests.support.operator_proc import OperatorFactory
from tests.support.s3 import shared_s3_server
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
crds = operator_proc.crds
start_operator = operator_proc.start_operator


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The local S3 server with the base model and two versions of one adapter: (s3, uris, base dir)."""
    s3 = shared_s3_server()
    tmp = tmp_path_factory.mktemp("adapters")
    base = cached_tiny_chat_model(tmp_path_factory.getbasetemp(), vocab_size=512)
    client = S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())
    bucket = s3.make_bucket()
    uris = {"base": f"s3://{bucket}/models/base"}
    upload_dir(client, base, uris["base"])
    for seed, version in enumerate(["sql-v1", "sql-v2"]):
        uris[version] = f"s3://{bucket}/adapters/{version}"
        upload_dir(client, make_adapter(base, tmp / version, seed), uris[version])
    return s3, uris, base


def model(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubedistill.io/v1alpha1", "kind": "DistilledModel", "metadata": {"name": name}, "spec": spec}


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``account`` with a bound token (what a projected token volume holds)."""
    token = cluster.kubectl("-n", namespace, "create", "token", account, "--duration=1h").stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.kubectl_json("-n", namespace, "get", "dm", name).get("status") or {}
    return found


def ready_condition(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    conditions = status(cluster, namespace, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_the_sidecars_report_reaches_the_adapters_status(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory, store, tmp_path: Path
) -> None:
    s3, uris, base = store
    storage = {"endpoint": s3.endpoint_url, "addressingStyle": "path"}
    start_operator()
    serving = {"gpus": 1, "replicas": 1, "adapters": {"maxAdapters": 2, "maxRank": 8}}
    cluster.apply(model("base", {"model": {"uri": uris["base"]}, "serving": serving, "storage": storage}), namespace)
    sql = {"model": {"uri": uris["sql-v1"]}, "pool": {"name": "base"}, "storage": storage}
    cluster.apply(model("sql", sql), namespace)

    def adapter_set() -> dict[str, Any] | None:
        out = cluster.kubectl("-n", namespace, "get", "configmap", "base-adapters", "-o", "json", "--ignore-not-found")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def pod() -> dict[str, Any] | None:
        pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "kubedistill.io/model=base")["items"]
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        return running[0] if len(running) == 1 else None

    def with_sql() -> dict[str, Any] | None:
        found = adapter_set()
        return found if found and uris["sql-v1"] in found["data"]["adapters.yaml"] else None

    # The pool's first reconcile may write its set before sql joins it; the member's event updates it.
    config = wait_for(with_sql, timeout=90, interval=0.5, what="sql in the pool's adapter set")
    target = wait_for(pod, timeout=90, interval=0.5, what="the pool's pod Running (kwok)")
    assert ready_condition(cluster, namespace, "sql").get("reason") == "AdapterLoading"  # nobody reports yet

    # the sidecar's credentials: the pool's ServiceAccount, and what its Role allows
    kubeconfig = service_account_kubeconfig(cluster, namespace, "base-adapter-sync", tmp_path / "sa.kubeconfig")

    def can(*args: str) -> bool:
        done = cluster.kubectl("--kubeconfig", str(kubeconfig), "-n", namespace, "auth", "can-i", *args, check=False)
        return done.stdout.strip() == "yes"

    assert can("patch", "pods", "--subresource=status") and can("get", "pods")
    assert not any(
        can(*a) for a in [("patch", "pods"), ("delete", "pods"), ("list", "pods"), ("get", "secrets"), ("get", "dm")]
    )

    deployment = cluster.kubectl_json("-n", namespace, "get", "deployment", "base-vllm")
    rendering = PoolRendering.from_objects(config, deployment)
    report_env = {"POD_NAME": target["metadata"]["name"], "POD_NAMESPACE": namespace, "KUBECONFIG": str(kubeconfig)}
    replica = Replica("pod", rendering, base, s3.env(), tmp_path, report_env=report_env)
    try:
        replica.start()
        replica.wait_started()
        revision_v1 = rendering.revisions()["sql"]
        wait_for(
            lambda: status(cluster, namespace, "sql").get("readyReplicas") == 1,
            timeout=120,
            interval=0.5,
            what="the adapter counted as served by the pool's replica",
        )
        ready = ready_condition(cluster, namespace, "sql")
        assert ready["status"] == "True" and ready["reason"] == "AdapterServed", ready
        assert "1/1 ready replicas of pool base" in ready["message"]
        pool_status = wait_for(
            lambda: (s := status(cluster, namespace, "base")).get("adapters") and s,
            timeout=60,
            what="the pool's adapters status",
        )
        assert [(a["name"], a["readyReplicas"]) for a in pool_status["adapters"]] == [("sql", 1)]
        conditions = cluster.kubectl_json("-n", namespace, "get", "pod", target["metadata"]["name"])["status"]
        reported = next(c for c in conditions["conditions"] if c["type"] == "kubedistill.io/adapters")
        assert json.loads(reported["message"]) == {"sql": revision_v1} and reported["status"] == "True"

        # promotion: the operator rewrites the set, the kubelet refreshes it, the sidecar reports the new revision
        patch = {"spec": {"model": {"uri": uris["sql-v2"]}}}
        cluster.kubectl("-n", namespace, "patch", "dm", "sql", "--type=merge", "-p", json.dumps(patch))
        config = wait_for(
            lambda: (c := adapter_set()) and uris["sql-v2"] in c["data"]["adapters.yaml"] and c,
            timeout=60,
            interval=0.5,
            what="the promoted adapter set",
        )
        replica.write_set(config["data"]["adapters.yaml"])
        wait_for(
            lambda: (
                (s := status(cluster, namespace, "sql")).get("readyReplicas") == 1
                and (s.get("currentModel") or {}).get("uri") == uris["sql-v2"]
            ),
            timeout=120,
            interval=0.5,
            what="the promoted adapter counted as served",
        )
        assert replica.held() == {"sql": PoolRendering.from_objects(config, deployment).revisions()["sql"]}
        assert replica.ask("sql") == 200
    finally:
        replica.delete()
