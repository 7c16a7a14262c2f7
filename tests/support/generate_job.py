"""A generate job against the fault stub and the worker tier's S3 server: its config, how to run it, what it wrote.

Shared by tests/worker/test_generate_stub.py, test_generate_spend.py and test_generate_shards.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from kubedistill.api.dataset import DatasetManifest, DatasetRecord, FailureRecord
from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker.teacher.keys import answer_key, teacher_settings
from tests.support.fault_stub import FaultStub

API_KEY = "sk-test-0123456789abcdef"
REPO_ROOT = Path(__file__).resolve().parents[2]


class GenerateJob:
    """One generate job's URIs in a fresh bucket, and helpers to read what it wrote."""

    def __init__(self, s3, stub, tmp_path, prompts, **overrides):
        self.s3, self.stub, self.tmp = s3, stub, tmp_path
        self.bucket = s3.make_bucket()
        self.client = s3.client()
        lines = [p if isinstance(p, bytes) else json.dumps(p).encode() for p in prompts]
        self.client.put_object(Bucket=self.bucket, Key="in/prompts.jsonl", Body=b"\n".join(lines) + b"\n")
        self.doc = {
            "prompts": f"s3://{self.bucket}/in/prompts.jsonl",
            "outputUri": f"s3://{self.bucket}/run/dataset",
            "answerStoreUri": f"s3://{self.bucket}/answers",
            "teacher": {
                "endpoint": {
                    "baseURL": stub.base_url,
                    "model": "stub-teacher",
                    "timeoutSeconds": 1,
                    "maxConcurrency": 8,
                },
                "sampling": {"temperature": 0, "maxTokens": 32},
            },
            "evalFraction": 0.2,
            "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
            "workDir": str(tmp_path / "work"),
            "backoffInitialSeconds": 0.05,
            "backoffMaxSeconds": 0.5,
            "progress": {"intervalSeconds": 1},
        }
        _merge(self.doc, overrides)

    @property
    def config(self) -> GenerateConfig:
        return GenerateConfig.model_validate(self.doc)

    def config_file(self) -> Path:
        path = self.tmp / "generate.yaml"
        path.write_text(yaml.safe_dump(self.doc))
        return path

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def exists(self, key: str) -> bool:
        return "Contents" in self.client.list_objects_v2(Bucket=self.bucket, Prefix=key)

    def manifest(self) -> DatasetManifest:
        return DatasetManifest.model_validate_json(self.get("run/dataset/manifest.json"))

    def records(self) -> list[DatasetRecord]:
        out = []
        for shard in self.manifest().shards:
            body = self.get(f"run/dataset/{shard.path}")
            out += [DatasetRecord.model_validate_json(line) for line in body.splitlines()]
        return out

    def failures(self) -> list[FailureRecord]:
        body = self.get("run/dataset/failures.jsonl")
        return [FailureRecord.model_validate_json(line) for line in body.splitlines()]

    def stored_keys(self) -> set[str]:
        keys = set()
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix="answers/")
        for obj in listing.get("Contents", []):
            for line in self.get(obj["Key"]).splitlines():
                keys.add(json.loads(line)["key"])
        return keys

    def key_of(self, prompt: str) -> str:
        return answer_key(teacher_settings(self.config.teacher), (("user", prompt),), 0)

    def cli(self, env: dict[str, str]) -> subprocess.Popen[str]:
        """`python -m kubedistill.worker generate --config FILE`, as the pod runs it."""
        return subprocess.Popen(
            [sys.executable, "-m", "kubedistill.worker", "generate", "--config", str(self.config_file())],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"prompt-{i}"} for i in range(n)]


def asked(stub: FaultStub) -> Counter[str]:
    return Counter(entry["prompt"] for entry in stub.requests())


def wait_for_stored(job: GenerateJob, proc: subprocess.Popen[str], at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker ended early:\n{proc.stdout.read() if proc.stdout else ''}"
        stored = len(job.stored_keys())
        if stored >= at_least:
            return stored
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} answers stored after {timeout}s")
