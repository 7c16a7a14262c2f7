"""generate: prompts -> teacher answers -> dataset shards + manifest, never paying twice.

    kubedistill-worker generate --config /etc/kubedistill/generate.yaml

    # a config for an OpenAI-compatible teacher (the key comes from the environment):
    #   prompts: s3://data/prompts.jsonl
    #   outputUri: s3://data/runs/r1/datasets/abc
    #   answerStoreUri: s3://data/runs/answers
    #   teacher:
    #     endpoint: {baseURL: https://api.openai.com/v1, model: gpt-4.1, requestsPerMinute: 500}
    #     sampling: {temperature: 0, maxTokens: 512}
    KUBEDISTILL_TEACHER_API_KEY=sk-... kubedistill-worker generate --config generate.yaml

The stage makes three streaming passes over the prompt set (so millions of
prompts never sit in memory at once):

1. census: parse and validate every line, dedupe, split train/eval by content
   hash, look each answer key up in the answer store (loaded first), and
   project what the missing answers may cost (logged before any request);
2. ask: the prompts with missing answers go through a bounded queue to a fixed
   pool of ``maxConcurrency`` tasks (an endpoint teacher, online), into Batch
   API batches (``mode: batch``, teacher/batch.py) or to vLLM in batches (an
   in-pod teacher); every answer lands in the answer store within
   ``flushSeconds``, so a killed run resumes without asking again;
3. write: shards, failures.jsonl, then manifest.json, in input order, so the
   same inputs and answers always give the same dataset digest; then, with
   ``speed``, the teacher's speed on the held-out prompts (teacher-speed.json).

Every request is metered and held against ``teacher.budget`` (teacher/spend.py):
none is sent that could take the spend past it. When the budget is spent the
stage stops with BudgetExceeded (a JSON termination message with the spend),
keeping every answer paid for. Bad lines and over-long prompts are reported,
never fatal. The stage fails only when more than ``maxFailureFraction`` of the
prompts got no answer; the one-line reason goes to /dev/termination-log. On
SIGTERM, requests in flight get ``drainSeconds`` to finish, stored answers are
flushed, and the worker exits as preempted: a restart resumes.

    kubedistill-worker estimate --config generate.yaml   # the projection only: nothing is asked
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubedistill.api.dataset import (
    TEACHER_SPEED_NAME,
    TEACHER_SPEND_NAME,
    TEACHER_TOKENIZER_DIR,
    DatasetCounts,
    DatasetManifest,
    DatasetRecord,
    FailureRecord,
    Message,
    Split,
    Usage,
)
from kubedistill.api.savings import SpeedReport, SpendProjection, TeacherSpend, format_money, format_tokens
from kubedistill.api.worker_config import GenerateConfig, GenerateResult
from kubedistill.storage.objectstore import (
    ObjectStore,
    StorageError,
    is_s3,
    join,
    local_path,
    open_store,
    upload_dir,
)
from kubedistill.worker.common import WorkerError
from kubedistill.worker.teacher.batch import BatchPass
from kubedistill.worker.teacher.census import AskInputs, Census, Failure, RunStats, project_missing, take_census
from kubedistill.worker.teacher.keys import settings_digest, teacher_settings
from kubedistill.worker.teacher.measure import measure_endpoint, measure_offline, probe_conversations
from kubedistill.worker.teacher.offline_pass import OfflineTeacher, ask_offline
from kubedistill.worker.teacher.online import EndpointPass
from kubedistill.worker.teacher.prompts import Prompt, Rejected, ScanOptions, Source, scan
from kubedistill.worker.teacher.shards import (
    Shard,
    ShardReport,
    combined_spend,
    shard_teacher,
    wait_for_reports,
    write_report,
)
from kubedistill.worker.teacher.spend import (
    Ledger,
    PromptCounter,
    budget_exceeded,
    describe_spend,
    new_ledger,
    prompt_counter,
    spend_report,
)
from kubedistill.worker.teacher.store import Answer, AnswerStore
from kubedistill.worker.teacher.writer import DatasetWriter

# Re-exported for callers that read the run's statistics (bench/, tests).
__all__ = ["CONFIG", "Census", "Failure", "RunStats", "main", "run"]

CONFIG = GenerateConfig
log = logging.getLogger("kubedistill.worker.generate")


# --------------------------------------------------------------------------- entry point


def main(config: GenerateConfig) -> dict[str, Any]:
    result, _ = run(config)
    if isinstance(result, ShardReport):  # shard 1..N-1: shard 0 reports for the Job
        return {"shard": result.index, "requested": result.requested, "reused": result.reused,
                "failed": len(result.failures)}  # fmt: skip
    return result.to_wire()


def run(config: GenerateConfig) -> tuple[GenerateResult | ShardReport, RunStats]:
    stats = RunStats()
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="generate-", dir=config.work_dir))
    try:
        return _run(config, work, stats), stats
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(config: GenerateConfig, work: Path, stats: RunStats) -> GenerateResult | ShardReport:
    teacher = config.teacher
    sources = fetch_sources(config, work)
    answers = load_answers(config, stats)
    offline = OfflineTeacher(config, work) if teacher.vllm is not None else None
    try:
        return _generate(config, work, stats, sources, answers, offline)
    finally:
        if offline is not None:
            offline.close()


def _generate(
    config: GenerateConfig,
    work: Path,
    stats: RunStats,
    sources: list[Source],
    answers: AnswerStore,
    offline: OfflineTeacher | None,
) -> GenerateResult | ShardReport:
    whole = config.teacher
    shard = Shard.from_env(whole.shards)
    if shard.sharded:
        log.info("%s (Job %s): asking for its prompts only, with 1/%d of the limits and budget", shard, shard.run,
                 shard.count)  # fmt: skip
        config = config.model_copy(
            update={
                "teacher": shard_teacher(whole, shard.count),
                "progress": config.progress.model_copy(update={"shard": shard.index}),
            }
        )
    teacher = config.teacher
    counter, counted_with = prompt_counter(offline.tokenizer() if offline is not None else None)
    census, options = census_run(config, sources, answers, stats, counter, counted_with, shard)
    ledger = stats.ledger = new_ledger(teacher)
    assert census.projection is not None
    projected = census.projection.result(ledger.prices)
    log_projection(config, projected)

    failures: list[Failure] = []
    if census.to_ask:
        start = time.monotonic()
        inputs = AskInputs(sources, options, answers, census, stats, ledger)
        if teacher.endpoint is not None and teacher.endpoint.mode == "batch":
            failures = BatchPass(config, inputs, work).run()
        elif teacher.endpoint is not None:
            failures = asyncio.run(EndpointPass(config, inputs).run())
        else:
            assert offline is not None
            failures = ask_offline(offline, inputs, counter)
        stats.ask_seconds = time.monotonic() - start
        log.info(
            "generate asked: answered=%d failed_prompts=%d seconds=%.1f store_batches=%d spent=%s",
            stats.answered, len(failures), stats.ask_seconds, answers.stats.batches_written,
            describe_spend(ledger.spent(), teacher.pricing.currency if teacher.pricing else None),
        )  # fmt: skip
    if ledger.exhausted:
        remaining = project_missing(sources, options, answers, teacher.sampling.max_tokens, counter)
        stopped = budget_exceeded(teacher, ledger, projected, census.stored, remaining, stats.answered)
        write_spend(config, TeacherSpend.model_validate(stopped.payload["spend"]))
        raise stopped

    reasons = {key: failure.reason for failure in failures for key in failure.keys}
    reused = census.stored
    others: list[ShardReport] = []
    if shard.sharded:
        own = ShardReport(index=shard.index, requested=stats.requested, reused=reused, failures=reasons,
                          spend=spend_report(teacher, ledger, projected, reused))  # fmt: skip
        if shard.index > 0:
            write_report(store_for(config.output_uri, config), config.output_uri, shard, own)
            return own
        others = collect_shards(config, shard)
        answers = load_answers(config, stats)  # every shard's answers
        census.stored = reused + sum(r.reused for r in others)
        stats.requested += sum(r.requested for r in others)
        reasons = {key: reason for r in [own, *others] for key, reason in r.failures.items()}
        config = config.model_copy(update={"teacher": whole})

    start = time.monotonic()
    result = write_dataset(config, sources, options, answers, census, reasons, stats, work)
    stats.write_seconds = time.monotonic() - start
    result.teacher_speed = measure_teacher(config, sources, options, ledger, offline)
    spend = spend_report(teacher, ledger, projected, reused)  # the speed probe is billed too
    result.spend = (combined_spend(whole, [spend, *(r.spend for r in others)]) if others else None) or spend
    write_spend(config, result.spend)
    return result


def collect_shards(config: GenerateConfig, shard: Shard) -> list[ShardReport]:
    """Shard 0: wait (SIGTERM stops the wait) for the other shards' reports of this Job."""
    from kubedistill.worker.teacher.offline import StopFlag

    with StopFlag() as stop:
        return wait_for_reports(
            store_for(config.output_uri, config), config.output_uri, shard, config.shard_poll_seconds, stop
        )


