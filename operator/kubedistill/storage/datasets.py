"""Reading a teacher dataset (see api/dataset.py for the layout).

The generate worker writes; train and evaluate read through here, so shard
verification and the "manifest.json means complete" rule live in one place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from pydantic import ValidationError

from kubedistill.api.dataset import MANIFEST_NAME, DatasetManifest, DatasetRecord, Split
from kubedistill.storage.objectstore import ObjectStore, StorageError, join


class DatasetError(RuntimeError):
    """The dataset is missing, incomplete or corrupt; the message says which."""


def read_manifest(store: ObjectStore, dataset_uri: str) -> DatasetManifest:
    uri = join(dataset_uri, MANIFEST_NAME)
    try:
        raw = store.get_bytes(uri)
    except StorageError as err:
        raise DatasetError(
            f"no dataset manifest at {uri} (the generate stage writes it last; is the dataset complete?): {err}"
        ) from err
    try:
        return DatasetManifest.model_validate_json(raw)
    except ValidationError as err:
        raise DatasetError(f"dataset manifest {uri} is not valid: {err.errors()[0]['msg']}") from err


def iter_records(
    store: ObjectStore, dataset_uri: str, manifest: DatasetManifest, split: Split | None = None
) -> Iterator[DatasetRecord]:
    """Records of one split (or all), shard by shard, each shard checked against its digest."""
    for shard in manifest.shards:
        if split is not None and shard.split != split:
            continue
        uri = join(dataset_uri, shard.path)
        data = store.get_bytes(uri)
        if hashlib.sha256(data).hexdigest() != shard.sha256.removeprefix("sha256:"):
            raise DatasetError(f"shard {uri} does not match its digest in the manifest: the dataset is corrupt")
        for number, line in enumerate(data.decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield DatasetRecord.model_validate(json.loads(line))
            except (ValueError, ValidationError) as err:
                raise DatasetError(f"{uri} line {number} is not a dataset record: {err}") from err


def load_records(
    store: ObjectStore, dataset_uri: str, split: Split | None = None
) -> tuple[DatasetManifest, list[DatasetRecord]]:
    manifest = read_manifest(store, dataset_uri)
    return manifest, list(iter_records(store, dataset_uri, manifest, split))
