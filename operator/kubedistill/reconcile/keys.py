"""Stage keys: which artifacts a spec edit invalidates.

Each stage's key is a hash of the inputs that shape its output, plus the key of the stage
it reads from::

    dataset  = H(teacher identity + sampling + system prompt, dataset, artifact location)
    generate = dataset, or H(dataset, spend settings) when any is set
    train    = H(dataset, student, nodes x GPUs per node, artifact location)
    evaluate = H(train, evaluation, sampling, artifact location)
    run      = H(evaluate, output.model)

So editing ``student.training.epochs`` changes train, evaluate and run but not
generate: the new run reuses the teacher dataset and nobody pays the teacher twice.

The spend settings (``teacher.budget``, ``teacher.pricing``, ``teacher.shards``,
``teacher.endpoint.mode`` and ``batch``, ``evaluation.speed``) decide how the teacher is paid,
spread over pods and measured, not what it answers: they name the generate Job (raising the
budget of a run that stopped at it starts a new Job, which asks only for what is missing) but
not the dataset's location, so nothing downstream of the dataset is trained or evaluated again
because of them.

Operational knobs (concurrency, rate limits, timeouts, retries, Secret names, tensor
parallelism, placement) change how a stage runs, not what it produces, and are left
out; they apply to the next Job that runs. Values equal to their defaults are left out
too, so spelling out a default, or an API upgrade that adds a defaulted field, does not
re-run anything.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubedistill.api.v1alpha1 import DistillationJobSpec
from kubedistill.builders.plan import StageKeys

# Bump when the meaning of a stage's output changes (a new dataset format...): every
# stage re-runs once after the upgrade.
KEY_VERSION = 1

_OPERATIONAL_ENDPOINT_FIELDS = {
    "api_key_secret_ref",
    "max_concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout_seconds",
    "max_retries",
    # whether the endpoint can score tokens changes no answer; objective onPolicy needs it, and the
    # objective is part of the train key
    "prompt_logprobs",
    "mode",
    "batch",
}
# How the answers are paid for and spread over pods: they name the generate Job, not the dataset.
_SPEND_TEACHER_FIELDS = {"pricing", "budget", "shards"}
_OPERATIONAL_VLLM_FIELDS = {"tensor_parallel_size", "gpus"}


def digest(value: Any) -> str:
    """sha256 hex of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _teacher_identity(spec: DistillationJobSpec) -> dict[str, Any]:
    teacher = spec.teacher
    out: dict[str, Any] = teacher.model_dump(
        mode="json", by_alias=True, exclude_defaults=True, exclude={"endpoint", "vllm", *_SPEND_TEACHER_FIELDS}
    )
    if teacher.endpoint is not None:
        out["endpoint"] = teacher.endpoint.model_dump(
            mode="json", by_alias=True, exclude_defaults=True, exclude=_OPERATIONAL_ENDPOINT_FIELDS
        )
    if teacher.vllm is not None:
        out["vllm"] = teacher.vllm.model_dump(
            mode="json", by_alias=True, exclude_defaults=True, exclude=_OPERATIONAL_VLLM_FIELDS
        )
    return out


def _spend_settings(spec: DistillationJobSpec) -> dict[str, Any]:
    teacher = spec.teacher
    out: dict[str, Any] = teacher.model_dump(
        mode="json", by_alias=True, exclude_defaults=True, include=_SPEND_TEACHER_FIELDS
    )
    if teacher.endpoint is not None:
        out |= teacher.endpoint.model_dump(mode="json", by_alias=True, exclude_defaults=True, include={"mode", "batch"})
    speed = _dump(spec.evaluation.speed)
    if speed:
        out["speed"] = speed
    return out


def _location(spec: DistillationJobSpec) -> dict[str, Any]:
    # Where artifacts live is part of their identity; credentials and addressing style are not.
    return {"uri": spec.output.uri.rstrip("/"), "endpoint": spec.storage.endpoint, "region": spec.storage.region}


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def compute_stage_keys(spec: DistillationJobSpec) -> StageKeys:
    """The keys of every stage of the run ``spec`` describes."""
    location = _location(spec)
    dataset = digest(
        {
            "v": KEY_VERSION,
            "stage": "generate",
            "teacher": _teacher_identity(spec),
            "dataset": _dump(spec.dataset),
            "location": location,
        }
    )
    spend = _spend_settings(spec)
    generate = digest({"v": KEY_VERSION, "dataset": dataset, "spend": spend}) if spend else dataset
    train = digest(
        {
            "v": KEY_VERSION,
            "stage": "train",
            "generate": dataset,
            "student": _dump(spec.student),
            # The global batch is per-device batch x devices: another topology is another model.
            "topology": {"nodes": spec.resources.nodes, "gpusPerNode": spec.resources.gpus_per_node},
            "location": location,
        }
    )
    evaluate = digest(
        {
            "v": KEY_VERSION,
            "stage": "evaluate",
            "train": train,
            "evaluation": _dump(spec.evaluation),
            "sampling": _dump(spec.teacher.sampling),
            "location": location,
        }
    )
    run = digest({"v": KEY_VERSION, "evaluate": evaluate, "model": _dump(spec.output.model)})
    return StageKeys(
        dataset=dataset[:16],
        generate=generate[:16],
        train=train[:16],
        evaluate=evaluate[:16],
        run=run[:16],
        spec=digest(_dump(spec))[:16],
    )
