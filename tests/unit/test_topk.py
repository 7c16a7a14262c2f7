"""Compact teacher distributions (worker/topk.py) and the token agreement checks (worker/tokens.py)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from kubedistill.worker.tokens import (
    Difference,
    answer_difference,
    piece_index,
    probe_difference,
    vocabulary_difference,
)
from kubedistill.worker.topk import TopKError, decode, encode, from_ids, from_strings, from_verbose


def random_answer(rng: random.Random, n: int, k: int, vocab: int) -> tuple[list[tuple[int, float]], list[list]]:
    chosen, tops = [], []
    for _ in range(n):
        raw = sorted((rng.gauss(0, 3) for _ in range(k)), reverse=True)
        norm = math.log(sum(math.exp(x) for x in raw) + 1.0)  # leave some tail mass
        ids = rng.sample(range(vocab), k)
        top = [(i, x - norm) for i, x in zip(ids, raw, strict=True)]
        tops.append(top)
        chosen.append(top[0])
    return chosen, tops


@pytest.mark.parametrize("vocab", [512, 49152, 151_936])  # tiny, SmolLM2, Qwen: uint16 and uint32 ids
def test_ids_round_trip_within_float16_precision(vocab: int) -> None:
    chosen, tops = random_answer(random.Random(vocab), 50, 20, vocab)
    dist = from_ids(chosen, tops, 20)
    back = decode(encode(dist))
    assert back.table is None and back.positions == 50 and back.k == 20
    assert back.tokens() == [c[0] for c in chosen]
    assert np.array_equal(back.top_ids, dist.top_ids)
    np.testing.assert_allclose(back.top_logprobs, dist.top_logprobs, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(back.logprobs, dist.logprobs, rtol=1e-3, atol=1e-3)


def test_encoding_is_deterministic_and_compact() -> None:
    chosen, tops = random_answer(random.Random(1), 200, 20, 49152)
    text = encode(from_ids(chosen, tops, 20))
    assert text == encode(from_ids(chosen, tops, 20))  # the dataset digest depends on it
    json.dumps(text)  # a plain JSON string
    assert '"' not in text and "\\" not in text
    # random ids are the worst case for compression: still within the 120 bytes per token
    assert len(text) / 200 <= 120


def test_fewer_alternatives_than_k_are_missing_not_invented() -> None:
    dist = from_ids([(5, -0.1), (6, -0.2)], [[(5, -0.1)], [(6, -0.2), (7, -1.9), (8, -4.0)]], 3)
    back = decode(encode(dist))
    assert back.top_logprobs[0, 1] == -math.inf and back.top_logprobs[0, 2] == -math.inf
    assert back.top_ids[1].tolist() == [6, 7, 8]


def test_token_strings_use_a_table_and_keep_any_unicode() -> None:
    chosen = [(" Par", -0.3), ("is", -0.01), ("\ufffd", -1.0), ("😀", -0.5)]
    tops = [[(" Par", -0.3), (" Lyon", -2.0)], [("is", -0.01), ("ish", -5.0)], [("\ufffd", -1.0)], [("😀", -0.5)]]
    back = decode(encode(from_strings(chosen, tops, 2)))
    assert back.tokens() == [" Par", "is", "\ufffd", "😀"]
    assert back.table is not None and [back.table[i] for i in back.top_ids[0]] == [" Par", " Lyon"]


def test_verbose_entries_of_older_stores_convert_most_likely_first() -> None:
    entries = [{"token": "a", "logprob": -0.5, "top": {"b": -2.0, "a": -0.5, "c": -3.0}}]
    back = decode(encode(from_verbose(entries)))
    assert back.k == 3 and back.table is not None
    assert [back.table[i] for i in back.top_ids[0]] == ["a", "b", "c"]


def test_garbage_and_future_versions_are_refused() -> None:
    with pytest.raises(TopKError, match="not a compact top-k distribution"):
        decode("hello")
    import base64
    import zlib

    future = base64.b85encode(zlib.compress(bytes([9, 0, 0, 0, 0, 0, 1]))).decode()
    with pytest.raises(TopKError, match="format 9 is newer"):
        decode(future)


# --------------------------------------------------------------------------- token agreement


def test_vocabulary_difference_names_the_lowest_disagreeing_id() -> None:
    same = {"<s>": 0, "a": 1, "b": 2}
    assert vocabulary_difference(same, dict(same)) is None
    assert vocabulary_difference(same, {"<s>": 0, "a": 1, "B": 2}) == Difference(2, "b", "B")
    assert vocabulary_difference(same, {"<s>": 0, "a": 1}) == Difference(2, "b", "<none>")


def test_answer_difference_and_probe_difference() -> None:
    assert answer_difference([1, 2, 3], [1, 2, 3, 99]) is None  # the template's end-of-turn follows
    assert answer_difference([" Par", "is"], [" Paris", "<|im_end|>"]) == Difference(0, " Par", " Paris")
    assert probe_difference([1, 2, 3], [1, 2, 3]) is None
    assert probe_difference([1, 2, 3], [1, 5, 3]) == 1
    assert probe_difference([1, 2], [1, 2, 3]) == 2


def test_message_names_both_tokenizers_and_the_token() -> None:
    text = Difference(3, "ĠParis", "ĠPar").message("SmolLM2 (teacher)", "tiny (student)", "in the answer of record p7")
    assert "\n" not in text
    assert "SmolLM2 (teacher) vs tiny (student)" in text and "token 3 is 'ĠParis' for the teacher" in text
    assert "'ĠPar' for the student" in text


def test_piece_index_leaves_out_ambiguous_and_partial_utf8_pieces() -> None:
    pieces = ["<pad>", " the", "\ufffd", "\ufffd", "the", " the"]
    index = piece_index(pieces)
    assert index == {"<pad>": 0, "the": 4}  # ' the' decodes from two ids, U+FFFD from partial bytes
