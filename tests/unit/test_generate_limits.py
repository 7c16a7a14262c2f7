"""generate: rate-limit math, Retry-After parsing, the backoff that honours it (pure or local)."""

from __future__ import annotations

import asyncio
import bisect
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from tenacity import RetryCallState, wait_fixed

from kubedistill.worker.teacher.endpoint import TeacherCallError, parse_retry_after, wait_retry_after
from kubedistill.worker.teacher.limits import RateLimits, estimate_prompt_tokens, token_bucket, token_charge


def max_in_window(times, seconds):
    times = sorted(times)
    return max(bisect.bisect_left(times, t + seconds) - i for i, t in enumerate(times))


def test_token_bucket_never_allows_more_than_tpm_per_minute():
    for tpm, largest in [(1_000_000, 5000), (60_000, 100), (10_000, 9000), (600, 1)]:
        capacity, drain = token_bucket(tpm, largest)
        assert capacity >= min(largest, tpm / 2)
        assert capacity + 60 * drain == pytest.approx(tpm)  # burst + a minute of drain = the limit
        assert drain > 0


def test_token_charge_counts_max_tokens_per_sample():
    msgs = [("system", "s" * 40), ("user", "u" * 400)]
    assert estimate_prompt_tokens(msgs) == 110 + 8 + 2
    assert token_charge(msgs, 3, 100) == 120 + 300


async def test_requests_are_spaced_so_no_window_exceeds_its_share():
    limits = RateLimits(requests_per_minute=6000)  # 100/s: at most 10 in any 0.1 s
    stamps = []

    async def one():
        await limits.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(30)))
    assert max_in_window(stamps, 0.1) <= 10
    assert stamps[-1] - stamps[0] >= 29 / 100 - 0.005


async def test_tokens_per_minute_limit():
    limits = RateLimits(tokens_per_minute=60_000, largest_charge=100)  # capacity 1000 (1 s), drain 983/s
    stamps = []

    async def one():
        await limits.acquire(500)
        stamps.append(time.monotonic())

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(4)))
    assert stamps[1] - start < 0.05  # the burst: one second's worth
    assert stamps[-1] - start >= (4 * 500 - 1000) / (59_000 / 60) - 0.02


async def test_cool_down_holds_every_request():
    limits = RateLimits()
    limits.cool_down(0.3)
    start = time.monotonic()
    await asyncio.gather(limits.acquire(), limits.acquire())
    assert time.monotonic() - start >= 0.29


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = parse_retry_after({"Retry-After": format_datetime(when, usegmt=True)})
    assert 28 <= seconds <= 31


def _state_failed_with(error):
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = 1
    state.set_exception((type(error), error, None))
    return state


def test_wait_is_the_longer_of_backoff_and_retry_after():
    wait = wait_retry_after(wait_fixed(0.5))
    assert wait(_state_failed_with(TeacherCallError("429", retryable=True, retry_after=3.0))) == 3.0
    assert wait(_state_failed_with(TeacherCallError("429", retryable=True, retry_after=0.1))) == 0.5
    assert wait(_state_failed_with(TeacherCallError("500", retryable=True))) == 0.5
    assert wait(_state_failed_with(TeacherCallError("429", retryable=True, retry_after=1e9))) == 600.0
