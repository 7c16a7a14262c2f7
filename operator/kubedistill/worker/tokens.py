"""Do teacher and student agree on the tokens? The pre-flight of objectives kd and onPolicy.

kd trains the student's probability of token t against the teacher's probability of token t;
onPolicy has the teacher score the student's token ids. Both are meaningless unless a token is
the same token to both. Three checks, each failing in one line that names both tokenizers and
the first token they disagree on:

- ``vocabulary_difference``: the teacher's and the student's id -> token maps, compared id by id
  (when the teacher's tokenizer is at hand: a vLLM teacher's, saved beside the dataset, or the
  model an onPolicy run serves). Equal maps make token ids interchangeable.
- ``answer_difference``: a teacher's answer as the teacher tokenized it, against the student's
  tokenization of the same text inside the chat template. Where they differ the teacher's
  distribution at that position is about another token.
- ``probe_difference``: for a teacher behind a vLLM server, the server's ``/tokenize`` of a text
  against the student's.

Mapping tokens by their strings (API teachers name tokens by their text, not ids) is sound
when, and only when: (1) the student splits the teacher's answer into exactly the same pieces
(``answer_difference`` checks every answer), so the chosen tokens map one to one; and (2) an
alternative's text is the decoded piece of exactly one student token. Byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) decode every token to a distinct string except the
pieces of a multi-byte character, which all decode to U+FFFD: those, and strings that are not
one student token, are left out of the named support and their mass falls into the tail bucket,
which is what the tail means (everything the support does not name). SentencePiece tokenizers
drop a word's leading space when one token is decoded alone, so (1) fails and the pre-flight
refuses rather than training on misaligned positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Difference:
    """The first token two tokenizations disagree on."""

    position: int
    teacher: str  # the teacher's token, as text
    student: str

    def message(self, teacher_name: str, student_name: str, what: str) -> str:
        return (
            f"teacher and student tokenizers disagree ({teacher_name} vs {student_name}): {what}, "
            f"token {self.position} is {self.teacher!r} for the teacher and {self.student!r} for the student; "
            "objectives kd and onPolicy need a student that shares the teacher's tokenizer (or use objective sft)"
        )


def vocabulary_difference(teacher: Mapping[str, int], student: Mapping[str, int]) -> Difference | None:
    """The lowest id whose token differs between two vocabularies (token -> id maps), or None."""
    by_id_t = {i: t for t, i in teacher.items()}
    by_id_s = {i: t for t, i in student.items()}
    for token_id in sorted(set(by_id_t) | set(by_id_s)):
        a, b = by_id_t.get(token_id), by_id_s.get(token_id)
        if a != b:
            return Difference(token_id, "<none>" if a is None else a, "<none>" if b is None else b)
    return None


def answer_difference(teacher: Sequence[Any], student: Sequence[Any]) -> Difference | None:
    """The first position where the teacher's answer tokens differ from the student's (ids or pieces).

    The student's sequence may run past the teacher's (the chat template's end-of-turn tokens);
    a teacher's sequence longer than the student's is a disagreement unless the student's was cut
    by the training length.
    """
    for position, (a, b) in enumerate(zip(teacher, student, strict=False)):
        if a != b:
            return Difference(position, str(a), str(b))
    return None


def probe_difference(teacher_ids: Sequence[int], student_ids: Sequence[int]) -> int | None:
    """The first position where two tokenizations of the same text differ (length included), or None."""
    for position, (a, b) in enumerate(zip(teacher_ids, student_ids, strict=False)):
        if a != b:
            return position
    if len(teacher_ids) != len(student_ids):
        return min(len(teacher_ids), len(student_ids))
    return None


def piece_index(pieces: Sequence[str]) -> dict[str, int]:
    """Decoded piece -> student token id, for the pieces exactly one token decodes to."""
    seen: dict[str, int] = {}
    ambiguous: set[str] = set()
    for token_id, piece in enumerate(pieces):
        if piece in seen or REPLACEMENT in piece:
            ambiguous.add(piece)
        else:
            seen[piece] = token_id
    return {piece: token_id for piece, token_id in seen.items() if piece not in ambiguous}


def decoded_pieces(tokenizer: Any) -> list[str]:
    """What each student token id decodes to alone (the text an OpenAI-style API names it by)."""
    size = len(tokenizer)
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in range(size)]
