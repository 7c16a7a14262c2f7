"""Serving speed, measured one way for the student (evaluate stage) and the teacher (generate stage).

Two concurrency levels on the same held-out prompts: 1 (one request at a time: what a single
user sees) and a loaded level (``evaluation.speed.concurrency`` requests in flight). Per
request: time to first token (TTFT) and output tokens per second after the first token
(``(tokens - 1) / (last token - first token)``, i.e. 1 / time per output token). Per level:
their median and 95th percentile, and answers per second over the level's wall time (what a
GPU-hour buys, hence the cost per answer).

Where the timestamps come from:

* ``vllm-offline``: vLLM's per-request metrics (``RequestOutput.metrics``, an engine built with
  ``disable_log_stats=False``) as the caller sees them: the request's arrival (wall clock) and its
  first token's latency, both taken by vLLM's frontend, and the last token when ``LLM.chat``
  returns (every request of a call ends at the same step, see below). The engine core's own
  token timestamps would leave out the frontend's work per token (detokenizing, output
  processing), which a small, fast model cannot hide. Every measured request generates exactly ``maxTokens`` tokens
  (``ignore_eos``): both models are timed on the same amount of output (a distilled student
  answers at the teacher's length), and a few-token answer would leave the per-token rate to
  scheduling jitter. The loaded level submits ``concurrency`` conversations per ``LLM.chat``
  call. The prefix cache is reset before each level, so that prompts answered just before
  (evaluation, generation) are not measured warm.
* ``openai-stream``: an OpenAI-compatible endpoint, streamed (``stream: true`` with
  ``stream_options.include_usage``): TTFT at the first content chunk, the last token at the last
  one, the token count from the final usage chunk; measured by this client, network included.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kubedistill.api.savings import SpeedLevel, SpeedReport

log = logging.getLogger("kubedistill.worker.speed")
Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Timing:
    """One request, as measured."""

    ttft: float  # seconds from submission to the first output token
    tokens: int  # output tokens
    decode_seconds: float  # first output token -> last output token

    @property
    def tokens_per_second(self) -> float | None:
        if self.tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.tokens - 1) / self.decode_seconds


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(concurrency: int, timings: Sequence[Timing], wall_seconds: float) -> SpeedLevel:
    ttfts = [t.ttft for t in timings]
    rates = [r for t in timings if (r := t.tokens_per_second) is not None]
    return SpeedLevel(
        concurrency=concurrency,
        requests=len(timings),
        ttft_p50=_round(percentile(ttfts, 0.5)),
        ttft_p95=_round(percentile(ttfts, 0.95)),
        tokens_per_second_p50=_round(percentile(rates, 0.5), 2),
        tokens_per_second_p95=_round(percentile(rates, 0.95), 2),
        answers_per_second=_round(len(timings) / wall_seconds if wall_seconds > 0 else None, 3),
    )


def level_prompts(conversations: Sequence[Conversation], concurrency: int) -> list[Conversation]:
    """The prompts of one level: all of them, cycled up to ``concurrency`` so the level is really loaded."""
    count = max(len(conversations), concurrency)
    return [conversations[i % len(conversations)] for i in range(count)]


# --------------------------------------------------------------------------- vLLM offline (LLM)


def offline_timing(output: Any, returned_at: float) -> Timing:
    """One request of an ``LLM.chat`` call that returned at ``returned_at`` (``time.time()``)."""
    metrics = output.metrics
    if metrics is None:
        raise RuntimeError("vLLM returned no request metrics: build the LLM with disable_log_stats=False")
    tokens = len(output.outputs[0].token_ids)
    ttft = float(metrics.first_token_latency)
    decode = max(0.0, returned_at - float(metrics.arrival_time) - ttft) if tokens > 1 else 0.0
    return Timing(ttft=ttft, tokens=tokens, decode_seconds=decode)


def probe_offline(
    llm: Any,
    conversations: Sequence[Conversation],
    params: Any,
    concurrency: int,
    *,
    gpus: int,
    lora_request: Any = None,
) -> SpeedReport:
    """``params``: the stage's sampling, with ``ignore_eos=True`` (see the module docstring)."""
    """Concurrency 1, then ``concurrency``, with a loaded ``vllm.LLM``; ``params`` must ignore eos.

    Each level is warmed up first with one unmeasured batch of its size: the first step of an
    engine at a new batch size pays one-off costs (compilation for that shape, buffers).
    """
    levels = []
    for level in (1, concurrency):
        prompts = level_prompts(conversations, level) if level > 1 else list(conversations)
        llm.chat(prompts[:level], params, use_tqdm=False, lora_request=lora_request)  # one-off costs
        _reset_prefix_cache(llm)
        timings: list[Timing] = []
        start = time.perf_counter()
        for first in range(0, len(prompts), level):
            chunk = prompts[first : first + level]
            outputs = llm.chat(chunk, params, use_tqdm=False, lora_request=lora_request)
            returned_at = time.time()
            timings.extend(offline_timing(output, returned_at) for output in outputs)
        levels.append(summarize(level, timings, time.perf_counter() - start))
    return SpeedReport(engine="vllm-offline", gpus=gpus, levels=levels)


def _reset_prefix_cache(llm: Any) -> None:
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None:
        try:
            reset()
        except Exception as err:  # an engine without a prefix cache
            log.debug("prefix cache not reset: %s", err)


# --------------------------------------------------------------------------- OpenAI-compatible endpoint (streamed)

StreamOne = Callable[[Conversation], Awaitable[Timing | None]]


async def probe_stream(stream_one: StreamOne, conversations: Sequence[Conversation], concurrency: int) -> SpeedReport:
    """Concurrency 1, then ``concurrency``, through ``stream_one`` (a streamed request; None: not answered)."""
    levels = []
    for level in (1, concurrency):
        prompts = level_prompts(conversations, level) if level > 1 else list(conversations)
        gate = asyncio.Semaphore(level)

        async def one(conversation: Conversation, gate: asyncio.Semaphore = gate) -> Timing | None:
            async with gate:
                return await stream_one(conversation)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(c) for c in prompts))
        wall = time.perf_counter() - start
        levels.append(summarize(level, [t for t in results if t is not None], wall))
    return SpeedReport(engine="openai-stream", gpus=0, levels=levels)
