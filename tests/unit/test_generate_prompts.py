"""generate: prompt parsing, content keys and the deterministic split (pure functions)."""

from __future__ import annotations

import json

import pytest

from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.worker.teacher.keys import answer_key, settings_digest, split_value, teacher_settings
from kubedistill.worker.teacher.prompts import (
    Prompt,
    PromptError,
    Rejected,
    ScanOptions,
    Source,
    parse_record,
    scan,
    with_system_prompt,
)


def teacher(**overrides):
    doc = {"endpoint": {"baseURL": "http://t/v1", "model": "big"}, "sampling": {"temperature": 0.0, "maxTokens": 64}}
    doc.update(overrides)
    return TeacherSpec.model_validate(doc)


def options(**kw):
    defaults = dict(
        system_prompt=None, max_prompt_chars=1000, eval_fraction=0.2, samples=1, settings=teacher_settings(teacher())
    )
    defaults.update(kw)
    return ScanOptions(**defaults)


def write_lines(path, lines):
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    )
    return path


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "hi"}, (None, [("user", "hi")])),
        ({"id": 7, "prompt": "hi"}, ("7", [("user", "hi")])),
        (
            {"id": "a", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
            ("a", [("system", "s"), ("user", "q")]),
        ),
        ({"prompt": [{"role": "user", "content": "q"}], "extra": 1}, (None, [("user", "q")])),
    ],
)
def test_parse_accepts_both_shapes(record, expected):
    assert parse_record(record) == expected


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], "JSON object"),
        ({"text": "x"}, "neither"),
        ({"prompt": ""}, "empty"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "end with a user"),
        ({"messages": [{"role": "tool", "content": "q"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "string"),
        ({"id": True, "prompt": "x"}, "id"),
    ],
)
def test_parse_rejects_with_a_reason(record, reason):
    with pytest.raises(PromptError, match=reason):
        parse_record(record)


def test_system_prompt_prepended_unless_record_has_one():
    assert with_system_prompt([("user", "q")], "be brief") == (("system", "be brief"), ("user", "q"))
    own = [("system", "mine"), ("user", "q")]
    assert with_system_prompt(own, "be brief") == tuple(own)
    assert with_system_prompt([("user", "q")], None) == (("user", "q"),)


# --------------------------------------------------------------------------- keys


def test_key_changes_with_teacher_sampling_system_prompt_and_sample():
    base = teacher_settings(teacher())
    msgs = (("user", "q"),)
    key = answer_key(base, msgs, 0)
    assert key == answer_key(teacher_settings(teacher()), msgs, 0)  # deterministic
    assert len({
        key,
        answer_key(base, msgs, 1),
        answer_key(base, (("system", "s"), ("user", "q")), 0),
        answer_key(teacher_settings(teacher(endpoint={"baseURL": "http://t/v1", "model": "other"})), msgs, 0),
        answer_key(teacher_settings(teacher(sampling={"temperature": 0.7, "maxTokens": 64})), msgs, 0),
        answer_key(teacher_settings(teacher(sampling={"temperature": 0.0, "maxTokens": 65})), msgs, 0),
        answer_key(teacher_settings(teacher(sampling={"temperature": 0.0, "maxTokens": 64, "seed": 1})), msgs, 0),
        answer_key(teacher_settings(teacher(logprobs=3)), msgs, 0),
    }) == 8  # fmt: skip


def test_n_and_endpoint_details_are_not_part_of_the_key():
    """Raising n asks only for the new samples; the URL or concurrency do not change an answer."""
    a = teacher(sampling={"temperature": 0.0, "maxTokens": 64, "n": 1})
    b = teacher(
        sampling={"temperature": 0.0, "maxTokens": 64, "n": 4},
        endpoint={"baseURL": "http://elsewhere/v1", "model": "big", "maxConcurrency": 3},
    )
    assert teacher_settings(a) == teacher_settings(b)
    assert settings_digest(a) == settings_digest(b)


def test_vllm_teacher_keys_on_its_model():
    spec = TeacherSpec.model_validate({"vllm": {"model": "s3://m/teacher"}})
    assert teacher_settings(spec)["model"] == "s3://m/teacher"


# --------------------------------------------------------------------------- scan


def test_scan_counts_bad_lines_and_keeps_going(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "one"},
            b"{not json",
            b"\xff\xfe not utf-8",
            b"   ",
            {"prompt": "x" * 2000},
            {"id": "dup", "prompt": "one"},
            {"messages": [{"role": "user", "content": "two"}]},
        ],
    )
    items = list(scan([Source(path, "p.jsonl")], options()))
    kinds = [(type(i).__name__, getattr(i, "kind", None), i.line) for i in items]
    assert kinds == [
        ("Prompt", None, 1),
        ("Rejected", "malformed", 2),
        ("Rejected", "malformed", 3),
        ("Rejected", "too_long", 5),
        ("Rejected", "duplicate", 6),
        ("Prompt", None, 7),
    ]
    assert "not valid JSON" in items[1].reason and "UTF-8" in items[2].reason
    assert [p.index for p in items if isinstance(p, Prompt)] == [0, 1]


def test_scan_max_examples_and_eval_source(tmp_path):
    main = write_lines(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    held = write_lines(tmp_path / "e.jsonl", [{"prompt": "p3"}, {"prompt": "e1"}])
    sources = [Source(held, "e", "eval", limited=False), Source(main, "p", "train")]
    items = list(scan(sources, options(max_examples=4)))
    prompts = [i for i in items if isinstance(i, Prompt)]
    assert [(p.messages[-1][1], p.split) for p in prompts] == [
        ("p3", "eval"), ("e1", "eval"), ("p0", "train"), ("p1", "train"), ("p2", "train"), ("p4", "train"),
    ]  # fmt: skip
    # p3 in the main file duplicates an eval prompt: eval wins (no leak into training), and
    # maxExamples counts the training prompts actually used
    assert [(r.kind, r.line) for r in items if isinstance(r, Rejected)] == [("duplicate", 4)]


def test_split_is_by_prompt_content_only(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(400)])

    def splits(**kw):
        return {p.messages[-1][1]: p.split for p in scan([Source(path, "p")], options(**kw)) if isinstance(p, Prompt)}

    base = splits()
    assert 0.12 < sum(s == "eval" for s in base.values()) / 400 < 0.28  # eval_fraction 0.2
    # Same held-out set whatever the teacher, sampling or system prompt: scores stay comparable.
    assert splits(system_prompt="be brief", settings=teacher_settings(teacher(logprobs=2))) == base
    assert split_value((("user", "question 1"),)) == split_value([("user", "question 1")])


def test_samples_get_one_key_each(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "q"}])
    (prompt,) = scan([Source(path, "p")], options(samples=3))
    assert len(set(prompt.keys)) == 3
    (single,) = scan([Source(path, "p")], options(samples=1))
    assert single.keys == prompt.keys[:1]
