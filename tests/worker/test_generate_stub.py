"""generate against the fault-injecting stub and a real S3-compatible server (versitygw).

What a real teacher won't do on demand: 429 with Retry-After, 500s, hangs, malformed and
truncated bodies; plus SIGKILL and SIGTERM in the middle of a run. The stub counts every
request it receives, so "never pays twice" is asserted on what the teacher actually saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker import common, generate
from kubedistill.worker.topk import decode
from tests.support.generate_job import API_KEY, GenerateJob, asked, prompts, wait_for_stored
from tests.support.progress import ProgressSampler

pytestmark = pytest.mark.worker

# --------------------------------------------------------------------------- faults and limits


def test_faults_every_prompt_answered_once_retries_observed_rate_never_exceeded(s3, stub, env, tmp_path, caplog):
    items = [*prompts(60), b"{this is not json", {"prompt": "x" * 400}, {"id": "again", "prompt": "prompt-7"}]
    faults = {
        "prompt-1": ["429:1", "ok"],
        "prompt-2": ["500", "502", "ok"],
        "prompt-3": ["hang", "ok"],
        "prompt-4": ["malformed", "truncated", "ok"],
        "prompt-5": ["reset", "nochoices", "ok"],
        "prompt-6": ["503:1", "ok"],
    }
    stub.script(faults)
    job = GenerateJob(
        s3, stub, tmp_path, items, maxPromptChars=300, teacher={"endpoint": {"requestsPerMinute": 1200}, "logprobs": 2}
    )
    caplog.set_level("DEBUG")

    result, stats = generate.run(job.config)

    # Every prompt answered exactly once in the output; bad lines counted, not fatal.
    records = job.records()
    assert sorted(r.id for r in records) == sorted(f"p{i}" for i in range(60))
    assert len({r.key for r in records}) == 60
    assert all(r.completion[0].content == f"echo: {r.prompt[-1].content}" for r in records)
    for record in records:  # the stub names tokens by their text, as OpenAI does: stored with a string table
        assert record.topk is not None and record.logprobs is None
        dist = decode(record.topk)
        assert dist.tokens() == record.completion[0].content.split(" ") and dist.k == 2
        assert [dist.table[i] for i in dist.top_ids[0]] == ["echo:", "alt1"]  # type: ignore[index]
        assert dist.top_logprobs[0].tolist() == [-0.25, -1.25]
    manifest = job.manifest()
    assert (manifest.counts.prompts, manifest.counts.malformed, manifest.counts.too_long) == (60, 1, 1)
    assert manifest.counts.duplicates == 1
    assert (result.train + result.eval, result.failed, result.requested) == (60, 0, 60)
    assert result.eval == sum(r.split == "eval" for r in records) > 0
    assert {f.kind for f in job.failures()} == {"malformed", "too_long"}
    assert manifest.usage.completion_tokens == sum(r.usage.completion_tokens for r in records) > 0

    # Retries observed: each faulted prompt was sent once per scripted fault, then answered.
    seen = asked(stub)
    assert {p: seen[p] for p in faults} == {p: len(f) for p, f in faults.items()}
    assert all(seen[f"prompt-{i}"] == 1 for i in range(7, 60))
    assert stats.calls.retries == sum(len(f) - 1 for f in faults.values())

    # Retry-After honoured, and by everyone: nothing reached the stub during the pause.
    log = stub.requests()
    for prompt in ("prompt-1", "prompt-6"):
        first, second = (e["t"] for e in log if e["prompt"] == prompt)
        assert second - first >= 1.0
        assert not [e for e in log if first + 0.2 < e["t"] < first + 0.95]

    # 1200 requests/minute: never more than 20 in any one-second window, at the server.
    assert stub.max_in_window(1.0) <= 20
    assert all(e["auth"] for e in log)
    assert API_KEY not in caplog.text


def test_changed_sampling_is_a_new_key_and_more_samples_ask_only_for_the_new_ones(s3, stub, env, tmp_path):
    job = GenerateJob(s3, stub, tmp_path, prompts(6))
    generate.run(job.config)
    assert sum(asked(stub).values()) == 6

    stub.reset()
    job.doc["teacher"]["sampling"]["temperature"] = 0.7
    generate.run(job.config)
    assert sum(asked(stub).values()) == 6  # another teacher setting: asked again

    stub.reset()
    job.doc["teacher"]["sampling"]["temperature"] = 0
    job.doc["teacher"]["sampling"]["n"] = 2
    result, _ = generate.run(job.config)
    assert sorted(e["n"] for e in stub.requests()) == [1] * 6  # sample 1 only; sample 0 was stored
    assert (result.examples, result.reused, result.requested) == (12, 6, 6)

    stub.reset()
    result, _ = generate.run(job.config)
    assert stub.requests() == []
    assert (result.examples, result.requested) == (12, 0)


def test_wrong_api_key_stops_the_stage_without_leaking_it(s3, stub, env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KUBEDISTILL_TEACHER_API_KEY", "sk-wrong-9876543210")
    job = GenerateJob(s3, stub, tmp_path, prompts(40))
    with pytest.raises(common.WorkerError) as err:
        generate.run(job.config)
    assert "HTTP 401" in str(err.value) and "API key" in str(err.value)
    assert "9876543210" not in str(err.value) + caplog.text
    assert len(stub.requests()) <= 8  # the requests already in flight, not the whole prompt set


# --------------------------------------------------------------------------- failures


def test_too_many_failures_fail_with_one_line_reason_then_a_rerun_asks_only_those(s3, stub, env, tmp_path):
    stub.script({f"prompt-{i}": ["500"] * 2 for i in range(3)})
    job = GenerateJob(s3, stub, tmp_path, prompts(12), maxFailureFraction=0.2, teacher={"endpoint": {"maxRetries": 1}})
    proc = job.cli(env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == common.EXIT_FAILED, out
    reason = Path(env["KUBEDISTILL_TERMINATION_LOG"]).read_text()
    assert "\n" not in reason
    assert reason.startswith("the teacher failed for 3 of 12 prompts (25.0% > maxFailureFraction 20.0%)")
    assert "HTTP 500" in reason
    assert not job.exists("run/dataset/manifest.json")
    assert sorted((f.kind, f.id) for f in job.failures()) == [("failed", "p0"), ("failed", "p1"), ("failed", "p2")]

    stub.reset()  # the teacher has recovered
    proc = job.cli(env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert asked(stub) == Counter({f"prompt-{i}": 1 for i in range(3)})
    summary = json.loads(Path(env["KUBEDISTILL_TERMINATION_LOG"]).read_text())
    assert (summary["examples"], summary["requested"], summary["reused"], summary["failed"]) == (12, 3, 9, 0)


def test_failures_within_the_fraction_are_reported_not_fatal(s3, stub, env, tmp_path):
    stub.script({"prompt-0": ["400"]})
    job = GenerateJob(s3, stub, tmp_path, prompts(20), maxFailureFraction=0.1)
    result, _ = generate.run(job.config)
    assert (result.examples, result.failed) == (19, 1)
    (failure,) = job.failures()
    assert (failure.kind, failure.id, failure.key) == ("failed", "p0", job.key_of("prompt-0"))
    assert failure.reason.startswith("HTTP 400") and "after 1 attempt" in failure.reason
    assert asked(stub)["prompt-0"] == 1  # a 400 is not retried


def test_no_usable_prompt_is_a_clear_failure(s3, stub, env, tmp_path):
    job = GenerateJob(s3, stub, tmp_path, [b"nope", b"[1, 2]"])
    with pytest.raises(common.WorkerError, match=r"no usable prompts.*2 malformed"):
        generate.run(job.config)


# --------------------------------------------------------------------------- kill and resume


def slow_job(s3, stub, tmp_path, total, **flush):
    """A run long enough to interrupt: 50 ms per answer, 4 in flight."""
    stub.script({}, latency=0.05)
    return GenerateJob(s3, stub, tmp_path, prompts(total), **flush, teacher={"endpoint": {"maxConcurrency": 4}})


def test_sigkill_mid_run_then_resume_never_asks_twice(s3, stub, env, tmp_path):
    total = 300
    job = slow_job(s3, stub, tmp_path, total, flushEvery=20, flushSeconds=0.25)
    proc = job.cli(env)
    try:
        wait_for_stored(job, proc, at_least=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    stored = job.stored_keys()
    first_run = asked(stub)
    assert 60 <= len(stored) < total, "the kill must land mid-run"
    assert all(n == 1 for n in first_run.values())
    by_key = {job.key_of(f"prompt-{i}"): f"prompt-{i}" for i in range(total)}
    stored_prompts = {by_key[k] for k in stored}
    lost = set(first_run) - stored_prompts  # asked, answered or in flight, not yet flushed at the kill

    stub.reset()
    proc = job.cli(env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    second_run = asked(stub)
    assert not stored_prompts & set(second_run), "a stored answer was asked for again"
    assert all(n == 1 for n in second_run.values())
    assert set(second_run) | stored_prompts == {f"prompt-{i}" for i in range(total)}
    assert lost <= set(second_run)
    records = job.records()
    assert len(records) == total == len({r.key for r in records})
    print(f"\nSIGKILL after {len(stored)} stored answers; re-asked (in flight or unflushed at the kill): {len(lost)}")

    stub.reset()
    proc = job.cli(env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert stub.requests() == [], "a full re-run must not ask the teacher anything"
    summary = json.loads(Path(env["KUBEDISTILL_TERMINATION_LOG"]).read_text())
    assert (summary["requested"], summary["reused"], summary["examples"]) == (0, total, total)
    assert summary["digest"] == job.manifest().digest


def test_sigterm_stores_every_answer_received_and_exits_preempted(s3, stub, env, tmp_path):
    total = 300
    job = slow_job(s3, stub, tmp_path, total, flushEvery=1000, flushSeconds=60)
    proc = job.cli(env)
    deadline = time.monotonic() + 60
    while len(stub.requests()) < 40:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == common.EXIT_PREEMPTED, out
    assert Path(env["KUBEDISTILL_TERMINATION_LOG"]).read_text().startswith("Preempted: SIGTERM")
    # Nothing was flushed on its own (60 s / 1000 answers): what is stored was flushed at SIGTERM,
    # and it is everything the teacher answered, the requests in flight included.
    answered = {e["prompt"] for e in stub.requests() if e["fault"] == "ok"}
    by_key = {job.key_of(f"prompt-{i}"): f"prompt-{i}" for i in range(total)}
    assert {by_key[k] for k in job.stored_keys()} == answered
    assert len(answered) < total


# --------------------------------------------------------------------------- nothing finishes and then hangs


def _run_bounded(config: GenerateConfig, seconds: float) -> bool:
    """generate.run in a daemon thread; False when it has not returned within ``seconds`` (a hang)."""
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(generate.run(config)), daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome)


def test_every_short_run_returns(s3, stub, env, tmp_path):
    """The CI hang, in process: the last answer wakes the flusher as the run shuts it down.

    With ``flushEvery: 1`` every answer wakes the flusher; before the fix, 7 of these 40 runs
    never returned (the flusher's cancellation was lost in ``asyncio.wait_for``); after it, none.
    """
    stub.script({}, latency=0.0)
    hung = []
    for run in range(40):
        local = tmp_path / f"run{run}"
        local.mkdir()
        (local / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts(6)))
        config = GenerateConfig.model_validate(
            {
                "prompts": str(local / "prompts.jsonl"),
                "outputUri": str(local / "dataset"),
                "answerStoreUri": str(local / "answers"),  # a local store: the fastest flush, the tightest race
                "teacher": {"endpoint": {"baseURL": stub.base_url, "model": "stub", "maxConcurrency": 4}},
                "workDir": str(local / "work"),
                "flushEvery": 1,
                "flushSeconds": 0.01,
            }
        )
        if not _run_bounded(config, 15):
            hung.append(run)
    assert not hung, f"runs {hung} did not return"


def _burn_cpu(seconds: float) -> subprocess.Popen[bytes]:
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_kill_and_resume_under_cpu_load_never_hangs_nor_asks_twice(s3, stub, env, tmp_path):
    """The loaded CI machine, reproduced: SIGKILL mid-run and resume, again and again, with every core busy."""
    total = 160
    job = slow_job(s3, stub, tmp_path, total, flushEvery=1, flushSeconds=0.05)
    burners = [_burn_cpu(150) for _ in range(os.cpu_count() or 2)]
    try:
        for cycle, at_least in enumerate((10, 40, 80, 120)):
            stub.reset()
            stored_before = job.stored_keys()
            proc = job.cli(env)
            try:
                wait_for_stored(job, proc, at_least=at_least, timeout=90)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
            by_key = {job.key_of(f"prompt-{i}"): f"prompt-{i}" for i in range(total)}
            again = {by_key[k] for k in stored_before} & set(asked(stub))
            assert not again, f"cycle {cycle}: stored answers asked again: {sorted(again)[:5]}"

        stub.reset()
        proc = job.cli(env)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"the resumed worker finished nothing or hung:\n{out[-3000:]}") from None
        assert proc.returncode == 0, out
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert len(job.records()) == total
    stored = job.stored_keys()
    assert len(stored) == total


def test_progress_is_reported_at_the_interval_with_monotone_counts_and_a_sane_eta(s3, stub, env, tmp_path):
    total = 150
    stub.script({}, latency=0.05)
    path = tmp_path / "generate.progress.json"
    job = GenerateJob(s3, stub, tmp_path, prompts(total), teacher={"endpoint": {"maxConcurrency": 2}},
              progress={"file": str(path), "intervalSeconds": 1})  # fmt: skip
    sampler = ProgressSampler(path)
    started = time.monotonic()
    result, _ = generate.run(job.config)
    finished = time.monotonic()
    reports = sampler.stop()
    assert result.requested == total
    assert len(reports) >= 3, f"{len(reports)} reports in {finished - started:.1f}s"
    done = [r.done for r in reports]
    assert done == sorted(done) and done[-1] == total and all(r.total == total for r in reports)
    assert all(r.stage == "generate" and r.unit == "answers" for r in reports)
    assert all(r.details.get("reused") == 0 and r.details.get("failed") == 0 for r in reports)
    assert any((r.details.get("teacherTokens") or 0) > 0 for r in reports)
    gaps = [b[0] - a[0] for a, b in zip(sampler.reports, sampler.reports[1:], strict=False)][:-1]
    assert all(gap >= 0.7 for gap in gaps), gaps  # about one report per second, the last one forced
    sampler.check_eta(finished)
