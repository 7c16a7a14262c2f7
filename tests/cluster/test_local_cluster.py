"""The local test cluster behaves like a real GPU cluster (hack/cluster, issue 2).

A real API server, scheduler and controller manager decide everything here; kwok only plays
the kubelets of the simulated nodes. Nothing is mocked.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from tests.support.cluster import (
    ANN_EXIT_CODE,
    ANN_HOLD,
    ANN_MESSAGE,
    ANN_RUN_DURATION,
    CPU_INSTANCE_TYPE,
    GPU_RESOURCE,
    H100_INSTANCE_TYPE,
    H100_PRODUCT,
    HACK_DIR,
    Cluster,
    gpu_pod_spec,
    hardened_container,
    hardened_pod_spec,
    job_manifest,
    wait_for,
)

pytestmark = pytest.mark.cluster


# --- helpers -------------------------------------------------------------------------------------


def _node_sets(cluster: Cluster) -> tuple[set[str], set[str]]:
    nodes = cluster.core().list_node().items
    h100 = {n.metadata.name for n in nodes if n.metadata.labels.get("nvidia.com/gpu.product") == H100_PRODUCT}
    return h100, {n.metadata.name for n in nodes} - h100


def _job_condition(cluster: Cluster, ns: str, name: str, cond_type: str) -> Any:
    job = cluster.batch().read_namespaced_job_status(name, ns)
    for cond in job.status.conditions or []:
        if cond.type == cond_type and cond.status == "True":
            return cond
    return None


def _job_pods(cluster: Cluster, ns: str, job: str) -> list[Any]:
    return cluster.core().list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={job}").items


def _unschedulable(cluster: Cluster, ns: str, pod: str) -> Any:
    status = cluster.core().read_namespaced_pod_status(pod, ns).status
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return cond
    return None


def _pod_ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def _pod(name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


# --- the cluster itself ----------------------------------------------------------------------------


def test_control_plane_is_the_pinned_release(cluster: Cluster) -> None:
    pinned = dict(
        line.split("=", 1)
        for line in (HACK_DIR / "versions.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )["KUBE_VERSION"]
    version = cluster.kubectl_json("version")
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned
    # The controller manager runs: its ServiceAccount controller made the default ServiceAccount.
    assert cluster.core().read_namespaced_service_account("default", "default")


def test_nodes_look_like_an_h100_cluster(cluster: Cluster) -> None:
    nodes = cluster.core().list_node().items
    h100 = [n for n in nodes if n.metadata.labels.get("nvidia.com/gpu.product") == H100_PRODUCT]
    cpu = [n for n in nodes if n not in h100]
    assert len(h100) >= 2 and len(cpu) >= 2
    for node in nodes:
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    for node in h100:
        labels = node.metadata.labels
        assert labels["nvidia.com/gpu.count"] == "8"
        assert labels["node.kubernetes.io/instance-type"] == H100_INSTANCE_TYPE
        assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("nvidia.com/gpu", "present", "NoSchedule")]
        assert node.status.capacity[GPU_RESOURCE] == "8"
        assert node.status.allocatable[GPU_RESOURCE] == "8"
        assert node.status.capacity["cpu"] == "192"
    for node in cpu:
        assert node.metadata.labels["node.kubernetes.io/instance-type"] == CPU_INSTANCE_TYPE
        assert GPU_RESOURCE not in node.status.capacity
        assert not node.spec.taints


# --- 1. scheduling onto the GPU pool --------------------------------------------------------------


def test_gpu_job_lands_on_an_h100_node_and_completes(cluster: Cluster, namespace: str) -> None:
    h100, _ = _node_sets(cluster)
    cluster.batch().create_namespaced_job(namespace, job_manifest("train", gpu_pod_spec(8)))

    wait_for(lambda: _job_condition(cluster, namespace, "train", "Complete"), timeout=60, what="Job Complete")
    (pod,) = _job_pods(cluster, namespace, "train")
    assert pod.spec.node_name in h100
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


# --- 2. what must not schedule ---------------------------------------------------------------------


def test_gpu_job_without_toleration_stays_pending(cluster: Cluster, namespace: str) -> None:
    h100, _ = _node_sets(cluster)
    cluster.batch().create_namespaced_job(namespace, job_manifest("no-toleration", gpu_pod_spec(8, tolerate=False)))
    pod = wait_for(lambda: _job_pods(cluster, namespace, "no-toleration"), timeout=30, what="Job pod")[0]
    cond = wait_for(lambda: _unschedulable(cluster, namespace, pod.metadata.name), timeout=30, what="Unschedulable")
    # The CPU nodes fail the selector, every H100 node the taint.
    assert f"{len(h100)} node(s) had untolerated taint(s)" in cond.message, cond.message

    time.sleep(3)  # and it stays so: the scheduler retries, nothing else changes
    pod = cluster.core().read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    assert not _job_condition(cluster, namespace, "no-toleration", "Complete")


def test_pod_asking_for_16_gpus_never_schedules(cluster: Cluster, namespace: str) -> None:
    cluster.core().create_namespaced_pod(namespace, _pod("greedy", gpu_pod_spec(16, restartPolicy="Never")))
    cond = wait_for(lambda: _unschedulable(cluster, namespace, "greedy"), timeout=30, what="Unschedulable")
    assert f"Insufficient {GPU_RESOURCE}" in cond.message

    time.sleep(3)
    pod = cluster.core().read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_cpu_pods_never_land_on_tainted_h100_nodes(cluster: Cluster, namespace: str) -> None:
    _, cpu = _node_sets(cluster)
    core = cluster.core()
    for i in range(8):
        core.create_namespaced_pod(namespace, _pod(f"cpu-{i}", hardened_pod_spec()))

    def all_running() -> list[Any]:
        pods = core.list_namespaced_pod(namespace).items
        return pods if len(pods) == 8 and all(_pod_ready(p) for p in pods) else []

    pods = wait_for(all_running, timeout=60, what="8 CPU pods Running and Ready")
    assert {p.spec.node_name for p in pods} <= cpu


# --- 3. Pod Security admission ---------------------------------------------------------------------


def test_pod_security_rejects_privileged_and_admits_hardened(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    privileged = hardened_container()
    privileged["securityContext"] = {"privileged": True}
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(namespace, _pod("privileged", {"containers": [privileged]}))
    assert refused.value.status == 403
    body = json.loads(refused.value.body)
    assert 'violates PodSecurity "restricted:latest"' in body["message"]
    assert "privileged" in body["message"]

    core.create_namespaced_pod(namespace, _pod("hardened", hardened_pod_spec()))
    wait_for(lambda: _pod_ready(core.read_namespaced_pod("hardened", namespace)), timeout=30, what="Ready")


# --- 4. Deployments --------------------------------------------------------------------------------


def test_deployment_becomes_available_and_rolls_out_an_update(cluster: Cluster, namespace: str) -> None:
    apps = cluster.apps()
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": hardened_pod_spec()},
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    def available() -> bool:
        status = apps.read_namespaced_deployment_status("web", namespace).status
        conds = {c.type: c.status for c in status.conditions or []}
        return conds.get("Available") == "True" and status.available_replicas == 2

    wait_for(available, timeout=60, what="Deployment Available")
    old_rs = {rs.metadata.name for rs in apps.list_namespaced_replica_set(namespace).items}

    apps.patch_namespaced_deployment(
        "web",
        namespace,
        {"spec": {"template": {"spec": {"containers": [hardened_container(image="registry.k8s.io/pause:3.9")]}}}},
    )
    rollout = cluster.kubectl("-n", namespace, "rollout", "status", "deployment/web", "--timeout=90s", timeout=120)
    assert "successfully rolled out" in rollout.stdout

    dep = apps.read_namespaced_deployment_status("web", namespace)
    assert dep.status.observed_generation == dep.metadata.generation == 2
    assert dep.status.updated_replicas == dep.status.available_replicas == dep.status.replicas == 2
    pods = wait_for(
        lambda: (
            [p for p in cluster.core().list_namespaced_pod(namespace).items if _pod_ready(p)]
            if len(cluster.core().list_namespaced_pod(namespace).items) == 2
            else []
        ),
        timeout=60,
        what="old pods gone",
    )
    assert {p.spec.containers[0].image for p in pods} == {"registry.k8s.io/pause:3.9"}
    new_rs = {rs.metadata.name for rs in apps.list_namespaced_replica_set(namespace).items} - old_rs
    assert len(new_rs) == 1


# --- 5. failing, holding and succeeding with a message ---------------------------------------------


def test_failing_pod_reports_exit_code_and_message_and_job_fails(cluster: Cluster, namespace: str) -> None:
    message = "CUDA out of memory: tried to allocate 20.00 GiB"
    job = job_manifest(
        "doomed",
        gpu_pod_spec(8),
        annotations={ANN_EXIT_CODE: "3", ANN_MESSAGE: message},
        backoff_limit=1,
    )
    cluster.batch().create_namespaced_job(namespace, job)

    cond = wait_for(lambda: _job_condition(cluster, namespace, "doomed", "Failed"), timeout=120, what="Job Failed")
    assert cond.reason == "BackoffLimitExceeded"
    pods = _job_pods(cluster, namespace, "doomed")
    assert len(pods) == 2  # backoffLimit 1: the first try and one retry
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert terminated.exit_code == 3
        assert terminated.message == message
        assert terminated.reason == "Error"


def test_held_pod_runs_until_released_then_succeeds_with_message(cluster: Cluster, namespace: str) -> None:
    metrics = json.dumps({"teacherAgreement": 0.97, "rougeL": 0.91})
    job = job_manifest("evaluate", hardened_pod_spec(), annotations={ANN_HOLD: "true", ANN_MESSAGE: metrics})
    cluster.batch().create_namespaced_job(namespace, job)
    core = cluster.core()

    pod = wait_for(
        lambda: [p for p in _job_pods(cluster, namespace, "evaluate") if _pod_ready(p)],
        timeout=30,
        what="held pod Running and Ready",
    )[0]
    time.sleep(3)
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert _pod_ready(pod)
    assert not _job_condition(cluster, namespace, "evaluate", "Complete")

    core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: None}}})
    wait_for(lambda: _job_condition(cluster, namespace, "evaluate", "Complete"), timeout=30, what="Job Complete")
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    terminated = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Succeeded"
    assert terminated.exit_code == 0
    assert json.loads(terminated.message) == json.loads(metrics)


def test_run_duration_keeps_a_job_pod_running_for_that_long(cluster: Cluster, namespace: str) -> None:
    job = job_manifest("slow", hardened_pod_spec(), annotations={ANN_RUN_DURATION: "3s"})
    cluster.batch().create_namespaced_job(namespace, job)
    wait_for(lambda: _job_condition(cluster, namespace, "slow", "Complete"), timeout=60, what="Job Complete")
    (pod,) = _job_pods(cluster, namespace, "slow")
    terminated = pod.status.container_statuses[0].state.terminated
    ran = datetime.fromisoformat(str(terminated.finished_at)) - datetime.fromisoformat(str(terminated.started_at))
    assert ran.total_seconds() >= 2.5


def test_bare_pod_exits_with_chosen_code(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    spec = hardened_pod_spec(restartPolicy="Never")
    core.create_namespaced_pod(namespace, _pod("ok", spec, {ANN_EXIT_CODE: "0", ANN_MESSAGE: "done"}))
    core.create_namespaced_pod(namespace, _pod("bad", spec, {ANN_EXIT_CODE: "137"}))
    core.create_namespaced_pod(namespace, _pod("forever", spec))

    def phase(name: str) -> str:
        return core.read_namespaced_pod(name, namespace).status.phase

    wait_for(lambda: phase("ok") == "Succeeded", timeout=30, what="ok Succeeded")
    wait_for(lambda: phase("bad") == "Failed", timeout=30, what="bad Failed")
    bad = core.read_namespaced_pod("bad", namespace).status.container_statuses[0].state.terminated
    assert bad.exit_code == 137 and bad.message is None
    ok = core.read_namespaced_pod("ok", namespace).status.container_statuses[0].state.terminated
    assert ok.message == "done"
    assert phase("forever") == "Running"  # no annotation, no Job: a server that keeps running


def test_crashing_deployment_pod_crash_loops_until_fixed(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_pod(
        namespace, _pod("server", hardened_pod_spec(), {ANN_EXIT_CODE: "1", ANN_MESSAGE: "model not found"})
    )

    def crash_looping() -> Any:
        status = core.read_namespaced_pod("server", namespace).status
        cs = (status.container_statuses or [None])[0]
        return cs if cs and cs.state.waiting and cs.state.waiting.reason == "CrashLoopBackOff" else None

    cs = wait_for(crash_looping, timeout=30, what="CrashLoopBackOff")
    assert cs.last_state.terminated.exit_code == 1
    assert cs.last_state.terminated.message == "model not found"
    pod = core.read_namespaced_pod("server", namespace)
    assert pod.status.phase == "Running" and not _pod_ready(pod)

    core.patch_namespaced_pod("server", namespace, {"metadata": {"annotations": {ANN_EXIT_CODE: None}}})
    wait_for(lambda: _pod_ready(core.read_namespaced_pod("server", namespace)), timeout=30, what="recovered")


def test_garbage_collector_removes_dependents_of_a_deleted_owner(cluster: Cluster, namespace: str) -> None:
    core, batch = cluster.core(), cluster.batch()
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    batch.create_namespaced_job(namespace, job_manifest("held", hardened_pod_spec(), annotations={ANN_HOLD: "true"}))
    wait_for(lambda: [p for p in _job_pods(cluster, namespace, "held") if _pod_ready(p)], timeout=30, what="pod")

    core.delete_namespaced_config_map("owner", namespace)
    batch.delete_namespaced_job("held", namespace, propagation_policy="Background")

    wait_for(
        lambda: not core.list_namespaced_config_map(namespace, field_selector="metadata.name=dependent").items,
        timeout=60,
        what="dependent ConfigMap collected",
    )
    wait_for(lambda: not _job_pods(cluster, namespace, "held"), timeout=60, what="Job's pod collected")
