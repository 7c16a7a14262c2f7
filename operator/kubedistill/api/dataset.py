"""The teacher dataset on storage: the contract between generate, train and evaluate.

Layout under a dataset prefix (``<output.uri>/datasets/<datasetKey>/``)::

    manifest.json                  DatasetManifest, written last: its presence means "complete"
    shards/train-00000.jsonl       DatasetRecord lines, split "train"
    shards/eval-00000.jsonl        DatasetRecord lines, split "eval"
    failures.jsonl                 optional: FailureRecord lines (rejected lines, failed prompts)
    teacher-tokenizer/             optional: the teacher's tokenizer, when records carry top-k token ids
    teacher-speed.json             optional: the teacher's measured speed (api/savings.SpeedReport)
    teacher-spend.json             what the last generate run projected and spent (api/savings.TeacherSpend)

Records use trl's conversational prompt-completion format (``prompt`` is a list
of messages ending with the user turn, ``completion`` the assistant turn), so
trl trains on the completion only without any custom collator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from kubedistill.api.base import ApiModel

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
FAILURES_NAME = "failures.jsonl"
TEACHER_TOKENIZER_DIR = "teacher-tokenizer"
TEACHER_SPEED_NAME = "teacher-speed.json"
TEACHER_SPEND_NAME = "teacher-spend.json"
DATASET_FORMAT_VERSION = 1

Split = Literal["train", "eval"]


class Message(ApiModel):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class Usage(ApiModel):
    """Tokens the teacher billed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class TokenLogprob(ApiModel):
    """One answer token with its top-k alternatives: the verbose form of datasets written before ``topk``
    (still read; new datasets carry ``DatasetRecord.topk``)."""

    token: str
    logprob: float
    top: dict[str, float] = Field(default_factory=dict)


class DatasetRecord(ApiModel):
    """One training/eval example: a prompt and one teacher answer."""

    key: str = Field(description="Content hash of (teacher model, sampling, system prompt, prompt, sample index).")
    id: str | None = Field(default=None, description="The prompt's id from the input, when it had one.")
    split: Split
    prompt: list[Message]
    completion: list[Message] = Field(description="Exactly one assistant message.")
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    logprobs: list[TokenLogprob] | None = Field(default=None, description="Verbose top-k logprobs (older datasets).")
    topk: str | None = Field(
        default=None,
        description="The teacher's top-k logprobs of every answer token, compact (kubedistill.worker.topk): "
        "token ids of the teacher's vocabulary (manifest teacherTokenizer) or, for API teachers, token strings.",
    )


class ShardInfo(ApiModel):
    """One JSONL shard, relative to the dataset prefix."""

    path: str
    split: Split
    records: int
    sha256: str


class DatasetCounts(ApiModel):
    """What happened to the input prompts."""

    prompts: int = 0
    train: int = 0
    eval: int = 0
    malformed: int = 0
    too_long: int = 0
    failed: int = 0
    reused: int = Field(default=0, description="Answers taken from the store instead of asking the teacher.")
    requested: int = Field(default=0, description="Answers the teacher was asked for in this run.")
    duplicates: int = Field(default=0, description="Input prompts identical to an earlier one (asked once).")


FailureKind = Literal["malformed", "too_long", "failed"]


class FailureRecord(ApiModel):
    """One line of failures.jsonl: an input line not used, or a prompt the teacher never answered."""

    kind: FailureKind
    source: str = Field(description="URI of the prompts file.")
    line: int = Field(description="1-based line number in that file.")
    id: str | None = None
    key: str | None = Field(default=None, description="Answer key, for prompts that reached the teacher.")
    reason: str


class DatasetManifest(ApiModel):
    """Written last; a dataset prefix without it is incomplete."""

    version: int = DATASET_FORMAT_VERSION
    dataset_key: str
    teacher_model: str
    shards: list[ShardInfo]
    counts: DatasetCounts
    usage: Usage = Field(default_factory=Usage)
    digest: str = Field(description="sha256 over the shard digests, in order: identifies the dataset's content.")
    created_at: str
    failures: str | None = Field(default=None, description="failures.jsonl, relative to the dataset prefix, when any.")
    teacher_tokenizer: str | None = Field(
        default=None,
        description="Prefix of the teacher's tokenizer files, relative to the dataset prefix: written when records "
        "carry top-k token ids, so training can check the student's tokenizer against the teacher's.",
    )


def dataset_digest(shards: Sequence[ShardInfo]) -> str:
    """The manifest digest: sha256 over the concatenated hex digests of the shards, in manifest order."""
    return hashlib.sha256("".join(shard.sha256 for shard in shards).encode()).hexdigest()
