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
    prompt_logprobs: bool = Field(
        default=False,
        description="The endpoint is a vLLM server that scores given tokens (prompt_logprobs on /v1/completions): "
        "the train stage of student.objective onPolicy asks it to score the student's answers. "
        "OpenAI-style APIs cannot; leave false for them.",
    )
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
_SHARDS_NOT_BATCH = (
    "teacher.shards > 1 needs an online endpoint or a vllm teacher: a Batch API teacher queues every request "
    "at once already (set teacher.shards: 1, or teacher.endpoint.mode: online)"
)


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
                cel(
                    "!has(self.shards) || self.shards == 1 || !has(self.endpoint) || "
                    "!has(self.endpoint.mode) || self.endpoint.mode != 'batch'",
                    _SHARDS_NOT_BATCH,
                ),
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
        default=None,
        ge=0,
        le=20,
        description="Capture this many top logprobs per answer token (0 or unset: none), stored compactly with "
        "the answers; student.objective kd trains on them.",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Generate pods answering in parallel (an Indexed Job): each takes the prompts whose content "
        "hash falls in its shard, into the same answer store; shard 0 writes the dataset once all are done. "
        "A vllm teacher runs one engine per pod (each with teacher.vllm.gpus); an endpoint teacher's rate "
        "limits (requestsPerMinute, tokensPerMinute) and the budget are divided between the shards, "
        "maxConcurrency is per pod.",
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
        if self.shards > 1 and self.endpoint is not None and self.endpoint.mode == "batch":
            raise ValueError(_SHARDS_NOT_BATCH)
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
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="How several training processes share the work: ddp (a full copy of the model on each GPU), "
        "fsdp (weights, gradients and optimizer state sharded across every GPU of every node: for students "
        "that do not fit one GPU), or auto (fsdp when the student's training state would take more than 80% "
        "of one GPU's memory: 16 bytes per parameter for full fine-tuning, 2 for LoRA; else ddp).",
    )
    seed: int = Field(default=42, description="Seed for data order and initialisation.")
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Save a checkpoint to the output URI every N steps."
    )


_ADAPTER_NEEDS_LORA = "student.export adapter needs student.method lora (full fine-tuning has no adapter)"

Objective = Literal["sft", "kd", "onPolicy"]
OBJECTIVES: tuple[Objective, ...] = ("sft", "kd", "onPolicy")


class KDSpec(ApiModel):
    """Offline logit distillation (objective kd): the teacher's top-k logprobs, captured when it answered.

    Per answer token the teacher's top-k probabilities plus one tail bucket (the mass outside its
    top k) form a distribution; the student's probabilities of the same k tokens plus its own tail
    form another. loss = alpha * temperature^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    on the teacher's answer.
    """

    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the KL term; 1 - alpha weighs cross-entropy on the teacher's answer tokens.",
    )
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        le=10.0,
        description="Softens the teacher's and the student's top-k + tail distributions alike; "
        "the KL term is scaled by temperature squared.",
    )


_TOPK_FORWARD_ONLY = "student.onPolicy.topK applies to divergence forwardKL only (reverseKL scores the sampled token)"


