"""fetch (also how the train worker brings in an s3:// student) on the local store: digest, verification, reuse."""

from __future__ import annotations

import json
import re

import pytest

from kubedistill.api.worker_config import FetchConfig
from kubedistill.storage.objectstore import LocalStore
from kubedistill.worker import fetch
from kubedistill.worker.common import WorkerError


def make_model(root, with_metadata=True):
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(b"\x00" * 100)
    (root / "sub").mkdir()
    (root / "sub" / "extra.txt").write_text("extra")
    files = fetch.hash_tree(root)
    digest = fetch.model_digest(files)
    if with_metadata:
        (root / fetch.METADATA_NAME).write_text(json.dumps({"files": files, "digest": digest}))
    return digest


def test_digest_is_over_names_and_contents():
    a = fetch.model_digest({"a": "1", "b": "2"})
    assert a == fetch.model_digest({"b": "2", "a": "1"})
    assert a == fetch.model_digest({"a": "1", "b": "2", fetch.METADATA_NAME: "x"})
    assert a != fetch.model_digest({"a": "1", "c": "2"})
    assert a != fetch.model_digest({"a": "1", "b": "3"})


def test_fetch_copies_verifies_and_reuses(tmp_path):
    digest = make_model(tmp_path / "src")
    result = fetch.main(FetchConfig(model_uri=str(tmp_path / "src"), destination=str(tmp_path / "dst"), digest=digest))
    assert result["digest"] == digest and result["files"] == 4 and result["reused"] is False
    assert (tmp_path / "dst" / "sub" / "extra.txt").read_text() == "extra"
    assert not [p for p in (tmp_path / "dst").iterdir() if p.name.startswith(".kubedistill-staging")]
    again = fetch.main(FetchConfig(model_uri=str(tmp_path / "src"), destination=str(tmp_path / "dst")))
    assert again["reused"] is True and again["digest"] == digest


def test_fetch_without_metadata_computes_the_same_digest(tmp_path):
    digest = make_model(tmp_path / "src", with_metadata=False)
    fetched = fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "dst")
    assert fetched.digest == digest and fetched.metadata is None


def test_fetch_refuses_a_corrupt_file(tmp_path):
    make_model(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x01" * 100)
    with pytest.raises(WorkerError, match=re.escape("is corrupt: model.safetensors does not match its sha256")):
        fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "dst")
    assert not (tmp_path / "dst" / "model.safetensors").exists()


def test_fetch_refuses_an_unexpected_digest(tmp_path):
    make_model(tmp_path / "src")
    with pytest.raises(WorkerError, match="expected deadbeef"):
        fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "dst", expected_digest="deadbeef")


def test_fetch_refuses_missing_and_unlisted_files(tmp_path):
    make_model(tmp_path / "src")
    (tmp_path / "src" / "sub" / "extra.txt").unlink()
    with pytest.raises(WorkerError, match=re.escape("incomplete: missing sub/extra.txt")):
        fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "a")
    (tmp_path / "src" / "sub" / "extra.txt").write_text("extra")
    (tmp_path / "src" / "rogue.bin").write_text("?")
    with pytest.raises(WorkerError, match=re.escape("not listed in kubedistill.json: rogue.bin")):
        fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "b")


def test_fetch_refuses_empty_and_non_model_prefixes(tmp_path):
    with pytest.raises(WorkerError, match="is empty"):
        fetch.fetch_model(LocalStore(), str(tmp_path / "nothing"), tmp_path / "dst")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("a")
    with pytest.raises(WorkerError, match=re.escape("no config.json")):
        fetch.fetch_model(LocalStore(), str(tmp_path / "notes"), tmp_path / "dst")


def test_a_changed_source_is_fetched_again(tmp_path):
    make_model(tmp_path / "src", with_metadata=False)
    first = fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "dst")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\x02" * 120)
    second = fetch.fetch_model(LocalStore(), str(tmp_path / "src"), tmp_path / "dst")
    assert not second.reused and second.digest != first.digest
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == b"\x02" * 120
