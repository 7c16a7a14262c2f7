"""The kubedistill.io/v1alpha1 API: DistillationJob and DistilledModel.

These pydantic models are the single source of truth: the CRD YAML in crds/ is
generated from them (``kubedistill crds``), the operator parses custom
resources with them, and the workers validate their configs with the same
sub-models. Every field carries a description because it is what
``kubectl explain`` prints.

Validation lives in two places that must agree: pydantic validators here (for
the operator, the workers and local mode) and the schema + CEL rules in the
generated CRD (for the API server). Rules that the API server must enforce are
declared with ``cel(...)`` in ``json_schema_extra`` next to the pydantic check.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from kubedistill.api.base import ApiModel
from kubedistill.api.conditions import ConditionStatus, JobPhase, ModelPhase, StagePhase
from kubedistill.api.savings import (
    BatchSettings,
    SpeedComparison,
    SpeedSpec,
    TeacherBudget,
    TeacherPricing,
    TeacherSpend,
)

GROUP = "kubedistill.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes resource quantity ("500m", "16Gi", "2"), as apimachinery parses it.
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
HTTP_URL_PATTERN = r"^https?://[^\s]+$"
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Services need a DNS-1035 label (starts with a letter); children are named after their resource.
DNS1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A sha256 content digest, hex, with or without the "sha256:" prefix.
DIGEST_PATTERN = r"^(sha256:)?[a-f0-9]{64}$"
RFC3339_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """One CEL rule for ``x-kubernetes-validations``."""
    validation: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


# Friendlier API server messages than "should match '<regex>'" for the mistakes users make most.
# The pattern stays (pydantic checks it); the CEL rule adds a sentence that says what to fix.
URI_MAX_LENGTH = 2048
QUANTITY_MAX_LENGTH = 64
S3_URI_RULE: dict[str, Any] = {
    "x-kubernetes-validations": [
        cel(
            "self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$')",
            "must be an s3:// URI: s3://<bucket>/<prefix>, the bucket in lowercase letters, digits, '.' and '-'",
        )
    ]
}
HTTP_URL_RULE: dict[str, Any] = {
    "x-kubernetes-validations": [
        cel("self.startsWith('http://') || self.startsWith('https://')", "must be an http:// or https:// URL")
    ]
}
QUANTITY_RULE: dict[str, Any] = {
    "x-kubernetes-validations": [
        cel("isQuantity(self)", "must be a Kubernetes quantity such as 64Gi, 512Mi, 8 or 500m (no spaces)")
    ]
}


# --------------------------------------------------------------------------- shared


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace. Its value never leaves the Secret:
    pods get it through ``secretKeyRef``."""

    name: str = Field(description="Name of the Secret, in the namespace of the resource.", min_length=1)
    key: str = Field(description="Key inside the Secret.", min_length=1)


class SecretRef(ApiModel):
    """A whole Secret in the same namespace."""

    name: str = Field(description="Name of the Secret, in the namespace of the resource.", min_length=1)


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(description="Name of the ConfigMap.", min_length=1)
    key: str = Field(description="Key inside the ConfigMap.", min_length=1)


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value the toleration matches (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction, in seconds."
    )