class OnPolicySpec(ApiModel):
    """On-policy distillation (objective onPolicy): the student answers the training prompts itself and
    the teacher scores every token it sampled (trl's server distillation against a vLLM teacher)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!has(self.topK) || (has(self.divergence) && self.divergence == 'forwardKL')", _TOPK_FORWARD_ONLY)
            ]
        }
    }

    divergence: Literal["reverseKL", "forwardKL"] = Field(
        default="reverseKL",
        description="reverseKL: per token, KL(student || teacher) on the sampled token plus the tail "
        "(mode-seeking, as in GKD and MiniLLM); forwardKL: KL(teacher || student) on the teacher's top-k "
        "plus the tail.",
    )
    top_k: int | None = Field(
        default=None, ge=1, le=20, description="forwardKL: teacher logprobs per position (default 20)."
    )
    max_new_tokens: int = Field(
        default=256, ge=1, le=32768, description="Longest answer the student samples per prompt during training."
    )
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        le=2.0,
        description="Temperature the student samples at; the teacher scores its tokens at the same temperature.",
    )

    @model_validator(mode="after")
    def _top_k_forward_only(self) -> OnPolicySpec:
        if self.top_k is not None and self.divergence != "forwardKL":
            raise ValueError(_TOPK_FORWARD_ONLY)
        return self


_KD_BLOCK = "student.kd is read only with student.objective kd: set objective: kd or remove student.kd"
_ON_POLICY_BLOCK = (
    "student.onPolicy is read only with student.objective onPolicy: set objective: onPolicy or remove student.onPolicy"
)
_KD_NO_PACKING = (
    "student.objective kd aligns the teacher's distributions with each answer's own tokens: "
    "set student.training.packing to false"
)


class StudentSpec(ApiModel):
    """The small pre-trained model to fine-tune on the teacher's answers."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!has(self.export) || self.export != 'adapter' || self.method == 'lora'", _ADAPTER_NEEDS_LORA),
                cel("!has(self.kd) || (has(self.objective) && self.objective == 'kd')", _KD_BLOCK),
                cel("!has(self.onPolicy) || (has(self.objective) && self.objective == 'onPolicy')", _ON_POLICY_BLOCK),
                cel(
                    "!has(self.objective) || self.objective != 'kd' || !has(self.training) || "
                    "!has(self.training.packing) || !self.training.packing",
                    _KD_NO_PACKING,
                ),
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
    objective: Objective = Field(
        default="sft",
        description="What the student learns from. sft: the teacher's answer text (cross-entropy). "
        "kd: also the teacher's top-k probabilities of every answer token (needs teacher.logprobs). "
        "onPolicy: its own sampled answers, scored token by token by the teacher (needs a teacher that "
        "scores tokens: teacher.vllm, or teacher.endpoint.promptLogprobs).",
    )
    kd: KDSpec | None = Field(default=None, description="Settings of objective kd.")
    on_policy: OnPolicySpec | None = Field(default=None, description="Settings of objective onPolicy.")

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> StudentSpec:
        if self.export == "adapter" and self.method != "lora":
            raise ValueError(_ADAPTER_NEEDS_LORA)
        if self.kd is not None and self.objective != "kd":
            raise ValueError(_KD_BLOCK)
        if self.on_policy is not None and self.objective != "onPolicy":
            raise ValueError(_ON_POLICY_BLOCK)
        if self.objective == "kd" and self.training.packing:
            raise ValueError(_KD_NO_PACKING)
        return self

    @property
    def exports_adapter(self) -> bool:
        """The train stage exports a LoRA adapter (served by a pool over its base), not merged weights."""
        return self.method == "lora" and self.export == "adapter"

    @property
    def kd_settings(self) -> KDSpec:
        """objective kd's settings, defaults filled in."""
        return self.kd or KDSpec()

    @property
    def on_policy_settings(self) -> OnPolicySpec:
        """objective onPolicy's settings, defaults filled in."""
        return self.on_policy or OnPolicySpec()


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

    def passes(self, teacher_agreement: float) -> bool:
        """The quality gate: the operator and local mode both decide with this."""
        return teacher_agreement >= self.min_teacher_agreement


# --------------------------------------------------------------------------- serving


class VLLMServingSpec(ApiModel):
    """vLLM server settings of a DistilledModel."""

    image: str | None = Field(default=None, description="vLLM image; the operator's default when unset.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length served.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype.")
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM server arguments.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables of the vLLM container.")


