"""generate with real teachers on CPU: a vLLM OpenAI-compatible server, and vLLM offline in the pod.

Both use a tiny chat model the test builds (random weights, trained tokenizer) and write to a
real S3-compatible server. The two modes must produce the same dataset format and the same split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubedistill.api.dataset import DatasetManifest, DatasetRecord
from kubedistill.api.savings import SpeedComparison, SpeedReport
from kubedistill.api.worker_config import GenerateConfig, StorageSettings
from kubedistill.storage.objectstore import S3Store, upload_dir
from kubedistill.worker import generate
from kubedistill.worker.teacher.keys import split_value
from kubedistill.worker.topk import decode
from tests.support.vllm_server import VLLM_CPU_ENV

pytestmark = [pytest.mark.worker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_FRACTION = 0.25
PROMPTS = [{"id": f"q{i}", "prompt": f"What is {i} plus {2 * i}?"} for i in range(30)] + [
    {"id": f"c{i}", "messages": [{"role": "user", "content": f"Reverse the word {w}"}]}
    for i, w in enumerate(["cat", "dog", "tree", "river", "city", "house", "night", "green", "blue", "word"])
]
BAD_LINES = [b"{truncated", json.dumps({"prompt": "x" * 3000}).encode()]


@pytest.fixture
def bucket(s3, monkeypatch):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    name = s3.make_bucket()
    lines = [json.dumps(p).encode() for p in PROMPTS] + BAD_LINES
    s3.client().put_object(Bucket=name, Key="in/prompts.jsonl", Body=b"\n".join(lines) + b"\n")
    return name


def config_doc(s3, bucket: str, teacher: dict, tmp_path: Path) -> dict:
    return {
        "prompts": f"s3://{bucket}/in/prompts.jsonl",
        "outputUri": f"s3://{bucket}/run/dataset",
        "answerStoreUri": f"s3://{bucket}/answers",
        "teacher": {**teacher, "sampling": {"temperature": 0, "maxTokens": 16}, "logprobs": 2},
        "evalFraction": EVAL_FRACTION,
        "maxPromptChars": 1000,
        "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
        "workDir": str(tmp_path / "work"),
    }


def read_dataset(s3, bucket: str) -> tuple[DatasetManifest, list[DatasetRecord]]:
    client = s3.client()

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"run/dataset/{key}")["Body"].read()

    manifest = DatasetManifest.model_validate_json(get("manifest.json"))
    records = []
    for shard in manifest.shards:
        lines = get(shard.path).splitlines()
        assert len(lines) == shard.records
        records += [DatasetRecord.model_validate_json(line) for line in lines]
    return manifest, records


def expected_split() -> dict[str, str]:
    """The split computed independently from each prompt's content hash."""
    out = {}
    for p in PROMPTS:
        messages = [("user", p["prompt"])] if "prompt" in p else [(m["role"], m["content"]) for m in p["messages"]]
        out[p["id"]] = "eval" if split_value(messages) < EVAL_FRACTION else "train"
    return out


def check_dataset(manifest: DatasetManifest, records: list[DatasetRecord], teacher_model: str, by_id: bool) -> None:
    split = expected_split()
    assert manifest.teacher_model == teacher_model
    assert (manifest.counts.prompts, manifest.counts.malformed, manifest.counts.too_long) == (40, 1, 1)
    assert sorted(r.id for r in records) == sorted(split)
    assert {r.id: r.split for r in records} == split
    assert (
        manifest.counts.train == sum(s == "train" for s in split.values()) == sum(r.split == "train" for r in records)
    )
    assert manifest.counts.eval == sum(s == "eval" for s in split.values()) > 0
    assert [s.split for s in manifest.shards] == ["train", "eval"]
    for record in records:
        assert record.prompt[-1].role == "user" and record.completion[0].role == "assistant"
        assert 1 <= record.usage.completion_tokens <= 16 and record.usage.prompt_tokens > 0
        assert record.finish_reason in ("stop", "length")
        # one position per answer token, top-2 alternatives each, most likely first
        assert record.topk is not None and record.logprobs is None
        dist = decode(record.topk)
        assert dist.k == 2 and 0 <= record.usage.completion_tokens - dist.positions <= 1
        assert bool((dist.top_logprobs[:, 0] >= dist.top_logprobs[:, 1]).all())
        # vLLM offline names tokens by id, an OpenAI-compatible API by their text
        assert (dist.table is None) == by_id
    assert manifest.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in records)
    assert manifest.usage.completion_tokens == sum(r.usage.completion_tokens for r in records)