class EnvVar(ApiModel):
    """A plain environment variable. Secrets belong in ``valueFrom`` of the pod, not here."""

    name: str = Field(description="Variable name.", min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = Field(default="", description="Variable value.")


class ComputeResources(ApiModel):
    """CPU and memory for one pod (requests = limits for memory)."""

    cpu: str | None = Field(
        default=None,
        description='CPU request, e.g. "8" or "500m".',
        pattern=QUANTITY_PATTERN,
        max_length=QUANTITY_MAX_LENGTH,
        json_schema_extra=QUANTITY_RULE,
    )
    memory: str | None = Field(
        default=None,
        description='Memory request and limit, e.g. "64Gi".',
        pattern=QUANTITY_PATTERN,
        max_length=QUANTITY_MAX_LENGTH,
        json_schema_extra=QUANTITY_RULE,
    )


# --------------------------------------------------------------------------- teacher


class Sampling(ApiModel):
    """How the teacher (and the student during evaluation) samples answers."""

    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    max_tokens: int = Field(default=512, ge=1, le=131072, description="Most tokens per answer.")
    # Not "n" on the wire, as in the OpenAI API: kubectl's YAML reads a bare `n:` key as `false`.
    n: int = Field(
        default=1,
        ge=1,
        le=16,
        alias="answersPerPrompt",
        description="Teacher answers per prompt (the OpenAI API's n); each becomes a training example.",
    )
    seed: int | None = Field(default=None, description="Sampling seed, where the teacher supports one.")


class EndpointTeacher(ApiModel):
    """An OpenAI-compatible chat completions API (OpenAI, vLLM, TGI, a gateway...)."""

    base_url: str = Field(
        alias="baseURL",
        pattern=HTTP_URL_PATTERN,
        max_length=URI_MAX_LENGTH,
        json_schema_extra=HTTP_URL_RULE,
        description="Base URL of the OpenAI-compatible API, including /v1, e.g. https://api.openai.com/v1.",
    )
    model: str = Field(min_length=1, description="Model name sent in each request.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key; passed to the pod as a secretKeyRef only."
    )
    max_concurrency: int = Field(default=32, ge=1, le=4096, description="Most requests in flight at once.")
    requests_per_minute: int | None = Field(default=None, ge=1, description="Request rate limit (per minute).")
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Token rate limit (prompt + max completion tokens, per minute)."
    )
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600, description="Timeout of one request, in seconds.")
    max_retries: int = Field(default=6, ge=0, le=100, description="Retries of one request before it counts as failed.")
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online: chat completions requests; batch: the OpenAI Batch API (/v1/files, /v1/batches), "
        "usually half the price, answers within the completion window. Both fill the same answer store.",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch API settings (mode: batch).")


_TP_WITHIN_GPUS = "teacher.vllm.tensorParallelSize must not exceed teacher.vllm.gpus (and must be 1 when gpus is 0)"


class VLLMTeacher(ApiModel):
    """An open-weight teacher run inside the generate pod with vLLM offline batch inference."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.tensorParallelSize) || self.tensorParallelSize <= "
                    "(has(self.gpus) ? (self.gpus == 0 ? 1 : self.gpus) : 1)",
                    _TP_WITHIN_GPUS,
                )
            ]
        }
    }

    model: str = Field(min_length=1, description="Model to load: an s3:// prefix, a local path, or a hub id.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="Tensor parallel degree.")
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs for the generate pod (0 runs on CPU).")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length vLLM allocates for.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype.")

    @model_validator(mode="after")
    def _tp_within_gpus(self) -> VLLMTeacher:
        if self.tensor_parallel_size > max(self.gpus, 1):
            raise ValueError(_TP_WITHIN_GPUS)
        return self


_ONE_TEACHER = (
    "set exactly one of spec.teacher.endpoint (an OpenAI-compatible API) or spec.teacher.vllm (an in-cluster model)"
)
_COST_NEEDS_PRICES = "teacher.budget.maxCost needs teacher.pricing (the price of a token); or set budget.maxTokens"


class TeacherSpec(ApiModel):
    """Who answers the prompts. Exactly one of endpoint or vllm."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "has(self.endpoint) != has(self.vllm)",
                    _ONE_TEACHER,
                ),
                cel("!has(self.budget) || !has(self.budget.maxCost) || has(self.pricing)", _COST_NEEDS_PRICES),
            ]
        }
    }

    endpoint: EndpointTeacher | None = Field(default=None, description="An OpenAI-compatible API.")
    vllm: VLLMTeacher | None = Field(
        default=None, description="An open-weight model run with vLLM in the generate pod."
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Sampling settings of the teacher.")
    system_prompt: str | None = Field(default=None, description="System prompt prepended to every prompt.")
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Capture this many top logprobs per answer token (0 or unset: none)."
    )
    pricing: TeacherPricing | None = Field(
        default=None, description="The teacher's price per million tokens: spend is then also a cost."
    )
    budget: TeacherBudget | None = Field(
        default=None, description="The most one generate run may spend on the teacher (tokens and/or cost)."
    )

    @model_validator(mode="after")
    def _valid_teacher(self) -> TeacherSpec:
        if (self.endpoint is None) == (self.vllm is None):
            raise ValueError(_ONE_TEACHER)
        if self.budget is not None and self.budget.max_cost is not None and self.pricing is None:
            raise ValueError(_COST_NEEDS_PRICES)
        return self

    @property
    def mode(self) -> Literal["online", "batch", "offline"]:
        """How the answers are bought: online or batch requests to an endpoint, or offline in the pod."""
        return self.endpoint.mode if self.endpoint else "offline"

    @property
    def model_name(self) -> str:
        """The teacher model's name, whichever kind of teacher this is."""
        return self.endpoint.model if self.endpoint else self.vllm.model  # type: ignore[union-attr]