_MIN_ZERO_NEEDS_WAKE = (
    "autoscaling.minReplicas 0 needs metric queue and a wakeQuery: vLLM's own metrics vanish with its last "
    "replica, so a signal from in front of the pods must say that requests are waiting"
)
_TARGETS_NEED_QUEUE = "autoscaling.targetWaitingRequests and targetRunningRequests apply to metric queue only"


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling of the vLLM Deployment: on vLLM's request queue (KEDA or an HPA on the
    Prometheus adapter's metrics) or on CPU utilisation (an HPA)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed maxReplicas"),
                cel(
                    "self.minReplicas >= 1 || (has(self.metric) && self.metric == 'queue' && has(self.wakeQuery))",
                    _MIN_ZERO_NEEDS_WAKE,
                    ".minReplicas",
                ),
                cel(
                    "(has(self.metric) && self.metric == 'queue') || "
                    "(!has(self.targetWaitingRequests) && !has(self.targetRunningRequests))",
                    _TARGETS_NEED_QUEUE,
                ),
            ]
        }
    }

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas. 0 (scale to zero) needs metric queue, a wakeQuery and KEDA.",
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    metric: Literal["cpu", "queue"] = Field(
        default="cpu",
        description="queue: vLLM's waiting (and/or running) requests per replica, through KEDA's ScaledObject when "
        "KEDA is installed, else an HPA on the Prometheus adapter's pod metrics; cpu: an HPA on CPU utilisation.",
    )
    target_cpu_utilization: int = Field(
        default=70, ge=1, le=100, description="Average CPU utilisation target, percent (metric cpu)."
    )
    target_waiting_requests: float | None = Field(
        default=None,
        gt=0,
        le=100000,
        description="Target of vllm:num_requests_waiting per replica (metric queue; 4 when neither target is set).",
    )
    target_running_requests: float | None = Field(
        default=None,
        gt=0,
        le=100000,
        description="Target of vllm:num_requests_running per replica (metric queue).",
    )
    wake_query: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL that is above 0 while requests wait for a model scaled to zero (e.g. the gateway's "
        "request rate for it); KEDA activates the first replica on it. Needed for minReplicas 0.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed maxReplicas")
        if self.min_replicas == 0 and (self.metric != "queue" or self.wake_query is None):
            raise ValueError(_MIN_ZERO_NEEDS_WAKE)
        queue_targets = self.target_waiting_requests is not None or self.target_running_requests is not None
        if queue_targets and self.metric != "queue":
            raise ValueError(_TARGETS_NEED_QUEUE)
        return self

    def queue_targets(self) -> dict[str, float]:
        """vLLM metric name -> target per replica (metric queue)."""
        targets: dict[str, float] = {}
        if self.target_waiting_requests is not None:
            targets["vllm:num_requests_waiting"] = self.target_waiting_requests
        if self.target_running_requests is not None:
            targets["vllm:num_requests_running"] = self.target_running_requests
        return targets or {"vllm:num_requests_waiting": 4.0}


class AdapterPoolSpec(ApiModel):
    """This model's replicas host LoRA adapters: every DistilledModel whose spec.pool names it is loaded
    into each replica at runtime (vLLM runtime LoRA loading, driven by a sidecar per pod)."""

    max_adapters: int = Field(
        default=8, ge=1, le=256, description="Adapters one replica holds at once on the GPU (vLLM --max-loras)."
    )
    max_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="Largest LoRA rank of an adapter of the pool (vLLM --max-lora-rank)."
    )


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
    weights: Literal["fetch", "stream"] = Field(
        default="fetch",
        description="fetch: an init container copies the model from the object store and verifies its digest "
        "before vLLM starts; stream: vLLM streams the safetensors straight from the object store "
        "(--load-format runai_streamer; the vLLM image needs runai-model-streamer[s3]; no digest check in the pod).",
    )
    adapters: AdapterPoolSpec | None = Field(
        default=None,
        description="Host the LoRA adapters of other DistilledModels (their spec.pool names this one).",
    )


# --------------------------------------------------------------------------- output, storage, resources


class PoolReference(ApiModel):
    """A DistilledModel in the same namespace whose replicas host adapters (its serving.adapters is set)."""

    name: str = Field(
        min_length=1, max_length=53, pattern=DNS1035_LABEL_PATTERN, description="Name of the pool's DistilledModel."
    )


