"""Session-wide real services for the worker tier: one S3 server, one tiny model, one vLLM teacher."""

from __future__ import annotations

import pytest

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