# --------------------------------------------------------------------------- dataset


class PromptsSource(ApiModel):
    """Where the prompts come from: exactly one of uri or configMapRef."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "has(self.uri) != has(self.configMapRef)",
                    "set exactly one of prompts.uri (s3://...jsonl) or prompts.configMapRef",
                )
            ]
        }
    }

    uri: str | None = Field(
        default=None,
        pattern=S3_URI_PATTERN,
        max_length=URI_MAX_LENGTH,
        json_schema_extra=S3_URI_RULE,
        description="s3:// URI of a JSONL file of prompts.",
    )
    config_map_ref: ConfigMapKeyRef | None = Field(
        default=None, description="A ConfigMap key holding JSONL prompts (small prompt sets)."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> PromptsSource:
        if (self.uri is None) == (self.config_map_ref is None):
            raise ValueError("set exactly one of prompts.uri (s3://...jsonl) or prompts.configMapRef")
        return self


class DatasetSpec(ApiModel):
    """The prompts the teacher answers, and how they are split for evaluation."""

    prompts: PromptsSource = Field(description='JSONL prompts: {"prompt": str} or {"messages": [...]}, optional "id".')
    format: Literal["chat", "prompt"] = Field(
        default="chat", description="chat: records hold messages; prompt: records hold a prompt string."
    )
    eval_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Fraction of prompts held out for evaluation (split by content hash)."
    )
    eval_prompts: PromptsSource | None = Field(
        default=None, description="Separate held-out prompts; when set, evalFraction is ignored."
    )
    max_examples: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    max_prompt_chars: int = Field(
        default=32000, ge=1, description="Prompts longer than this are skipped and reported, not sent."
    )
    max_failure_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Generation fails only when more than this fraction of prompts fail."
    )


# --------------------------------------------------------------------------- student


class LoraSpec(ApiModel):
    """LoRA adapter settings (peft)."""

    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / rank).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description='Module names to adapt, or ["all-linear"].',
    )


class TrainingSpec(ApiModel):
    """Training hyper-parameters (trl SFTConfig)."""

    epochs: float = Field(default=3.0, gt=0, le=1000, description="Passes over the training set.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps used for warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="AdamW weight decay.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(default=2048, ge=16, le=1048576, description="Longest training sequence in tokens.")
    packing: bool = Field(default=False, description="Pack short examples into full-length sequences.")
    completion_only_loss: bool = Field(
        default=True, description="Train on the teacher's answer only, not on the prompt."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory.")
    seed: int = Field(default=42, description="Seed for data order and initialisation.")
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Save a checkpoint to the output URI every N steps."
    )


_ADAPTER_NEEDS_LORA = "student.export adapter needs student.method lora (full fine-tuning has no adapter)"


class StudentSpec(ApiModel):
    """The small pre-trained model to fine-tune on the teacher's answers."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!has(self.export) || self.export != 'adapter' || self.method == 'lora'", _ADAPTER_NEEDS_LORA)
            ]
        }
    }

    model: str = Field(
        min_length=1,
        description="Base model: an s3:// prefix, pvc://<claim>/<path>, or a hub id the cluster can reach.",
    )
    method: Literal["lora", "full"] = Field(default="lora", description="lora (peft adapter) or full fine-tuning.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (method lora).")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyper-parameters.")
    chat_template: str | None = Field(
        default=None, description="Jinja chat template to use when the student's tokenizer has none."
    )
    export: Literal["merged", "adapter"] = Field(
        default="merged", description="merged: full safetensors vLLM serves as is; adapter: the LoRA adapter only."
    )

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> StudentSpec:
        if self.export == "adapter" and self.method != "lora":
            raise ValueError(_ADAPTER_NEEDS_LORA)
        return self


# --------------------------------------------------------------------------- evaluation

