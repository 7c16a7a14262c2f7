"""Agreement metrics: each one's edge cases, since the quality gate rests on them."""

from __future__ import annotations

import pytest

from kubedistill.worker import metrics


def test_exact_match_ignores_case_and_whitespace():
    assert metrics.exact_match("  The  Answer\n", "the answer") == 1.0
    assert metrics.exact_match("the answer.", "the answer") == 0.0


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        ("a b c", "a b c", 1.0),
        ("", "", 1.0),
        ("x y", "a b", 0.0),
        ("a b", "a b c d", 2 * (1.0 * 0.5) / 1.5),  # precision 1, recall 1/2
        ("a a b", "a b b", 2 / 3),  # bag of tokens: overlap counts duplicates once each
    ],
)
def test_token_f1(student, teacher, expected):
    assert metrics.token_f1(student, teacher) == pytest.approx(expected)


def test_rouge_l_rewards_order_where_token_f1_does_not():
    assert metrics.token_f1("c b a", "a b c") == 1.0
    assert metrics.rouge_l("c b a", "a b c") == pytest.approx(1 / 3)
    assert metrics.rouge_l("a b c", "a b c") == 1.0
    assert metrics.rouge_l("a x c", "a b c") == pytest.approx(2 / 3)


def test_json_field_accuracy_counts_leaf_fields():
    teacher = '{"name": "Ada", "tags": ["x", "y"], "meta": {"age": 36}}'
    assert metrics.json_field_accuracy(teacher, teacher) == 1.0
    assert metrics.json_field_accuracy('{"name": "Ada", "tags": ["x", "z"], "meta": {"age": 36}}', teacher) == 0.75
    assert metrics.json_field_accuracy("```json\n" + teacher + "\n```", teacher) == 1.0


def test_json_field_accuracy_when_either_side_is_not_json():
    assert metrics.json_field_accuracy("not json", '{"a": 1}') == 0.0
    assert metrics.json_field_accuracy("plain", "plain") == 1.0  # teacher not JSON: exact match


def test_mean_scores():
    rows = [metrics.score(["exactMatch", "tokenF1"], s, t) for s, t in [("a", "a"), ("b", "c")]]
    assert metrics.mean_scores(rows, ["exactMatch", "tokenF1"]) == {"exactMatch": 0.5, "tokenF1": 0.5}
    assert metrics.mean_scores([], ["rougeL"]) == {"rougeL": 0.0}
