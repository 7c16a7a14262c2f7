"""Queue autoscaling, monitors, routing and adapter pools: the pure decisions, per cluster capabilities."""

from __future__ import annotations

import json
from typing import Any

import yaml

from kubedistill.api import conditions as c
from kubedistill.api.conditions import ModelPhase, Reason
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel
from kubedistill.builders import integrations as i
from kubedistill.builders import names
from kubedistill.builders.adapters import adapter_revision
from kubedistill.builders.integrations import Capabilities
from kubedistill.reconcile.adapters import AdapterObservations
from kubedistill.reconcile.serving import (
    ModelObservations,
    PoolMember,
    compute_adapter_decision,
    compute_model_decision,
)
from kubedistill.reconcile.status import get_condition

SETTINGS = OperatorSettings()
NOW = "2026-01-01T00:00:00Z"
URI = "s3://bkt/models/base"
BARE = Capabilities()
KEDA = Capabilities(kinds=frozenset({i.HPA, i.SCALED_OBJECT}))
ADAPTER_API = Capabilities(custom_metrics=True)
EVERYTHING = Capabilities(
    kinds=frozenset({i.HPA, i.SCALED_OBJECT, i.POD_MONITOR, i.SERVICE_MONITOR, i.INFERENCE_POOL, i.INFERENCE_OBJECTIVE})
)
QUEUE = {"autoscaling": {"metric": "queue", "minReplicas": 1, "maxReplicas": 5, "targetWaitingRequests": 2.5}}


def model(name: str = "base", **spec: Any) -> DistilledModel:
    spec.setdefault("model", {"uri": URI})
    return DistilledModel.model_validate(
        {"metadata": {"name": name, "namespace": "ml", "uid": "u1", "generation": 1}, "spec": spec}
    )


def decide(dm: DistilledModel, caps: Capabilities, settings: OperatorSettings = SETTINGS, **obs: Any) -> Any:
    return compute_model_decision(dm, settings, ModelObservations(deployment=None, capabilities=caps, **obs), NOW)


def kinds(decision: Any) -> dict[str, dict[str, Any]]:
    return {x["kind"]: x for x in decision.apply}