class EndpointPickerReference(ApiModel):
    """The endpoint picker (EPP) Service the gateway asks which replica takes a request."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Service of the endpoint picker; <model>-epp when unset (the inference extension's chart "
        "names it so).",
    )
    port: int = Field(default=9002, ge=1, le=65535, description="Its gRPC ext-proc port.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose", description="What the gateway does when the picker does not answer."
    )


class RoutingSpec(ApiModel):
    """Inference-aware routing (opt-in): with the Gateway API Inference Extension's CRDs installed, an
    InferencePool per Deployment and an InferenceObjective per served model, so that a gateway picks
    replicas by queue depth, LoRA affinity and prefix cache."""

    priority: int | None = Field(
        default=None,
        ge=-1000,
        le=1000,
        description="InferenceObjective priority of this model's requests (higher first when the pool is saturated).",
    )
    endpoint_picker: EndpointPickerReference | None = Field(
        default=None, description="Endpoint picker of the InferencePool (a model with its own Deployment only)."
    )


class ModelOutputSpec(ApiModel):
    """The DistilledModel a successful run publishes."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("!has(self.pool) || !has(self.serving)", "output.model: set serving or pool, not both")
            ]
        }
    }

    name: str = Field(
        min_length=1,
        max_length=53,
        pattern=DNS1035_LABEL_PATTERN,
        description="Name of the DistilledModel to create or update: lowercase letters, digits and '-', "
        "starting with a letter (it also names the model's Service).",
    )
    serve: bool = Field(default=True, description="Create/update the DistilledModel (and so serve it) on success.")
    serving: ServingSpec | None = Field(default=None, description="Serving settings copied into the DistilledModel.")
    pool: PoolReference | None = Field(
        default=None,
        description="Publish the adapter into this pool (a DistilledModel with serving.adapters) instead of a "
        "Deployment of its own; needs student.export adapter.",
    )
    routing: RoutingSpec | None = Field(default=None, description="Routing settings copied into the DistilledModel.")


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
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Multi-node training: how often the whole group of pods is restarted from the last checkpoint "
        "after a rank fails or is preempted (a worker error, exit code 1, is never retried).",
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


_POOL_NEEDS_ADAPTER = "output.model.pool needs student.export adapter (a pool serves LoRA adapters of its base)"
_FSDP_NEEDS_GPUS = (
    "student.training.strategy fsdp shards the student across GPUs: give the train stage at least 2 GPUs "
    "(spec.resources.gpusPerNode >= 2, or spec.resources.nodes >= 2 with GPUs), or use strategy ddp or auto"
)
_KD_NEEDS_LOGPROBS = (
    "student.objective kd trains on the teacher's top-k logprobs: set spec.teacher.logprobs "
    "(1-20; 20 recommended), or use objective sft"
)
_ON_POLICY_NEEDS_SCORER = (
    "student.objective onPolicy needs a teacher that scores the student's tokens: use spec.teacher.vllm "
    "(run in the train pod), or a vLLM endpoint with spec.teacher.endpoint.promptLogprobs: true "
    "(OpenAI-style APIs cannot score given tokens)"
)
_ON_POLICY_ONE_NODE = (
    "student.objective onPolicy with spec.teacher.vllm runs the teacher inside the train pod: "
    "set spec.resources.nodes to 1, or serve the teacher with vLLM and use spec.teacher.endpoint"
)


