"""DistillationJob manifests for operator tests, and the worker results kwok pods report.

    from tests.support.djobs import distillation_job, generate_result, evaluate_result
    manifest = distillation_job("demo", api_key_secret="teacher-key", epochs=2)

The results are what a worker writes to its termination message on success; cluster
tests hand them to kwok (annotation ``kwok.kubedistill.io/message``) so that a simulated
pod "succeeds" with exactly that summary.
"""

from __future__ import annotations

import json
from typing import Any

DIGEST = "a" * 64


def distillation_job(
    name: str,
    *,
    api_key_secret: str | None = None,
    budget: dict[str, Any] | None = None,
    pricing: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    epochs: float | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    min_agreement: float | None = None,
    model_name: str | None = None,
    serve: bool = True,
) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"baseURL": "http://teacher.models.svc:8000/v1", "model": "big-teacher"}
    if api_key_secret:
        endpoint["apiKeySecretRef"] = {"name": api_key_secret, "key": "api-key"}
    spec: dict[str, Any] = {
        "teacher": {"endpoint": endpoint, "sampling": {"maxTokens": 256}},
        "dataset": {"prompts": {"uri": "s3://kd-test/prompts.jsonl"}},
        "student": {"model": "s3://kd-test/base/tiny", "method": "lora"},
        "output": {
            "uri": f"s3://kd-test/runs/{name}",
            "model": {"name": model_name or f"{name}-model", "serve": serve},
        },
        "storage": {"endpoint": "http://s3.storage.svc:9000", "addressingStyle": "path"},
    }
    if storage_secret:
        spec["storage"]["credentialsSecretRef"] = {"name": storage_secret}
    if budget is not None:
        spec["teacher"]["budget"] = budget
    if pricing is not None:
        spec["teacher"]["pricing"] = pricing
    if epochs is not None:
        spec["student"]["training"] = {"epochs": epochs}
    resources: dict[str, Any] = {}
    if nodes is not None:
        resources["nodes"] = nodes
    if gpus_per_node is not None:
        resources["gpusPerNode"] = gpus_per_node
    if resources:
        spec["resources"] = resources
    if min_agreement is not None:
        spec["evaluation"] = {"minTeacherAgreement": min_agreement}
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def _line(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


PRICES = {"currency": "USD", "inputPerMillion": 2.0, "outputPerMillion": 8.0}


def projection(answers: int = 100, cost: float | None = 0.21) -> dict[str, Any]:
    """A projection as the estimate container and the generate stage report it."""
    return {"answers": answers, "reused": 0, "promptTokens": 1000 * answers // 100, "completionTokens": 256 * answers,
            "tokens": 1000 * answers // 100 + 256 * answers, "cost": cost, "countedWith": "estimate"}  # fmt: skip


def spend(
    *, requests: int = 100, cost: float | None = 0.1234, budget: dict[str, Any] | None = None, state: str = "Within"
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": "online",
        "currency": "USD" if cost is not None else None,
        "projected": projection(cost=None if cost is None else 0.21),
        "spent": {
            "requests": requests,
            "promptTokens": 10 * requests,
            "cachedPromptTokens": 0,
            "completionTokens": 110 * requests,
            "cost": cost,
        },
        "reusedAnswers": 0,
    }
    if budget is not None:
        out["budget"] = {**budget, "state": state}
    return {k: v for k, v in out.items() if v is not None}


def estimate_message(cost: float | None = 0.21) -> str:
    """What the generate pod's estimate init container leaves as its termination message."""
    return _line({"mode": "online", "currency": "USD", "projected": projection(cost=cost), "reusedAnswers": 0})


def generate_result(examples: int = 100, spent: dict[str, Any] | None = None) -> str:
    result: dict[str, Any] = {
        "datasetUri": "s3://kd-test/runs/x/datasets/k",
        "digest": DIGEST,
        "examples": examples,
        "train": examples - examples // 10,
        "eval": examples // 10,
        "requested": examples,
    }
    if spent is not None:
        result["spend"] = spent
    return _line(result)


def budget_exceeded(max_tokens: int = 5000) -> str:
    """The termination message of a generate stage stopped at its budget (api/worker_config.StageFailure)."""
    message = (
        f"BudgetExceeded: the teacher budget (maxTokens {max_tokens:,}) is spent: $0.0301, 4,920 tokens (410 prompt, "
        "4,510 completion) on 41 billed requests; 59 answer(s) for 59 prompt(s) are still to ask, at most 15k tokens; "
        "raise spec.teacher.budget.maxTokens to at least 15,694 to finish. The 41 answer(s) paid for in this run are "
        "stored: the next run asks only for the rest"
    )
    spent = spend(requests=41, cost=0.0301, budget={"maxTokens": max_tokens}, state="Exceeded")
    spent["budget"]["remainingAnswers"] = 59
    return _line({"reason": "BudgetExceeded", "message": message, "spend": spent})


def train_result(**extra: Any) -> str:
    return _line(
        {"modelUri": "s3://kd-test/runs/x/models/k", "digest": DIGEST, "globalStep": 42, "trainLoss": 0.5, **extra}
    )


def speed_comparison(speedup: float = 11.2, cost_ratio: float = 14.3) -> dict[str, Any]:
    level = {"concurrency": 1, "requests": 16, "ttftP50": 0.05, "ttftP95": 0.09, "tokensPerSecondP50": 120.0,
             "tokensPerSecondP95": 140.0, "answersPerSecond": 1.5}  # fmt: skip
    return {"speedup": speedup, "ttftSpeedup": 3.1, "loadedSpeedup": 9.0, "costRatio": cost_ratio,
            "teacherCostPerMillionAnswers": 1430.0, "studentCostPerMillionAnswers": 100.0, "currency": "USD",
            "student": {"engine": "vllm-offline", "gpus": 1, "levels": [level]},
            "teacher": {"engine": "openai-stream", "gpus": 0, "levels": [level]}}  # fmt: skip


def evaluate_result(agreement: float = 0.97, speed: dict[str, Any] | None = None) -> str:
    result: dict[str, Any] = {
        "teacherAgreement": agreement,
        "metrics": {"tokenF1": agreement, "exactMatch": agreement - 0.1},
        "examples": 10,
        "reportUri": "s3://kd-test/runs/x/reports/k/report.json",
    }
    if speed is not None:
        result["speed"] = speed
    return _line(result)
