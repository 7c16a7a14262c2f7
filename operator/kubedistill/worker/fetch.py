"""fetch: copy an exported model prefix into a local directory and verify it.

    kubedistill-worker fetch --config /etc/kubedistill/fetch.yaml

    # fetch.yaml
    modelUri: s3://bucket/runs/abc/model
    destination: /models/student
    digest: 3f5a...           # optional: refuse anything else

The serving pod's init container runs this before vLLM starts. The train
worker uses the same code to bring an ``s3://`` student into its scratch
directory.

A model prefix written by the train worker holds ``kubedistill.json`` (written
last) listing every file with its sha256 and the model digest: the sha256 over
the sorted ``name NUL sha256 LF`` lines of those files. Fetch recomputes each
file's sha256 and the digest, and fails on any difference. A prefix without
``kubedistill.json`` (a model someone uploaded by hand) is copied and its digest
computed the same way, so a DistilledModel may pin it.

The destination is usually a volume that outlives a restarted init container:
a marker (``.kubedistill-fetched``) records what was fetched, and a second run
with the same listing does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import FetchConfig, FetchResult
from kubedistill.storage.objectstore import (
    ObjectInfo,
    ObjectStore,
    StorageError,
    open_store,
    sha256_file,
)
from kubedistill.worker.common import WorkerError

CONFIG = FetchConfig
METADATA_NAME = "kubedistill.json"
FETCHED_MARKER = ".kubedistill-fetched"
log = logging.getLogger("kubedistill.worker.fetch")


def model_digest(files: dict[str, str]) -> str:
    """The digest of a model: sha256 over ``name NUL sha256 LF`` of its files, sorted by name.

    ``kubedistill.json`` is not part of it (it records the digest itself).
    """
    digest = hashlib.sha256()
    for name in sorted(files):
        if name == METADATA_NAME:
            continue
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, by '/'-separated relative path; hidden top-level markers skipped."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".kubedistill-") or rel.startswith(".tmp-"):
            continue
        out[rel] = sha256_file(path)
    return out


@dataclass(frozen=True)
class FetchedModel:
    """A model prefix copied into a local directory and verified."""

    path: Path
    digest: str
    files: dict[str, str]
    metadata: dict[str, Any] | None
    bytes: int
    reused: bool


def _listing_key(objects: list[ObjectInfo]) -> list[list[Any]]:
    return [[o.key, o.size] for o in sorted(objects, key=lambda o: o.key)]


def _read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((dest / FETCHED_MARKER).read_text())
        return data
    except (OSError, ValueError):
        return None


def _reusable(dest: Path, uri: str, objects: list[ObjectInfo]) -> dict[str, Any] | None:
    """The marker of an earlier fetch of the same listing whose files are all still there, else None."""
    marker = _read_marker(dest)
    if not marker or marker.get("uri") != uri or marker.get("listing") != _listing_key(objects):
        return None
    for obj in objects:
        path = dest / obj.key
        if not path.is_file() or path.stat().st_size != obj.size:
            return None
    return marker


def fetch_model(
    store: ObjectStore,
    uri: str,
    dest: Path,
    expected_digest: str | None = None,
) -> FetchedModel:
    """Copy every object under ``uri`` into ``dest`` and verify it (see module docstring).

    Raises WorkerError with a one-line reason when the prefix is empty, a file
    differs from its recorded sha256, or the digest is not ``expected_digest``.
    """
    try:
        objects = [o for o in store.list(uri) if not o.key.startswith(".")]
    except StorageError as err:
        raise WorkerError(f"cannot list model {uri}: {err}") from err
    if not objects:
        raise WorkerError(f"model {uri} is empty: no objects under that prefix")
    if not any(o.key in ("config.json", "adapter_config.json") for o in objects):
        raise WorkerError(f"model {uri} has no config.json (nor adapter_config.json): not a model directory")

    dest.mkdir(parents=True, exist_ok=True)
    marker = _reusable(dest, uri, objects)
    if marker is not None:
        digest = marker["digest"]
        if expected_digest and digest != expected_digest:
            raise WorkerError(f"model {uri} has digest {digest}, expected {expected_digest}")
        log.info("model %s already in %s (digest %s)", uri, dest, digest[:12])
        return FetchedModel(dest, digest, marker["files"], marker.get("metadata"), marker["bytes"], reused=True)

    (dest / FETCHED_MARKER).unlink(missing_ok=True)
    # Download next to the destination, then move into place file by file: a
    # half-fetched file never sits under its final name.
    staging = Path(tempfile.mkdtemp(prefix=".kubedistill-staging-", dir=dest))
    try:
        for obj in objects:
            store.download_file(obj.uri, staging / obj.key)
            if (staging / obj.key).stat().st_size != obj.size:
                raise WorkerError(f"model file {obj.uri} changed while it was being fetched (size differs)")
        files = hash_tree(staging)
        metadata = _verify_against_metadata(uri, staging, files)
        digest = model_digest(files)
        if expected_digest and digest != expected_digest:
            raise WorkerError(f"model {uri} has digest {digest}, expected {expected_digest}")
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
    except StorageError as err:
        raise WorkerError(f"cannot fetch model {uri}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    total = sum(o.size for o in objects)
    marker = {
        "uri": uri,
        "digest": digest,
        "files": files,
        "metadata": metadata,
        "bytes": total,
        "listing": _listing_key(objects),
    }
    (dest / FETCHED_MARKER).write_text(json.dumps(marker, sort_keys=True))
    log.info("fetched %s into %s: %d files, %d bytes, digest %s", uri, dest, len(files), total, digest[:12])
    return FetchedModel(dest, digest, files, metadata, total, reused=False)


def _verify_against_metadata(uri: str, root: Path, files: dict[str, str]) -> dict[str, Any] | None:
    """Check the files against kubedistill.json when the prefix has one; return its content."""
    meta_path = root / METADATA_NAME
    if not meta_path.is_file():
        return None
    try:
        metadata: dict[str, Any] = json.loads(meta_path.read_text())
    except ValueError as err:
        raise WorkerError(f"model {uri}: {METADATA_NAME} is not valid JSON: {err}") from err
    recorded: dict[str, str] = metadata.get("files") or {}
    missing = sorted(set(recorded) - set(files))
    if missing:
        raise WorkerError(f"model {uri} is incomplete: missing {', '.join(missing[:5])}")
    for name, sha in recorded.items():
        if files[name] != sha:
            raise WorkerError(f"model {uri} is corrupt: {name} does not match its sha256 in {METADATA_NAME}")
    extra = sorted(set(files) - set(recorded) - {METADATA_NAME})
    if extra:
        raise WorkerError(f"model {uri} holds files not listed in {METADATA_NAME}: {', '.join(extra[:5])}")
    if metadata.get("digest") and metadata["digest"] != model_digest(files):
        raise WorkerError(f"model {uri} is corrupt: its digest differs from the one in {METADATA_NAME}")
    return metadata


def main(config: FetchConfig) -> dict[str, Any]:
    store = open_store(config.model_uri, config.storage)
    fetched = fetch_model(store, config.model_uri.rstrip("/"), Path(config.destination), config.digest)
    return FetchResult(
        model_uri=config.model_uri,
        destination=str(fetched.path),
        digest=fetched.digest,
        files=len(fetched.files),
        bytes=fetched.bytes,
        reused=fetched.reused,
    ).to_wire()


__all__ = ["CONFIG", "METADATA_NAME", "FetchedModel", "fetch_model", "hash_tree", "main", "model_digest"]
