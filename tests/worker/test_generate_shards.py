"""teacher.shards for real: generate worker processes as the pods of an Indexed Job, against the
fault stub and the real S3 server.

Each process gets what the Job gives its pod: JOB_COMPLETION_INDEX and the Job's uid. The stub
counts every request, so "each prompt asked exactly once" is what the teacher saw; the dataset
is compared with a single process's, shard file by shard file.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from kubedistill.api.worker_config import SHARD_INDEX_ENV, SHARD_RUN_ENV
from kubedistill.worker.teacher.shards import REPORTS_DIR, Shard
from tests.support.generate_job import API_KEY, GenerateJob, asked, prompts, wait_for_stored

pytestmark = pytest.mark.worker

SHARDS = 3


@pytest.fixture
def env(s3, stub):
    stub.reset()
    return {**s3.env(), "KUBEDISTILL_TEACHER_API_KEY": API_KEY}


def shard_env(env: dict[str, str], tmp_path: Path, index: int, run: str = "job-uid-1") -> dict[str, str]:
    log = tmp_path / f"termination-log-{index}"
    return {**env, SHARD_INDEX_ENV: str(index), SHARD_RUN_ENV: run, "KUBEDISTILL_TERMINATION_LOG": str(log)}


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def result_of(tmp_path: Path, index: int) -> dict:
    return json.loads((tmp_path / f"termination-log-{index}").read_text())


def dataset_files(job: GenerateJob) -> dict[str, bytes]:
    """The dataset's shard files and failures, by path: what a single pod would have written."""
    files = {shard.path: job.get(f"run/dataset/{shard.path}") for shard in job.manifest().shards}
    if job.exists("run/dataset/failures.jsonl"):  # it names the prompts' source, in the job's own bucket
        files["failures.jsonl"] = job.get("run/dataset/failures.jsonl").replace(job.bucket.encode(), b"<bucket>")
    return files


def test_three_shards_ask_every_prompt_once_and_write_the_single_pod_dataset(s3, stub, env, tmp_path):
    total = 240
    faults = {"prompt-1": ["429:1", "ok"], "prompt-2": ["500", "ok"], "prompt-3": ["malformed", "ok"]}
    stub.script(faults)
    items = [*prompts(total), b"{not json"]
    job = GenerateJob(s3, stub, tmp_path, items, teacher={"endpoint": {"maxConcurrency": 6}, "shards": SHARDS})
    job.doc["shardPollSeconds"] = 0.2

    procs = [job.cli(shard_env(env, tmp_path, i)) for i in range(SHARDS)]
    for proc in procs:
        finish(proc)

    # The teacher saw each prompt answered once: the faulted ones retried, nobody asked twice.
    seen = asked(stub)
    assert set(seen) == {f"prompt-{i}" for i in range(total)}
    assert {p: n for p, n in seen.items() if n > 1} == {p: len(f) for p, f in faults.items()}
    # Each shard asked for its own prompts (by content key), and shard 0 reported for the Job.
    owned = [sum(Shard(i, SHARDS, "x").owns(job.key_of(f"prompt-{p}")) for p in range(total)) for i in range(SHARDS)]
    assert all(n > 40 for n in owned)
    for index in (1, 2):
        assert result_of(tmp_path, index) == {"shard": index, "requested": owned[index], "reused": 0, "failed": 0}
    result = result_of(tmp_path, 0)
    assert (result["examples"], result["requested"], result["reused"], result["malformed"]) == (total, total, 0, 1)
    assert job.exists(f"run/dataset/{REPORTS_DIR}/job-uid-1/1.json")

    # One process over the same prompts, into another bucket, writes the same dataset byte for byte.
    stub.reset()
    stub.script(faults)
    single = GenerateJob(s3, stub, tmp_path / "single", items)
    (tmp_path / "single").mkdir()
    finish(single.cli({**env, "KUBEDISTILL_TERMINATION_LOG": str(tmp_path / "single-log")}))
    assert single.manifest().digest == job.manifest().digest == result["digest"]
    assert dataset_files(single) == dataset_files(job)
    assert single.manifest().counts == job.manifest().counts
    # ... and the shards' bill, added up, is the single pod's (the faults billed alike).
    alone = json.loads((tmp_path / "single-log").read_text())
    assert result["spend"]["spent"] == alone["spend"]["spent"]
    assert result["spend"]["projected"] == alone["spend"]["projected"]


def test_a_killed_shard_resumes_alone_asking_only_its_own_missing_prompts(s3, stub, env, tmp_path):
    total = 300
    stub.script({}, latency=0.05)
    job = GenerateJob(
        s3, stub, tmp_path, prompts(total), flushEvery=10, flushSeconds=0.25,
        teacher={"endpoint": {"maxConcurrency": 6}, "shards": SHARDS},
    )  # fmt: skip
    job.doc["shardPollSeconds"] = 0.2
    mine = {f"prompt-{p}" for p in range(total) if Shard(1, SHARDS, "x").owns(job.key_of(f"prompt-{p}"))}

    procs = {i: job.cli(shard_env(env, tmp_path, i)) for i in range(SHARDS)}
    try:
        wait_for_stored(job, procs[1], at_least=60)
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate(timeout=30)
    finish(procs[2])
    assert procs[0].poll() is None, "shard 0 must wait for shard 1"
    stored_before = {p for p in mine if job.key_of(p) in job.stored_keys()}
    assert 0 < len(stored_before) < len(mine), "the kill must land mid-shard"

    stub.reset()
    stub.script({}, latency=0.0)
    finish(job.cli(shard_env(env, tmp_path, 1)))  # the Job's replacement pod for index 1
    again = asked(stub)
    assert set(again) <= mine - stored_before, "the restarted shard asked for another shard's or a stored prompt"
    assert all(n == 1 for n in again.values())
    finish(procs[0])
    records = job.records()
    assert len(records) == total == len({r.key for r in records})
    assert result_of(tmp_path, 0)["examples"] == total


def test_shard_reports_of_another_job_are_never_read(s3, stub, env, tmp_path):
    """A report under another Job's uid does not stand for this Job's shard."""
    job = GenerateJob(s3, stub, tmp_path, prompts(30), teacher={"shards": 2})
    job.doc["shardPollSeconds"] = 0.2
    job.client.put_object(
        Bucket=job.bucket, Key=f"run/dataset/{REPORTS_DIR}/old-uid/1.json", Body=b'{"index": 1, "requested": 99}'
    )
    zero = job.cli(shard_env(env, tmp_path, 0, run="new-uid"))
    with pytest.raises(subprocess.TimeoutExpired):
        zero.wait(timeout=8)  # its own prompts done, it waits for shard 1 of its own Job
    assert not job.exists("run/dataset/manifest.json")
    finish(job.cli(shard_env(env, tmp_path, 1, run="new-uid")))
    finish(zero)
    assert result_of(tmp_path, 0)["examples"] == 30
