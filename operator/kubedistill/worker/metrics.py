"""Answer-agreement metrics: how close the student's answer is to the teacher's.

Pure functions of two strings, each in [0, 1]. The teacher's answer is the
reference: the student "keeps 95% of the quality" when its answers agree with
the teacher's at 0.95 on the chosen metric.

* exactMatch        normalised strings are equal
* tokenF1           SQuAD-style bag-of-tokens F1
* rougeL            F-measure of the longest common token subsequence
* jsonFieldAccuracy share of the teacher's JSON leaf fields the student reproduces
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

_TOKEN = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used by every metric."""
    return " ".join(text.casefold().split())


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(normalise(text))


def exact_match(student: str, teacher: str) -> float:
    return 1.0 if normalise(student) == normalise(teacher) else 0.0


def token_f1(student: str, teacher: str) -> float:
    pred, ref = tokens(student), tokens(teacher)
    if not pred and not ref:
        return 1.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    # One row of the DP table at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(student: str, teacher: str) -> float:
    pred, ref = tokens(student), tokens(teacher)
    if not pred and not ref:
        return 1.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _leaves(value: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _parse_json(text: str) -> Any:
    text = text.strip()
    # Models often wrap JSON in a markdown fence; the content is what counts.
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.DOTALL)
    return json.loads(fenced.group(1) if fenced else text)


def json_field_accuracy(student: str, teacher: str) -> float:
    """Share of the teacher's leaf fields the student reproduces exactly.

    A teacher answer that is not JSON falls back to exact match, so the metric
    stays meaningful on mixed datasets; a student answer that is not JSON scores 0.
    """
    try:
        reference = dict(_leaves(_parse_json(teacher)))
    except ValueError:
        return exact_match(student, teacher)
    try:
        prediction = dict(_leaves(_parse_json(student)))
    except ValueError:
        return 0.0
    if not reference:
        return 1.0 if not prediction else 0.0
    return sum(1 for path, value in reference.items() if prediction.get(path) == value) / len(reference)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exactMatch": exact_match,
    "tokenF1": token_f1,
    "rougeL": rouge_l,
    "jsonFieldAccuracy": json_field_accuracy,
}


def score(names: Iterable[str], student: str, teacher: str) -> dict[str, float]:
    """Every requested metric for one example."""
    return {name: METRICS[name](student, teacher) for name in names}


def mean_scores(rows: list[dict[str, float]], names: Iterable[str]) -> dict[str, float]:
    """Average of each metric over examples (0 for an empty set)."""
    return {name: (sum(row[name] for row in rows) / len(rows) if rows else 0.0) for name in names}