def write_spend(config: GenerateConfig, spend: TeacherSpend) -> None:
    """The run's spend next to its dataset: the evaluation report carries it (the run report in the store)."""
    uri = join(config.output_uri, TEACHER_SPEND_NAME)
    try:
        store_for(uri, config).put_bytes(uri, json.dumps(spend.to_wire()).encode(), "application/json")
    except StorageError as err:
        log.warning("the teacher spend could not be written to %s: %s", uri, err)


def load_answers(config: GenerateConfig, stats: RunStats) -> AnswerStore:
    start = time.monotonic()
    answers = AnswerStore.for_partition(
        store_for(config.answer_store_uri, config),
        config.answer_store_uri,
        settings_digest(config.teacher),
        flush_every=config.flush_every,
        flush_seconds=config.flush_seconds,
    )
    answers.load()
    stats.store = answers.stats
    stats.load_seconds = time.monotonic() - start
    return answers


def census_run(
    config: GenerateConfig,
    sources: list[Source],
    answers: AnswerStore,
    stats: RunStats,
    counter: PromptCounter,
    counted_with: str,
    shard: Shard | None = None,
) -> tuple[Census, ScanOptions]:
    """Pass 1, logged; a prompt set with nothing usable is an error."""
    teacher = config.teacher
    start = time.monotonic()
    options = scan_options(config)
    if shard is not None and shard.sharded:
        options.owns = shard.owns
    census = take_census(sources, options, answers, teacher.sampling.max_tokens, counter, counted_with)
    options.split_overrides = census.split_overrides
    stats.plan_seconds = time.monotonic() - start
    log.info(
        "generate census: prompts=%d train=%d eval=%d malformed=%d too_long=%d duplicates=%d "
        "answers_stored=%d answers_to_ask=%d teacher=%s",
        census.prompts, census.train, census.eval, census.malformed, census.too_long, census.duplicates,
        census.stored, census.to_ask, teacher.model_name,
    )  # fmt: skip
    if census.prompts == 0:
        raise WorkerError(
            f"no usable prompts in {config.prompts}: {census.malformed} malformed, {census.too_long} too long"
        )
    return census, options


