"""The worker tier's services: one S3 server, one tiny model, one vLLM teacher per session; a fault stub per module."""

from __future__ import annotations

import pytest

from tests.support.fault_stub import FaultStub
from tests.support.generate_job import API_KEY
from tests.support.s3 import shared_s3_server
from tests.support.tiny_model import tiny_chat_model
from tests.support.vllm_server import shared_vllm_server


@pytest.fixture(scope="session")
def s3():
    return shared_s3_server()


@pytest.fixture(scope="session")
def tiny_model_dir():
    return tiny_chat_model()


@pytest.fixture(scope="session")
def vllm_teacher(tiny_model_dir):
    return shared_vllm_server(tiny_model_dir, served_model_name="teacher")


@pytest.fixture(scope="module")
def stub():
    """The fault-injecting OpenAI-style teacher, for the faults and APIs a real one won't give on demand."""
    with FaultStub(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def env(s3, stub, monkeypatch, tmp_path):
    """Credentials as a pod gets them: S3 keys, the teacher key, the termination log path; the stub reset."""
    values = {
        **s3.env(),
        "KUBEDISTILL_TEACHER_API_KEY": API_KEY,
        "KUBEDISTILL_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    stub.reset()
    return values
