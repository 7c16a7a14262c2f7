"""Teacher spend, budgets and the Batch API, against the fault stub and a real S3-compatible server.

The stub bills every response it sends with a ``usage`` block and keeps its own count
(``stub.billing()``): the spend the worker records is checked against what the "provider"
charged, retries and lost-but-billed responses included. Budgets are checked on what reached
the stub: nothing past the budget, and a second run with more budget sends exactly the rest.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from kubedistill.api.savings import TeacherSpend
from kubedistill.api.worker_config import StageFailure
from kubedistill.worker import common, estimate, generate
from kubedistill.worker.teacher.batch import BatchRecord, BatchRequest
from kubedistill.worker.teacher.keys import settings_digest
from tests.support.generate_job import API_KEY, GenerateJob, asked, prompts

pytestmark = pytest.mark.worker

PRICES = {"currency": "USD", "inputPerMillion": 2.0, "cachedInputPerMillion": 0.5, "outputPerMillion": 8.0,
          "batch": {"inputPerMillion": 1.0, "cachedInputPerMillion": 0.25, "outputPerMillion": 4.0}}  # fmt: skip


def priced(bill: dict[str, int], prices: dict) -> float:
    cached = bill["cached_tokens"]
    return (
        (bill["prompt_tokens"] - cached) * prices["inputPerMillion"]
        + cached * prices["cachedInputPerMillion"]
        + bill["completion_tokens"] * prices["outputPerMillion"]
    ) / 1e6


def assert_spend_is_the_bill(spend: TeacherSpend, bill: dict[str, int], prices: dict) -> None:
    spent = spend.spent
    assert spent is not None
    assert (spent.requests, spent.prompt_tokens, spent.cached_prompt_tokens, spent.completion_tokens) == (
        bill["requests"], bill["prompt_tokens"], bill["cached_tokens"], bill["completion_tokens"],
    )  # fmt: skip
    assert spent.cost == pytest.approx(priced(bill, prices), abs=1e-9)


def termination(env: dict[str, str]) -> str:
    return Path(env["KUBEDISTILL_TERMINATION_LOG"]).read_text()


def store_objects(job: GenerateJob) -> list[str]:
    listing = job.client.list_objects_v2(Bucket=job.bucket, Prefix="answers/")
    return [obj["Key"] for obj in listing.get("Contents", [])]


def answer_keys(job: GenerateJob) -> set[str]:
    keys = set()
    for name in store_objects(job):
        if name.endswith(".jsonl"):
            keys |= {json.loads(line)["key"] for line in job.get(name).splitlines()}
    return keys


def batch_records(job: GenerateJob) -> list[str]:
    return [name for name in store_objects(job) if "/batches/" in name]


# --------------------------------------------------------------------------- online spend


def test_recorded_spend_is_the_stubs_bill_retries_and_cached_tokens_included(s3, stub, env, tmp_path):
    faults = {
        "prompt-1": ["billednochoices", "ok"],  # billed twice: the first response had no answer
        "prompt-2": ["500", "429:0", "ok"],  # errors bill nothing
        "prompt-3": ["billednochoices", "billednochoices", "ok"],
        "prompt-4": ["truncated", "ok"],  # lost in transit: unconfirmed, the stub billed nothing
    }
    stub.script(faults)
    job = GenerateJob(s3, stub, tmp_path, prompts(30), teacher={"systemPrompt": "You are a precise assistant.",
                                                        "pricing": PRICES})  # fmt: skip
    result, stats = generate.run(job.config)

    bill = stub.billing()
    assert bill["requests"] == 30 + 1 + 2  # every answer, plus the billed responses that were retried
    assert bill["cached_tokens"] > 0  # the system prompt, from the second request on
    assert result.spend is not None and result.spend.mode == "online" and result.spend.currency == "USD"
    assert_spend_is_the_bill(result.spend, bill, PRICES)
    assert stats.ledger.unconfirmed_requests == 1
    # The dataset's own usage is what the kept answers billed, less than the run's spend.
    assert result.completion_tokens < result.spend.spent.completion_tokens
    # Nothing asked again costs nothing.
    stub.reset()
    again, _ = generate.run(job.config)
    assert again.spend.spent.requests == 0 and again.spend.spent.cost == 0
    assert again.spend.reused_answers == 30 and stub.billing()["requests"] == 0


def test_the_projection_is_logged_before_the_first_request_and_matches_the_estimate_stage(
    s3, stub, env, tmp_path, caplog
):
    job = GenerateJob(s3, stub, tmp_path, prompts(20), teacher={"pricing": PRICES})
    projected = TeacherSpend.model_validate(estimate.main(job.config)).projected
    assert stub.requests() == []  # estimating asks nothing
    assert projected is not None and projected.counted_with == "estimate"
    assert (projected.answers, projected.reused, projected.completion_tokens) == (20, 0, 20 * 32)
    assert projected.cost == pytest.approx((projected.prompt_tokens * 2.0 + 20 * 32 * 8.0) / 1e6)

    caplog.set_level("INFO")
    result, _ = generate.run(job.config)
    assert result.spend.projected == projected
    lines = [r.getMessage() for r in caplog.records]
    first_request = next(i for i, line in enumerate(lines) if "generate asked" in line)
    assert any("generate projection: at most" in line for line in lines[:first_request])


# --------------------------------------------------------------------------- budgets


def test_half_the_projection_stops_at_the_budget_then_more_budget_asks_exactly_the_rest(s3, stub, env, tmp_path):
    total = 40
    stub.script({}, fill=True)  # answers as long as maxTokens allows: the projection is close to the bill
    job = GenerateJob(s3, stub, tmp_path, prompts(total), teacher={"pricing": PRICES})
    projected = TeacherSpend.model_validate(estimate.main(job.config)).projected
    assert projected is not None
    budget = projected.tokens // 2
    job.doc["teacher"]["budget"] = {"maxTokens": budget}

    proc = job.cli(env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == common.EXIT_FAILED, out
    failure = StageFailure.model_validate_json(termination(env))
    assert failure.reason == "BudgetExceeded"
    bill = stub.billing()
    assert 0 < bill["prompt_tokens"] + bill["completion_tokens"] <= budget  # nothing past the budget
    assert len(stub.requests()) == bill["requests"]  # every request that reached the teacher was billed
    assert_spend_is_the_bill(failure.spend, bill, PRICES)
    assert failure.spend.budget.state == "Exceeded" and failure.spend.budget.max_tokens == budget
    first = set(asked(stub))
    stored = job.stored_keys()
    assert len(stored) == len(first) < total  # every answer paid for is kept
    left = total - len(first)
    assert failure.spend.budget.remaining_answers == left
    assert f"{left} answer(s) for {left} prompt(s) are still to ask" in failure.message
    assert "raise spec.teacher.budget.maxTokens to at least" in failure.message
    assert not job.exists("run/dataset/manifest.json")
    assert TeacherSpend.model_validate_json(job.get("run/dataset/teacher-spend.json")) == failure.spend

    stub.reset()
    stub.script({}, fill=True)
    job.doc["teacher"]["budget"] = {"maxTokens": projected.tokens}
    proc = job.cli(env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    second = asked(stub)
    assert set(second) == {f"prompt-{i}" for i in range(total)} - first  # exactly the rest
    assert all(n == 1 for n in second.values())
    summary = json.loads(termination(env))
    assert (summary["examples"], summary["requested"], summary["reused"]) == (total, left, total - left)
    assert summary["spend"]["budget"]["state"] == "Within"
    assert json.loads(job.get("run/dataset/teacher-spend.json")) == summary["spend"]  # for the run report


def test_a_cost_budget_holds_with_many_requests_in_flight(s3, stub, env, tmp_path):
    stub.script({}, latency=0.05, fill=True)
    job = GenerateJob(s3, stub, tmp_path, prompts(60), teacher={"pricing": PRICES, "endpoint": {"maxConcurrency": 16}})
    projected = TeacherSpend.model_validate(estimate.main(job.config)).projected
    job.doc["teacher"]["budget"] = {"maxCost": round(projected.cost / 3, 6)}
    with pytest.raises(common.StageStopped) as stopped:
        generate.run(job.config)
    failure = StageFailure.model_validate(stopped.value.payload)
    bill = stub.billing()
    assert 0 < priced(bill, PRICES) <= job.doc["teacher"]["budget"]["maxCost"]
    assert_spend_is_the_bill(failure.spend, bill, PRICES)
    assert "raise spec.teacher.budget.maxCost to at least $" in failure.message


# --------------------------------------------------------------------------- the Batch API


def batch_job(s3, stub, tmp_path, items, **batch):
    settings = {"pollSeconds": 0.2, **batch}
    return GenerateJob(
        s3, stub, tmp_path, items, teacher={"endpoint": {"mode": "batch", "batch": settings}, "pricing": PRICES}
    )


def test_batch_and_online_give_the_same_dataset_and_batch_spend_uses_batch_prices(s3, stub, env, tmp_path):
    items = prompts(25)
    online = GenerateJob(s3, stub, tmp_path / "online", items)
    online_result, _ = generate.run(online.config)
    stub.reset()
    batched = batch_job(s3, stub, tmp_path / "batch", items, maxRequestsPerBatch=10)
    batch_result, _ = generate.run(batched.config)

    assert [r.key for r in batched.records()] == [r.key for r in online.records()]
    assert [r.completion for r in batched.records()] == [r.completion for r in online.records()]
    assert batch_result.digest == online_result.digest
    assert [len(b["prompts"]) for b in stub.batches()] == [10, 10, 5]  # maxRequestsPerBatch
    assert [e for e in stub.requests() if "batch" not in e] == []  # nothing went online
    assert batch_result.spend.mode == "batch"
    assert_spend_is_the_bill(batch_result.spend, stub.billing("batch"), PRICES["batch"])
    assert batch_records(batched) == []  # each record goes once its answers are stored


def test_failed_and_expired_lines_go_to_a_new_batch_until_out_of_rounds(s3, stub, env, tmp_path):
    stub.script({"prompt-1": ["500", "ok"], "prompt-2": ["expire", "ok"], "prompt-3": ["500", "503", "500"]})
    job = batch_job(s3, stub, tmp_path, prompts(30), maxRounds=3)
    result, _ = generate.run(job.config)

    rounds = [sorted(b["prompts"]) for b in stub.batches()]
    assert len(rounds[0]) == 30
    assert rounds[1:] == [["prompt-1", "prompt-2", "prompt-3"], ["prompt-3"]]
    assert (result.examples, result.failed) == (29, 1)
    (failure,) = job.failures()
    assert failure.id == "p3" and "after 3 batches" in failure.reason and "HTTP 500" in failure.reason
    assert_spend_is_the_bill(result.spend, stub.billing("batch"), PRICES["batch"])


def test_a_batch_run_killed_while_polling_resumes_the_same_batch(s3, stub, env, tmp_path):
    stub.script_batches(6.0)  # a slow batch: the kill lands while it runs
    job = batch_job(s3, stub, tmp_path, prompts(30))
    proc = job.cli(env)
    try:
        deadline = time.monotonic() + 60
        while not stub.batches() or not batch_records(job):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        time.sleep(0.5)  # polling
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert len(stub.batches()) == 1 and answer_keys(job) == set() and len(batch_records(job)) == 1

    proc = job.cli(env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert len(stub.batches()) == 1, "the restarted run submitted a batch again"
    assert Counter(e["prompt"] for e in stub.requests()) == Counter({f"prompt-{i}": 1 for i in range(30)})
    assert len(job.records()) == 30 and batch_records(job) == []
    summary = json.loads(termination(env))
    assert summary["spend"]["spent"]["requests"] == 30  # the resumed batch's bill is this run's


def test_a_batch_created_before_its_id_was_recorded_is_found_not_created_again(s3, stub, env, tmp_path):
    """The kill between "create the batch" and "write its id": the record names it in the batch's metadata."""
    import httpx

    job = batch_job(s3, stub, tmp_path, prompts(5))
    items = [(f"prompt-{i}", job.key_of(f"prompt-{i}")) for i in range(5)]
    body = "".join(
        json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "stub-teacher", "messages": [{"role": "user", "content": text}],
                             "max_tokens": 32, "temperature": 0, "top_p": 1, "n": 1}}) + "\n"
        for text, key in items
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {API_KEY}"}
    file_id = httpx.post(f"{stub.base_url}/files", headers=auth, data={"purpose": "batch"},
                         files={"file": ("in.jsonl", body.encode())}).json()["id"]  # fmt: skip
    httpx.post(f"{stub.base_url}/batches", headers=auth, json={"input_file_id": file_id, "completion_window": "24h",
               "endpoint": "/v1/chat/completions", "metadata": {"kubedistill_record": "r-killed"}})  # fmt: skip
    record = BatchRecord(name="r-killed", input_file_id=file_id,
                         requests={key: BatchRequest(keys=[key], prompt_tokens=20) for _, key in items})  # fmt: skip
    partition = settings_digest(job.config.teacher)
    key = f"answers/v1/{partition}/batches/r-killed.json"
    job.client.put_object(Bucket=job.bucket, Key=key, Body=record.model_dump_json().encode())

    result, _ = generate.run(job.config)
    assert len(stub.batches()) == 1  # adopted, not created again
    assert result.examples == 5 and result.spend.spent.requests == 5