Metric = Literal["exactMatch", "tokenF1", "rougeL", "jsonFieldAccuracy"]


class EvaluationSpec(ApiModel):
    """How the student is compared with the teacher on held-out prompts, and the gate."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.agreementMetric) || !has(self.metrics) || self.agreementMetric in self.metrics",
                    "evaluation.agreementMetric must be one of evaluation.metrics",
                )
            ]
        }
    }

    metrics: list[Metric] = Field(
        default_factory=lambda: list[Metric](["exactMatch", "tokenF1", "rougeL"]),
        min_length=1,
        max_length=8,
        description="Metrics computed between student and teacher answers.",
    )
    agreement_metric: Metric = Field(
        default="tokenF1", description="The metric whose mean is the teacher agreement the gate checks."
    )
    min_teacher_agreement: float = Field(
        default=0.95, ge=0.0, le=1.0, description="Gate: the run fails below this teacher agreement."
    )
    max_examples: int | None = Field(default=None, ge=1, description="Evaluate on at most this many held-out prompts.")
    speed: SpeedSpec = Field(
        default_factory=SpeedSpec, description="Student vs teacher speed and cost per answer, measured."
    )

    @model_validator(mode="after")
    def _agreement_metric_is_computed(self) -> EvaluationSpec:
        if self.agreement_metric not in self.metrics:
            raise ValueError("evaluation.agreementMetric must be one of evaluation.metrics")
        return self


# --------------------------------------------------------------------------- serving


class VLLMServingSpec(ApiModel):
    """vLLM server settings of a DistilledModel."""

    image: str | None = Field(default=None, description="vLLM image; the operator's default when unset.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length served.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype.")
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM server arguments.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables of the vLLM container.")


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling of the vLLM Deployment."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed maxReplicas")
            ]
        }
    }

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    target_cpu_utilization: int = Field(
        default=70, ge=1, le=100, description="Average CPU utilisation target, percent."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed maxReplicas")
        return self


class ServingSpec(ApiModel):
    """How a DistilledModel is served."""

    replicas: int = Field(default=1, ge=0, le=1000, description="vLLM replicas (ignored when autoscaling is set).")
    autoscaling: AutoscalingSpec | None = Field(default=None, description="Autoscale replicas with an HPA.")
    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per replica (0 serves on CPU).")
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node selector; the operator's GPU pool default when unset."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Tolerations; the operator's GPU default when unset."
    )
    resources: ComputeResources | None = Field(default=None, description="CPU and memory per replica.")
    vllm: VLLMServingSpec = Field(default_factory=VLLMServingSpec, description="vLLM settings.")


# --------------------------------------------------------------------------- output, storage, resources


class ModelOutputSpec(ApiModel):
    """The DistilledModel a successful run publishes."""

    name: str = Field(
        min_length=1,
        max_length=53,
        pattern=DNS1035_LABEL_PATTERN,
        description="Name of the DistilledModel to create or update: lowercase letters, digits and '-', "
        "starting with a letter (it also names the model's Service).",
    )
    serve: bool = Field(default=True, description="Create/update the DistilledModel (and so serve it) on success.")
    serving: ServingSpec | None = Field(default=None, description="Serving settings copied into the DistilledModel.")


class OutputSpec(ApiModel):
    """Where artifacts go and what is published."""

    uri: str = Field(
        pattern=S3_URI_PATTERN,
        max_length=URI_MAX_LENGTH,
        json_schema_extra=S3_URI_RULE,
        description="s3:// prefix for datasets, checkpoints, the final model and the report.",
    )
    model: ModelOutputSpec = Field(description="The DistilledModel to publish.")


class StorageSpec(ApiModel):
    """The S3 or S3-compatible store (MinIO, Ceph RGW, SeaweedFS...)."""

    endpoint: str | None = Field(
        default=None,
        pattern=HTTP_URL_PATTERN,
        max_length=URI_MAX_LENGTH,
        json_schema_extra=HTTP_URL_RULE,
        description="Endpoint URL; AWS S3 when unset.",
    )
    region: str = Field(default="us-east-1", min_length=1, description="Region.")
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; workload identity when unset.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="S3 addressing style; most S3-compatible stores want path."
    )


class ResourcesSpec(ApiModel):
    """Where and with what the GPU stages run. Unset fields take the operator's defaults (Helm values)."""

    node_selector: dict[str, str] | None = Field(
        default=None, description="Node selector of GPU stages; default: the H100 pool (nvidia.com/gpu.product)."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Tolerations of GPU stages; default: nvidia.com/gpu NoSchedule."
    )
    gpus_per_node: int | None = Field(default=None, ge=0, le=16, description="GPUs per training pod (default 8).")
    nodes: int = Field(
        default=1, ge=1, le=1024, description="Training pods; above 1 runs an Indexed Job with torchrun rendezvous."
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the stage pods.")
    queue_name: str | None = Field(default=None, description="Kueue LocalQueue (kueue.x-k8s.io/queue-name label).")
    cpu: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        max_length=QUANTITY_MAX_LENGTH,
        json_schema_extra=QUANTITY_RULE,
        description="CPU request per training pod.",
    )
    memory: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        max_length=QUANTITY_MAX_LENGTH,
        json_schema_extra=QUANTITY_RULE,
        description="Memory per training pod.",
    )
    shm_size: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        max_length=QUANTITY_MAX_LENGTH,
        json_schema_extra=QUANTITY_RULE,
        description="Size of the memory-backed /dev/shm.",
    )


