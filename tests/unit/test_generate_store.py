"""generate: the answer store (batches, index, first copy wins) and the dataset writer (local backend)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from kubedistill.api.dataset import DatasetCounts, DatasetManifest, DatasetRecord, Message, dataset_digest
from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.storage.objectstore import LocalStore
from kubedistill.worker.teacher.endpoint import EndpointClient
from kubedistill.worker.teacher.limits import RateLimits
from kubedistill.worker.teacher.store import Answer, AnswerStore
from kubedistill.worker.teacher.writer import DatasetWriter
from kubedistill.worker.topk import decode, encode, from_strings


def make_store(tmp_path, **kw):
    return AnswerStore.for_partition(LocalStore(), str(tmp_path / "answers"), "abc", **kw)


def test_answers_flush_in_batches_and_load_back(tmp_path):
    store = make_store(tmp_path, flush_every=3, flush_seconds=3600)
    assert not store.add([Answer("k1", "a1"), Answer("k2", "a2")])
    compact = encode(from_strings([("a", -0.1)], [[("a", -0.1), ("b", -2.5)]], 2))
    assert store.add([Answer("k3", "a3", topk=compact)])
    assert store.flush() == 3
    store.add([Answer("k4", "a4", finish_reason="length", prompt_tokens=5, completion_tokens=7)])
    assert store.flush() == 1
    assert store.flush() == 0
    batches = sorted((tmp_path / "answers" / "v1" / "abc").glob("batch-*.jsonl"))
    assert len(batches) == 2

    again = make_store(tmp_path)
    assert again.load() == 4
    assert again.get("k4") == Answer("k4", "a4", "length", 5, 7, None)
    assert again.get("k3").topk == compact
    assert "k1" in again and "nope" not in again


class GatedStore(LocalStore):
    """A store whose PUTs wait until the test opens the gate: a write still queued or running."""

    def __init__(self):
        self.gate = threading.Event()

    def put_bytes(self, uri, data, content_type=None):
        self.gate.wait(10)
        super().put_bytes(uri, data, content_type)


async def test_a_cancelled_flush_still_writes_its_batch(tmp_path):
    """Shutdown cancels the flusher mid-PUT: the answers already taken from the buffer must land."""
    backend = GatedStore()
    store = AnswerStore.for_partition(backend, str(tmp_path / "answers"), "abc", flush_every=2)
    store.add([Answer("k1", "a1"), Answer("k2", "a2")])
    flusher = asyncio.create_task(store.aflush())
    await asyncio.sleep(0.05)  # the batch has left the buffer; its PUT waits at the gate
    assert store.pending == 0
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    backend.gate.set()
    assert await store.aflush() == 0  # nothing new, but it waits for the orphaned write
    assert make_store(tmp_path).load() == 2


def test_flush_is_due_after_flush_seconds(tmp_path):
    store = make_store(tmp_path, flush_every=100, flush_seconds=0.05)
    assert not store.add([Answer("k1", "a")])
    time.sleep(0.06)
    assert store.flush_due()


def test_first_copy_of_a_key_wins_and_torn_lines_are_skipped(tmp_path):
    part = tmp_path / "answers" / "v1" / "abc"
    part.mkdir(parents=True)
    (part / "batch-1.jsonl").write_bytes(Answer("k", "first").to_line() + b'{"key": "torn", "cont')
    (part / "batch-2.jsonl").write_bytes(Answer("k", "second").to_line() + Answer("j", "x").to_line())
    store = make_store(tmp_path)
    assert store.load() == 2
    assert store.get("k").content == "first"
    assert store.stats.unreadable_lines == 1


def test_other_partitions_are_not_loaded(tmp_path):
    other = AnswerStore.for_partition(LocalStore(), str(tmp_path / "answers"), "zzz")
    other.add([Answer("k", "x")])
    other.flush()
    assert make_store(tmp_path).load() == 0


def record(i, split):
    return DatasetRecord(
        key=f"k{i}",
        split=split,
        prompt=[Message(role="user", content=f"q{i}")],
        completion=[Message(role="assistant", content=f"a{i}")],
    )


def write(tmp_path, name):
    out = tmp_path / name
    writer = DatasetWriter(LocalStore(), str(out), tmp_path / f"work-{name}", shard_records=2)
    writer.begin()
    for i in range(5):
        writer.add(record(i, "eval" if i == 3 else "train"))
    manifest = writer.finish(teacher_model="t", counts=DatasetCounts(prompts=5, train=4, eval=1), settings_digest="s")
    return out, manifest


def test_writer_shards_manifest_last_and_deterministic(tmp_path):
    out, manifest = write(tmp_path, "a")
    assert [(s.path, s.records) for s in manifest.shards] == [
        ("shards/train-00000.jsonl", 2), ("shards/train-00001.jsonl", 2), ("shards/eval-00000.jsonl", 1),
    ]  # fmt: skip
    assert manifest.digest == dataset_digest(manifest.shards)
    on_disk = DatasetManifest.model_validate(json.loads((out / "manifest.json").read_text()))
    assert on_disk == manifest
    lines = (out / "shards" / "train-00000.jsonl").read_text().splitlines()
    assert DatasetRecord.model_validate_json(lines[0]) == record(0, "train")
    _, again = write(tmp_path, "b")
    assert (again.digest, again.dataset_key) == (manifest.digest, manifest.dataset_key)


def test_api_key_is_scrubbed_from_error_text():
    spec = TeacherSpec.model_validate({"endpoint": {"baseURL": "http://t/v1", "model": "m"}})
    client = EndpointClient(spec, "sk-supersecret-123456", RateLimits())
    assert "supersecret" not in client._scrub("Incorrect API key provided: sk-supersecret-123456")
    assert "sk-other" not in client._scrub("bad key sk-otherkey12345")


def test_answers_stored_before_the_compact_format_still_load(tmp_path):
    """A batch written by an earlier version: verbose logprobs, and an answer without any."""
    old_lines = [
        {
            "key": "old",
            "content": "Paris",
            "finishReason": "stop",
            "usage": {"promptTokens": 9, "completionTokens": 1},
            "logprobs": [{"token": " Paris", "logprob": -0.05, "top": {" Paris": -0.05, " Lyon": -3.2}}],
        },
        {"key": "plain", "content": "hi", "finishReason": "stop", "usage": {"promptTokens": 1, "completionTokens": 1}},
    ]
    folder = tmp_path / "answers" / "v1" / "abc"
    folder.mkdir(parents=True)
    batch = folder / "batch-20250101T000000000000Z-old-000000.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in old_lines))
    store = make_store(tmp_path)
    assert store.load() == 2
    plain = store.get("plain")
    assert plain is not None and plain.topk is None and plain.content == "hi"
    old = store.get("old")
    assert old is not None and old.topk is not None and (old.prompt_tokens, old.completion_tokens) == (9, 1)
    dist = decode(old.topk)
    assert dist.tokens() == [" Paris"] and [dist.table[i] for i in dist.top_ids[0]] == [" Paris", " Lyon"]
    assert abs(float(dist.top_logprobs[0, 1]) - -3.2) < 2e-3
    assert store.get("old").topk == old.topk  # converted the same way every time: the dataset digest holds
