"""Serving builders: the vLLM Deployment, Service, PDB, HPA and fetch config of a DistilledModel."""

from __future__ import annotations

from typing import Any

import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel, ModelArtifact, StorageSpec
from kubedistill.api.worker_config import FetchConfig
from kubedistill.builders import names
from kubedistill.builders.serving import ServingPlan, build_serving_children
from tests.unit.test_builders import assert_restricted

SETTINGS = OperatorSettings()


def model(serving: dict[str, Any] | None = None, **spec: Any) -> DistilledModel:
    return DistilledModel.model_validate(
        {
            "metadata": {"name": "faq", "namespace": "ml", "uid": "u1", "generation": 1},
            "spec": {"model": {"uri": "s3://bkt/models/faq", "digest": "c" * 64}, "serving": serving or {}, **spec},
        }
    )


def plan_of(dm: DistilledModel, base: str | None = None, storage: StorageSpec | None = None) -> ServingPlan:
    assert dm.spec.model is not None
    return ServingPlan(model=dm, source=dm.spec.model, base_model=base, storage=storage or StorageSpec())


def by_kind(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["kind"]: c for c in children}


def test_serving_children() -> None:
    storage = StorageSpec.model_validate({"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s3"}})
    children = by_kind(build_serving_children(plan_of(model({"replicas": 2})), SETTINGS))
    assert set(children) == {"ConfigMap", "Service", "PodDisruptionBudget", "Deployment"}
    children = by_kind(build_serving_children(plan_of(model({"replicas": 2}), storage=storage), SETTINGS))
    deployment, service = children["Deployment"], children["Service"]
    assert deployment["metadata"]["name"] == "faq-vllm"
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "DistilledModel"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == service["spec"]["selector"] == children["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    template = deployment["spec"]["template"]
    assert set(selector.items()) <= set(template["metadata"]["labels"].items())
    assert template["metadata"]["annotations"][names.ANNOTATION_MODEL_URI] == "s3://bkt/models/faq"
    pod = template["spec"]
    assert_restricted(pod)
    [fetch] = pod["initContainers"]
    assert fetch["command"] == ["kubedistill-worker", "fetch", "--config", "/etc/kubedistill/fetch.yaml"]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    [vllm] = pod["containers"]
    args = vllm["args"]
    assert args[args.index("--model") + 1] == "/models/model"
    assert args[args.index("--served-model-name") + 1] == "faq"
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert service["metadata"]["name"] == "faq" and service["spec"]["ports"][0]["port"] == 8000
    config_map = children["ConfigMap"]
    assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    fetch_config = FetchConfig.model_validate(yaml.safe_load(config_map["data"]["fetch.yaml"]))
    assert fetch_config.model_uri == "s3://bkt/models/faq" and fetch_config.digest == "c" * 64
    assert fetch_config.storage.endpoint == "http://minio:9000"


def test_a_new_model_version_changes_the_pod_template_and_the_fetch_config() -> None:
    a = plan_of(model())
    b_model = model()
    b = ServingPlan(model=b_model, source=ModelArtifact(uri="s3://bkt/models/faq-v2"), base_model=None,
                    storage=StorageSpec())  # fmt: skip
    da, db = (by_kind(build_serving_children(p, SETTINGS)) for p in (a, b))
    assert da["ConfigMap"]["metadata"]["name"] != db["ConfigMap"]["metadata"]["name"]
    assert da["Deployment"]["spec"]["template"] != db["Deployment"]["spec"]["template"]
    assert da["Service"] == db["Service"]


def test_lora_adapter_is_served_on_its_fetched_base() -> None:
    children = by_kind(build_serving_children(plan_of(model(), base="s3://bkt/base/llama"), SETTINGS))
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch", "fetch-base"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/base"
    assert "--enable-lora" in args and "faq=/models/model" in args
    assert "fetch-base.yaml" in children["ConfigMap"]["data"]


def test_autoscaling_leaves_replicas_to_the_hpa() -> None:
    children = by_kind(
        build_serving_children(plan_of(model({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}})), SETTINGS)
    )
    assert "replicas" not in children["Deployment"]["spec"]
    hpa = children["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "faq-vllm"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)


def test_cpu_serving_has_no_gpu_and_no_gpu_pool() -> None:
    children = by_kind(build_serving_children(plan_of(model({"gpus": 0})), SETTINGS))
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