# --------------------------------------------------------------------------- DistillationJob


class DistillationJobSpec(ApiModel):
    """A distillation run: teacher data, student training, evaluation gate, publication."""

    teacher: TeacherSpec = Field(description="The large model whose answers the student learns.")
    dataset: DatasetSpec = Field(description="The prompts, and the held-out split.")
    student: StudentSpec = Field(description="The small model to train.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Placement and size of the stage pods.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Student vs teacher comparison and the gate."
    )
    output: OutputSpec = Field(description="Artifact location and the model to publish.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="The object store of s3:// URIs.")


# --------------------------------------------------------------------------- shared status and objects


class Condition(ApiModel):
    """One observation of the resource's state (the metav1.Condition shape)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Condition type in CamelCase, e.g. Ready, Generated, Failed.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Machine-readable CamelCase reason of the last transition, e.g. StageFailed.",
    )
    message: str = Field(
        default="", max_length=32768, description="Human-readable details; says what to fix on failure."
    )
    last_transition_time: str = Field(pattern=RFC3339_PATTERN, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


class ObjectMeta(ApiModel):
    """The few metadata fields the operator reads; everything else is kept as is."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str | None = Field(default=None, description="Name of the resource.")
    namespace: str | None = Field(default=None, description="Namespace of the resource.")
    uid: str | None = Field(default=None, description="UID assigned by the API server.")
    generation: int | None = Field(default=None, description="Spec generation, incremented on each spec change.")
    resource_version: str | None = Field(default=None, description="Opaque version for optimistic concurrency.")
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")


class ModelArtifact(ApiModel):
    """An exported model on object storage."""

    uri: str = Field(
        pattern=S3_URI_PATTERN,
        max_length=URI_MAX_LENGTH,
        json_schema_extra=S3_URI_RULE,
        description="s3:// prefix holding the model (safetensors, tokenizer, chat template) or LoRA adapter.",
    )
    digest: str | None = Field(
        default=None,
        pattern=DIGEST_PATTERN,
        description="sha256 of the exported files; when set, the serving pod refuses a model with another digest.",
    )


# --------------------------------------------------------------------------- DistillationJob status


class StageStatus(ApiModel):
    """One stage of the run (generate, train or evaluate) and its Kubernetes Job."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    job: str | None = Field(default=None, description="Name of the stage's Job.")
    phase: StagePhase = Field(default=StagePhase.PENDING, description="Pending, Running, Succeeded, Failed or Skipped.")
    start_time: str | None = Field(
        default=None, pattern=RFC3339_PATTERN, description="When the stage started (RFC 3339)."
    )
    completion_time: str | None = Field(
        default=None, pattern=RFC3339_PATTERN, description="When the stage finished (RFC 3339)."
    )
    progress: float | None = Field(default=None, ge=0.0, le=1.0, description="Fraction done, 0 to 1, where known.")
    reason: str | None = Field(
        default=None, description="Why the stage failed, in CamelCase: StageFailed or StageResultMissing."
    )
    message: str | None = Field(default=None, description="Last word from the stage, e.g. the worker's failure reason.")


class StagesStatus(ApiModel):
    """Per-stage status of the current run."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    generate: StageStatus | None = Field(default=None, description="Teacher data generation.")
    train: StageStatus | None = Field(default=None, description="Student training.")
    evaluate: StageStatus | None = Field(default=None, description="Student vs teacher evaluation.")


class DatasetStatus(ApiModel):
    """The teacher dataset of the current run."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    uri: str | None = Field(default=None, description="s3:// prefix of the dataset (manifest.json inside).")
    examples: int | None = Field(default=None, ge=0, description="Training + evaluation examples.")
    train_examples: int | None = Field(default=None, ge=0, description="Training examples.")
    eval_examples: int | None = Field(default=None, ge=0, description="Held-out evaluation examples.")
    digest: str | None = Field(default=None, description="Digest of the dataset's content (its manifest digest).")


class EvaluationStatus(ApiModel):
    """The student's evaluation against the teacher."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    teacher_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Mean of the agreement metric over held-out prompts (0 to 1)."
    )
    metrics: dict[str, float] | None = Field(default=None, description="Every metric computed, by name.")
    passed: bool | None = Field(default=None, description="Whether teacherAgreement reached minTeacherAgreement.")
    examples: int | None = Field(default=None, ge=0, description="Held-out prompts evaluated.")
    report_uri: str | None = Field(default=None, description="s3:// URI of the full evaluation report.")
    speed: SpeedComparison | None = Field(
        default=None, description="The student's serving speed and cost per answer against the teacher's."
    )
    summary: str | None = Field(
        default=None, description="The trade in one line, e.g. 'keeps 97% of the teacher's rougeL, 11x faster, ...'."
    )


