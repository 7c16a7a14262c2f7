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


def generate_result(examples: int = 100) -> str:
    return _line(
        {
            "datasetUri": "s3://kd-test/runs/x/datasets/k",
            "digest": DIGEST,
            "examples": examples,
            "train": examples - examples // 10,
            "eval": examples // 10,
            "requested": examples,
        }
    )


def train_result(**extra: Any) -> str:
    return _line(
        {"modelUri": "s3://kd-test/runs/x/models/k", "digest": DIGEST, "globalStep": 42, "trainLoss": 0.5, **extra}
    )


def evaluate_result(agreement: float = 0.97) -> str:
    return _line(
        {
            "teacherAgreement": agreement,
            "metrics": {"tokenF1": agreement, "exactMatch": agreement - 0.1},
            "examples": 10,
            "reportUri": "s3://kd-test/runs/x/reports/k/report.json",
        }
    )
