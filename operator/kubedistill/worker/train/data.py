"""The teacher dataset as the train worker reads it: manifest, verified shards, trl records.

The generate worker writes ``manifest.json`` last (see ``kubedistill.api.dataset``);
its absence means the dataset is incomplete. Shards are copied once per node
into the scratch directory, each checked against its sha256 in the manifest,
and turned into trl's conversational prompt-completion records
(``{"prompt": [messages], "completion": [assistant message]}``): the format
SFTTrainer masks for completion-only loss without a custom collator.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubedistill.api.dataset import MANIFEST_NAME, DatasetManifest, DatasetRecord, Split
from kubedistill.storage.objectstore import ObjectStore, StorageError, join, sha256_file
from kubedistill.worker.common import WorkerError

log = logging.getLogger("kubedistill.worker.train")


def read_manifest(store: ObjectStore, dataset_uri: str) -> DatasetManifest:
    """The dataset's manifest; a clear error when generate has not finished or the file is not one."""
    uri = join(dataset_uri, MANIFEST_NAME)
    try:
        exists = store.exists(uri)
    except StorageError as err:
        raise WorkerError(f"cannot read dataset {dataset_uri}: {err}") from err
    if not exists:
        raise WorkerError(f"dataset {dataset_uri} is incomplete: no {MANIFEST_NAME} (has the generate stage finished?)")
    try:
        return DatasetManifest.model_validate_json(store.get_bytes(uri))
    except StorageError as err:
        raise WorkerError(f"cannot read dataset {dataset_uri}: {err}") from err
    except ValidationError as err:
        raise WorkerError(
            f"dataset manifest {uri} is not a kubedistill dataset manifest: {err.errors()[0]['msg']}"
        ) from err


def count_records(manifest: DatasetManifest, split: Split = "train") -> int:
    return sum(s.records for s in manifest.shards if s.split == split)


def check_not_empty(manifest: DatasetManifest, dataset_uri: str) -> None:
    """Pre-flight: there is something to train on."""
    if count_records(manifest, "train") == 0:
        raise WorkerError(
            f"dataset {dataset_uri} has no training examples "
            f"(train={manifest.counts.train}, failed={manifest.counts.failed}, malformed={manifest.counts.malformed})"
        )


def download_shards(
    store: ObjectStore, dataset_uri: str, manifest: DatasetManifest, dest: Path, split: Split
) -> list[Path]:
    """Copy the split's shards into ``dest`` (once: a verified local copy is reused)."""
    paths = []
    for shard in manifest.shards:
        if shard.split != split:
            continue
        local = dest / shard.path
        if not (local.is_file() and sha256_file(local) == shard.sha256):
            try:
                store.download_file(join(dataset_uri, shard.path), local)
            except StorageError as err:
                raise WorkerError(f"cannot read dataset shard: {err}") from err
            if sha256_file(local) != shard.sha256:
                local.unlink(missing_ok=True)
                raise WorkerError(
                    f"dataset shard {join(dataset_uri, shard.path)} is corrupt: its sha256 differs from the manifest"
                )
        paths.append(local)
    return paths


def to_trl_record(record: DatasetRecord) -> dict[str, Any]:
    """trl's conversational prompt-completion record (roles and contents only)."""
    return {
        "prompt": [{"role": m.role, "content": m.content} for m in record.prompt],
        "completion": [{"role": m.role, "content": m.content} for m in record.completion],
    }


def read_records(paths: list[Path], split: Split = "train") -> list[DatasetRecord]:
    """Every record of the given split in ``paths``, validated (shard order, line order)."""
    out = []
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = DatasetRecord.model_validate_json(line)
                except ValidationError as err:
                    raise WorkerError(
                        f"dataset shard {path.name} line {lineno} is not a dataset record: {err.errors()[0]['msg']}"
                    ) from err
                if record.split != split:
                    continue
                if len(record.completion) != 1 or record.completion[0].role != "assistant":
                    raise WorkerError(
                        f"dataset shard {path.name} line {lineno}: completion must be exactly one assistant message"
                    )
                if not record.prompt or record.prompt[-1].role != "user":
                    raise WorkerError(f"dataset shard {path.name} line {lineno}: prompt must end with a user message")
                out.append(record)
    return out


def load_train_records(
    store: ObjectStore, dataset_uri: str, manifest: DatasetManifest, dest: Path
) -> list[DatasetRecord]:
    """Download, verify and parse the training split (``to_trl_record`` makes trl's rows of them)."""
    paths = download_shards(store, dataset_uri, manifest, dest, "train")
    records = read_records(paths, "train")
    if not records:
        raise WorkerError(f"dataset {dataset_uri} has no training examples in its shards")
    log.info("dataset %s: %d training examples (digest %s)", dataset_uri, len(records), manifest.digest[:12])
    return records


def dump_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """Plain trl records as JSONL (what ``trl sft --dataset_name DIR`` reads; used by the bench)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
