"""Writing the dataset: JSONL shards, failures.jsonl, then manifest.json (last: it means "complete").

Shards are filled locally and uploaded as soon as they are full, so local disk
holds at most one shard per split. Records come in input order, so the same
inputs and answers give byte-identical shards and the same digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from kubedistill.api.dataset import (
    FAILURES_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    DatasetCounts,
    DatasetManifest,
    DatasetRecord,
    FailureRecord,
    ShardInfo,
    Split,
    Usage,
    dataset_digest,
)
from kubedistill.storage.objectstore import ObjectStore, join, sha256_file


@dataclass
class _OpenShard:
    split: Split
    index: int
    path: Path
    handle: IO[bytes]
    records: int = 0


@dataclass
class DatasetWriter:
    store: ObjectStore
    output_uri: str
    work_dir: Path
    shard_records: int = 10000
    shards: list[ShardInfo] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._open: dict[Split, _OpenShard] = {}
        self._next_index: dict[Split, int] = {"train": 0, "eval": 0}
        self._failures: _OpenShard | None = None
        self._failure_count = 0
        self._key_hash = hashlib.sha256()

    def begin(self) -> None:
        """A dataset prefix without manifest is incomplete: say so before touching shards."""
        self.store.delete(join(self.output_uri, MANIFEST_NAME))

    def add(self, record: DatasetRecord) -> None:
        shard = self._open.get(record.split)
        if shard is None:
            index = self._next_index[record.split]
            self._next_index[record.split] += 1
            path = self.work_dir / f"{record.split}-{index:05d}.jsonl"
            shard = self._open[record.split] = _OpenShard(record.split, index, path, path.open("wb"))
        shard.handle.write(record.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n")
        shard.records += 1
        self.usage = self.usage + record.usage
        self._key_hash.update(f"{record.key} {record.split}\n".encode())
        if shard.records >= self.shard_records:
            self._close(shard)

    def add_failure(self, failure: FailureRecord) -> None:
        if self._failures is None:
            path = self.work_dir / FAILURES_NAME
            self._failures = _OpenShard("train", 0, path, path.open("wb"))
        self._failures.handle.write(failure.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n")
        self._failure_count += 1

    def _close(self, shard: _OpenShard) -> None:
        shard.handle.close()
        del self._open[shard.split]
        rel = f"{SHARDS_DIR}/{shard.path.name}"
        self.store.upload_file(shard.path, join(self.output_uri, rel))
        self.shards.append(
            ShardInfo(path=rel, split=shard.split, records=shard.records, sha256=sha256_file(shard.path))
        )
        shard.path.unlink()

    def write_failures(self) -> str | None:
        """Upload failures.jsonl (when there is any); returns its relative path."""
        if self._failures is None:
            return None
        self._failures.handle.close()
        self.store.upload_file(self._failures.path, join(self.output_uri, FAILURES_NAME))
        return FAILURES_NAME

    def finish(
        self, *, teacher_model: str, counts: DatasetCounts, settings_digest: str, teacher_tokenizer: str | None = None
    ) -> DatasetManifest:
        for shard in list(self._open.values()):
            self._close(shard)
        failures = self.write_failures()
        shards = sorted(self.shards, key=lambda s: (s.split != "train", s.path))
        manifest = DatasetManifest(
            dataset_key=hashlib.sha256(f"{settings_digest}\n".encode() + self._key_hash.digest()).hexdigest(),
            teacher_model=teacher_model,
            shards=shards,
            counts=counts,
            usage=self.usage,
            digest=dataset_digest(shards),
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            failures=failures,
            teacher_tokenizer=teacher_tokenizer,
        )
        body = json.dumps(manifest.to_wire(), indent=2, sort_keys=True).encode() + b"\n"
        self.store.put_bytes(join(self.output_uri, MANIFEST_NAME), body, content_type="application/json")
        return manifest
