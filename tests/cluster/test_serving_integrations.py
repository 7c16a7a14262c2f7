"""Queue autoscaling, monitors, routing and adapter pools against the real API server, with the
released CRDs of KEDA, the Prometheus Operator and the Gateway API Inference Extension
(hack/cluster/extension-crds) installed, and without them.

kwok runs no container, so the adapter sidecar cannot run in these pods: it runs as a real process
next to a real vLLM in tests/worker/test_adapter_sync.py and test_adapter_convergence.py, and
reports a kwok pod's condition through this API server in test_adapter_sync_report.py; here the
operator's side: the adapter set it writes, the pods it builds, and what it reads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import extensions, operator_proc
from tests.support.cluster import Cluster, wait_for
from tests.support.operator_proc import OperatorFactory

pytestmark = pytest.mark.cluster
crds = operator_proc.crds
start_operator = operator_proc.start_operator
V1 = "s3://kd-test/models/base"
QUEUE = {"metric": "queue", "minReplicas": 1, "maxReplicas": 4, "targetWaitingRequests": 3}


@pytest.fixture
def integrations(cluster: Cluster) -> Iterator[None]:
    for component in extensions.COMPONENTS:
        extensions.install(cluster, component)
    yield
    for component in extensions.COMPONENTS:
        extensions.uninstall(cluster, component)


def model(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"uri": V1})
    return {"apiVersion": "kubedistill.io/v1alpha1", "kind": "DistilledModel", "metadata": {"name": name}, "spec": spec}


def condition(cluster: Cluster, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    status = cluster.kubectl_json("-n", namespace, "get", "dm", name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def maybe(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    if name not in names(cluster, namespace, kind):
        return None
    found: dict[str, Any] = cluster.kubectl_json("-n", namespace, "get", kind, name)
    return found


def names(cluster: Cluster, namespace: str, kind: str) -> set[str]:
    out = cluster.kubectl("-n", namespace, "get", kind, "-o", "name", "--ignore-not-found").stdout.split()
    return {line.split("/", 1)[1] for line in out}


def test_without_the_crds_conditions_say_what_is_missing(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    start_operator(serving={"monitor": "PodMonitor"})
    cluster.apply(
        model("bare", serving={"gpus": 1, "autoscaling": QUEUE}, routing={"priority": 5}), namespace=namespace
    )
    ready = wait_for(
        lambda: (c := condition(cluster, namespace, "bare", "Ready")) and c["status"] == "True" and c,
        timeout=90,
        interval=0.5,
        what="Ready without any integration",
    )
    assert ready
    autoscaling = condition(cluster, namespace, "bare", "Autoscaling")
    assert autoscaling and autoscaling["status"] == "False" and autoscaling["reason"] == "AutoscalerUnavailable"
    assert "KEDA (keda.sh/v1alpha1 ScaledObject)" in autoscaling["message"]
    monitoring = condition(cluster, namespace, "bare", "Monitoring")
    assert monitoring and monitoring["reason"] == "CRDMissing" and "PodMonitor" in monitoring["message"]
    routing = condition(cluster, namespace, "bare", "Routing")
    assert routing and routing["reason"] == "CRDMissing" and "InferencePool" in routing["message"]
    deployment = cluster.kubectl_json("-n", namespace, "get", "deployment", "bare-vllm")
    assert deployment["spec"]["replicas"] == 1  # no autoscaler can run: minReplicas, fixed
    assert names(cluster, namespace, "hpa") == set()


def test_with_the_crds_the_objects_appear_and_switching_metric_leaves_nothing_stale(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory, integrations: None
) -> None:
    start_operator(serving={"monitor": "PodMonitor", "monitorLabels": {"release": "prom"}})
    cluster.apply(
        model("elastic", serving={"gpus": 1, "autoscaling": QUEUE}, routing={"priority": 5}), namespace=namespace
    )
    scaled = wait_for(
        lambda: maybe(cluster, namespace, "scaledobject", "elastic-vllm"),
        timeout=90,
        interval=0.5,
        what="the ScaledObject",
    )
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    monitor = cluster.kubectl_json("-n", namespace, "get", "podmonitor", "elastic-vllm")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    pool = cluster.kubectl_json("-n", namespace, "get", "inferencepool", "elastic")
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    objective = cluster.kubectl_json("-n", namespace, "get", "inferenceobjective", "elastic")
    assert objective["spec"]["priority"] == 5 and objective["spec"]["poolRef"]["name"] == "elastic"
    wait_for(
        lambda: (c := condition(cluster, namespace, "elastic", "Autoscaling")) and c["status"] == "True",
        timeout=30,
        what="Autoscaling True",
    )

    # queue -> cpu: the ScaledObject goes, an HPA comes; routing off: its objects go
    patch = {"spec": {"serving": {"autoscaling": {"metric": "cpu", "targetWaitingRequests": None}}, "routing": None}}
    cluster.kubectl("-n", namespace, "patch", "dm", "elastic", "--type=merge", "-p", json.dumps(patch))
    wait_for(
        lambda: (
            names(cluster, namespace, "scaledobject") == set() and names(cluster, namespace, "hpa") == {"elastic-vllm"}
        ),
        timeout=60,
        interval=0.5,
        what="the ScaledObject replaced by an HPA",
    )
    wait_for(
        lambda: not names(cluster, namespace, "inferencepool") and not names(cluster, namespace, "inferenceobjective"),
        timeout=30,
        what="routing objects pruned",
    )
    # autoscaling off: no autoscaler at all
    cluster.kubectl(
        "-n", namespace, "patch", "dm", "elastic", "--type=merge", "-p", '{"spec":{"serving":{"autoscaling":null}}}'
    )
    wait_for(lambda: names(cluster, namespace, "hpa") == set(), timeout=60, interval=0.5, what="the HPA deleted")
    assert names(cluster, namespace, "scaledobject") == set()


def test_an_adapter_pool_gets_its_adapter_set_and_sidecar(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    start_operator()
    cluster.apply(model("base", serving={"gpus": 1, "replicas": 2, "adapters": {"maxRank": 8}}), namespace=namespace)
    cluster.apply(
        model("sql", model={"uri": "s3://kd-test/adapters/sql-v1"}, pool={"name": "base"}), namespace=namespace
    )
    cluster.apply(
        model("faq", model={"uri": "s3://kd-test/adapters/faq-v1"}, pool={"name": "base"}), namespace=namespace
    )

    def adapter_set() -> list[str]:
        config = maybe(cluster, namespace, "configmap", "base-adapters")
        if not config:
            return []
        return [a["uri"] for a in yaml.safe_load(config["data"]["adapters.yaml"])["adapters"]]

    wait_for(
        lambda: adapter_set() == ["s3://kd-test/adapters/faq-v1", "s3://kd-test/adapters/sql-v1"],
        timeout=90,
        interval=0.5,
        what="both adapters in the set",
    )
    pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "kubedistill.io/model=base")["items"]
    assert len(pods) == 2
    for pod in pods:  # admitted under the restricted Pod Security Standard, sidecar and token included
        assert [c["name"] for c in pod["spec"]["containers"]] == ["vllm", "adapter-sync"]
        assert pod["spec"]["serviceAccountName"] == "base-adapter-sync"
    deployment_before = cluster.kubectl_json("-n", namespace, "get", "deployment", "base-vllm")["metadata"][
        "generation"
    ]

    # promotion and removal rewrite the set in place: the pool's Deployment does not change
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "dm",
        "sql",
        "--type=merge",
        "-p",
        '{"spec":{"model":{"uri":"s3://kd-test/adapters/sql-v2"}}}',
    )
    cluster.kubectl("-n", namespace, "delete", "dm", "faq")
    wait_for(
        lambda: adapter_set() == ["s3://kd-test/adapters/sql-v2"],
        timeout=60,
        interval=0.5,
        what="sql promoted, faq gone",
    )
    assert (
        cluster.kubectl_json("-n", namespace, "get", "deployment", "base-vllm")["metadata"]["generation"]
        == deployment_before
    )

    # kwok runs no sidecar: no replica reports the adapter, so it is not Ready, and says why
    ready = condition(cluster, namespace, "sql", "Ready")
    assert ready and ready["status"] == "False" and ready["reason"] == "AdapterLoading"
    status = cluster.kubectl_json("-n", namespace, "get", "dm", "sql")["status"]
    assert status["pool"] == "base" and status["endpoint"] == f"http://base.{namespace}.svc:8000/v1"
    cluster.apply(
        model("lost", model={"uri": "s3://kd-test/adapters/x"}, pool={"name": "nowhere"}), namespace=namespace
    )
    wait_for(
        lambda: (c := condition(cluster, namespace, "lost", "Ready")) and c["reason"] == "PoolNotFound",
        timeout=60,
        what="PoolNotFound",
    )