def log_projection(config: GenerateConfig, projected: SpendProjection) -> None:
    teacher = config.teacher
    currency = teacher.pricing.currency if teacher.pricing else None
    cost = f" ({format_money(projected.cost, currency)})" if projected.cost is not None and currency else ""
    budget = teacher.budget
    limit = ""
    if budget is not None:
        limit = " budget:" + (f" maxTokens={budget.max_tokens:,}" if budget.max_tokens else "")
        limit += f" maxCost={budget.max_cost:g} {currency}" if budget.max_cost and currency else ""
    log.info(
        "generate projection: at most %s%s for %d answers (%d prompt tokens counted with the %s, %d answers x "
        "maxTokens %d), %d answers reused from the store at no cost;%s",
        format_tokens(projected.tokens), cost, projected.answers, projected.prompt_tokens, projected.counted_with,
        projected.answers, teacher.sampling.max_tokens, projected.reused, limit or " no budget",
    )  # fmt: skip


def measure_teacher(
    config: GenerateConfig, sources: list[Source], options: ScanOptions, ledger: Ledger, offline: OfflineTeacher | None
) -> SpeedReport | None:
    """The teacher's speed on the prompts the evaluate stage measures the student on (evaluation.speed)."""
    if config.speed is None or not config.speed.enabled:
        return None
    conversations = probe_conversations(sources, options, config.speed.prompts)
    if not conversations:
        return None
    uri = join(config.output_uri, TEACHER_SPEED_NAME)
    store = store_for(uri, config)
    measured = previous_speed(store, uri, config.speed.concurrency, len(conversations))
    if measured is not None:
        log.info("teacher speed: measured by an earlier run of this dataset, reused (nothing asked)")
        return measured
    report: SpeedReport | None
    if offline is not None:
        report = measure_offline(config, offline.llm(), conversations)
    else:
        report = measure_endpoint(config, ledger, conversations)
    if report is not None:
        store.put_bytes(uri, report.model_dump_json(by_alias=True).encode(), "application/json")
        log.info("teacher speed: %s", report.model_dump_json(by_alias=True, exclude_none=True))
    return report