def test_endpoint_teacher_vllm_server_to_s3(s3, bucket, vllm_teacher, tmp_path):
    doc = config_doc(s3, bucket, {"endpoint": {"baseURL": vllm_teacher.base_url, "model": "teacher"}}, tmp_path)
    result, stats = generate.run(GenerateConfig.model_validate(doc))

    manifest, records = read_dataset(s3, bucket)
    check_dataset(manifest, records, "teacher", by_id=False)
    assert manifest.teacher_tokenizer is None  # an API teacher's tokenizer is not at hand
    assert (result.examples, result.requested, result.failed, result.digest) == (40, 40, 0, manifest.digest)
    assert stats.calls.retries == 0
    # The spend is what vLLM's usage said, request by request: here the dataset's own usage.
    spent = result.spend.spent
    assert (spent.requests, spent.prompt_tokens, spent.completion_tokens) == (
        40, manifest.usage.prompt_tokens, manifest.usage.completion_tokens,
    )  # fmt: skip
    assert result.spend.projected.counted_with == "estimate" and result.spend.projected.answers == 40

    # The stored answer is what the server says for that prompt (greedy, same settings).
    record = next(r for r in records if r.id == "q3")
    direct = vllm_teacher.chat([m.to_wire() for m in record.prompt], max_tokens=16, temperature=0)
    assert record.completion[0].content == direct["choices"][0]["message"]["content"]

    again, _ = generate.run(GenerateConfig.model_validate(doc))
    assert (again.requested, again.reused, again.digest) == (0, 40, manifest.digest)


