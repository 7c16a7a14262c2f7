"""``serving.weights: stream`` for real: the vLLM container the operator renders streams the model from S3.

The DistilledModel's Deployment is rendered by the operator's builder (no fetch init container,
``--model s3://...``, ``--load-format runai_streamer``, the object store's endpoint and path-style
addressing in the environment, credentials from the storage Secret), and its vLLM container runs
here as a process (tests/support/local_pod.py) against the local S3 server. The streamed weights
are the model's own: greedy answers equal what transformers computes from the same files.
bench/cold_start.py measures how long this takes next to the fetch copy.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel
from kubedistill.api.worker_config import StorageSettings
from kubedistill.builders.serving import ServingPlan, build_serving_children
from kubedistill.local.serve import VLLM_CPU_ENV
from kubedistill.storage.objectstore import S3Store, upload_dir
from tests.support.local_pod import container_argv, container_env
from tests.support.procs import ManagedProcess, free_port, wait_for_http
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = [pytest.mark.worker, pytest.mark.slow]
PROMPTS = ["the cat sat on", "one two three", "hello"]


def test_a_streamed_model_serves_its_own_weights(s3, tmp_path_factory, tmp_path):
    base = cached_tiny_chat_model(tmp_path_factory.getbasetemp())
    store = S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())
    uri = f"s3://{s3.make_bucket()}/models/streamed"
    upload_dir(store, base, uri)
    port = free_port()
    dm = DistilledModel.model_validate(
        {
            "metadata": {"name": "streamed", "namespace": "ml", "uid": "u1"},
            "spec": {
                "model": {"uri": uri},
                "serving": {"gpus": 0, "weights": "stream", "vllm": {"dtype": "float32", "maxModelLen": 512}},
                "storage": {"endpoint": s3.endpoint_url, "credentialsSecretRef": {"name": "s3"}},
            },
        }
    )
    assert dm.spec.model is not None and dm.spec.storage is not None
    plan = ServingPlan(model=dm, source=dm.spec.model, base_model=None, storage=dm.spec.storage)
    settings = OperatorSettings.model_validate({"serving": {"port": port}})
    children = build_serving_children(plan, settings)
    assert "ConfigMap" not in {c["kind"] for c in children}  # nothing fetched
    [deployment] = [c for c in children if c["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["initContainers"] == []
    [vllm] = pod["containers"]

    scratch = tmp_path / "tmp"  # the pod's /tmp: HOME, where vLLM puts the pulled config and tokenizer
    scratch.mkdir()
    env = {**container_env(vllm, s3.env(), scratch), **VLLM_CPU_ENV}
    argv = [*container_argv(vllm, tmp_path / "config"), "--distributed-executor-backend", "uni"]
    proc = ManagedProcess(argv, log_path=tmp_path / "vllm.log", env=env, name="vllm-stream").start()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=420, proc=proc, interval=0.5)
        log = (tmp_path / "vllm.log").read_text(errors="replace")
        assert "Runai Model Streamer" in log, proc.log_tail()
        answers = [complete(port, prompt) for prompt in PROMPTS]
    finally:
        proc.stop()
    assert answers == [reference(base, prompt) for prompt in PROMPTS]
    assert list((scratch / ".cache" / "vllm" / "assets" / "model_streamer").glob("*/config.json"))  # in the pod's /tmp
    assert not list(scratch.rglob("*.safetensors"))  # the weights were streamed, never copied to disk


def complete(port: int, prompt: str) -> str:
    body = {"model": "streamed", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return str(json.load(response)["choices"][0]["text"])


def reference(model_dir, prompt: str) -> str:
    """Greedy continuation by transformers from the same files, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return str(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))
