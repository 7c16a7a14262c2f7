"""Valid and invalid kubedistill.io manifests, shared by the unit tier (pydantic) and the
cluster tier (the real API server with the generated CRDs).

Each invalid case is a valid base manifest with one mistake. ``server`` lists substrings the
API server's error must contain: the field path and what to fix. ``pydantic`` lists substrings
of the pydantic error: the operator, the workers and local mode refuse the same manifest.

    from tests.support.api_cases import INVALID, valid_job
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]


def valid_job(name: str = "demo") -> Manifest:
    """A small, complete DistillationJob."""
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "teacher": {"endpoint": {"baseURL": "http://teacher.models.svc:8000/v1", "model": "big"}},
            "dataset": {"prompts": {"uri": "s3://prompts/demo.jsonl"}},
            "student": {"model": "Qwen/Qwen2.5-0.5B-Instruct"},
            "output": {"uri": "s3://artifacts/demo", "model": {"name": "demo-student"}},
        },
    }


def valid_model(name: str = "demo-model") -> Manifest:
    """A small, complete DistilledModel."""
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistilledModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "s3://artifacts/demo/model"}},
    }


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """Set a dotted path (creating objects on the way)."""

    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


@dataclass(frozen=True)
class Invalid:
    """One mistake in an otherwise valid manifest."""

    id: str
    base: Callable[[], Manifest]
    mutations: tuple[Callable[[Manifest], None], ...]
    server: tuple[str, ...]
    pydantic: tuple[str, ...] = field(default=())

    def manifest(self, name: str | None = None) -> Manifest:
        manifest = copy.deepcopy(self.base())
        if name is not None:
            manifest["metadata"]["name"] = name
        for mutate in self.mutations:
            mutate(manifest)
        return manifest


_ONE_TEACHER = "set exactly one of spec.teacher.endpoint (an OpenAI-compatible API) or spec.teacher.vllm"
_KD_NEEDS_LOGPROBS = "student.objective kd trains on the teacher's top-k logprobs: set spec.teacher.logprobs"
_ON_POLICY_NEEDS_SCORER = "student.objective onPolicy needs a teacher that scores the student's tokens"
_ONE_SOURCE = "set exactly one of spec.model (an s3:// model URI) or spec.fromJob"
_FSDP_NEEDS_GPUS = "student.training.strategy fsdp shards the student across GPUs: give the train stage at least 2 GPUs"

INVALID: tuple[Invalid, ...] = (
    Invalid(
        "fsdp-on-one-gpu",
        valid_job,
        (_set("spec.student.training", {"strategy": "fsdp"}), _set("spec.resources", {"gpusPerNode": 1})),
        server=("spec.student.training.strategy", _FSDP_NEEDS_GPUS),
        pydantic=(_FSDP_NEEDS_GPUS,),
    ),
    Invalid(
        "fsdp-on-cpu-nodes",
        valid_job,
        (_set("spec.student.training", {"strategy": "fsdp"}), _set("spec.resources", {"gpusPerNode": 0, "nodes": 2})),
        server=("spec.student.training.strategy", _FSDP_NEEDS_GPUS),
        pydantic=(_FSDP_NEEDS_GPUS,),
    ),
    Invalid(
        "both-teachers",
        valid_job,
        (_set("spec.teacher.vllm", {"model": "s3://models/big"}),),
        server=("spec.teacher", _ONE_TEACHER),
        pydantic=(_ONE_TEACHER,),
    ),
    Invalid(
        "no-teacher",
        valid_job,
        (_delete("spec.teacher.endpoint"), _set("spec.teacher.systemPrompt", "Be brief.")),
        server=("spec.teacher", _ONE_TEACHER),
        pydantic=(_ONE_TEACHER,),
    ),
    Invalid(
        "lora-rank-zero",
        valid_job,
        (_set("spec.student.lora", {"rank": 0}),),
        server=("spec.student.lora.rank", "should be greater than or equal to 1"),
        pydantic=("rank", "greater than or equal to 1"),
    ),
    Invalid(
        "eval-fraction-one",
        valid_job,
        (_set("spec.dataset.evalFraction", 1.0),),
        server=("spec.dataset.evalFraction", "should be less than 1"),
        pydantic=("evalFraction", "less than 1"),
    ),
    Invalid(
        "eval-fraction-zero",
        valid_job,
        (_set("spec.dataset.evalFraction", 0),),
        server=("spec.dataset.evalFraction", "should be greater than 0"),
        pydantic=("evalFraction", "greater than 0"),
    ),
    Invalid(
        "gate-above-one",
        valid_job,
        (_set("spec.evaluation.minTeacherAgreement", 1.5),),
        server=("spec.evaluation.minTeacherAgreement", "should be less than or equal to 1"),
        pydantic=("minTeacherAgreement", "less than or equal to 1"),
    ),
    Invalid(
        "negative-gpus",
        valid_job,
        (_set("spec.resources.gpusPerNode", -1),),
        server=("spec.resources.gpusPerNode", "should be greater than or equal to 0"),
        pydantic=("gpusPerNode", "greater than or equal to 0"),
    ),
    Invalid(
        "zero-nodes",
        valid_job,
        (_set("spec.resources.nodes", 0),),
        server=("spec.resources.nodes", "should be greater than or equal to 1"),
        pydantic=("nodes", "greater than or equal to 1"),
    ),
    Invalid(
        "non-s3-output-uri",
        valid_job,
        (_set("spec.output.uri", "https://artifacts.example.com/demo"),),
        server=("spec.output.uri", "must be an s3:// URI: s3://<bucket>/<prefix>"),
        pydantic=("output", "uri", "should match pattern '^s3://"),
    ),
    Invalid(
        "unknown-field",
        valid_job,
        (_set("spec.teacher.endpoint.apiKey", "sk-do-not-put-keys-here"),),
        server=('unknown field "spec.teacher.endpoint.apiKey"',),
        pydantic=("apiKey", "Extra inputs are not permitted"),
    ),
    Invalid(
        "malformed-memory-quantity",
        valid_job,
        (_set("spec.resources.memory", "64 GB"),),
        server=("spec.resources.memory", "must be a Kubernetes quantity such as 64Gi"),
        pydantic=("memory", "should match pattern"),
    ),
    Invalid(
        "zero-token-budget",
        valid_job,
        (_set("spec.teacher.budget", {"maxTokens": 0}),),
        server=("spec.teacher.budget.maxTokens", "should be greater than or equal to 1"),
        pydantic=("maxTokens", "greater than or equal to 1"),
    ),
    Invalid(
        "negative-cost-budget",
        valid_job,
        (
            _set("spec.teacher.pricing", {"inputPerMillion": 2.5, "outputPerMillion": 10}),
            _set("spec.teacher.budget", {"maxCost": -5}),
        ),
        server=("spec.teacher.budget.maxCost", "should be greater than 0"),
        pydantic=("maxCost", "greater than 0"),
    ),
    Invalid(
        "zero-cost-budget",
        valid_job,
        (
            _set("spec.teacher.pricing", {"inputPerMillion": 2.5, "outputPerMillion": 10}),
            _set("spec.teacher.budget", {"maxCost": 0}),
        ),
        server=("spec.teacher.budget.maxCost", "should be greater than 0"),
        pydantic=("maxCost", "greater than 0"),
    ),
    Invalid(
        "empty-budget",
        valid_job,
        (_set("spec.teacher.budget", {}),),
        server=("spec.teacher.budget", "set teacher.budget.maxTokens and/or teacher.budget.maxCost"),
        pydantic=("set teacher.budget.maxTokens and/or teacher.budget.maxCost",),
    ),
    Invalid(
        "cost-budget-without-prices",
        valid_job,
        (_set("spec.teacher.budget", {"maxCost": 20}),),
        server=("spec.teacher", "teacher.budget.maxCost needs teacher.pricing"),
        pydantic=("teacher.budget.maxCost needs teacher.pricing",),
    ),
    Invalid(
        "zero-shards",
        valid_job,
        (_set("spec.teacher.shards", 0),),
        server=("spec.teacher.shards", "should be greater than or equal to 1"),
        pydantic=("shards", "greater than or equal to 1"),
    ),
    Invalid(
        "too-many-shards",
        valid_job,
        (_set("spec.teacher.shards", 65),),
        server=("spec.teacher.shards", "should be less than or equal to 64"),
        pydantic=("shards", "less than or equal to 64"),
    ),
    Invalid(
        "shards-of-a-batch-teacher",
        valid_job,
        (_set("spec.teacher.shards", 2), _set("spec.teacher.endpoint.mode", "batch")),
        server=("spec.teacher", "teacher.shards > 1 needs an online endpoint or a vllm teacher", "shards: 1"),
        pydantic=("teacher.shards > 1 needs an online endpoint or a vllm teacher",),
    ),
    Invalid(
        "negative-price",
        valid_job,
        (_set("spec.teacher.pricing", {"inputPerMillion": -1, "outputPerMillion": 10}),),
        server=("spec.teacher.pricing.inputPerMillion", "should be greater than or equal to 0"),
        pydantic=("inputPerMillion", "greater than or equal to 0"),
    ),
    Invalid(
        "unknown-teacher-mode",
        valid_job,
        (_set("spec.teacher.endpoint.mode", "async"),),
        server=("spec.teacher.endpoint.mode", 'Unsupported value: "async"', '"online", "batch"'),
        pydantic=("mode", "'online' or 'batch'"),
    ),
    Invalid(
        "model-neither-source",
        valid_model,
        (_delete("spec.model"), _set("spec.servedModelName", "demo")),
        server=("spec", _ONE_SOURCE),
        pydantic=(_ONE_SOURCE,),
    ),
    Invalid(
        "model-both-sources",
        valid_model,
        (_set("spec.fromJob", {"name": "demo"}),),
        server=("spec", _ONE_SOURCE),
        pydantic=(_ONE_SOURCE,),
    ),
    Invalid(
        "prompts-uri-and-configmap",
        valid_job,
        (_set("spec.dataset.prompts.configMapRef", {"name": "prompts", "key": "prompts.jsonl"}),),
        server=("spec.dataset.prompts", "set exactly one of prompts.uri (s3://...jsonl) or prompts.configMapRef"),
        pydantic=("set exactly one of prompts.uri",),
    ),
    Invalid(
        "agreement-metric-not-computed",
        valid_job,
        (_set("spec.evaluation", {"metrics": ["exactMatch"], "agreementMetric": "rougeL"}),),
        server=("spec.evaluation", "evaluation.agreementMetric must be one of evaluation.metrics"),
        pydantic=("evaluation.agreementMetric must be one of evaluation.metrics",),
    ),
    Invalid(
        "unknown-metric",
        valid_job,
        (_set("spec.evaluation", {"metrics": ["bleu"]}),),
        server=("spec.evaluation.metrics[0]", 'Unsupported value: "bleu"', '"exactMatch"'),
        pydantic=("metrics", "exactMatch"),
    ),
    Invalid(
        "unknown-training-method",
        valid_job,
        (_set("spec.student.method", "qlora"),),
        server=("spec.student.method", 'Unsupported value: "qlora"', '"lora", "full"'),
        pydantic=("method", "'lora' or 'full'"),
    ),
    Invalid(
        "adapter-export-of-full-finetune",
        valid_job,
        (_set("spec.student.method", "full"), _set("spec.student.export", "adapter")),
        server=("spec.student", "student.export adapter needs student.method lora"),
        pydantic=("student.export adapter needs student.method lora",),
    ),
    Invalid(
        "kd-without-teacher-logprobs",
        valid_job,
        (_set("spec.student.objective", "kd"),),
        server=("spec.student.objective", _KD_NEEDS_LOGPROBS, "20 recommended"),
        pydantic=(_KD_NEEDS_LOGPROBS,),
    ),
    Invalid(
        "kd-with-zero-teacher-logprobs",
        valid_job,
        (_set("spec.student.objective", "kd"), _set("spec.teacher.logprobs", 0)),
        server=("spec.student.objective", _KD_NEEDS_LOGPROBS),
        pydantic=(_KD_NEEDS_LOGPROBS,),
    ),
    Invalid(
        "on-policy-with-an-endpoint-that-cannot-score",
        valid_job,
        (_set("spec.student.objective", "onPolicy"),),
        server=("spec.student.objective", _ON_POLICY_NEEDS_SCORER, "spec.teacher.endpoint.promptLogprobs: true"),
        pydantic=(_ON_POLICY_NEEDS_SCORER,),
    ),
    Invalid(
        "on-policy-in-cluster-teacher-on-two-nodes",
        valid_job,
        (
            _delete("spec.teacher.endpoint"),
            _set("spec.teacher.vllm", {"model": "s3://models/big"}),
            _set("spec.student.objective", "onPolicy"),
            _set("spec.resources.nodes", 2),
        ),
        server=("spec.student.objective", "runs the teacher inside the train pod: set spec.resources.nodes to 1"),
        pydantic=("runs the teacher inside the train pod: set spec.resources.nodes to 1",),
    ),
    Invalid(
        "kd-settings-with-objective-sft",
        valid_job,
        (_set("spec.student.kd", {"alpha": 0.9}),),
        server=("spec.student", "student.kd is read only with student.objective kd"),
        pydantic=("student.kd is read only with student.objective kd",),
    ),
    Invalid(
        "kd-with-packing",
        valid_job,
        (
            _set("spec.teacher.logprobs", 20),
            _set("spec.student.objective", "kd"),
            _set("spec.student.training", {"packing": True}),
        ),
        server=("spec.student", "set student.training.packing to false"),
        pydantic=("set student.training.packing to false",),
    ),
    Invalid(
        "on-policy-top-k-with-reverse-kl",
        valid_job,
        (
            _set("spec.teacher.endpoint.promptLogprobs", True),
            _set("spec.student.objective", "onPolicy"),
            _set("spec.student.onPolicy", {"topK": 5}),
        ),
        server=("spec.student.onPolicy", "student.onPolicy.topK applies to divergence forwardKL only"),
        pydantic=("student.onPolicy.topK applies to divergence forwardKL only",),
    ),
    Invalid(
        "unknown-objective",
        valid_job,
        (_set("spec.student.objective", "dpo"),),
        server=("spec.student.objective", 'Unsupported value: "dpo"', '"sft", "kd", "onPolicy"'),
        pydantic=("objective", "'sft', 'kd' or 'onPolicy'"),
    ),
    Invalid(
        "tensor-parallel-above-gpus",
        valid_job,
        (
            _delete("spec.teacher.endpoint"),
            _set("spec.teacher.vllm", {"model": "s3://models/big", "tensorParallelSize": 4, "gpus": 2}),
        ),
        server=("spec.teacher.vllm", "tensorParallelSize must not exceed teacher.vllm.gpus"),
        pydantic=("tensorParallelSize must not exceed teacher.vllm.gpus",),
    ),
    Invalid(
        "temperature-above-two",
        valid_job,
        (_set("spec.teacher.sampling", {"temperature": 3}),),
        server=("spec.teacher.sampling.temperature", "should be less than or equal to 2"),
        pydantic=("temperature", "less than or equal to 2"),
    ),
    Invalid(
        "missing-output",
        valid_job,
        (_delete("spec.output"),),
        server=("spec.output", "Required value"),
        pydantic=("output", "Field required"),
    ),
    Invalid(
        "teacher-base-url-not-http",
        valid_job,
        (_set("spec.teacher.endpoint.baseURL", "teacher.models.svc:8000/v1"),),
        server=("spec.teacher.endpoint.baseURL", "must be an http:// or https:// URL"),
        pydantic=("baseURL", "should match pattern"),
    ),
    Invalid(
        "job-name-starts-with-digit",
        valid_job,
        (_set("metadata.name", "1-demo"),),
        server=("metadata.name of a DistillationJob must be at most 50 characters", "starting with a letter"),
        pydantic=("metadata.name of a DistillationJob must be at most 50 characters",),
    ),
    Invalid(
        "published-model-name-invalid",
        valid_job,
        (_set("spec.output.model.name", "Demo_Student"),),
        server=("spec.output.model.name", "should match '^[a-z]"),
        pydantic=("name", "should match pattern"),
    ),
    Invalid(
        "autoscaling-min-above-max",
        valid_model,
        (_set("spec.serving", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),),
        server=("spec.serving.autoscaling", "autoscaling.minReplicas must not exceed maxReplicas"),
        pydantic=("autoscaling.minReplicas must not exceed maxReplicas",),
    ),
    Invalid(
        "model-uri-not-s3",
        valid_model,
        (_set("spec.model.uri", "/models/demo"),),
        server=("spec.model.uri", "must be an s3:// URI"),
        pydantic=("uri", "should match pattern '^s3://"),
    ),
    Invalid(
        "negative-serving-replicas",
        valid_model,
        (_set("spec.serving", {"replicas": -1}),),
        server=("spec.serving.replicas", "should be greater than or equal to 0"),
        pydantic=("replicas", "greater than or equal to 0"),
    ),
    Invalid(
        "scale-to-zero-without-wake-query",
        valid_model,
        (_set("spec.serving", {"autoscaling": {"minReplicas": 0, "metric": "queue"}}),),
        server=("spec.serving.autoscaling.minReplicas", "minReplicas 0 needs metric queue and a wakeQuery"),
        pydantic=("minReplicas 0 needs metric queue and a wakeQuery",),
    ),
    Invalid(
        "queue-target-with-cpu-metric",
        valid_model,
        (_set("spec.serving", {"autoscaling": {"targetWaitingRequests": 4}}),),
        server=("spec.serving.autoscaling", "apply to metric queue only"),
        pydantic=("apply to metric queue only",),
    ),
    Invalid(
        "adapter-with-own-serving",
        valid_model,
        (_set("spec.pool", {"name": "base"}), _set("spec.serving", {"replicas": 3})),
        server=("spec", "spec.serving belongs on the pool's DistilledModel", "leave spec.serving unset"),
        pydantic=("spec.serving belongs on the pool's DistilledModel",),
    ),
    Invalid(
        "adapter-with-base-model",
        valid_model,
        (_set("spec.pool", {"name": "base"}), _set("spec.baseModel", "s3://models/base")),
        server=("spec", "spec.baseModel is the pool's model for an adapter"),
        pydantic=("spec.baseModel is the pool's model for an adapter",),
    ),
    Invalid(
        "adapter-with-endpoint-picker",
        valid_model,
        (_set("spec.pool", {"name": "base"}), _set("spec.routing", {"endpointPicker": {"name": "epp"}})),
        server=("spec", "spec.routing.endpointPicker belongs on the pool's DistilledModel"),
        pydantic=("spec.routing.endpointPicker belongs on the pool's DistilledModel",),
    ),
    Invalid(
        "adapter-pool-rank-unsupported",
        valid_model,
        (_set("spec.serving", {"adapters": {"maxRank": 12}}),),
        server=("spec.serving.adapters.maxRank", "Unsupported value: 12"),
        pydantic=("maxRank", "Input should be 8, 16"),
    ),
    Invalid(
        "publish-to-pool-without-adapter-export",
        valid_job,
        (_set("spec.output.model.pool", {"name": "base"}),),
        server=("spec", "output.model.pool needs student.export adapter"),
        pydantic=("output.model.pool needs student.export adapter",),
    ),
)