def previous_speed(store: ObjectStore, uri: str, concurrency: int, prompts: int) -> SpeedReport | None:
    """The teacher's speed as an earlier run measured it on the same prompts and levels (the same dataset)."""
    try:
        if not store.exists(uri):
            return None
        report = SpeedReport.model_validate_json(store.get_bytes(uri))
    except (StorageError, ValueError):
        return None
    wanted = [(1, prompts), (concurrency, max(prompts, concurrency))]
    return report if [(lv.concurrency, lv.requests) for lv in report.levels] == wanted else None


# --------------------------------------------------------------------------- inputs


def store_for(uri: str, config: GenerateConfig) -> ObjectStore:
    return open_store(uri, config.storage)


def fetch_sources(config: GenerateConfig, work: Path) -> list[Source]:
    """The prompt files as local files: eval prompts first (they win a duplicate), then the rest."""
    sources = []
    if config.eval_prompts:
        sources.append(
            Source(
                _local_copy(config.eval_prompts, config, work / "eval-prompts.jsonl"),
                config.eval_prompts,
                "eval",
                False,
            )
        )
    split: Split | None = "train" if config.eval_prompts else None
    sources.append(Source(_local_copy(config.prompts, config, work / "prompts.jsonl"), config.prompts, split, True))
    return sources


def _local_copy(uri: str, config: GenerateConfig, target: Path) -> Path:
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise WorkerError(f"prompts file {uri} does not exist")
        return path
    try:
        store_for(uri, config).download_file(uri, target)
    except StorageError as err:
        raise WorkerError(f"cannot read prompts: {err}") from err
    return target


def scan_options(config: GenerateConfig) -> ScanOptions:
    return ScanOptions(
        system_prompt=config.teacher.system_prompt,
        max_prompt_chars=config.max_prompt_chars,
        eval_fraction=config.eval_fraction,
        samples=config.teacher.sampling.n,
        settings=teacher_settings(config.teacher),
        max_examples=config.max_examples,
    )


# --------------------------------------------------------------------------- output


