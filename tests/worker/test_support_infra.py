"""The shared test infrastructure works: real S3 server, tiny model, real vLLM CPU server.

If these fail, every worker test fails for the same reason: read these first.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import ManagedProcess, ProcessFailed, free_port, wait_for_http
from tests.support.s3 import S3Server
from tests.support.tiny_model import EOS, build_tiny_chat_model, tiny_chat_model
from tests.support.vllm_server import VLLMServer

pytestmark = pytest.mark.worker

MIB = 1024 * 1024


# --------------------------------------------------------------------------- S3


def test_s3_round_trip_listing_and_delete(s3: S3Server) -> None:
    client = s3.client()
    bucket = s3.make_bucket()
    client.put_object(Bucket=bucket, Key="runs/a/manifest.json", Body=b'{"shards": 2}', Metadata={"digest": "abc"})

    head = client.head_object(Bucket=bucket, Key="runs/a/manifest.json")
    assert head["ContentLength"] == 13
    assert head["Metadata"] == {"digest": "abc"}
    assert client.get_object(Bucket=bucket, Key="runs/a/manifest.json")["Body"].read() == b'{"shards": 2}'

    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"runs/a/shards/{i:05d}.jsonl", Body=b"{}\n")
    client.put_object(Bucket=bucket, Key="runs/b/other", Body=b"x")
    pages = list(
        client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="runs/a/shards/", PaginationConfig={"PageSize": 10}
        )
    )
    assert [page["KeyCount"] for page in pages] == [10, 10, 5]
    keys = [obj["Key"] for page in pages for obj in page["Contents"]]
    assert keys == [f"runs/a/shards/{i:05d}.jsonl" for i in range(25)]
    top = client.list_objects_v2(Bucket=bucket, Prefix="runs/", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["runs/a/", "runs/b/"]

    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    client.delete_object(Bucket=bucket, Key="runs/b/other")
    assert client.list_objects_v2(Bucket=bucket, Prefix="runs/a/shards/")["KeyCount"] == 0
    with pytest.raises(client.exceptions.ClientError) as err:
        client.head_object(Bucket=bucket, Key="runs/b/other")
    assert err.value.response["Error"]["Code"] == "404"


def test_s3_multipart_upload_and_ranged_download(s3: S3Server, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    client = s3.client()
    bucket = s3.make_bucket()
    data = os.urandom(20 * MIB)
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    config = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB)

    client.upload_file(str(src), bucket, "model/model.safetensors", Config=config)

    head = client.head_object(Bucket=bucket, Key="model/model.safetensors")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # 8 + 8 + 4 MiB: a real multipart upload
    out = io.BytesIO()
    client.download_fileobj(bucket, "model/model.safetensors", out, Config=config)
    assert out.getvalue() == data
    ranged = client.get_object(Bucket=bucket, Key="model/model.safetensors", Range="bytes=100-199")
    assert ranged["Body"].read() == data[100:200]


def test_s3_conditional_put(s3: S3Server) -> None:
    client = s3.client()
    bucket = s3.make_bucket()
    client.put_object(Bucket=bucket, Key="lock", Body=b"first", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError) as err:
        client.put_object(Bucket=bucket, Key="lock", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"first"


def test_s3_env_is_what_a_worker_needs(s3: S3Server) -> None:
    """A process given only env() and the endpoint (as workers get them) can read and write."""
    bucket = s3.make_bucket()
    code = (
        "import boto3, sys; c = boto3.client('s3', endpoint_url=sys.argv[1]);"
        "c.put_object(Bucket=sys.argv[2], Key='k', Body=b'v');"
        "print(c.get_object(Bucket=sys.argv[2], Key='k')['Body'].read().decode())"
    )
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **s3.env()}
    done = subprocess.run(
        [sys.executable, "-c", code, s3.endpoint_url, bucket], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "v"
    assert set(s3.env()) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert "AWS_ENDPOINT_URL_S3" not in s3.env()
    assert s3.env(include_endpoint=True)["AWS_ENDPOINT_URL_S3"] == s3.endpoint_url


def test_s3_server_stop_leaves_nothing(tmp_path: Path) -> None:
    server = S3Server(tmp_path / "s3").start()
    pid = server.proc.pid if server.proc else 0
    assert server.client().list_buckets()["Buckets"] == []
    server.stop()
    assert not _alive(pid)


# --------------------------------------------------------------------------- process helpers


def test_managed_process_kills_its_whole_group(tmp_path: Path) -> None:
    # A shell that forks a grandchild ignoring SIGTERM: stop() must still remove both.
    script = "trap '' TERM; (trap '' TERM; sleep 300) & echo $! > child.pid; wait"
    proc = ManagedProcess(["bash", "-c", script], log_path=tmp_path / "log", cwd=tmp_path).start()
    pid_file = tmp_path / "child.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.stop(timeout=1)
    assert not _alive(proc.pid)
    assert not _alive(child)


def test_wait_for_http_reports_the_log_tail_when_the_server_dies(tmp_path: Path) -> None:
    code = "import sys; print('cannot load model: bad config', flush=True); sys.exit(3)"
    proc = ManagedProcess([sys.executable, "-c", code], log_path=tmp_path / "log").start()
    with pytest.raises(ProcessFailed, match=r"(?s)exited with 3.*cannot load model: bad config"):
        wait_for_http(f"http://127.0.0.1:{free_port()}/health", timeout=30, proc=proc)
    proc.stop()


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_chat_template_and_generation(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM CPU needs it
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == EOS == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)

    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert full == prompt + "5<|im_end|>\n"  # prefix-preserving: prompt/completion training relies on it

    # trl's assistant_only_loss: the mask covers the reply and its end-of-turn token.
    encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "5<|im_end|>\n"

    inputs = tokenizer.apply_chat_template(chat[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tiny_model_template_satisfies_trl(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_tiny_model_is_deterministic_and_cached(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_chat_model(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "model.safetensors", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert tiny_chat_model() == tiny_model_dir
    assert tiny_chat_model(seed=0) == tiny_model_dir  # defaults are part of the cache key


def test_tiny_model_variants(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    corpus = ["distillation kubernetes operator"] * 200 + ["teacher student agreement"] * 200
    custom = build_tiny_chat_model(tmp_path / "custom", corpus=corpus, vocab_size=400, with_chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(custom)
    assert tokenizer.chat_template is None
    assert not (custom / "chat_template.jinja").exists()
    assert len(tokenizer.tokenize(" kubernetes")) == 1  # trained on the given corpus


# --------------------------------------------------------------------------- vLLM


def test_vllm_lists_the_served_model(vllm_teacher: VLLMServer) -> None:
    with urllib.request.urlopen(f"{vllm_teacher.base_url}/models", timeout=30) as resp:
        models = json.load(resp)
    assert [m["id"] for m in models["data"]] == ["teacher"]
    assert vllm_teacher.base_url == f"http://127.0.0.1:{vllm_teacher.port}/v1"


def test_vllm_chat_completion_with_logprobs(vllm_teacher: VLLMServer) -> None:
    reply = vllm_teacher.chat(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2 + 3?"}],
        max_tokens=16,
        temperature=0.8,
        seed=1,
        logprobs=True,
        top_logprobs=5,
    )
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["prompt_tokens"] > 0 and reply["usage"]["completion_tokens"] > 0
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == reply["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 5 for t in tokens)
    assert all(t["logprob"] <= 0 for t in tokens)


def test_vllm_completion_with_logprobs(vllm_teacher: VLLMServer) -> None:
    reply = vllm_teacher.completion("What is 2 + 3?", max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    choice = reply["choices"][0]
    assert reply["usage"]["completion_tokens"] == 8
    assert len(choice["logprobs"]["tokens"]) == 8
    assert all(3 <= len(top) <= 4 for top in choice["logprobs"]["top_logprobs"])  # top 3 (+ the sampled one)
    # Greedy decoding is deterministic: the same request gives the same text.
    again = vllm_teacher.completion("What is 2 + 3?", max_tokens=8, temperature=0, ignore_eos=True)
    assert again["choices"][0]["text"] == choice["text"]


# --------------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
