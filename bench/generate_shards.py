"""Sharded generation: answers/s of the generate stage with 1, 2 and 4 shards (teacher.shards).

    python bench/generate_shards.py                           # ~2 min
    python bench/generate_shards.py --shards 1,2,4,8 --prompts 2000 --latency 0.2

Each shard is a real worker process (``python -m kubedistill.worker generate``) given what an
Indexed Job gives its pod (JOB_COMPLETION_INDEX, the Job's uid), all against one fault stub
with a fixed latency per request and no faults, and the real S3 server (answer store, dataset,
shard reports). Every level starts from an empty answer store. A shard keeps ``maxConcurrency``
requests in flight, so the ideal rate is shards x concurrency / latency: the stub stands for a
teacher with room for more (an in-cluster vLLM teacher runs an engine in each shard's pod).

Measured per level: wall time from the first process start to shard 0's exit (dataset written),
answers/s over it, speedup against 1 shard in the same run, and efficiency against the ideal.
The same prompts at every level; the dataset digest must be the same at every level too.

Prints a table and writes bench/results/generate_shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kubedistill.api.worker_config import SHARD_INDEX_ENV, SHARD_RUN_ENV  # noqa: E402
from tests.support.fault_stub import FaultStub  # noqa: E402
from tests.support.s3 import shared_s3_server  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "generate_shards.json"


def run_level(s3: Any, stub: FaultStub, shards: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    bucket = s3.make_bucket()
    lines = [json.dumps({"id": f"p{i}", "prompt": f"bench prompt {i}"}) for i in range(args.prompts)]
    s3.client().put_object(Bucket=bucket, Key="prompts.jsonl", Body=("\n".join(lines) + "\n").encode())
    config = {
        "prompts": f"s3://{bucket}/prompts.jsonl",
        "outputUri": f"s3://{bucket}/dataset",
        "answerStoreUri": f"s3://{bucket}/answers",
        "teacher": {
            "endpoint": {"baseURL": stub.base_url, "model": "stub", "maxConcurrency": args.concurrency},
            "sampling": {"temperature": 0, "maxTokens": 16},
            "shards": shards,
        },
        "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
        "workDir": str(tmp / f"work-{shards}"),
        "shardPollSeconds": 0.1,
    }
    path = tmp / f"generate-{shards}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **s3.env(), "KUBEDISTILL_TEACHER_API_KEY": "sk-bench", SHARD_RUN_ENV: f"bench-{shards}"}
    stub.reset()
    stub.script({}, latency=args.latency)
    start = time.monotonic()
    procs = []
    for index in range(shards):
        log = tmp / f"termination-{shards}-{index}"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kubedistill.worker", "generate", "--config", str(path)],
                env={**env, SHARD_INDEX_ENV: str(index), "KUBEDISTILL_TERMINATION_LOG": str(log)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    codes = [p.wait(timeout=1800) for p in procs]
    seconds = time.monotonic() - start
    if any(codes):
        raise SystemExit(f"{shards} shards: exit codes {codes}")
    result = json.loads((tmp / f"termination-{shards}-0").read_text())
    asked = len(stub.requests())
    assert result["examples"] == args.prompts == asked, (result, asked)
    return {
        "shards": shards,
        "seconds": seconds,
        "answersPerSecond": args.prompts / seconds,
        "digest": result["digest"],
    }


def main(args: argparse.Namespace) -> None:
    s3 = shared_s3_server()
    rows = []
    with FaultStub(api_key=None) as stub, tempfile.TemporaryDirectory() as tmp:
        for shards in [int(n) for n in args.shards.split(",")]:
            rows.append(run_level(s3, stub, shards, args, Path(tmp)))
    base = rows[0]["answersPerSecond"]
    print(f"\n{args.prompts} prompts, stub latency {args.latency}s, maxConcurrency {args.concurrency} per shard, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'shards':>6} {'seconds':>8} {'answers/s':>10} {'speedup':>8} {'ideal':>8} {'efficiency':>10}")
    for row in rows:
        ideal = row["shards"] * args.concurrency / args.latency
        row["speedup"] = row["answersPerSecond"] / base
        row["efficiency"] = row["answersPerSecond"] / ideal
        print(f"{row['shards']:>6} {row['seconds']:>8.1f} {row['answersPerSecond']:>10.1f} {row['speedup']:>7.2f}x "
              f"{ideal:>8.0f} {row['efficiency']:>9.0%}")  # fmt: skip
    digests = {row["digest"] for row in rows}
    print(f"dataset digest the same at every level: {len(digests) == 1}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"args": vars(args), "machine": platform.platform(), "cores": os.cpu_count(), "rows": rows}, indent=1
        )
    )
    if len(digests) != 1:
        raise SystemExit("the dataset differs between shard counts")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--prompts", type=int, default=1200)
    parser.add_argument("--latency", type=float, default=0.25, help="seconds per request at the stub")
    parser.add_argument("--concurrency", type=int, default=8, help="maxConcurrency (per shard)")
    main(parser.parse_args())