class DistillationJobSpec(ApiModel):
    """A distillation run: teacher data, student training, evaluation gate, publication."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.output.model.pool) || (has(self.student.export) && self.student.export == 'adapter')",
                    _POOL_NEEDS_ADAPTER,
                ),
                cel(
                    "!has(self.student.training) || !has(self.student.training.strategy) || "
                    "self.student.training.strategy != 'fsdp' || !has(self.resources) || "
                    "(!has(self.resources.gpusPerNode) || self.resources.gpusPerNode > 0) && "
                    "(!has(self.resources.gpusPerNode) || self.resources.gpusPerNode >= 2 || "
                    "(has(self.resources.nodes) && self.resources.nodes >= 2))",
                    _FSDP_NEEDS_GPUS,
                    ".student.training.strategy",
                ),
                cel(
                    "!has(self.student.objective) || self.student.objective != 'kd' || "
                    "(has(self.teacher.logprobs) && self.teacher.logprobs > 0)",
                    _KD_NEEDS_LOGPROBS,
                    ".student.objective",
                ),
                cel(
                    "!has(self.student.objective) || self.student.objective != 'onPolicy' || has(self.teacher.vllm) || "
                    "(has(self.teacher.endpoint) && has(self.teacher.endpoint.promptLogprobs) && "
                    "self.teacher.endpoint.promptLogprobs)",
                    _ON_POLICY_NEEDS_SCORER,
                    ".student.objective",
                ),
                cel(
                    "!has(self.student.objective) || self.student.objective != 'onPolicy' || "
                    "!has(self.teacher.vllm) || !has(self.resources) || !has(self.resources.nodes) || "
                    "self.resources.nodes == 1",
                    _ON_POLICY_ONE_NODE,
                    ".student.objective",
                ),
            ]
        }
    }

    teacher: TeacherSpec = Field(description="The large model whose answers the student learns.")
    dataset: DatasetSpec = Field(description="The prompts, and the held-out split.")
    student: StudentSpec = Field(description="The small model to train.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Placement and size of the stage pods.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Student vs teacher comparison and the gate."
    )
    output: OutputSpec = Field(description="Artifact location and the model to publish.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="The object store of s3:// URIs.")

    @model_validator(mode="after")
    def _pool_needs_adapter(self) -> DistillationJobSpec:
        output = self.output.model
        if output.pool is not None and output.serving is not None:
            raise ValueError("output.model: set serving or pool, not both")
        if output.pool is not None and self.student.export != "adapter":
            raise ValueError(_POOL_NEEDS_ADAPTER)
        return self

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self) -> DistillationJobSpec:
        if self.student.training.strategy == "fsdp":
            gpus, nodes = self.resources.gpus_per_node, self.resources.nodes
            if gpus == 0 or (nodes < 2 and gpus is not None and gpus < 2):
                raise ValueError(_FSDP_NEEDS_GPUS)
        return self

    @model_validator(mode="after")
    def _objective_fits_teacher(self) -> DistillationJobSpec:
        objective, teacher = self.student.objective, self.teacher
        if objective == "kd" and not teacher.logprobs:
            raise ValueError(_KD_NEEDS_LOGPROBS)
        if objective == "onPolicy":
            if teacher.vllm is None and not (teacher.endpoint is not None and teacher.endpoint.prompt_logprobs):
                raise ValueError(_ON_POLICY_NEEDS_SCORER)
            if teacher.vllm is not None and self.resources.nodes != 1:
                raise ValueError(_ON_POLICY_ONE_NODE)
        return self


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
    progress_message: str | None = Field(
        default=None,
        description="The running stage's latest report, e.g. '412,000/1,000,000 answers, 118/s, ETA 1h23m'.",
    )
    progress_time: str | None = Field(
        default=None, pattern=RFC3339_PATTERN, description="When the stage's pod wrote that report."
    )
    restarts: int | None = Field(
        default=None, ge=0, description="Whole-group restarts of this stage so far (multi-node training)."
    )
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


class RunRecord(ApiModel):
    """One run of a DistillationJob and the Jobs it used (the history the operator keeps)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    run_id: str = Field(description="The run's identifier (status.runId while it was current).")
    phase: JobPhase | None = Field(default=None, description="The last phase the run reached.")
    start_time: str | None = Field(default=None, pattern=RFC3339_PATTERN, description="When the run started.")
    completion_time: str | None = Field(
        default=None, pattern=RFC3339_PATTERN, description="When it succeeded or failed."
    )
    jobs: list[str] = Field(
        default_factory=list, max_length=64, description="Its stage Jobs (reused ones and restarts included)."
    )


