"""Objective onPolicy: the student answers the training prompts itself; the teacher scores every token.

trl 1.16's ``ServerDistillationTrainer`` (trl.experimental) does exactly this: each step the
student samples completions (transformers' ``generate``), the teacher, a vLLM server, returns its
logprobs of those very tokens through ``prompt_logprobs`` on ``/v1/completions`` (one request,
no generation), and the loss is a generalised JSD on a sparse support with a tail bucket:
reverse KL on the sampled token (beta 1, the mode-seeking objective of GKD, MiniLLM and
Thinking Machines' on-policy distillation) or forward KL on the teacher's top k (beta 0). It is
a transformers ``Trainer``, so checkpoints, SIGTERM and resume work as for SFT.

What is ours:
- the teacher: an endpoint that is a vLLM server (``teacher.endpoint.promptLogprobs``), or the
  ``teacher.vllm`` model served here for the length of the run (``TeacherServer``);
- ``ScoringClient``: trl's client plus the API key (trl's sends none) and the model the spec
  names (trl's takes the first the server lists), counting the tokens the teacher scores;
- the pre-flight: the teacher's tokenizer against the student's, and one scoring request, so a
  teacher that cannot score fails before any training, in one line.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.api.worker_config import TrainConfig
from kubedistill.storage.objectstore import is_s3, open_store
from kubedistill.worker.common import WorkerError
from kubedistill.worker.tokens import Difference, probe_difference, vocabulary_difference

log = logging.getLogger("kubedistill.worker.train")

SERVED_NAME = "teacher"
# A teacher served inside the train pod shares the GPU with the student: it gets this share of
# the memory (weights + KV cache for the scoring requests), training keeps the rest.
TEACHER_GPU_MEMORY_SHARE = 0.3
MAX_LOGPROBS = 20
TEACHER_PORT = 18400  # under torchrun: a port every rank of the node agrees on


def scoring_url(teacher: TeacherSpec, port: int | None) -> str:
    """The server root trl's client wants (it appends /v1/completions and /health)."""
    if teacher.endpoint is not None:
        return teacher.endpoint.base_url.rstrip("/").removesuffix("/v1")
    return f"http://127.0.0.1:{port}"


def scoring_model(teacher: TeacherSpec) -> str:
    return teacher.endpoint.model if teacher.endpoint is not None else SERVED_NAME


# --------------------------------------------------------------------------- a teacher served for the run


class TeacherServer:
    """``teacher.vllm`` served by vLLM's OpenAI server on localhost while the student trains."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        assert config.teacher is not None and config.teacher.vllm is not None
        self.config = config
        self.spec = config.teacher.vllm
        self.log_path = run_dir / "teacher-vllm.log"
        # torchrun: every rank of the node must find the one server its local main process starts
        self.port = TEACHER_PORT if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 else _free_port()
        self.proc: Any = None
        self.model_path: str | None = None

    def start(self) -> None:
        from kubedistill.local import serve
        from kubedistill.worker.teacher.offline import resolve_model

        store = open_store(self.spec.model, self.config.storage) if is_s3(self.spec.model) else None
        self.model_path = resolve_model(self.spec.model, store, Path(self.config.work_dir))
        extra = ["--max-logprobs", str(MAX_LOGPROBS), "--dtype", self.spec.dtype]
        if self.spec.tensor_parallel_size > 1:
            extra += ["--tensor-parallel-size", str(self.spec.tensor_parallel_size)]
        if serve.has_cuda():
            extra += ["--gpu-memory-utilization", str(TEACHER_GPU_MEMORY_SHARE)]
        argv = serve.vllm_server_argv(
            self.model_path,
            served_model_name=SERVED_NAME,
            port=self.port,
            max_model_len=self.spec.max_model_len,
            extra_args=extra,
        )
        log.info(
            "onPolicy: serving teacher %s with vLLM on port %d (log %s)", self.spec.model, self.port, self.log_path
        )
        self.proc = serve.start_server(argv, self.log_path, serve.vllm_env())

    def wait(self, timeout: float = 1800.0) -> None:
        """Until the server answers /health (the local main process also watches it, and fails if it dies)."""
        from kubedistill.local import serve
        from kubedistill.worker.teacher.offline import resolve_model

        url = f"http://127.0.0.1:{self.port}/health"
        try:
            if self.proc is not None:
                seconds = serve.wait_healthy(url, self.proc, self.log_path, timeout)
            else:
                seconds = _wait_for(url, timeout)
        except serve.ServeError as err:
            raise WorkerError(f"the onPolicy teacher {self.spec.model} did not start: {err}"[:1500]) from err
        if self.model_path is None:  # another rank started it: the model is on this node's disk already
            store = open_store(self.spec.model, self.config.storage) if is_s3(self.spec.model) else None
            self.model_path = resolve_model(self.spec.model, store, Path(self.config.work_dir))
        log.info("onPolicy: teacher healthy after %.0fs", seconds)

    def stop(self) -> None:
        from kubedistill.local import serve

        if self.proc is not None:
            serve.stop_server(self.proc)
            self.proc = None


def _wait_for(url: str, timeout: float) -> float:
    import time

    from kubedistill.local import serve

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise serve.ServeError(f"{url} did not answer within {timeout:.0f}s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- pre-flight


def _call(url: str, body: dict[str, Any] | None, api_key: str | None, timeout: float = 120.0) -> Any:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def check_teacher_tokens(
    teacher: TeacherSpec, url: str, api_key: str | None, tokenizer: Any, probe: str, student_name: str
) -> None:
    """The teacher server tokenizes a probe text as the student does, and scores tokens (prompt_logprobs)."""
    model = scoring_model(teacher)
    name = teacher.model_name
    student_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    try:
        teacher_ids = _call(f"{url}/tokenize", {"model": model, "prompt": probe, "add_special_tokens": False}, api_key)[
            "tokens"
        ]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        raise WorkerError(
            f"objective onPolicy: the teacher at {url} does not tokenize like a vLLM server ({_reason(err)}); "
            "onPolicy needs a vLLM teacher (spec.teacher.vllm, or a vLLM endpoint)"
        ) from err
    position = probe_difference(teacher_ids, student_ids)
    if position is not None:
        theirs = _piece(url, model, teacher_ids, position, api_key)
        ours = tokenizer.convert_ids_to_tokens(student_ids[position]) if position < len(student_ids) else "<end>"
        difference = Difference(position, theirs, ours)
        raise WorkerError(difference.message(name, student_name, "tokenizing the first training example"))
    try:
        _call(
            f"{url}/v1/completions",
            {"model": model, "prompt": student_ids[:16], "max_tokens": 1, "prompt_logprobs": 1},
            api_key,
        )
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise WorkerError(
            f"objective onPolicy: the teacher at {url} refused to score tokens (prompt_logprobs: {_reason(err)}); "
            "is spec.teacher.endpoint a vLLM server?"
        ) from err


def check_teacher_vocabulary(model_path: str, name: str, tokenizer: Any, student_name: str) -> None:
    """A teacher served here: its tokenizer file against the student's, id by id."""
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(model_path)
    difference = vocabulary_difference(teacher.get_vocab(), tokenizer.get_vocab())
    if difference is not None:
        raise WorkerError(difference.message(name, student_name, "in their vocabularies"))