def test_queue_metric_with_keda_is_a_scaled_object_on_vllm_waiting_requests() -> None:
    decision = decide(model(serving=QUEUE), KEDA)
    applied = kinds(decision)
    assert "HorizontalPodAutoscaler" not in applied
    scaled = applied["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "base-vllm"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 5)
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["query"] == 'sum(vllm:num_requests_waiting{namespace="ml",kubedistill_io_model="base"})'
    assert trigger["metadata"]["threshold"] == "2500m" and trigger["metricType"] == "AverageValue"
    assert "replicas" not in applied["Deployment"]["spec"]  # KEDA owns replicas
    autoscaling = get_condition(decision.status.conditions, c.AUTOSCALING)
    assert autoscaling is not None and autoscaling.status == "True" and "KEDA" in autoscaling.message


def test_scale_to_zero_adds_the_wake_trigger() -> None:
    serving = {"autoscaling": {"metric": "queue", "minReplicas": 0, "wakeQuery": "sum(rate(gw_requests[1m])) > 0"}}
    scaled = kinds(decide(model(serving=serving), KEDA))["ScaledObject"]
    assert scaled["spec"]["minReplicaCount"] == 0
    assert [t["name"] for t in scaled["spec"]["triggers"]] == ["num-requests-waiting", "wake"]
    assert scaled["spec"]["triggers"][1]["metadata"]["query"] == "sum(rate(gw_requests[1m])) > 0"


def test_queue_metric_without_keda_is_an_hpa_on_pod_metrics_or_a_condition() -> None:
    serving = {"autoscaling": {"metric": "queue", "targetWaitingRequests": 4, "targetRunningRequests": 16}}
    hpa = kinds(decide(model(serving=serving), ADAPTER_API))["HorizontalPodAutoscaler"]
    assert [(m["pods"]["metric"]["name"], m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]] == [
        ("vllm:num_requests_waiting", "4"),
        ("vllm:num_requests_running", "16"),
    ]
    bare = decide(model(serving=serving), BARE)
    applied = kinds(bare)
    assert "HorizontalPodAutoscaler" not in applied and "ScaledObject" not in applied
    assert applied["Deployment"]["spec"]["replicas"] == 1  # serves minReplicas, fixed
    condition = get_condition(bare.status.conditions, c.AUTOSCALING)
    assert condition is not None and condition.status == "False"
    assert condition.reason == Reason.AUTOSCALER_UNAVAILABLE and "KEDA" in condition.message
    assert "custom.metrics.k8s.io" in condition.message


def test_switching_metric_kinds_prunes_the_other_autoscaler() -> None:
    scaled = (i.SCALED_OBJECT[0], i.SCALED_OBJECT[1], "base-vllm")
    hpa = (i.HPA[0], i.HPA[1], "base-vllm")
    to_cpu = decide(model(serving={"autoscaling": {"maxReplicas": 3}}), KEDA, optional_children=(scaled,))
    assert to_cpu.delete == [scaled] and "HorizontalPodAutoscaler" in kinds(to_cpu)
    to_queue = decide(model(serving=QUEUE), KEDA, optional_children=(hpa,))
    assert to_queue.delete == [hpa] and "ScaledObject" in kinds(to_queue)
    off = decide(model(), KEDA, optional_children=(hpa, scaled))
    assert off.delete == sorted([hpa, scaled])


def test_monitor_written_where_the_crd_exists_else_a_condition() -> None:
    settings = OperatorSettings.model_validate(
        {"serving": {"monitor": "PodMonitor", "monitorLabels": {"release": "p"}}}
    )
    monitor = kinds(decide(model(), EVERYTHING, settings))["PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["podTargetLabels"] == [names.LABEL_MODEL]
    assert monitor["metadata"]["labels"]["release"] == "p"
    missing = decide(model(), BARE, settings)
    assert "PodMonitor" not in kinds(missing)
    condition = get_condition(missing.status.conditions, c.MONITORING)
    assert condition is not None and condition.reason == Reason.CRD_MISSING
    assert "PodMonitor (monitoring.coreos.com/v1)" in condition.message
    assert get_condition(decide(model(), BARE).status.conditions, c.MONITORING) is None  # not asked for


def test_routing_writes_an_inference_pool_and_objective() -> None:
    routing = {"priority": 10, "endpointPicker": {"name": "gw-epp"}}
    applied = kinds(decide(model(routing=routing), EVERYTHING))
    pool = applied["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == names.model_selector("base")
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "gw-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
    objective = applied["InferenceObjective"]
    assert objective["spec"] == {"poolRef": {"group": "inference.networking.k8s.io", "name": "base"}, "priority": 10}
    missing = decide(model(routing=routing), BARE)
    condition = get_condition(missing.status.conditions, c.ROUTING)
    assert condition is not None and condition.status == "False" and "InferencePool" in condition.message


def test_streamed_weights_skip_the_fetch_copy() -> None:
    applied = kinds(decide(model(serving={"weights": "stream", "gpus": 0}), BARE))
    pod = applied["Deployment"]["spec"]["template"]["spec"]
    assert pod["initContainers"] == [] and "ConfigMap" not in applied
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == URI
    assert args[args.index("--load-format") + 1] == "runai_streamer"


def test_every_config_map_a_pod_mounts_is_one_the_operator_writes() -> None:
    # A pod whose ConfigMap volume names a missing ConfigMap never starts (FailedMount): streamed
    # weights have no fetch ConfigMap, so their pods must not mount one.
    for serving in ({}, {"weights": "stream"}, {"adapters": {}}, {"weights": "stream", "adapters": {}}):
        applied = decide(model(serving={"gpus": 0, **serving}), BARE).apply
        written = {x["metadata"]["name"] for x in applied if x["kind"] == "ConfigMap"} | {"kube-root-ca.crt"}
        [deployment] = [x for x in applied if x["kind"] == "Deployment"]
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        mounted = {v["configMap"]["name"] for v in volumes if "configMap" in v}
        mounted |= {
            source["configMap"]["name"]
            for v in volumes
            for source in (v.get("projected") or {}).get("sources", [])
            if "configMap" in source
        }
        assert mounted <= written, (serving, mounted - written)


# --------------------------------------------------------------------------- adapter pools


def member(name: str, uri: str, **spec: Any) -> PoolMember:
    return PoolMember(
        model={
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"model": {"uri": uri}, "pool": {"name": "base"}, **spec},
        }
    )


def pod(name: str, ready: bool, loaded: dict[str, str] | None) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if loaded is not None:
        conditions.append({"type": names.CONDITION_ADAPTERS, "status": "True", "message": json.dumps(loaded)})
    return {"metadata": {"name": name}, "status": {"conditions": conditions}}


def test_a_pool_loads_its_members_through_a_sidecar_and_counts_who_serves_them() -> None:
    pool = model(serving={"adapters": {"maxAdapters": 4, "maxRank": 8}, "replicas": 3})
    members = (member("sql", "s3://bkt/sql/v1"), member("faq", "s3://bkt/faq/v1"))
    sql_rev, faq_rev = (
        adapter_revision("sql", "s3://bkt/sql/v1", None),
        adapter_revision("faq", "s3://bkt/faq/v1", None),
    )
    pods = (
        pod("a", True, {"sql": sql_rev, "faq": faq_rev}),
        pod("b", True, {"sql": sql_rev}),
        pod("c", False, {"sql": sql_rev, "faq": faq_rev}),  # not Ready: not counted
    )
    decision = decide(pool, BARE, members=members, pods=pods)
    applied = kinds(decision)
    [config] = [x for x in decision.apply if x["metadata"]["name"] == "base-adapters"]
    adapter_set = yaml.safe_load(config["data"]["adapters.yaml"])
    assert [a["name"] for a in adapter_set["adapters"]] == ["faq", "sql"]
    assert "immutable" not in config  # updated in place: adding an adapter restarts no replica
    pod_spec = applied["Deployment"]["spec"]["template"]["spec"]
    assert [x["name"] for x in pod_spec["containers"]] == ["vllm", "adapter-sync"]
    sidecar = pod_spec["containers"][1]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod_spec["automountServiceAccountToken"] is False  # the token is projected into the sidecar only
    assert {v["name"] for v in pod_spec["volumes"]} >= {"adapters-config", "adapters", "adapter-sync-token"}
    args = pod_spec["containers"][0]["args"]
    assert args[args.index("--max-loras") + 1] == "4" and args[args.index("--max-lora-rank") + 1] == "8"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in pod_spec["containers"][0]["env"]
    assert {"ServiceAccount", "Role", "RoleBinding"} <= set(applied)
    role = applied["Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    ]
    statuses = {a.name: a.ready_replicas for a in decision.status.adapters or []}
    assert statuses == {"faq": 1, "sql": 2}


def test_an_adapter_is_ready_when_every_ready_replica_serves_its_version() -> None:
    adapter = model("sql", pool={"name": "base"}, model={"uri": "s3://bkt/sql/v2"})
    rev2 = adapter_revision("sql", "s3://bkt/sql/v2", None)
    rev1 = adapter_revision("sql", "s3://bkt/sql/v1", None)
    pool_raw = {"metadata": {"name": "base"}, "spec": {"serving": {"adapters": {}}}}
    deployment = {"status": {"replicas": 3}}

    def status(*pods: dict[str, Any]) -> Any:
        obs = AdapterObservations(pool=pool_raw, pool_deployment=deployment, pods=pods)
        return compute_adapter_decision(adapter, SETTINGS, obs, NOW).status

    loading = status(pod("a", True, {"sql": rev2}), pod("b", True, {"sql": rev1}), pod("c", False, {}))
    assert loading.phase == ModelPhase.DEPLOYING and loading.ready_replicas == 1 and loading.replicas == 3
    assert get_condition(loading.conditions, c.READY).message == "1/2 ready replicas of pool base serve it"
    ready = status(pod("a", True, {"sql": rev2}), pod("b", True, {"sql": rev2}), pod("c", False, {}))
    assert ready.phase == ModelPhase.READY and ready.ready_replicas == 2
    assert ready.endpoint == "http://base.ml.svc:8000/v1" and ready.served_model_name == "sql"
    assert ready.current_model is not None and ready.current_model.uri == "s3://bkt/sql/v2"

    missing = compute_adapter_decision(adapter, SETTINGS, AdapterObservations(pool=None), NOW).status
    assert get_condition(missing.conditions, c.READY).reason == Reason.POOL_NOT_FOUND
    not_a_pool = AdapterObservations(pool={"metadata": {"name": "base"}, "spec": {"serving": {}}})
    refused = compute_adapter_decision(adapter, SETTINGS, not_a_pool, NOW).status
    ready_condition = get_condition(refused.conditions, c.READY)
    assert (
        ready_condition.reason == Reason.NOT_AN_ADAPTER_POOL
        and "set its spec.serving.adapters" in ready_condition.message
    )