class TrainingStatus(ApiModel):
    """What the train stage of the current run optimised, and where it ended."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    objective: Objective | None = Field(default=None, description="The objective that ran: sft, kd or onPolicy.")
    global_step: int | None = Field(default=None, ge=0, description="Optimizer steps taken.")
    loss: float | None = Field(default=None, description="The objective's training loss at the last logged step.")
    losses: dict[str, float] | None = Field(
        default=None,
        description="Each term of the loss at the last logged step: ce (cross-entropy), kl (kd's KL term), "
        "divergence (onPolicy's).",
    )
    teacher_tokens_scored: int | None = Field(
        default=None, ge=0, description="onPolicy: student tokens the teacher scored during training."
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
    progress: str | None = Field(
        default=None, description="The running stage and how far it is, e.g. 'train 41%, ETA 12m07s' (kubectl get)."
    )
    teacher: str | None = Field(default=None, description="The teacher model, for display.")
    student: str | None = Field(default=None, description="The student base model, for display.")
    stages: StagesStatus | None = Field(default=None, description="Per-stage status and Job names.")
    dataset: DatasetStatus | None = Field(default=None, description="The teacher dataset.")
    model: ModelArtifact | None = Field(default=None, description="The trained, exported student model.")
    training: TrainingStatus | None = Field(default=None, description="The objective trained and its final losses.")
    evaluation: EvaluationStatus | None = Field(default=None, description="Evaluation results and gate decision.")
    teacher_spend: TeacherSpend | None = Field(
        default=None, description="What the generate stage projected and spent on the teacher, and the budget's state."
    )
    distilled_model: str | None = Field(default=None, description="Name of the DistilledModel published by this job.")
    history: list[RunRecord] | None = Field(
        default=None,
        max_length=128,
        description="The current run first, then the earlier runs whose Jobs are kept (the operator's "
        "jobs.historyLimit, plus the latest successful run); Jobs of runs no longer listed are deleted.",
    )


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


_POOL_OWNS_SERVING = (
    "spec.serving belongs on the pool's DistilledModel: an adapter (spec.pool) runs in the pool's replicas; "
    "leave spec.serving unset"
)


def _at_defaults(path: str, model: type[ApiModel]) -> str:
    """CEL that holds when the object at ``path`` has only the defaults of ``model`` (as the API server fills them)."""
    terms: list[str] = []
    for name, info in model.model_fields.items():
        field = f"{path}.{info.alias or name}"
        factory = info.default_factory
        if factory is not None:
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, ApiModel):
                terms.append(_at_defaults(field, type(value)))
            else:
                terms.append(f"{field}.size() == 0")
        elif info.default is None:
            terms.append(f"!has({field})")
        elif isinstance(info.default, str):
            terms.append(f"{field} == '{info.default}'")
        else:
            terms.append(f"{field} == {info.default}")
    return "(" + " && ".join(terms) + ")"


_POOL_OWNS_PICKER = "spec.routing.endpointPicker belongs on the pool's DistilledModel: an adapter uses its pool's"
_POOL_NEEDS_NO_BASE = "spec.baseModel is the pool's model for an adapter (spec.pool): leave it unset"


class DistilledModelSpec(ApiModel):
    """A model served with vLLM: an exported model URI, or the output of a DistillationJob."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "has(self.model) != has(self.fromJob)",
                    "set exactly one of spec.model (an s3:// model URI) or spec.fromJob (a DistillationJob's output)",
                ),
                # The API server fills in serving's defaults, so "unset" reads "at its defaults".
                cel("!has(self.pool) || " + _at_defaults("self.serving", ServingSpec), _POOL_OWNS_SERVING),
                cel(
                    "!has(self.pool) || !has(self.routing) || !has(self.routing.endpointPicker)",
                    _POOL_OWNS_PICKER,
                ),
                cel("!has(self.pool) || !has(self.baseModel)", _POOL_NEEDS_NO_BASE),
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
    serving: ServingSpec = Field(
        default_factory=ServingSpec,
        description="Replicas, placement and vLLM settings of the model's own Deployment (an adapter in a pool "
        "leaves it at its defaults: the pool's serving applies).",
    )
    pool: PoolReference | None = Field(
        default=None,
        description="Serve this LoRA adapter in the replicas of another DistilledModel (its serving.adapters "
        "is set) instead of a Deployment of its own: loaded into every replica at runtime, unloaded when this "
        "model goes, promoted in place when its model changes.",
    )
    routing: RoutingSpec | None = Field(
        default=None,
        description="Inference-aware routing through the Gateway API Inference Extension (opt-in).",
    )
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
        if self.pool is not None:
            if self.serving != ServingSpec():
                raise ValueError(_POOL_OWNS_SERVING)
            if self.routing is not None and self.routing.endpoint_picker is not None:
                raise ValueError(_POOL_OWNS_PICKER)
            if self.base_model is not None:
                raise ValueError(_POOL_NEEDS_NO_BASE)
        return self


class AdapterStatus(ApiModel):
    """One adapter of a pool, as the pool's replicas report it."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    name: str = Field(description="The adapter's DistilledModel (and served model name).")
    uri: str = Field(description="s3:// prefix of the adapter version the pool should serve.")
    ready_replicas: int = Field(ge=0, description="Ready replicas that serve this version.")


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
    pool: str | None = Field(default=None, description="The pool whose replicas serve this adapter.")
    adapters: list[AdapterStatus] | None = Field(
        default=None, max_length=256, description="A pool's adapters and how many ready replicas serve each."
    )


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
