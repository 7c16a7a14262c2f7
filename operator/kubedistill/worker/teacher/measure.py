"""The teacher's serving speed on the held-out prompts, measured as the evaluate stage measures the student's.

The same prompts (the eval split, in answer-key order, as evaluate takes them), the same
concurrency levels, the same statistics (worker/speed.py). An in-pod vLLM teacher is measured
with the engine that just answered (per-request engine metrics; costs GPU time only). An
endpoint teacher is asked the prompts again, streamed, at each level: those requests are billed,
counted in the spend and held against the budget like the others; when the budget has no room
left for them, the teacher's speed is simply not measured.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from kubedistill.api.savings import SpeedReport
from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker.speed import Conversation, probe_offline, probe_stream
from kubedistill.worker.teacher.endpoint import EndpointClient
from kubedistill.worker.teacher.limits import RateLimits
from kubedistill.worker.teacher.prompts import Prompt, ScanOptions, Source, scan
from kubedistill.worker.teacher.spend import BudgetExhausted, Ledger

log = logging.getLogger("kubedistill.worker.generate")


def probe_conversations(sources: list[Source], options: ScanOptions, count: int) -> list[Conversation]:
    """The first ``count`` eval prompts by answer key: the prompts the evaluate stage measures the student on."""
    held_out = [item for item in scan(sources, options) if isinstance(item, Prompt) and item.split == "eval"]
    held_out.sort(key=lambda prompt: min(prompt.keys))
    return [[{"role": role, "content": content} for role, content in p.messages] for p in held_out[:count]]


def measure_offline(config: GenerateConfig, llm: Any, conversations: list[Conversation]) -> SpeedReport:
    from kubedistill.worker.teacher.offline import sampling_params

    assert config.speed is not None and config.teacher.vllm is not None
    params = sampling_params(config.teacher.model_copy(update={"logprobs": None}), 1, ignore_eos=True)
    return probe_offline(llm, conversations, params, config.speed.concurrency, gpus=config.teacher.vllm.gpus)


def measure_endpoint(config: GenerateConfig, ledger: Ledger, conversations: list[Conversation]) -> SpeedReport | None:
    assert config.speed is not None and config.teacher.endpoint is not None
    spec = config.teacher.endpoint
    limits = RateLimits(spec.requests_per_minute, spec.tokens_per_minute)

    async def probe() -> SpeedReport:
        async with EndpointClient(config.teacher, os.environ.get(config.api_key_env), limits, ledger=ledger) as client:

            async def one(conversation: Conversation) -> Any:
                messages = tuple((m["role"], m["content"]) for m in conversation)
                return await client.stream(messages)

            return await probe_stream(one, conversations, config.speed.concurrency)  # type: ignore[union-attr]

    try:
        return asyncio.run(probe())
    except BudgetExhausted:
        log.warning("the teacher's speed is not measured: the budget has no room for the probe's requests")
        return None
