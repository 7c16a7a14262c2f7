"""Operator settings, the model: cluster-wide defaults of the pods the operator creates (the Helm values).

A DistillationJob says *what* to distil; these settings say how pods look on this cluster
when the job does not: the GPU pool (the H100 node selector, the ``nvidia.com/gpu``
toleration, GPUs per node), images, the memory-backed /dev/shm, pod security, which
namespaces the operator watches, and how hard it may push the API server.

The model lives at the bottom, in api/, with the resources' models: the builders, the
reconcile cycle and the CLI all import it from here, and the Helm chart's settings schema is
generated from it (hack/gen-crds). ``kubedistill.settings`` loads it from a file and the
environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from kubedistill import __version__
from kubedistill.api.base import ApiModel
from kubedistill.api.v1alpha1 import QUANTITY_PATTERN, Toleration
from kubedistill.api.worker_config import RunStage

H100_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"

NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a DNS label (RFC 1123)


def _default_gpu_tolerations() -> list[Toleration]:
    return [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]


class GpuPoolSettings(ApiModel):
    """The GPU node pool: where train, evaluate and vLLM pods go unless a resource says otherwise."""

    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.product": H100_PRODUCT},
        description="Node selector of GPU pods (the NVIDIA GPU operator's product label).",
    )
    tolerations: list[Toleration] = Field(
        default_factory=_default_gpu_tolerations, description="Tolerations of GPU pods (the GPU pool's taint)."
    )
    gpus_per_node: int = Field(default=8, ge=1, le=64, description="GPUs per training pod unless the job says.")
    gpu_resource: str = Field(default=GPU_RESOURCE, min_length=1, description="Extended resource name of a GPU.")
    cpu_per_gpu: str = Field(default="12", pattern=QUANTITY_PATTERN, description="CPU request per GPU.")
    memory_per_gpu: str = Field(
        default="120Gi", pattern=QUANTITY_PATTERN, description="Memory per GPU (request = limit)."
    )
    shm_size: str = Field(
        default="64Gi", pattern=QUANTITY_PATTERN, description="Size limit of the memory-backed /dev/shm."
    )


class CpuPoolSettings(ApiModel):
    """Where CPU-only stage pods go (generate against an OpenAI-compatible teacher)."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of CPU-only pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of CPU-only pods.")
    cpu: str = Field(default="2", pattern=QUANTITY_PATTERN, description="CPU request of a CPU-only stage pod.")
    memory: str = Field(default="4Gi", pattern=QUANTITY_PATTERN, description="Memory of a CPU-only stage pod.")
    shm_size: str = Field(
        default="2Gi", pattern=QUANTITY_PATTERN, description="/dev/shm of CPU-only train/evaluate pods."
    )


class SecuritySettings(ApiModel):
    """Pod security of everything the operator creates (passes the `restricted` standard)."""

    run_as_user: int = Field(default=65532, ge=1, description="Non-root UID of every container (the images' user).")
    run_as_group: int = Field(default=65532, ge=1, description="GID of every container.")
    fs_group: int = Field(default=65532, ge=1, description="Group owning mounted volumes.")
    read_only_root_filesystem: bool = Field(
        default=True,
        description="Read-only root filesystem in every container; /tmp (scratch, caches, HOME) is an emptyDir. "
        "Turn off only for an image that must write elsewhere.",
    )


class JobSettings(ApiModel):
    """How stage Jobs behave."""

    backoff_limit: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Retries of a pod that crashed (exit 2+); worker errors (exit 1) fail at once.",
    )
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit of a stage Job.")
    rendezvous_port: int = Field(default=29500, ge=1, le=65535, description="torchrun rendezvous port (multi-node).")
    evaluate_gpus: int = Field(default=1, ge=0, le=16, description="GPUs of the evaluate pod (vLLM); 0 on CPU pools.")
    history_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Earlier runs whose Jobs, ConfigMaps and Services are kept per DistillationJob, besides the "
        "current run and the latest successful one; older ones are deleted (their artifacts stay in storage).",
    )


