"""DistilledModel for real: the operator deploys vLLM pods (kwok runs them) and reports readiness."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import operator_proc
from tests.support.cluster import ANN_EXIT_CODE, Cluster, wait_for
from tests.support.djobs import distillation_job
from tests.support.operator_proc import GROUP, VERSION, OperatorFactory, Run

pytestmark = pytest.mark.cluster
crds = operator_proc.crds
start_operator = operator_proc.start_operator
PLURAL = "distilledmodels"
V1 = "s3://kd-test/models/faq-v1"
V2 = "s3://kd-test/models/faq-v2"


class Model:
    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.custom, self.apps, self.core = cluster.custom(), cluster.apps(), cluster.core()

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return obj

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def wait(self, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        wait_for(lambda: check(self.status()), timeout=timeout, interval=0.5, what=f"{self.name}: {what}")
        return self.status()

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status()["conditions"] if c["type"] == type_)


def test_a_distilled_model_is_served_rolled_and_scaled(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    start_operator()
    manifest = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistilledModel",
        "metadata": {"name": "faq"},
        "spec": {"model": {"uri": V1}, "serving": {"replicas": 2, "gpus": 1}},
    }
    cluster.apply(manifest, namespace=namespace)
    model = Model(cluster, namespace, "faq")
    status = model.wait(lambda s: s.get("phase") == "Ready", "Ready")
    assert status["endpoint"] == f"http://faq.{namespace}.svc:8000/v1"
    assert status["readyReplicas"] == 2 and status["currentModel"] == {"uri": V1}
    assert model.condition("Ready")["status"] == "True"
    assert model.condition("Progressing")["status"] == "False"
    assert model.condition("Degraded")["status"] == "False"

    deployment = model.apps.read_namespaced_deployment("faq-vllm", namespace)
    assert deployment.spec.strategy.rolling_update.max_unavailable == 0
    [owner] = deployment.metadata.owner_references
    assert (owner.kind, owner.name) == ("DistilledModel", "faq")
    service = model.core.read_namespaced_service("faq", namespace)
    assert service.spec.ports[0].port == 8000
    cluster.kubectl("-n", namespace, "get", "pdb", "faq-vllm")
    pods = model.core.list_namespaced_pod(namespace, label_selector="kubedistill.io/model=faq").items
    assert len(pods) == 2
    assert {p.spec.init_containers[0].name for p in pods} == {"fetch"}
    assert all(p.spec.node_name.startswith("h100-") for p in pods)

    # A new model rolls out; the old one serves until the new pods are available.
    patch = f'{{"spec":{{"model":{{"uri":"{V2}"}}}}}}'
    cluster.kubectl("-n", namespace, "patch", "dm", "faq", "--type=merge", "-p", patch)
    status = model.wait(lambda s: (s.get("currentModel") or {}).get("uri") == V2, "serving v2")
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2
    fetch_configs = wait_for(
        lambda: (lambda items: items if len(items) == 1 else None)(
            model.core.list_namespaced_config_map(namespace, label_selector="kubedistill.io/model=faq").items
        ),
        timeout=30,
        what="the old fetch ConfigMap pruned",
    )
    assert fetch_configs[0].data["fetch.yaml"].count(V2) == 1
    assert "RolloutComplete" in [
        e.reason for e in model.core.list_namespaced_event(namespace, field_selector="involvedObject.name=faq").items
    ]

    # The scale subresource.
    cluster.kubectl("-n", namespace, "scale", "dm", "faq", "--replicas=3")
    model.wait(lambda s: s.get("replicas") == 3 and s.get("readyReplicas") == 3, "3 replicas")
    assert model.apps.read_namespaced_deployment("faq-vllm", namespace).spec.replicas == 3

    # A replica that crashes: Degraded, and Ready again once it recovers.
    victim = model.core.list_namespaced_pod(namespace, label_selector="kubedistill.io/model=faq").items[0]
    model.core.patch_namespaced_pod(
        victim.metadata.name, namespace, {"metadata": {"annotations": {ANN_EXIT_CODE: "1"}}}
    )
    model.wait(lambda s: s.get("phase") == "Degraded", "Degraded")
    assert model.condition("Degraded")["status"] == "True"
    model.core.patch_namespaced_pod(
        victim.metadata.name, namespace, {"metadata": {"annotations": {ANN_EXIT_CODE: None}}}
    )
    model.wait(lambda s: s.get("phase") == "Ready", "Ready again")


def test_a_model_that_follows_a_job_serves_its_latest_successful_run(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator()
    follower = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistilledModel",
        "metadata": {"name": "canary"},
        "spec": {"fromJob": {"name": "src"}, "serving": {"replicas": 1}},
    }
    cluster.apply(follower, namespace=namespace)
    model = Model(cluster, namespace, "canary")
    model.wait(lambda s: s.get("phase") == "Pending", "Pending while the job does not exist")
    assert model.condition("Ready")["reason"] == "SourceNotFound"

    run = Run(cluster, namespace, "src", op).apply(distillation_job("src"))
    status = run.wait_phase("Succeeded")
    served = model.wait(lambda s: s.get("phase") == "Ready", "Ready with the job's model")
    assert served["currentModel"] == status["model"]


def test_switching_autoscaling_off_removes_the_hpa(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    """An HPA left behind would keep rescaling the Deployment against spec.serving.replicas."""
    start_operator()
    serving = {"gpus": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}
    cluster.apply(
        {
            "apiVersion": "kubedistill.io/v1alpha1",
            "kind": "DistilledModel",
            "metadata": {"name": "elastic"},
            "spec": {"model": {"uri": V1}, "serving": serving},
        },
        namespace=namespace,
    )
    model = Model(cluster, namespace, "elastic")
    model.wait(lambda s: s.get("phase") == "Ready", "Ready")
    autoscaling = cluster.kubectl_json("-n", namespace, "get", "hpa", "elastic-vllm")
    assert autoscaling["spec"]["maxReplicas"] == 3

    patch = '{"spec":{"serving":{"autoscaling":null,"replicas":2}}}'
    cluster.kubectl("-n", namespace, "patch", "dm", "elastic", "--type=merge", "-p", patch)
    wait_for(
        lambda: not cluster.kubectl("-n", namespace, "get", "hpa", "-o", "name").stdout.strip(),
        timeout=60,
        interval=0.5,
        what="the HPA to be deleted",
    )
    status = model.wait(lambda s: s.get("readyReplicas") == 2, "2 replicas without the HPA")
    assert status["phase"] == "Ready"