# --------------------------------------------------------------------------- the teacher's speed


def test_an_endpoint_teachers_speed_is_probed_streamed_and_its_requests_are_billed(s3, stub, env, tmp_path):
    job = GenerateJob(
        s3, stub, tmp_path, prompts(40), speed={"prompts": 4, "concurrency": 3}, teacher={"pricing": PRICES}
    )
    result, _ = generate.run(job.config)

    speed = result.teacher_speed
    assert speed is not None and speed.engine == "openai-stream"
    assert result.eval >= 4
    assert [(level.concurrency, level.requests) for level in speed.levels] == [(1, 4), (3, 4)]
    for level in speed.levels:
        assert 0 < level.ttft_p50 <= level.ttft_p95 and level.tokens_per_second_p50 > 0 and level.answers_per_second > 0
    eval_prompts = sorted((r.key, r.prompt[-1].content) for r in job.records() if r.split == "eval")
    probed = [e["prompt"] for e in stub.requests()][40:]
    assert sorted(set(probed)) == sorted(text for _, text in eval_prompts[:4])  # the prompts evaluate measures
    assert_spend_is_the_bill(result.spend, stub.billing(), PRICES)  # the probe is in the bill and in the spend
    assert stub.billing()["requests"] == 40 + 8
    stored = json.loads(job.get("run/dataset/teacher-speed.json"))
    assert stored["levels"][0]["concurrency"] == 1
    # A re-run of the same dataset pays for nothing: the answers are stored, the speed measured.
    stub.reset()
    again, _ = generate.run(job.config)
    assert stub.requests() == [] and again.teacher_speed == speed and again.spend.spent.requests == 0


def test_a_budget_in_batch_mode_submits_only_what_it_holds(s3, stub, env, tmp_path):
    stub.script({}, fill=True)
    job = batch_job(s3, stub, tmp_path, prompts(30))
    projected = TeacherSpend.model_validate(estimate.main(job.config)).projected
    job.doc["teacher"]["budget"] = {"maxTokens": projected.tokens // 2}
    with pytest.raises(common.StageStopped) as stopped:
        generate.run(job.config)
    failure = StageFailure.model_validate(stopped.value.payload)
    bill = stub.billing("batch")
    assert 0 < bill["prompt_tokens"] + bill["completion_tokens"] <= projected.tokens // 2
    assert_spend_is_the_bill(failure.spend, bill, PRICES["batch"])
    sent = sum(len(b["prompts"]) for b in stub.batches())
    assert len(answer_keys(job)) == sent < 30 and failure.spend.budget.remaining_answers == 30 - sent
