"""teacher.shards: the generate stage as an Indexed Job of independent shards (pure parts)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubedistill.api.savings import SpendProjection, TeacherSpend, TokenSpend
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.api.worker_config import SHARD_RUN_ENV, StageProgress
from kubedistill.builders.plan import RunPlan
from kubedistill.builders.stages import build_stage_job
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.reconcile.observe import observe_job, parse_progress
from kubedistill.worker.common import WorkerError
from kubedistill.worker.teacher.shards import Shard, combined_spend, shard_teacher
from tests.support.djobs import distillation_job

SETTINGS = OperatorSettings()


def plan_of(manifest: dict[str, Any]) -> RunPlan:
    from kubedistill.api.v1alpha1 import DistillationJob

    manifest["metadata"] |= {"namespace": "ml", "uid": "uid-1", "generation": 1}
    job = DistillationJob.model_validate(manifest)
    return RunPlan(job=job, keys=compute_stage_keys(job.spec))


def sharded(shards: int, **kwargs: Any) -> dict[str, Any]:
    manifest = distillation_job("demo", **kwargs)
    manifest["spec"]["teacher"]["shards"] = shards
    return manifest


def test_a_sharded_generate_stage_is_an_indexed_job_of_independent_pods() -> None:
    job = build_stage_job(plan_of(sharded(3)), "generate", SETTINGS)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    # each pod resumes alone: preemption is ignored, a worker error fails the Job, as for one pod
    assert spec["backoffLimit"] == SETTINGS.jobs.backoff_limit
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    [worker] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in worker["env"]}
    assert env[SHARD_RUN_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    # the Job controller's view: a stage of independent shards, not a group restarted as one
    observed = observe_job(job | {"status": {}})
    assert observed.stage == "generate" and not observed.group
    # one pod as before when unsharded, and other stages never shard
    assert "completionMode" not in build_stage_job(plan_of(sharded(1)), "generate", SETTINGS)["spec"]
    assert "completionMode" not in build_stage_job(plan_of(sharded(3)), "train", SETTINGS)["spec"]


def test_shards_name_the_generate_job_but_not_the_dataset() -> None:
    one, three = plan_of(sharded(1)), plan_of(sharded(3))
    assert one.job_name("generate") != three.job_name("generate")
    assert one.dataset_uri == three.dataset_uri
    assert one.keys.train == three.keys.train and one.run_id == three.run_id


def test_every_prompt_key_has_exactly_one_shard() -> None:
    import hashlib

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    shards = [Shard(index=i, count=3, run="r") for i in range(3)]
    owners = [[s.index for s in shards if s.owns(key)] for key in keys]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [i] for o in owners) for i in range(3)]
    assert min(sizes) > 900  # content hashes spread the work
    assert all(Shard().owns(key) for key in keys)


def test_the_shard_comes_from_the_indexed_jobs_environment() -> None:
    env = {"JOB_COMPLETION_INDEX": "2", SHARD_RUN_ENV: "uid-9"}
    assert Shard.from_env(3, env) == Shard(index=2, count=3, run="uid-9")
    assert Shard.from_env(1, {}) == Shard()
    with pytest.raises(WorkerError, match="JOB_COMPLETION_INDEX is not set"):
        Shard.from_env(3, {})
    with pytest.raises(WorkerError, match=r"outside 0\.\.2"):
        Shard.from_env(3, {"JOB_COMPLETION_INDEX": "3"})


def test_rate_limits_and_budget_are_divided_so_their_sum_stays_within() -> None:
    teacher = TeacherSpec.model_validate(
        {
            "endpoint": {
                "baseURL": "http://t/v1", "model": "m", "maxConcurrency": 10,
                "requestsPerMinute": 100, "tokensPerMinute": 1000,
            },
            "pricing": {"inputPerMillion": 1, "outputPerMillion": 2},
            "budget": {"maxTokens": 1000, "maxCost": 3.0},
            "shards": 3,
        }
    )  # fmt: skip
    part = shard_teacher(teacher, 3)
    assert part.endpoint is not None and part.budget is not None
    assert (part.endpoint.requests_per_minute, part.endpoint.tokens_per_minute) == (33, 333)
    assert part.endpoint.max_concurrency == 10  # each pod's own, like its connection pool
    assert 3 * part.endpoint.requests_per_minute <= 100 and 3 * part.budget.max_cost <= 3.0
    assert part.budget.max_tokens == 333
    assert shard_teacher(teacher, 1) is teacher
    # the answers' identity is untouched: the store is shared with unsharded runs
    from kubedistill.worker.teacher.keys import settings_digest

    assert settings_digest(part) == settings_digest(teacher)


def test_the_runs_spend_adds_up_every_shard_against_the_whole_budget() -> None:
    teacher = TeacherSpec.model_validate(
        {"endpoint": {"baseURL": "http://t/v1", "model": "m"}, "budget": {"maxTokens": 900}, "shards": 3}
    )
    parts = [
        TeacherSpend(
            mode="online",
            projected=SpendProjection(answers=10, prompt_tokens=100, completion_tokens=50, tokens=150),
            spent=TokenSpend(requests=10 + i, prompt_tokens=90, completion_tokens=20),
            reused_answers=i,
            budget={"maxTokens": 300, "state": "Within"},
        )
        for i in range(3)
    ]
    total = combined_spend(teacher, [*parts, None])
    assert total is not None and total.spent is not None and total.projected is not None and total.budget
    assert (total.spent.requests, total.spent.prompt_tokens, total.spent.completion_tokens) == (33, 270, 60)
    assert (total.projected.answers, total.projected.tokens, total.reused_answers) == (30, 450, 3)
    assert total.budget.max_tokens == 900
    assert combined_spend(teacher, [None]) is None


def report(
    shard: int | None, done: int, total: int, job: str = "demo-generate-1", rate: float = 1.0, minute: int = 5
) -> str:
    progress = StageProgress(
        stage="generate", job=job, shard=shard, done=done, total=total, unit="answers", rate=rate,
        eta_seconds=(total - done) / rate, updated_at=f"2026-11-30T10:0{minute}:00Z",
    )  # fmt: skip
    return json.dumps(progress.to_wire())


def test_the_shards_progress_is_one_line_with_each_shards_share() -> None:
    data = {
        "generate.0": report(0, 50, 100, rate=2.0),
        "generate.1": report(1, 100, 100),
        "generate.2": report(2, 25, 100),
        "generate.3": report(3, 99, 100, job="demo-generate-old", minute=1),  # an earlier Job's: left out
        "train": report(None, 1, 2).replace('"generate"', '"train"'),
    }
    reports = parse_progress(data)
    combined = reports["generate"]
    assert (combined.done, combined.total, combined.rate, combined.eta_seconds) == (175, 300, 4.0, 75.0)
    assert combined.details["shards"] == "0 50%, 1 done, 2 25%"
    assert combined.summary().endswith("(shards: 0 50%, 1 done, 2 25%)")
    assert reports["train"].stage == "train"
    # a shard's report under another key is a worker's bug: ignored
    assert parse_progress({"generate": report(1, 1, 2)}) == {}
