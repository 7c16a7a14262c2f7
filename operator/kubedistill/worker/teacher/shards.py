"""Generation sharded across the pods of an Indexed Job (``teacher.shards``).

Every shard scans the whole prompt set (the split and the dataset counts stay global and
deterministic) but asks only for the prompts whose content key falls in its shard::

    shard(prompt) = int(prompt_key[:12], 16) mod shards

so each prompt has one owner whatever the order of the files, and a re-run with another shard
count still finds every answer in the one content-addressed answer store. An endpoint teacher's
rate limits (requests and tokens per minute) and the budget are divided between the shards
(floors, at least 1), so their sum stays within what the spec allows; ``maxConcurrency`` is each
pod's, like its connection pool, so N shards keep N times as many requests in flight.

A shard that has asked for all its prompts writes its report (what it asked, reused, spent and
failed) to ``<dataset>/generate-shards/<run>/<index>.json``; ``<run>`` is the Job's uid, so the
reports of another Job (an earlier run of the same spec) are never read. Shard 0, once its own
prompts are done, waits for the other reports, reloads the answer store, and writes the
dataset exactly as a single pod would: the shard files are byte for byte the same. A killed
shard is replaced by the Job and resumes alone: it asks only for its own prompts still
missing from the store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import Field, ValidationError

from kubedistill.api.base import ApiModel
from kubedistill.api.savings import SpendProjection, TeacherSpend, TokenSpend
from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.api.worker_config import SHARD_INDEX_ENV, SHARD_RUN_ENV
from kubedistill.storage.objectstore import ObjectStore, join
from kubedistill.worker.common import Preempted, WorkerError

log = logging.getLogger("kubedistill.worker.generate")
REPORTS_DIR = "generate-shards"


@dataclass(frozen=True)
class Shard:
    """Which part of the prompts this process asks for: ``index`` of ``count``, in Job ``run``."""

    index: int = 0
    count: int = 1
    run: str = "local"

    @classmethod
    def from_env(cls, count: int, env: Mapping[str, str] | None = None) -> Shard:
        env = os.environ if env is None else env
        if count <= 1:
            return cls()
        raw = env.get(SHARD_INDEX_ENV)
        if raw is None:
            raise WorkerError(f"teacher.shards is {count} but ${SHARD_INDEX_ENV} is not set (an Indexed Job sets it)")
        try:
            index = int(raw)
        except ValueError:
            raise WorkerError(f"${SHARD_INDEX_ENV}={raw!r} is not a shard index") from None
        if not 0 <= index < count:
            raise WorkerError(f"${SHARD_INDEX_ENV}={index} is outside 0..{count - 1} (teacher.shards {count})")
        return cls(index=index, count=count, run=env.get(SHARD_RUN_ENV) or "local")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owns(self, prompt_key: str) -> bool:
        return self.count == 1 or int(prompt_key[:12], 16) % self.count == self.index

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


def shard_teacher(teacher: TeacherSpec, count: int) -> TeacherSpec:
    """The teacher as one of ``count`` shards sees it: rate limits and budget divided."""
    if count <= 1:
        return teacher
    update: dict[str, object] = {}
    endpoint = teacher.endpoint
    if endpoint is not None:
        update["endpoint"] = endpoint.model_copy(
            update={
                "requests_per_minute": _divided(endpoint.requests_per_minute, count),
                "tokens_per_minute": _divided(endpoint.tokens_per_minute, count),
            }
        )
    if teacher.budget is not None:
        budget = teacher.budget
        update["budget"] = budget.model_copy(
            update={
                "max_tokens": None if budget.max_tokens is None else max(1, budget.max_tokens // count),
                "max_cost": None if budget.max_cost is None else budget.max_cost / count,
            }
        )
    return teacher.model_copy(update=update)


def _divided(limit: int | None, count: int) -> int | None:
    return None if limit is None else max(1, limit // count)


class ShardReport(ApiModel):
    """What one shard did; shard 0 adds them up into the dataset's counts and the run's spend."""

    index: int = Field(ge=0)
    requested: int = Field(default=0, ge=0, description="Answers asked for by this shard's pods.")
    reused: int = Field(default=0, ge=0, description="Answers of this shard found in the store.")
    failures: dict[str, str] = Field(default_factory=dict, description="Answer key -> why the teacher did not answer.")
    spend: TeacherSpend | None = None


def report_uri(output_uri: str, shard: Shard, index: int | None = None) -> str:
    return join(output_uri, REPORTS_DIR, shard.run, f"{shard.index if index is None else index}.json")


def write_report(store: ObjectStore, output_uri: str, shard: Shard, report: ShardReport) -> None:
    uri = report_uri(output_uri, shard)
    store.put_bytes(uri, report.model_dump_json(by_alias=True, exclude_none=True).encode(), "application/json")
    log.info("%s done: %d asked, %d reused, %d failed; report at %s", shard, report.requested, report.reused,
             len(report.failures), uri)  # fmt: skip


def wait_for_reports(
    store: ObjectStore,
    output_uri: str,
    shard: Shard,
    poll_seconds: float,
    stopped: Callable[[], bool] = lambda: False,
) -> list[ShardReport]:
    """Shard 0: the reports of every other shard of this run, once all are written."""
    found: dict[int, ShardReport] = {}
    waiting_since = time.monotonic()
    last_log = 0.0
    while True:
        for index in range(1, shard.count):
            if index in found:
                continue
            uri = report_uri(output_uri, shard, index)
            if not store.exists(uri):
                continue
            try:
                found[index] = ShardReport.model_validate_json(store.get_bytes(uri))
            except ValidationError as err:
                raise WorkerError(f"shard report {uri} does not parse: {err}") from err
        if len(found) == shard.count - 1:
            return [found[i] for i in sorted(found)]
        if stopped():
            raise Preempted(f"SIGTERM while waiting for shards {_missing(found, shard)}; a restart waits again")
        now = time.monotonic()
        if now - last_log >= 60:
            last_log = now
            log.info("waiting for shards %s (%.0fs)", _missing(found, shard), now - waiting_since)
        time.sleep(poll_seconds)


def _missing(found: Mapping[int, ShardReport], shard: Shard) -> str:
    return ", ".join(str(i) for i in range(1, shard.count) if i not in found)


def combined_spend(teacher: TeacherSpec, spends: list[TeacherSpend | None]) -> TeacherSpend | None:
    """The run's spend: every shard's projection and bill added up, against the whole budget."""
    known = [s for s in spends if s is not None]
    if not known:
        return None
    first = known[0]
    spent = [s.spent for s in known if s.spent is not None]
    projected = [s.projected for s in known if s.projected is not None]
    total = TokenSpend()
    for part in spent:
        total = total + part
    budget = first.budget
    if budget is not None and teacher.budget is not None:
        budget = budget.model_copy(
            update={"max_tokens": teacher.budget.max_tokens, "max_cost": teacher.budget.max_cost}
        )
    return first.model_copy(
        update={
            "projected": _sum_projections(projected) if projected else None,
            "spent": total if spent else None,
            "reused_answers": sum(s.reused_answers or 0 for s in known),
            "budget": budget,
        }
    )


def _sum_projections(parts: list[SpendProjection]) -> SpendProjection:
    costs = [p.cost for p in parts if p.cost is not None]
    return SpendProjection(
        answers=sum(p.answers for p in parts),
        reused=sum(p.reused for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
        tokens=sum(p.tokens for p in parts),
        cost=sum(costs) if costs else None,
        counted_with=parts[0].counted_with,
    )