class DistillationJobStatus(ApiModel):
    """What the operator observed; written only by the operator."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    phase: JobPhase | None = Field(
        default=None,
        description="Pending, Generating, Training, Evaluating, Publishing, Succeeded or Failed.",
    )
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        description="Generated, Trained, Evaluated, Published, Succeeded and Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    spec_hash: str | None = Field(default=None, description="Hash of the spec the current run executes.")
    run_id: str | None = Field(
        default=None, description="Identifier of the current run; a spec change starts a new run."
    )
    start_time: str | None = Field(default=None, pattern=RFC3339_PATTERN, description="When the current run started.")
    completion_time: str | None = Field(
        default=None, pattern=RFC3339_PATTERN, description="When the current run succeeded or failed."
    )
    teacher: str | None = Field(default=None, description="The teacher model, for display.")
    student: str | None = Field(default=None, description="The student base model, for display.")
    stages: StagesStatus | None = Field(default=None, description="Per-stage status and Job names.")
    dataset: DatasetStatus | None = Field(default=None, description="The teacher dataset.")
    model: ModelArtifact | None = Field(default=None, description="The trained, exported student model.")
    evaluation: EvaluationStatus | None = Field(default=None, description="Evaluation results and gate decision.")
    teacher_spend: TeacherSpend | None = Field(
        default=None, description="What the generate stage projected and spent on the teacher, and the budget's state."
    )
    distilled_model: str | None = Field(default=None, description="Name of the DistilledModel published by this job.")


JOB_NAME_MAX_LENGTH = 50
MODEL_NAME_MAX_LENGTH = 53


def _name_rule(kind: str, max_length: int, purpose: str) -> dict[str, Any]:
    # CEL on the root: metadata is otherwise outside what a CRD schema may constrain.
    return cel(
        f"!has(self.metadata.name) || (self.metadata.name.size() <= {max_length} && "
        f"self.metadata.name.matches('{DNS1035_LABEL_PATTERN}'))",
        f"metadata.name of a {kind} must be at most {max_length} characters of lowercase letters, digits and '-', "
        f"starting with a letter ({purpose})",
    )  # no fieldPath: the API server accepts none under metadata


_JOB_NAME_RULE = _name_rule("DistillationJob", JOB_NAME_MAX_LENGTH, "it names the stage Jobs and Services")
_MODEL_NAME_RULE = _name_rule("DistilledModel", MODEL_NAME_MAX_LENGTH, "it names the model's Service")


def _check_name(metadata: ObjectMeta, max_length: int, kind: str) -> None:
    name = metadata.name
    if name is None:
        return
    if len(name) > max_length or not re.match(DNS1035_LABEL_PATTERN, name):
        raise ValueError(
            f"metadata.name of a {kind} must be at most {max_length} characters of lowercase letters, "
            "digits and '-', starting with a letter"
        )


class DistillationJob(ApiModel):
    """Distil a large teacher model into a small student: Generate, Train, Evaluate, Publish."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [_JOB_NAME_RULE]}}

    api_version: Literal["kubedistill.io/v1alpha1"] = Field(
        default="kubedistill.io/v1alpha1", description="kubedistill.io/v1alpha1."
    )
    kind: Literal["DistillationJob"] = Field(default="DistillationJob", description="DistillationJob.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: DistillationJobSpec = Field(description="What to distil, how, and where the result goes.")
    status: DistillationJobStatus | None = Field(default=None, description="Observed state, written by the operator.")

    @model_validator(mode="after")
    def _valid_name(self) -> DistillationJob:
        _check_name(self.metadata, JOB_NAME_MAX_LENGTH, "DistillationJob")
        return self


# --------------------------------------------------------------------------- DistilledModel


class JobReference(ApiModel):
    """A DistillationJob in the same namespace."""

    name: str = Field(
        min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN_PATTERN, description="Name of the DistillationJob."
    )


class DistilledModelSpec(ApiModel):
    """A model served with vLLM: an exported model URI, or the output of a DistillationJob."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "has(self.model) != has(self.fromJob)",
                    "set exactly one of spec.model (an s3:// model URI) or spec.fromJob (a DistillationJob's output)",
                )
            ]
        }
    }

    model: ModelArtifact | None = Field(default=None, description="The exported model to serve.")
    from_job: JobReference | None = Field(
        default=None, description="Serve the model of this DistillationJob's latest successful run."
    )
    base_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Base model the artifact is a LoRA adapter of (s3:// prefix, pvc:// path or hub id); "
        "unset when the artifact holds merged weights.",
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Replicas, placement and vLLM settings.")
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Model name clients send in requests; metadata.name when unset.",
    )
    storage: StorageSpec | None = Field(
        default=None,
        description="The object store holding spec.model (endpoint, region, credentials Secret); "
        "with fromJob, the job's spec.storage when unset.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DistilledModelSpec:
        if (self.model is None) == (self.from_job is None):
            raise ValueError(
                "set exactly one of spec.model (an s3:// model URI) or spec.fromJob (a DistillationJob's output)"
            )
        return self


class DistilledModelStatus(ApiModel):
    """What the operator observed of the served model."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    phase: ModelPhase | None = Field(
        default=None, description="Pending, Deploying, Ready, Degraded, Stopped or Failed."
    )
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        description="Ready, Progressing and Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    endpoint: str | None = Field(
        default=None, description="OpenAI-compatible base URL inside the cluster, e.g. http://<name>.<ns>.svc:8000/v1."
    )
    served_model_name: str | None = Field(default=None, description="Model name to send in requests.")
    replicas: int | None = Field(default=None, ge=0, description="Pods of the vLLM Deployment (scale subresource).")
    ready_replicas: int | None = Field(default=None, ge=0, description="Pods ready to answer.")
    selector: str | None = Field(
        default=None, description="Label selector of the serving pods, as a string (scale subresource, HPA)."
    )
    current_model: ModelArtifact | None = Field(default=None, description="The model the ready pods serve.")


class DistilledModel(ApiModel):
    """A distilled model served with vLLM behind an OpenAI-compatible Service."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [_MODEL_NAME_RULE]}}

    api_version: Literal["kubedistill.io/v1alpha1"] = Field(
        default="kubedistill.io/v1alpha1", description="kubedistill.io/v1alpha1."
    )
    kind: Literal["DistilledModel"] = Field(default="DistilledModel", description="DistilledModel.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: DistilledModelSpec = Field(description="The model to serve and how.")
    status: DistilledModelStatus | None = Field(default=None, description="Observed state, written by the operator.")

    @model_validator(mode="after")
    def _valid_name(self) -> DistilledModel:
        _check_name(self.metadata, MODEL_NAME_MAX_LENGTH, "DistilledModel")
        return self
