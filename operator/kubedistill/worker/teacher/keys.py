"""Content keys: what makes two teacher answers "the same answer".

An answer's key is sha256 over a canonical JSON document of everything that
changes what the teacher would say: the teacher model, the sampling settings
(temperature, top_p, max_tokens, seed), the logprobs setting, the exact
messages sent (system prompt included) and the sample index. A changed
teacher or sampling setting is a different key, so it is asked again; an
unchanged one is found in the answer store and never paid for twice.

``n`` (samples per prompt) is deliberately *not* part of the key: sample ``i``
of a prompt is the same answer whatever ``n`` is, so raising ``n`` from 2 to 3
asks only for sample 2.

The train/eval split uses a different hash: the prompt's own messages only
(without the configured system prompt), so that changing the teacher, its
sampling or the system prompt keeps the held-out set the same and scores stay
comparable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from kubedistill.api.v1alpha1 import TeacherSpec

# Bump when the meaning of a key changes: old answers then stop matching.
KEY_VERSION = "kubedistill.answer.v1"

Messages = Sequence[tuple[str, str]]  # (role, content)


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def teacher_settings(teacher: TeacherSpec) -> dict[str, Any]:
    """What about the teacher, beyond the messages, decides its answer."""
    sampling = teacher.sampling
    return {
        "model": teacher.model_name,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "logprobs": teacher.logprobs or 0,
    }


def settings_digest(teacher: TeacherSpec) -> str:
    """Short hash of the teacher settings: the answer store's partition, so a run reads only
    answers that can match it."""
    return hashlib.sha256(canonical_json({"v": KEY_VERSION, **teacher_settings(teacher)})).hexdigest()[:16]


def answer_key(settings: dict[str, Any], messages: Messages, sample: int) -> str:
    """The content key of sample ``sample`` of the answer to ``messages``."""
    document = {
        "v": KEY_VERSION,
        "teacher": settings,
        "messages": [[role, content] for role, content in messages],
        "sample": sample,
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()


def split_value(messages: Messages) -> float:
    """A number in [0, 1) fixed by the prompt's own messages: below evalFraction means eval."""
    digest = hashlib.sha256(canonical_json([[role, content] for role, content in messages])).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