def test_offline_vllm_teacher_same_format(s3, bucket, tiny_model_dir, tmp_path):
    model_uri = f"s3://{bucket}/models/teacher"
    upload_dir(S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path")), tiny_model_dir, model_uri)
    doc = config_doc(
        s3, bucket, {"vllm": {"model": model_uri, "gpus": 0, "maxModelLen": 512, "dtype": "float32"}}, tmp_path
    )
    doc["offlineBatchSize"] = 16
    doc["speed"] = {"prompts": 4, "concurrency": 3}  # the teacher's speed, measured as evaluate measures the student
    config_file = tmp_path / "generate.yaml"
    config_file.write_text(yaml.safe_dump(doc))
    termination = tmp_path / "termination-log"
    env = {**os.environ, **s3.env(), **VLLM_CPU_ENV, "KUBEDISTILL_TERMINATION_LOG": str(termination)}

    done = subprocess.run(
        [sys.executable, "-m", "kubedistill.worker", "generate", "--config", str(config_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    manifest, records = read_dataset(s3, bucket)
    check_dataset(manifest, records, model_uri, by_id=True)
    summary = json.loads(termination.read_text())
    assert (summary["examples"], summary["requested"], summary["digest"]) == (40, 40, manifest.digest)

    # the ids are the teacher's: its tokenizer, saved beside the dataset, turns them back into the answers
    from transformers import AutoTokenizer

    assert manifest.teacher_tokenizer == "teacher-tokenizer"
    saved = tmp_path / "teacher-tokenizer"
    client = s3.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="run/dataset/teacher-tokenizer/")["Contents"]:
        (saved / obj["Key"].rsplit("/", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(saved / obj["Key"].rsplit("/", 1)[-1]))
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    for record in records:
        text = tokenizer.decode(decode(record.topk).ids, skip_special_tokens=True)  # type: ignore[arg-type]
        assert text == record.completion[0].content
    # An in-pod teacher's tokens are counted with its own tokenizer: the projection's prompt tokens
    # (tokenizer and chat template, before the model was loaded) are exactly what vLLM processed.
    spend = summary["spend"]
    assert spend["mode"] == "offline" and spend["projected"]["countedWith"] == "tokenizer"
    assert spend["projected"]["promptTokens"] == spend["spent"]["promptTokens"] == manifest.usage.prompt_tokens
    assert spend["spent"]["completionTokens"] == manifest.usage.completion_tokens
    assert spend["projected"]["completionTokens"] == 40 * 16 >= spend["spent"]["completionTokens"]
    # The estimate stage projects the same, from the tokenizer files alone.
    from kubedistill.worker import estimate

    fresh = {**doc, "answerStoreUri": f"s3://{bucket}/no-answers-yet"}
    assert estimate.main(GenerateConfig.model_validate(fresh))["projected"] == spend["projected"]

    # The teacher's speed, from vLLM's per-request metrics, on the eval prompts evaluate measures.
    teacher_speed = SpeedReport.model_validate(summary["teacherSpeed"])
    assert teacher_speed.engine == "vllm-offline" and teacher_speed.gpus == 0
    assert [(level.concurrency, level.requests) for level in teacher_speed.levels] == [(1, 4), (3, 4)]
    for level in teacher_speed.levels:
        assert 0 < level.ttft_p50 <= level.ttft_p95 and level.tokens_per_second_p50 > 0 and level.answers_per_second
    stored = s3.client().get_object(Bucket=bucket, Key="run/dataset/teacher-speed.json")["Body"].read()
    assert SpeedReport.model_validate_json(stored) == teacher_speed

    # The same model as the student: evaluate measures it the same way, and finds it about as fast.
    evaluate_doc = {
        "modelUri": str(tiny_model_dir), "datasetUri": f"s3://{bucket}/run/dataset",
        "reportUri": f"s3://{bucket}/run/report", "engine": "vllm", "maxModelLen": 512, "gpus": 0,
        "sampling": {"temperature": 0, "maxTokens": 16},
        "evaluation": {"speed": {"prompts": 4, "concurrency": 3}, "agreementMetric": "exactMatch"},
        "storage": doc["storage"], "workDir": str(tmp_path / "evaluate"),
    }  # fmt: skip
    evaluate_file = tmp_path / "evaluate.yaml"
    evaluate_file.write_text(yaml.safe_dump(evaluate_doc))
    done = subprocess.run(
        [sys.executable, "-m", "kubedistill.worker", "evaluate", "--config", str(evaluate_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(termination.read_text())
    speed = SpeedComparison.model_validate(result["speed"])
    assert speed.teacher == teacher_speed and speed.student is not None and speed.student.engine == "vllm-offline"
    assert [(level.concurrency, level.requests) for level in speed.student.levels] == [(1, 4), (3, 4)]
    # How close to 1 the ratios of one model against itself come is the bench's business (bench/cost_speed.py):
    # timings on a shared machine are not a test's. Here: every ratio is there, and they are consistent.
    assert speed.speedup > 0 and speed.ttft_speedup > 0 and speed.loaded_speedup > 0
    assert speed.cost_ratio == pytest.approx(speed.loaded_speedup, rel=0.01)  # same GPUs: GPU-seconds per answer
    assert result["teacherAgreement"] == 1.0  # greedy, same model, same prompts
    report = json.loads(s3.client().get_object(Bucket=bucket, Key="run/report/report.json")["Body"].read())
    assert report["speed"]["speedup"] == speed.speedup
    assert report["teacherSpend"] == spend  # the run report in the store says what the teacher cost
