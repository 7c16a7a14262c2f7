"""DistilledModel children: the vLLM Deployment, its Service, PodDisruptionBudget, HPA and fetch config.

Pure: a ServingPlan (the DistilledModel with its source resolved) and the operator
settings in, manifests out.

Zero-downtime rollout: a new model changes the pod template (model URI and digest
annotations, a new fetch ConfigMap), and the Deployment rolls with ``maxUnavailable: 0``:
a new pod must fetch the model, load it and pass ``/health`` before an old one goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel, ModelArtifact, StorageSpec
from kubedistill.api.worker_config import CONFIG_DIR, TERMINATION_LOG, FetchConfig, StorageSettings
from kubedistill.builders import adapters as pool
from kubedistill.builders import integrations, names
from kubedistill.builders.integrations import Capabilities
from kubedistill.builders.resources import (
    HOME_ENV,
    SHM_MOUNT,
    TMP_MOUNT,
    TMP_VOLUME,
    container_security_context,
    image_pull_secrets,
    pod_security_context,
    scale_quantity,
    shm_volume,
    storage_env,
)

MODEL_SUBDIR = "model"
BASE_SUBDIR = "base"


@dataclass(frozen=True)
class ServingPlan:
    """A DistilledModel whose source is resolved: what to serve and how to reach its store."""

    model: DistilledModel
    source: ModelArtifact
    base_model: str | None
    storage: StorageSpec

    @property
    def name(self) -> str:
        return self.model.metadata.name or ""

    @property
    def namespace(self) -> str:
        return self.model.metadata.namespace or "default"

    @property
    def served_model_name(self) -> str:
        return self.model.spec.served_model_name or self.name

    @property
    def source_hash(self) -> str:
        """Identifies what the pods fetch: a new value rolls the Deployment."""
        identity = {
            "uri": self.source.uri,
            "digest": self.source.digest,
            "base": self.base_model,
            "storage": self.storage.to_wire(),
        }
        return names.short_hash(json.dumps(identity, sort_keys=True), 16)

    def owner_reference(self) -> dict[str, object]:
        return {
            "apiVersion": self.model.api_version,
            "kind": self.model.kind,
            "name": self.name,
            "uid": self.model.metadata.uid or "",
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": names.model_labels(self.name),
            "ownerReferences": [self.owner_reference()],
        }


def _fetches_base(plan: ServingPlan) -> bool:
    return plan.base_model is not None and plan.base_model.startswith("s3://") and not _streams(plan)


def _streams(plan: ServingPlan) -> bool:
    return plan.model.spec.serving.weights == "stream"


def _streams_model(plan: ServingPlan) -> bool:
    """Merged weights are streamed; a LoRA artifact (small) is still fetched, its base streamed."""
    return _streams(plan) and plan.base_model is None


def stream_env(storage: StorageSpec) -> list[dict[str, Any]]:
    """Where vLLM's runai streamer finds the object store (credentials: storage_env)."""
    env = [{"name": "AWS_DEFAULT_REGION", "value": storage.region}, {"name": "AWS_REGION", "value": storage.region}]
    if storage.endpoint:
        env += [
            {"name": "AWS_ENDPOINT_URL", "value": storage.endpoint},
            {"name": "RUNAI_STREAMER_S3_ENDPOINT", "value": storage.endpoint},
        ]
    if storage.addressing_style == "path" or (storage.endpoint and storage.addressing_style == "auto"):
        env.append({"name": "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "value": "0"})
    return env


def build_fetch_config_map(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    """What the init container fetches (and verifies): one ConfigMap per model version, immutable."""
    storage = StorageSettings(
        endpoint=plan.storage.endpoint, region=plan.storage.region, addressing_style=plan.storage.addressing_style
    )
    model_dir = settings.serving.model_dir
    files = {
        "fetch.yaml": FetchConfig(
            model_uri=plan.source.uri,
            destination=f"{model_dir}/{MODEL_SUBDIR}",
            digest=plan.source.digest.removeprefix("sha256:") if plan.source.digest else None,
            storage=storage,
        ).to_wire()
    }
    if _fetches_base(plan):
        files["fetch-base.yaml"] = FetchConfig(
            model_uri=plan.base_model or "", destination=f"{model_dir}/{BASE_SUBDIR}", storage=storage
        ).to_wire()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": plan.metadata(names.model_fetch_config_name(plan.name, plan.source_hash)),
        "immutable": True,
        "data": {key: yaml.safe_dump(value, sort_keys=True) for key, value in files.items()},
    }


def _vllm_args(plan: ServingPlan, settings: OperatorSettings) -> list[str]:
    vllm = plan.model.spec.serving.vllm
    model_dir = settings.serving.model_dir
    local_model = f"{model_dir}/{MODEL_SUBDIR}"
    args = ["--host", "0.0.0.0", "--port", str(settings.serving.port), "--dtype", vllm.dtype]
    args += ["--gpu-memory-utilization", str(vllm.gpu_memory_utilization)]
    if plan.base_model is None:
        model = plan.source.uri if _streams_model(plan) else local_model
        args += ["--model", model, "--served-model-name", plan.served_model_name]
    else:
        base = f"{model_dir}/{BASE_SUBDIR}" if _fetches_base(plan) else plan.base_model
        # The adapter answers under the served name; the base model keeps its own.
        args += ["--model", base, "--enable-lora", "--lora-modules", f"{plan.served_model_name}={local_model}"]
        if plan.model.spec.serving.adapters is not None:
            args += ["--max-loras", str(plan.model.spec.serving.adapters.max_adapters)]
            args += ["--max-lora-rank", str(plan.model.spec.serving.adapters.max_rank)]
    if plan.model.spec.serving.adapters is not None and plan.base_model is None:
        args += pool.pool_vllm_args(plan.model.spec.serving.adapters)
    if _streams(plan):
        args += ["--load-format", "runai_streamer"]
    if vllm.max_model_len:
        args += ["--max-model-len", str(vllm.max_model_len)]
    return args + list(vllm.extra_args)


def _serving_resources(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    serving = plan.model.spec.serving
    defaults = settings.serving
    gpus = serving.gpus
    cpu = (serving.resources.cpu if serving.resources else None) or (
        scale_quantity(defaults.cpu_per_gpu, gpus) if gpus else defaults.cpu
    )
    memory = (serving.resources.memory if serving.resources else None) or (
        scale_quantity(defaults.memory_per_gpu, gpus) if gpus else defaults.memory
    )
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        requests[settings.gpu_pool.gpu_resource] = limits[settings.gpu_pool.gpu_resource] = str(gpus)
    return {"requests": requests, "limits": limits}


def _fetch_container(plan: ServingPlan, settings: OperatorSettings, config_file: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "image": settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubedistill-worker", "fetch", "--config", f"{CONFIG_DIR}/{config_file}"],
        "env": [
            {"name": "KUBEDISTILL_LOG_LEVEL", "value": settings.log_level},
            *HOME_ENV,
            *storage_env(plan.storage),
        ],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [
            {"name": "fetch-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "models", "mountPath": settings.serving.model_dir},
            dict(TMP_MOUNT),
        ],
        "securityContext": container_security_context(settings),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_deployment(plan: ServingPlan, settings: OperatorSettings, autoscaled: bool = False) -> dict[str, Any]:
    """The vLLM Deployment ``<model>-vllm``; replicas left to the autoscaler when ``autoscaled``."""
    spec = plan.model.spec
    serving = spec.serving
    port = settings.serving.port
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": names.VLLM_CONTAINER,
        "image": serving.vllm.image or settings.vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": _vllm_args(plan, settings),
        "env": [
            # The image may expect root's HOME; caches go to a writable volume instead.
            *HOME_ENV,
            *(pool.POOL_VLLM_ENV if serving.adapters is not None else []),
            *(stream_env(plan.storage) + storage_env(plan.storage) if _streams(plan) else []),
            *[{"name": e.name, "value": e.value} for e in serving.vllm.env],
        ],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": _serving_resources(plan, settings),
        "startupProbe": {
            **health,
            "periodSeconds": 10,
            "failureThreshold": max(settings.serving.startup_seconds // 10, 1),
        },
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 4},
        "volumeMounts": [
            {"name": "models", "mountPath": settings.serving.model_dir, "readOnly": True},
            dict(TMP_MOUNT),
            dict(SHM_MOUNT),
        ],
        "securityContext": container_security_context(settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    init = [] if _streams_model(plan) else [_fetch_container(plan, settings, "fetch.yaml", names.FETCH_CONTAINER)]
    if _fetches_base(plan):
        init.append(_fetch_container(plan, settings, "fetch-base.yaml", f"{names.FETCH_CONTAINER}-base"))
    gpu = serving.gpus > 0
    node_selector = (
        serving.node_selector
        if serving.node_selector is not None
        else (settings.gpu_pool.node_selector if gpu else settings.cpu_pool.node_selector)
    )
    tolerations = (
        serving.tolerations
        if serving.tolerations is not None
        else (settings.gpu_pool.tolerations if gpu else settings.cpu_pool.tolerations)
    )
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "terminationGracePeriodSeconds": 60,
        "initContainers": init,
        "containers": [container],
        "volumes": [
            {"name": "models", "emptyDir": {"sizeLimit": settings.serving.model_volume_size}},
            dict(TMP_VOLUME),
            shm_volume(settings.gpu_pool.shm_size if gpu else settings.cpu_pool.shm_size),
        ],
    }
    if init:  # streamed weights have no fetch ConfigMap: a volume naming it would keep the pod from starting
        config_name = names.model_fetch_config_name(plan.name, plan.source_hash)
        pod_spec["volumes"].insert(0, {"name": "fetch-config", "configMap": {"name": config_name}})
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in tolerations]
    if serving.adapters is not None:
        container["volumeMounts"].append(dict(pool.POOL_VLLM_MOUNT))
        pod_spec["containers"].append(pool.build_adapter_sync_container(plan.storage, settings))
        pod_spec["volumes"] += pool.pool_volumes(plan.name)
        pod_spec["serviceAccountName"] = pool.pool_service_account(plan.name, settings)
    elif settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = image_pull_secrets(settings)
    annotations = {
        **settings.pod_annotations,
        names.ANNOTATION_MODEL_URI: plan.source.uri,
        names.ANNOTATION_MODEL_DIGEST: plan.source.digest or "",
    }
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": names.model_selector(plan.name)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": settings.serving.startup_seconds + 600,
        "template": {
            "metadata": {"labels": names.model_labels(plan.name), "annotations": annotations},
            "spec": pod_spec,
        },
    }
    metadata = plan.metadata(names.model_deployment_name(plan.name))
    if serving.autoscaling is None:
        deployment_spec["replicas"] = serving.replicas
    elif autoscaled:
        metadata["annotations"] = {names.ANNOTATION_AUTOSCALED: "true"}
    else:  # no autoscaler can run here (a condition says why): serve the fewest replicas that serve
        deployment_spec["replicas"] = max(serving.autoscaling.min_replicas, 1)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": deployment_spec}


def build_service(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    """``<model>``: the stable OpenAI-compatible endpoint in front of the ready pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": plan.metadata(names.model_service_name(plan.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.model_selector(plan.name),
            "ports": [{"name": "http", "port": settings.serving.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_pdb(plan: ServingPlan) -> dict[str, Any]:
    """Node drains take one replica at a time; they are never blocked outright."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": plan.metadata(names.model_pdb_name(plan.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": names.model_selector(plan.name)}},
    }


def build_optional_children(plan: ServingPlan, settings: OperatorSettings, caps: Capabilities) -> list[dict[str, Any]]:
    """Autoscaler, monitor and routing objects this cluster can take (see builders/integrations.py)."""
    spec = plan.model.spec
    args = (plan.name, plan.namespace, plan.owner_reference())
    children: list[dict[str, Any]] = []
    autoscaling = spec.serving.autoscaling
    if autoscaling is not None:
        kind = integrations.choose_autoscaler(autoscaling, caps).kind
        if kind == integrations.HPA:
            children.append(integrations.build_hpa(*args, autoscaling))
        elif kind == integrations.SCALED_OBJECT:
            children.append(integrations.build_scaled_object(*args, autoscaling, settings))
    monitor = integrations.build_monitor(*args, settings)
    if monitor is not None and caps.has((monitor["apiVersion"], monitor["kind"])):
        children.append(monitor)
    routing = spec.routing
    if routing is not None and caps.has(integrations.INFERENCE_POOL):
        children.append(integrations.build_inference_pool(*args, routing, settings))
        if caps.has(integrations.INFERENCE_OBJECTIVE):
            children.append(integrations.build_inference_objective(*args, routing, plan.name))
    return children


def build_serving_children(
    plan: ServingPlan, settings: OperatorSettings, caps: Capabilities | None = None
) -> list[dict[str, Any]]:
    """Everything that serves a DistilledModel, in apply order (config before the pods that mount it)."""
    caps = caps or Capabilities()
    children = [] if _streams_model(plan) else [build_fetch_config_map(plan, settings)]
    children += [build_service(plan, settings), build_pdb(plan)]
    if plan.model.spec.serving.adapters is not None:
        children += pool.build_adapter_sync_rbac(plan.name, plan.namespace, plan.owner_reference(), settings)
    autoscaling = plan.model.spec.serving.autoscaling
    autoscaled = autoscaling is not None and integrations.choose_autoscaler(autoscaling, caps).kind is not None
    children.append(build_deployment(plan, settings, autoscaled))
    return children + build_optional_children(plan, settings, caps)
