"""The generate stage's census: what the prompt set holds, what is left to ask, and where time went.

Pass 1 (``take_census``) counts every line, finds the answers missing from the store
and settles the train/eval split; pass 2 (``missing_work``) streams the prompts
with missing answers to a teacher. Both scan the prompt files again rather than
hold millions of prompts in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kubedistill.worker.teacher.endpoint import CallStats
from kubedistill.worker.teacher.limits import estimate_prompt_tokens, token_charge
from kubedistill.worker.teacher.prompts import Prompt, Rejected, ScanOptions, Source, scan
from kubedistill.worker.teacher.spend import Ledger, Projection, PromptCounter, project
from kubedistill.worker.teacher.store import AnswerStore, StoreStats


@dataclass
class Census:
    """What the prompt set holds and what is left to ask."""

    prompts: int = 0
    train: int = 0
    eval: int = 0
    malformed: int = 0
    too_long: int = 0
    duplicates: int = 0
    stored: int = 0  # answers already in the store
    to_ask: int = 0  # answers missing
    prompts_to_ask: int = 0
    largest_charge: int = 0
    split_overrides: dict[str, Any] = field(default_factory=dict)
    projection: Projection | None = None  # what the missing answers may cost


@dataclass
class Failure:
    """A prompt the teacher did not answer (after retries)."""

    prompt: Prompt
    keys: list[str]
    reason: str


@dataclass
class RunStats:
    """Where the time went; logged, and read by bench/generate_throughput.py."""

    load_seconds: float = 0.0
    plan_seconds: float = 0.0
    ask_seconds: float = 0.0
    write_seconds: float = 0.0
    requested: int = 0
    answered: int = 0
    calls: CallStats | None = None
    store: StoreStats | None = None
    ledger: Ledger | None = None


@dataclass(frozen=True)
class AskInputs:
    """What pass 2 works from, whichever teacher it asks: the prompts, the store, the census and the bills."""

    sources: list[Source]
    options: ScanOptions
    answers: AnswerStore
    census: Census
    stats: RunStats
    ledger: Ledger

    def missing(self, *, with_heartbeats: bool = False) -> Iterator[Any]:
        """Each prompt with the keys of its samples not yet stored (see ``missing_work``)."""
        return missing_work(self.sources, self.options, self.answers, with_heartbeats=with_heartbeats)


def take_census(
    sources: list[Source],
    options: ScanOptions,
    answers: AnswerStore,
    max_tokens: int,
    counter: PromptCounter = estimate_prompt_tokens,
    counted_with: str = "estimate",
) -> Census:
    """Pass 1: count everything, find what is missing, project its cost, and settle the split.

    The split is by content hash; with at least two hashed prompts, one is
    moved so that neither split is empty (the one nearest the boundary), which
    keeps tiny prompt sets usable and stays deterministic.
    """
    census = Census(projection=Projection(max_tokens=max_tokens, counter=counter, counted_with=counted_with))
    assert census.projection is not None
    lowest: Prompt | None = None
    highest: Prompt | None = None
    hashed = hashed_eval = 0
    for item in scan(sources, options):
        if isinstance(item, Rejected):
            setattr(census, _COUNTER[item.kind], getattr(census, _COUNTER[item.kind]) + 1)
            continue
        census.prompts += 1
        if item.split == "eval":
            census.eval += 1
        else:
            census.train += 1
        if item.hashed:
            hashed += 1
            hashed_eval += item.split == "eval"
            if lowest is None or item.split_value < lowest.split_value:
                lowest = item
            if highest is None or item.split_value > highest.split_value:
                highest = item
        if not options.asks_for(item):
            continue  # another shard's prompt: it asks, stores and counts it
        missing = [key for key in item.keys if key not in answers]
        census.stored += len(item.keys) - len(missing)
        census.projection.reused += len(item.keys) - len(missing)
        if missing:
            census.to_ask += len(missing)
            census.prompts_to_ask += 1
            census.projection.add(item.messages, len(missing))
            census.largest_charge = max(census.largest_charge, token_charge(item.messages, len(missing), max_tokens))
    if hashed >= 2 and lowest is not None and highest is not None:
        if hashed_eval == 0:
            census.split_overrides[lowest.prompt_key] = "eval"
            census.eval, census.train = census.eval + 1, census.train - 1
        elif hashed_eval == hashed:
            census.split_overrides[highest.prompt_key] = "train"
            census.eval, census.train = census.eval - 1, census.train + 1
    return census


_COUNTER = {"malformed": "malformed", "too_long": "too_long", "duplicate": "duplicates"}


def missing_work(
    sources: list[Source], options: ScanOptions, answers: AnswerStore, *, with_heartbeats: bool = False
) -> Iterator[Any]:
    """Pass 2's input: each prompt with the keys of its samples not yet stored.

    ``with_heartbeats`` also yields None for every line with nothing to ask, so an async
    caller can give the event loop a turn while it skips.
    """
    for item in scan(sources, options):
        missing: list[str] = []
        if isinstance(item, Prompt) and options.asks_for(item):
            missing = [key for key in item.keys if key not in answers]
        if missing:
            yield item, missing
        elif with_heartbeats:
            yield None


def project_missing(
    sources: list[Source], options: ScanOptions, answers: AnswerStore, max_tokens: int, counter: PromptCounter
) -> Projection:
    """What the answers still missing from the store may cost (after a run stopped at its budget)."""
    work = ((prompt.messages, len(keys)) for prompt, keys in missing_work(sources, options, answers))
    return project(work, max_tokens, counter, "estimate")
