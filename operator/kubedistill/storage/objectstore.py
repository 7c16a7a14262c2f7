"""One small object-store interface over S3 (boto3) and the local filesystem.

Workers address everything by URI: ``s3://bucket/key`` in a cluster, a plain
path (or ``file://``) in local mode and tests. ``open_store(uri)`` picks the
backend, so worker code never branches on where its data lives.

S3 credentials come from the standard AWS environment variables (the pod gets
them from a Secret via ``secretKeyRef``); only the endpoint, region and
addressing style travel in configs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubedistill.api.worker_config import StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # pragma: no cover


@dataclass(frozen=True)
class ObjectInfo:
    """An object under a listed prefix."""

    uri: str
    key: str  # relative to the listed prefix, '/'-separated
    size: int


class StorageError(RuntimeError):
    """An object could not be read or written; the message says which and why."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with exactly one '/' between them."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


class ObjectStore(Protocol):
    """What workers need from storage; both backends implement it."""

    def get_bytes(self, uri: str) -> bytes: ...
    def put_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]: ...
    def download_file(self, uri: str, path: Path) -> None: ...
    def upload_file(self, path: Path, uri: str) -> None: ...
    def delete(self, uri: str) -> None: ...


class LocalStore:
    """A directory tree that behaves like a bucket. Writes are atomic (temp file + rename)."""

    def get_bytes(self, uri: str) -> bytes:
        try:
            return local_path(uri).read_bytes()
        except OSError as err:
            raise StorageError(f"cannot read {uri}: {err.strerror or err}") from err

    def put_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        root = local_path(prefix_uri)
        if not root.is_dir():
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")):
            rel = path.relative_to(root).as_posix()
            yield ObjectInfo(uri=join(prefix_uri, rel), key=rel, size=path.stat().st_size)

    def download_file(self, uri: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(local_path(uri), path)
        except OSError as err:
            raise StorageError(f"cannot read {uri}: {err.strerror or err}") from err

    def upload_file(self, path: Path, uri: str) -> None:
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)


class S3Store:
    """boto3-backed store; retries are botocore's (adaptive mode), multipart is boto3's transfer manager."""

    def __init__(self, settings: StorageSettings, client: S3Client | None = None) -> None:
        self._client = client or make_s3_client(settings)

    @property
    def client(self) -> S3Client:
        return self._client

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        try:
            body: bytes = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body
        except Exception as err:  # botocore raises many types; all mean "could not read"
            raise StorageError(f"cannot read {uri}: {_describe(err)}") from err

    def put_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        bucket, key = split_s3(uri)
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except Exception as err:
            raise StorageError(f"cannot write {uri}: {_describe(err)}") from err

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            if _status(err) in (404, 403) or _code(err) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check {uri}: {_describe(err)}") from err

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        bucket, prefix = split_s3(prefix_uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    yield ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", key=rel, size=obj["Size"])
        except Exception as err:
            raise StorageError(f"cannot list {prefix_uri}: {_describe(err)}") from err

    def download_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            self._client.download_file(bucket, key, str(tmp))
        except Exception as err:
            raise StorageError(f"cannot download {uri}: {_describe(err)}") from err
        os.replace(tmp, path)

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self._client.upload_file(str(path), bucket, key)
        except Exception as err:
            raise StorageError(f"cannot upload {path} to {uri}: {_describe(err)}") from err

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._client.delete_object(Bucket=bucket, Key=key)


def make_s3_client(settings: StorageSettings) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        retries={"max_attempts": 8, "mode": "adaptive"},
        s3={"addressing_style": settings.addressing_style},
        # Recent botocore adds CRC checksums by default; several S3-compatible
        # stores reject them, so only send them where the operation needs one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client("s3", endpoint_url=settings.endpoint, config=config)


def open_store(uri: str, settings: StorageSettings | None = None) -> ObjectStore:
    """The store that holds ``uri``: S3 for ``s3://``, the filesystem otherwise."""
    if is_s3(uri):
        return S3Store(settings or StorageSettings())
    return LocalStore()


def download_prefix(store: ObjectStore, prefix_uri: str, dest: Path) -> list[Path]:
    """Copy every object under a prefix into ``dest``, keeping relative paths."""
    paths = []
    for obj in store.list(prefix_uri):
        target = dest / obj.key
        store.download_file(obj.uri, target)
        paths.append(target)
    return paths


def upload_dir(store: ObjectStore, src: Path, prefix_uri: str) -> list[str]:
    """Copy every file below ``src`` under a prefix, keeping relative paths."""
    uris = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        uri = join(prefix_uri, path.relative_to(src).as_posix())
        store.upload_file(path, uri)
        uris.append(uri)
    return uris


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _code(err: Exception) -> str | None:
    response = getattr(err, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def _describe(err: Exception) -> str:
    code = _code(err)
    return f"{code}: {err}" if code else f"{type(err).__name__}: {err}"
