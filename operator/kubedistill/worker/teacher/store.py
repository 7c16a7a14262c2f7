"""The answer store: every teacher answer, durably, as soon as it arrives.

S3 has no append, and one object per answer means millions of PUTs (money,
and ~10-30 ms each). So answers are buffered and written as small JSONL
*batch* objects, flushed when ``flush_every`` answers are waiting or
``flush_seconds`` after the oldest unflushed one, at the end of a run and on
SIGTERM::

    <answerStoreUri>/v1/<settings digest>/batch-<utc time>-<run id>-<seq>.jsonl

A line holds the answer's key (keys.answer_key) and the answer, nothing else:
the store is content-addressed and shared by every run of a job, so an edited
job that keeps its teacher, sampling and prompts finds its answers here. The
settings digest partitions the store so a run loads only answers that can
match it.

What a SIGKILL can cost: answers received but not yet flushed (at most
``flush_every`` answers or ``flush_seconds`` of them) plus the requests in
flight. They are asked again on restart; everything already flushed never is.

Batches are never rewritten; a key found twice (two runs racing) keeps the
first by object name, which sorts by time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubedistill.storage.objectstore import ObjectStore, StorageError, join
from kubedistill.worker.common import WorkerError

STORE_FORMAT = "v1"
log = logging.getLogger("kubedistill.worker.generate")


@dataclass
class Answer:
    """One teacher answer for one (prompt, sample) key."""

    key: str
    content: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    topk: str | None = None  # the teacher's top-k logprobs per answer token, compact (worker/topk.py)

    def to_line(self) -> bytes:
        doc: dict[str, Any] = {"key": self.key, "content": self.content, "finishReason": self.finish_reason}
        doc["usage"] = {"promptTokens": self.prompt_tokens, "completionTokens": self.completion_tokens}
        if self.topk is not None:
            doc["topk"] = self.topk
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Answer:
        doc = json.loads(line)
        usage = doc.get("usage") or {}
        topk = doc.get("topk")
        if topk is None and doc.get("logprobs"):
            # stored before the compact format: [{token, logprob, top}], converted the same way every time
            from kubedistill.worker.topk import encode, from_verbose

            topk = encode(from_verbose(doc["logprobs"]))
        return cls(
            key=doc["key"],
            content=doc["content"],
            finish_reason=doc.get("finishReason"),
            prompt_tokens=int(usage.get("promptTokens", 0)),
            completion_tokens=int(usage.get("completionTokens", 0)),
            topk=topk,
        )


@dataclass
class StoreStats:
    batches_loaded: int = 0
    answers_loaded: int = 0
    batches_written: int = 0
    answers_written: int = 0
    unreadable_lines: int = 0
    write_seconds: float = 0.0


@dataclass
class AnswerStore:
    """Buffered, batch-flushed, content-addressed answers under one settings partition.

    ``answers`` maps key -> the stored line (bytes, parsed only when the dataset
    is written: a million parsed dicts cost several times more memory).
    """

    store: ObjectStore
    prefix: str  # <answerStoreUri>/v1/<settings digest>
    flush_every: int = 500
    flush_seconds: float = 5.0
    answers: dict[str, bytes] = field(default_factory=dict)
    stats: StoreStats = field(default_factory=StoreStats)

    def __post_init__(self) -> None:
        self._run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._buffer: list[bytes] = []
        self._oldest: float | None = None
        self._write_lock = threading.Lock()  # one batch PUT at a time keeps names ordered
        self._async_lock: asyncio.Lock | None = None
        self._unsettled: list[asyncio.Future[None]] = []

    @classmethod
    def for_partition(cls, store: ObjectStore, store_uri: str, settings_digest: str, **kwargs: Any) -> AnswerStore:
        return cls(store=store, prefix=join(store_uri, STORE_FORMAT, settings_digest), **kwargs)

    # ------------------------------------------------------------------ reading

    def load(self, threads: int = 16) -> int:
        """Read every batch of the partition into ``answers``; returns how many answers were found."""
        try:
            batches = sorted(
                (obj for obj in self.store.list(self.prefix) if obj.key.endswith(".jsonl")), key=lambda o: o.key
            )
        except StorageError as err:
            raise WorkerError(f"cannot list the answer store: {err}") from err
        with ThreadPoolExecutor(max_workers=threads) as pool:
            blobs = pool.map(lambda obj: self.store.get_bytes(obj.uri), batches)
            try:
                for blob in blobs:  # in name order: the first copy of a key wins
                    self._index(blob)
                    self.stats.batches_loaded += 1
            except StorageError as err:
                raise WorkerError(f"cannot read the answer store: {err}") from err
        self.stats.answers_loaded = len(self.answers)
        return len(self.answers)

    def _index(self, blob: bytes) -> None:
        for line in blob.splitlines():
            if not line.strip():
                continue
            try:
                key = json.loads(line)["key"]
            except (ValueError, KeyError, TypeError):
                # A torn or foreign line is skipped: at worst that answer is asked again.
                self.stats.unreadable_lines += 1
                continue
            self.answers.setdefault(key, line)

    def get(self, key: str) -> Answer | None:
        line = self.answers.get(key)
        return None if line is None else Answer.from_line(line)

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    # ------------------------------------------------------------------ writing

    def add(self, answers: Iterable[Answer]) -> bool:
        """Buffer answers (visible to ``get`` at once); True when a flush is due."""
        for answer in answers:
            line = answer.to_line()
            if answer.key in self.answers:
                continue
            self.answers[answer.key] = line.rstrip(b"\n")
            self._buffer.append(line)
            if self._oldest is None:
                self._oldest = time.monotonic()
        return self.flush_due()

    def flush_due(self) -> bool:
        if not self._buffer:
            return False
        return len(self._buffer) >= self.flush_every or time.monotonic() - (self._oldest or 0) >= self.flush_seconds

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _take(self) -> tuple[str, bytes, int] | None:
        if not self._buffer:
            return None
        lines, self._buffer, self._oldest = self._buffer, [], None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"batch-{stamp}-{self._run_id}-{self._seq:06d}.jsonl"
        self._seq += 1
        return join(self.prefix, name), b"".join(lines), len(lines)

    def _write(self, uri: str, data: bytes, count: int) -> None:
        start = time.monotonic()
        with self._write_lock:
            try:
                self.store.put_bytes(uri, data, content_type="application/x-ndjson")
            except StorageError as err:
                # Nothing is gained by paying for answers that cannot be kept.
                raise WorkerError(f"cannot write teacher answers to the answer store: {err}") from err
        self.stats.batches_written += 1
        self.stats.answers_written += count
        self.stats.write_seconds += time.monotonic() - start

    def flush(self) -> int:
        """Write buffered answers now (blocking); returns how many were written."""
        batch = self._take()
        if batch is None:
            return 0
        self._write(*batch)
        return batch[2]

    async def aflush(self) -> int:
        """``flush`` without blocking the event loop: the PUT runs in a thread.

        Once answers leave the buffer their PUT must happen, even if the caller is
        cancelled (the run shutting down): cancelling ``to_thread`` before the executor
        starts it would drop the batch silently. So the PUT is shielded, and the next
        ``aflush`` first waits for writes whose caller went away (raising their errors).
        """
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            await self._settle()
            batch = self._take()
            if batch is None:
                return 0
            write = asyncio.ensure_future(asyncio.to_thread(self._write, *batch))
            self._unsettled.append(write)
            await asyncio.shield(write)
            self._unsettled.remove(write)
            return batch[2]

    async def _settle(self) -> None:
        while self._unsettled:
            await self._unsettled[0]
            self._unsettled.pop(0)
