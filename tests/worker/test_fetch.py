"""fetch against a real S3-compatible server: what the serving pod's init container does."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from kubedistill.api.worker_config import StorageSettings
from kubedistill.storage.objectstore import S3Store
from kubedistill.worker import common
from kubedistill.worker.__main__ import run_stage
from kubedistill.worker.train.export import publish, write_metadata
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = pytest.mark.worker


@pytest.fixture
def exported(s3, tmp_path, tmp_path_factory, monkeypatch):
    """A model published the way the train worker publishes it (files, then kubedistill.json)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    src = tmp_path / "export"
    shutil.copytree(cached_tiny_chat_model(tmp_path_factory.getbasetemp()), src)
    _, digest = write_metadata(src, base_model="tiny", export="merged")
    bucket = s3.make_bucket()
    uri = f"s3://{bucket}/runs/r1/model"
    store = S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())
    # an earlier export's leftovers are removed by publish
    store.put_bytes(f"{uri}/stale.bin", b"old")
    publish(store, src, uri)
    return uri, digest, bucket


def fetch(s3, tmp_path, uri, digest=None, dest="model"):
    doc = {
        "modelUri": uri,
        "destination": str(tmp_path / dest),
        "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
    }
    if digest:
        doc["digest"] = digest
    path = tmp_path / "fetch.yaml"
    path.write_text(yaml.safe_dump(doc))
    return run_stage("fetch", str(path)), (tmp_path / "termination-log").read_text()


def test_fetch_verifies_and_reports_the_digest(s3, tmp_path, exported):
    uri, digest, bucket = exported
    assert "runs/r1/model/stale.bin" not in {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    rc, message = fetch(s3, tmp_path, uri, digest)
    assert rc == 0, message
    result = json.loads(message)
    assert result == {
        "modelUri": uri,
        "destination": str(tmp_path / "model"),
        "digest": digest,
        "files": result["files"],
        "bytes": result["bytes"],
        "reused": False,
    }
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "model" / "chat_template.jinja").is_file()

    # the init container restarted: nothing is downloaded again
    rc, message = fetch(s3, tmp_path, uri, digest)
    assert rc == 0 and json.loads(message)["reused"] is True


def test_fetch_refuses_another_digest(s3, tmp_path, exported):
    uri, _, _ = exported
    rc, message = fetch(s3, tmp_path, uri, "0" * 64)
    assert rc == common.EXIT_FAILED
    assert message.endswith(f"expected {'0' * 64}")


def test_fetch_refuses_a_tampered_object(s3, tmp_path, exported):
    uri, digest, bucket = exported
    s3.client().put_object(Bucket=bucket, Key="runs/r1/model/config.json", Body=b"{}")
    rc, message = fetch(s3, tmp_path, uri, digest)
    assert rc == common.EXIT_FAILED
    assert message == f"model {uri} is corrupt: config.json does not match its sha256 in kubedistill.json"


def test_fetch_of_a_missing_prefix(s3, tmp_path, exported):
    _, _, bucket = exported
    rc, message = fetch(s3, tmp_path, f"s3://{bucket}/nothing/here")
    assert rc == common.EXIT_FAILED
    assert message == f"model s3://{bucket}/nothing/here is empty: no objects under that prefix"