class ServingSettings(ApiModel):
    """Defaults of DistilledModel serving pods."""

    port: int = Field(default=8000, ge=1, le=65535, description="vLLM's HTTP port (OpenAI-compatible API).")
    model_dir: str = Field(default="/models", description="Where the fetch init container puts the model.")
    model_volume_size: str = Field(
        default="200Gi", pattern=QUANTITY_PATTERN, description="Size limit of the model emptyDir volume."
    )
    cpu_per_gpu: str = Field(default="8", pattern=QUANTITY_PATTERN, description="CPU request per GPU of a vLLM pod.")
    memory_per_gpu: str = Field(
        default="64Gi", pattern=QUANTITY_PATTERN, description="Memory per GPU of a vLLM pod (request = limit)."
    )
    cpu: str = Field(default="4", pattern=QUANTITY_PATTERN, description="CPU request of a CPU-only vLLM pod.")
    memory: str = Field(default="16Gi", pattern=QUANTITY_PATTERN, description="Memory of a CPU-only vLLM pod.")
    startup_seconds: int = Field(
        default=1800, ge=60, description="How long a vLLM pod may take to load the model before it is restarted."
    )
    monitor: Literal["none", "PodMonitor", "ServiceMonitor"] = Field(
        default="none",
        description="Have the Prometheus Operator scrape vLLM's /metrics with a PodMonitor or ServiceMonitor per "
        "model (written when its CRDs are installed; a Monitoring condition says when they are not).",
    )
    monitor_interval: str = Field(
        default="15s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval of the PodMonitor/ServiceMonitor."
    )
    monitor_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels on the PodMonitor/ServiceMonitor, e.g. the release label a Prometheus selects.",
    )
    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        pattern=r"^https?://[^\s]+$",
        description="Prometheus that KEDA's ScaledObjects query for vLLM's queue (autoscaling metric queue).",
    )
    adapter_sync_port: int = Field(
        default=8001, ge=1, le=65535, description="Readiness port of the adapter sidecar of an adapter pool's pods."
    )


class ReconcileSettings(ApiModel):
    """How the operator paces itself (the N=1000 knobs)."""

    resync_seconds: float = Field(
        default=300,
        ge=5,
        description="Safety-net re-reconcile of every active DistillationJob (children drive the rest).",
    )
    max_concurrent_reconciles: int = Field(default=32, ge=1, le=1024, description="Reconciles in flight at once.")
    api_qps: float = Field(default=100, gt=0, description="Requests per second the operator sends to the API server.")
    api_burst: int = Field(default=200, ge=1, description="Requests the operator may send at once above api_qps.")
    api_threads: int = Field(default=16, ge=1, le=256, description="Threads (and connections) of the API client.")
    request_timeout_seconds: float = Field(default=30, gt=0, description="Timeout of one API request.")


class ProgressSettings(ApiModel):
    """Live progress of running stages (the Progress column of kubectl get dj)."""

    report_seconds: float = Field(
        default=30, ge=5, le=3600, description="How often a running stage pod reports its progress."
    )
    status_seconds: float = Field(
        default=30,
        ge=5,
        le=3600,
        description="Least seconds between two progress updates of one DistillationJob's status "
        "(what 1,000 running jobs cost the API server).",
    )


class OperatorSettings(ApiModel):
    """Everything the operator needs to know about the cluster it runs in."""

    namespaces: list[Annotated[str, StringConstraints(pattern=NAMESPACE_PATTERN, max_length=63)]] = Field(
        default_factory=list,
        json_schema_extra={"uniqueItems": True},
        description="Namespaces to watch, each a DNS label such as ml-team; empty watches all.",
    )

    @field_validator("namespaces")
    @classmethod
    def _each_namespace_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({ns for ns in value if value.count(ns) > 1})
        if repeated:
            raise ValueError(f"namespaces lists {', '.join(repeated)} more than once")
        return value

    worker_image: str = Field(
        default=f"ghcr.io/kubedistill/worker:{__version__}", min_length=1, description="Image of every stage pod."
    )
    vllm_image: str = Field(
        default="vllm/vllm-openai:v0.11.0", min_length=1, description="Image of vLLM serving pods (DistilledModel)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Pull secrets of every pod.")
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of stage and serving pods (their token is never mounted)."
    )
    gpu_pool: GpuPoolSettings = Field(default_factory=GpuPoolSettings)
    cpu_pool: CpuPoolSettings = Field(default_factory=CpuPoolSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations on every pod created.")
    stage_pod_annotations: dict[RunStage, dict[str, str]] = Field(
        default_factory=dict, description="Extra annotations on one stage's pods, e.g. train: {...}."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