def _piece(url: str, model: str, ids: list[int], position: int, api_key: str | None) -> str:
    if position >= len(ids):
        return "<end>"
    try:
        return str(_call(f"{url}/detokenize", {"model": model, "tokens": [ids[position]]}, api_key)["prompt"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return f"id {ids[position]}"


def _reason(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}: {err.read()[:200].decode('utf-8', 'replace')}"
    return f"{type(err).__name__}: {err}"


def probe_text(tokenizer: Any, row: dict[str, Any]) -> str:
    """A text both tokenizers must split alike: the first training example, as the student renders it."""
    return str(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False))


# --------------------------------------------------------------------------- the trainer


def scoring_client_class() -> type:
    from trl.generation.vllm_client import VLLMClient

    class ScoringClient(VLLMClient):
        """trl's vLLM client with an API key and the spec's model name; counts what the teacher scores."""

        def __init__(self, base_url: str, model: str, api_key: str | None) -> None:
            self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            super().__init__(base_url=base_url, connection_timeout=60.0)
            self.model = model
            self.sequences_scored = 0
            self.tokens_sent = 0  # prompt + completion tokens, what a metered teacher bills
            self.tokens_scored = 0  # completion tokens: the student's own

        def _get(self, url: str, **kwargs: Any) -> dict[str, Any]:
            return super()._get(url, headers=self._auth, **kwargs)

        def _post(self, url: str, **kwargs: Any) -> dict[str, Any]:
            return super()._post(url, headers=self._auth, **kwargs)

        def get_sequence_logprobs(
            self, sequences: list[list[int]], prompt_lengths: list[int], *args: Any, **kwargs: Any
        ) -> dict[str, list[Any]]:
            result = super().get_sequence_logprobs(sequences, prompt_lengths, *args, **kwargs)
            self.sequences_scored += len(sequences)
            self.tokens_sent += sum(len(s) for s in sequences)
            self.tokens_scored += sum(len(s) - p for s, p in zip(sequences, prompt_lengths, strict=True))
            return result

    return ScoringClient


def config_class() -> type:
    """trl's ServerDistillationConfig. trl.experimental warns on import; the worker tests pin the API we use."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.server_distillation import ServerDistillationConfig

    return ServerDistillationConfig


def on_policy_trainer_class() -> type:
    """trl's ServerDistillationTrainer, its teacher client ours (built lazily: trl is imported in the worker)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.server_distillation import ServerDistillationTrainer
    from trl.trainer.distillation_trainer import DistillationTrainer

    class OnPolicyTrainer(ServerDistillationTrainer):
        def __init__(self, *, client: Any, **kwargs: Any) -> None:
            # ServerDistillationTrainer.__init__ = DistillationTrainer's + these four attributes, with a client
            # that sends no API key; so the base's, then the same attributes with ours.
            DistillationTrainer.__init__(self, teacher_model=None, **kwargs)
            args = kwargs["args"]
            self.reverse_kl_top_1_mode = args.reverse_kl_top_1_mode
            self.loss_top_k = args.loss_top_k
            self.loss_add_tail = args.loss_add_tail
            self.teacher_client = client

    return OnPolicyTrainer


def api_key(config: TrainConfig) -> str | None:
    return os.environ.get(config.api_key_env) or None
