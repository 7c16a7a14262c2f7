"""Reading the prompt set: JSONL lines -> prompts to ask, or rejections to report.

Each line is one JSON object, either chat-shaped or prompt-shaped::

    {"id": "q1", "messages": [{"role": "user", "content": "What is 2+2?"}]}
    {"id": "q2", "prompt": "What is 2+2?"}
    {"prompt": [{"role": "user", "content": "..."}]}     # trl's conversational prompt

Both shapes are accepted whatever ``format`` says: a prompt set mixing them is
not worth failing a run for. A conversation must end with a user turn. The
configured system prompt is prepended unless the record brings its own.

A bad line (not JSON, wrong shape, not UTF-8) or a prompt over the length limit
is *rejected*: counted and reported with its line number, never fatal. A
prompt seen before (same messages as sent) is a duplicate: it is asked once.

``scan`` is deterministic and streaming: the generate stage calls it once per
pass (census, ask, write) instead of holding millions of prompts in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubedistill.api.dataset import Split
from kubedistill.worker.teacher.keys import Messages, answer_key, split_value

ROLES = ("system", "user", "assistant")
RejectKind = Literal["malformed", "too_long", "duplicate"]


class PromptError(ValueError):
    """A line that is not a usable prompt; the message says why."""


@dataclass(frozen=True)
class Source:
    """One prompts file (already local) and the split it forces, if any."""

    path: Path
    uri: str
    split: Split | None = None  # None: split by content hash
    limited: bool = True  # maxExamples counts prompts of this source


@dataclass(frozen=True)
class Prompt:
    """A prompt to answer ``len(keys)`` times (one key per sample)."""

    index: int
    uri: str
    line: int
    id: str | None
    messages: tuple[tuple[str, str], ...]  # exactly as sent, system prompt included
    split: Split
    split_value: float
    keys: tuple[str, ...]
    hashed: bool = True  # the split came from the content hash (not forced by the source)

    @property
    def prompt_key(self) -> str:
        return self.keys[0]


@dataclass(frozen=True)
class Rejected:
    """A line that was not asked, and why."""

    kind: RejectKind
    uri: str
    line: int
    reason: str
    id: str | None = None


@dataclass
class ScanOptions:
    system_prompt: str | None
    max_prompt_chars: int
    eval_fraction: float
    samples: int
    settings: dict[str, Any]
    max_examples: int | None = None
    split_overrides: Mapping[str, Split] = field(default_factory=dict)
    # teacher.shards: whether this process asks for a prompt (by its key); None: every prompt
    owns: Callable[[str], bool] | None = None

    def asks_for(self, prompt: Prompt) -> bool:
        return self.owns is None or self.owns(prompt.prompt_key)


def parse_record(record: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """A decoded JSON line -> (id, the record's own messages). Raises PromptError."""
    if not isinstance(record, dict):
        raise PromptError(f"expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("id")
    if (raw_id is not None and not isinstance(raw_id, str | int)) or isinstance(raw_id, bool):
        raise PromptError("id must be a string or an integer")
    prompt_id = None if raw_id is None else str(raw_id)
    if "messages" in record:
        messages = _parse_messages(record["messages"], "messages")
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("prompt is empty")
            messages = [("user", prompt)]
        else:
            messages = _parse_messages(prompt, "prompt")
    else:
        raise PromptError('record has neither "messages" nor "prompt"')
    return prompt_id, messages


def _parse_messages(value: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise PromptError(f"{name} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise PromptError(f"{name}[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PromptError(f"{name}[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise PromptError(f"{name}[{i}].content must be a string")
        out.append((role, content))
    if out[-1][0] != "user":
        raise PromptError(f"{name} must end with a user message")
    return out


def with_system_prompt(messages: Sequence[tuple[str, str]], system_prompt: str | None) -> tuple[tuple[str, str], ...]:
    """The messages as sent: the configured system prompt first, unless the record has its own."""
    if system_prompt and not any(role == "system" for role, _ in messages):
        return (("system", system_prompt), *messages)
    return tuple(messages)


def prompt_chars(messages: Messages) -> int:
    return sum(len(content) for _, content in messages)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for every non-blank line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def scan(sources: Sequence[Source], options: ScanOptions) -> Iterator[Prompt | Rejected]:
    """Every line of every source, in order, as a Prompt or a Rejected (duplicates included)."""
    seen: set[str] = set()
    index = 0
    limited = 0
    for source in sources:
        for number, raw in read_lines(source.path):
            if source.limited and options.max_examples is not None and limited >= options.max_examples:
                break
            try:
                prompt_id, own = parse_record(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                yield Rejected("malformed", source.uri, number, "not valid UTF-8")
                continue
            except json.JSONDecodeError as err:
                yield Rejected("malformed", source.uri, number, f"not valid JSON: {err.msg} at column {err.colno}")
                continue
            except PromptError as err:
                yield Rejected("malformed", source.uri, number, str(err))
                continue
            messages = with_system_prompt(own, options.system_prompt)
            chars = prompt_chars(messages)
            if chars > options.max_prompt_chars:
                reason = f"prompt has {chars} characters, more than maxPromptChars={options.max_prompt_chars}"
                yield Rejected("too_long", source.uri, number, reason, prompt_id)
                continue
            keys = tuple(answer_key(options.settings, messages, s) for s in range(options.samples))
            if keys[0] in seen:
                yield Rejected("duplicate", source.uri, number, "same messages as an earlier prompt", prompt_id)
                continue
            seen.add(keys[0])
            value = split_value(own)
            split: Split = source.split or ("eval" if value < options.eval_fraction else "train")
            split = options.split_overrides.get(keys[0], split)
            yield Prompt(index, source.uri, number, prompt_id, messages, split, value, keys, source.split is None)
            index += 1
            if source.limited:
                limited += 1
