"""The worker entry point's contract with the operator: exit codes and termination messages."""

from __future__ import annotations

import json

import pytest

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker import common
from kubedistill.worker.__main__ import run_stage


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(path))
    return path


def test_termination_message_is_one_line_and_bounded(termination_log):
    common.write_termination_message("first line\nsecond line " + "x" * 10_000)
    text = termination_log.read_text()
    assert "\n" not in text
    assert text.startswith("first line second line")
    assert len(text.encode()) == common.TERMINATION_MESSAGE_LIMIT


def test_summary_is_compact_json(termination_log):
    common.write_termination_message({"b": 1, "a": "x"})
    assert json.loads(termination_log.read_text()) == {"a": "x", "b": 1}


def test_invalid_config_names_the_field(tmp_path, termination_log):
    config = tmp_path / "generate.yaml"
    config.write_text(
        "prompts: p.jsonl\noutputUri: out\nanswerStoreUri: store\nteacher:\n  endpoint: {baseURL: ftp://x, model: m}\n"
    )
    with pytest.raises(common.WorkerError) as err:
        common.load_config(config, GenerateConfig)
    assert "teacher.endpoint.baseURL" in str(err.value)


def test_bad_config_exits_1_with_reason(tmp_path, termination_log):
    config = tmp_path / "generate.yaml"
    config.write_text("prompts: [unclosed\n")
    assert run_stage("generate", str(config)) == common.EXIT_FAILED
    assert "not valid YAML" in termination_log.read_text()