def write_dataset(
    config: GenerateConfig,
    sources: list[Source],
    options: ScanOptions,
    answers: AnswerStore,
    census: Census,
    reasons: Mapping[str, str],
    stats: RunStats,
    work: Path,
) -> GenerateResult:
    """Pass 3: shards in input order, failures.jsonl, and, if the failures are tolerable, the manifest.

    ``reasons``: why the teacher did not answer a key (what failures.jsonl says of it).
    """
    writer = DatasetWriter(
        store_for(config.output_uri, config), config.output_uri, work / "shards", config.shard_records
    )
    writer.begin()
    counts = DatasetCounts(
        prompts=census.prompts,
        malformed=census.malformed,
        too_long=census.too_long,
        duplicates=census.duplicates,
        reused=census.stored,
        requested=stats.requested,
    )
    failed_prompts = 0
    first_reason = ""
    for item in scan(sources, options):
        if isinstance(item, Rejected):
            if item.kind != "duplicate":
                writer.add_failure(
                    FailureRecord(kind=item.kind, source=item.uri, line=item.line, id=item.id, reason=item.reason)
                )
            continue
        prompt_failed = False
        for key in item.keys:
            line = answers.answers.get(key)
            if line is None:
                reason = reasons.get(key, "not answered")
                if not prompt_failed:
                    writer.add_failure(
                        FailureRecord(
                            kind="failed", source=item.uri, line=item.line, id=item.id, key=key, reason=reason
                        )
                    )
                    first_reason = first_reason or reason
                prompt_failed = True
                continue
            writer.add(build_record(item, Answer.from_line(line)))
            if item.split == "eval":
                counts.eval += 1
            else:
                counts.train += 1
        failed_prompts += prompt_failed
    counts.failed = failed_prompts

    fraction = failed_prompts / census.prompts
    if fraction > config.max_failure_fraction:
        where = writer.write_failures()
        raise WorkerError(
            f"the teacher failed for {failed_prompts} of {census.prompts} prompts ({fraction:.1%} > maxFailureFraction "
            f"{config.max_failure_fraction:.1%}), e.g. {first_reason}; answers so far are stored, details in "
            f"{config.output_uri.rstrip('/')}/{where}"
        )
    if counts.train == 0:
        raise WorkerError(f"no training examples: all {counts.eval} answered prompts are in the eval split")
    manifest = writer.finish(
        teacher_model=config.teacher.model_name,
        counts=counts,
        settings_digest=settings_digest(config.teacher),
        teacher_tokenizer=write_teacher_tokenizer(config, work),
    )
    log.info(
        "generate wrote %s: train=%d eval=%d failed=%d malformed=%d too_long=%d reused=%d requested=%d digest=%s",
        config.output_uri, counts.train, counts.eval, counts.failed, counts.malformed, counts.too_long,
        counts.reused, counts.requested, manifest.digest,
    )  # fmt: skip
    return result_of(config, manifest)


def write_teacher_tokenizer(config: GenerateConfig, work: Path) -> str | None:
    """A vLLM teacher's top-k are token ids of its vocabulary: its tokenizer goes beside the dataset, so the
    train stage can check that the student's is the same (objective kd). Returns the relative prefix."""
    spec = config.teacher.vllm
    if spec is None or not config.teacher.logprobs:
        return None
    from kubedistill.worker.teacher.offline import save_tokenizer

    local = save_tokenizer(spec.model, store_for(spec.model, config) if is_s3(spec.model) else None, work)
    upload_dir(store_for(config.output_uri, config), local, join(config.output_uri, TEACHER_TOKENIZER_DIR))
    return TEACHER_TOKENIZER_DIR


def build_record(prompt: Prompt, answer: Answer) -> DatasetRecord:
    return DatasetRecord(
        key=answer.key,
        id=prompt.id,
        split=prompt.split,
        prompt=[Message(role=role, content=content) for role, content in prompt.messages],  # type: ignore[arg-type]
        completion=[Message(role="assistant", content=answer.content)],
        finish_reason=answer.finish_reason,
        usage=Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens),
        topk=answer.topk,
    )


def result_of(config: GenerateConfig, manifest: DatasetManifest) -> GenerateResult:
    counts = manifest.counts
    return GenerateResult(
        dataset_uri=config.output_uri,
        digest=manifest.digest,
        examples=counts.train + counts.eval,
        train=counts.train,
        eval=counts.eval,
        failed=counts.failed,
        malformed=counts.malformed,
        too_long=counts.too_long,
        requested=counts.requested,
        reused=counts.reused,
        prompt_tokens=manifest.usage.prompt_tokens,
        completion_tokens=manifest.usage.completion_tokens,
    )
