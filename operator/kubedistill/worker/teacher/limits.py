"""Staying inside the teacher's rate limits (aiolimiter leaky buckets).

Requests per minute: a bucket of capacity one that drains at 95% of rpm/60 per
second, so consecutive requests leave at least 60/(0.95 rpm) seconds apart. Any
window of length W then holds at most ceil(W * 0.95 * rpm / 60) requests: the
limit holds per minute and also per second, which matters because providers
quantize their limits (OpenAI documents 60,000 rpm being enforced as 1,000 per
second). The 5% headroom is what the server's count sees through scheduling
and network jitter: a request held up between our decision and its arrival
(a busy CPU, a GC pause) lands next to the following one, and without headroom
that alone puts one request too many into some one-second window. Measured on
a busy 2-core machine against the fault stub at 20 requests/s: one window in
four held 21 requests without headroom, none with it.

Tokens per minute: each request is charged up front with its estimated prompt
tokens plus ``n * max_tokens``, which is how providers count a request against
their own token limit, so there is nothing to correct with the actual usage
afterwards. The bucket holds ``capacity`` tokens (one second's worth, or the
largest single request if that is more, but at most half the minute) and
drains at ``(tpm - capacity) / 60`` per second, so any 60-second window holds at
most ``tpm`` charged tokens. A single request charged above ``capacity`` (only
possible when one request needs more than half of ``tpm``) is clamped to it.

A 429 with Retry-After also pauses *every* worker until that moment
(``cool_down``): when the server says "slow down", all of our requests do.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

from aiolimiter import AsyncLimiter

# Fraction of requestsPerMinute we aim at (see the module docstring).
REQUEST_HEADROOM = 0.95
# Rough prompt-token estimate (OpenAI's rule of thumb: ~4 characters per token)
# plus the per-message framing a chat template adds.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_prompt_tokens(messages: Sequence[tuple[str, str]]) -> int:
    chars = sum(len(content) for _, content in messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + 2


def token_charge(messages: Sequence[tuple[str, str]], samples: int, max_tokens: int) -> int:
    """What one request counts against tokens per minute."""
    return estimate_prompt_tokens(messages) + samples * max_tokens


def token_bucket(tokens_per_minute: int, largest_charge: int) -> tuple[float, float]:
    """(capacity, drain per second) of the token bucket; see the module docstring."""
    capacity = min(max(tokens_per_minute / 60, float(largest_charge)), tokens_per_minute / 2)
    return capacity, (tokens_per_minute - capacity) / 60


class RateLimits:
    """Requests-per-minute and tokens-per-minute limits plus the shared 429 cool-down."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        largest_charge: int = 0,
    ) -> None:
        self.requests: AsyncLimiter | None = None
        self.tokens: AsyncLimiter | None = None
        self.token_capacity = 0.0
        if requests_per_minute:
            self.requests = AsyncLimiter(1, 60 / (requests_per_minute * REQUEST_HEADROOM))
        if tokens_per_minute:
            capacity, drain = token_bucket(tokens_per_minute, largest_charge)
            self.token_capacity = capacity
            self.tokens = AsyncLimiter(capacity, capacity / drain)
        self._resume_at = 0.0  # time.monotonic() before which nobody sends

    def cool_down(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (never shortens an earlier hold)."""
        self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request charged ``tokens`` may be sent.

        A cool-down that starts while we wait for the buckets voids the slot we got:
        waking up after it and sending at once would make every waiting worker fire
        together. So we wait it out and queue again, keeping the spacing.
        """
        while True:
            while (delay := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if self.tokens is not None and tokens:
                await self.tokens.acquire(min(float(tokens), self.token_capacity))
            if self.requests is not None:
                await self.requests.acquire()
            if self._resume_at <= time.monotonic():
                return
