"""evaluate: the student answers the held-out prompts; its answers are scored against the teacher's.

    kubedistill-worker evaluate --config evaluate.yaml

The result's ``teacherAgreement`` is the mean of ``evaluation.agreementMetric``
over the eval split; the operator (or local mode) compares it with
``minTeacherAgreement``. A full report (per-example answers and scores) goes to
``<reportUri>/report.json``.

The student generates with vLLM (offline batch inference, the same engine that
serves it later, so what is measured is what is served) or, where vLLM is not
available, with transformers.

With ``evaluation.speed`` (and vLLM), the student's serving speed is then measured
on the first ``speed.prompts`` held-out prompts at concurrency 1 and at
``speed.concurrency`` (worker/speed.py: TTFT and output tokens/s from vLLM's
per-request metrics, p50 and p95), and set against the teacher's, which the
generate stage measured the same way on the same prompts (teacher-speed.json in
the dataset): the speedup, and the cost ratio per million answers (the teacher at
its price table, or at the GPU-hour price for an in-cluster teacher; the student
at ``speed.gpuHourPrice`` over its measured throughput).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kubedistill.api.dataset import TEACHER_SPEED_NAME, TEACHER_SPEND_NAME, DatasetRecord, Message
from kubedistill.api.savings import SpeedComparison, SpeedReport, TokenSpend, compare_speed
from kubedistill.api.worker_config import EvaluateConfig, EvaluateResult
from kubedistill.storage.datasets import DatasetError, load_records
from kubedistill.storage.objectstore import ObjectStore, StorageError, download_prefix, is_s3, join, open_store
from kubedistill.worker import metrics
from kubedistill.worker.common import WorkerError
from kubedistill.worker.fetch import METADATA_NAME
from kubedistill.worker.report import ProgressReporter

CONFIG = EvaluateConfig
log = logging.getLogger("kubedistill.worker.evaluate")

Conversation = list[dict[str, str]]


def main(config: EvaluateConfig) -> dict[str, Any]:
    store = open_store(config.dataset_uri, config.storage)
    records = load_eval_records(store, config)
    conversations = unique_prompts(records)
    log.info("evaluating on %d records (%d distinct prompts)", len(records), len(conversations))

    model_dir = resolve_model(config)
    reporter = ProgressReporter(config.progress, "evaluate", "examples", total=len(conversations))
    started = time.monotonic()
    answers, student_speed = generate_answers(config, model_dir, list(conversations.values()), reporter)
    seconds = time.monotonic() - started
    reporter.update(len(answers), force=True)
    reporter.finish()
    answer_by_prompt = dict(zip(conversations, answers, strict=True))

    examples = score_records(config, records, answer_by_prompt)
    summary = summarise(config, examples)
    speed = compare(config, store, records, student_speed)
    report = {
        **summary,
        "agreementMetric": config.evaluation.agreement_metric,
        "generationSeconds": round(seconds, 3),
        "engine": config.engine,
        "training": training_summary(model_dir),
        "speed": speed.to_wire() if speed is not None else None,
        "teacherSpend": read_json(store, join(config.dataset_uri, TEACHER_SPEND_NAME)),
        "examples": examples,
    }
    report_uri = join(config.report_uri, "report.json")
    write_report(config, report, report_uri)
    result = EvaluateResult(
        teacher_agreement=summary["teacherAgreement"],
        metrics=summary["metrics"],
        examples=len(examples),
        report_uri=report_uri,
        speed=speed,
    )
    return result.to_wire()


def compare(
    config: EvaluateConfig, store: ObjectStore, records: list[DatasetRecord], student: SpeedReport | None
) -> SpeedComparison | None:
    """The student against the teacher (evaluation.speed); None when speed is not measured."""
    speed = config.evaluation.speed
    if not speed.enabled:
        return None
    pricing = config.teacher_pricing
    comparison = compare_speed(
        student,
        read_teacher_speed(store, config),
        speed.concurrency,
        teacher_cost_per_answer=teacher_cost_per_answer(config, records),
        gpu_hour_price=speed.gpu_hour_price,
        currency=pricing.currency if pricing is not None else None,
    )
    if student is None and config.engine != "vllm":
        comparison.note = f"the student's speed is measured with vLLM; this evaluation ran on {config.engine}"
    log.info("speed: %s", comparison.model_dump_json(by_alias=True, exclude_none=True, exclude={"student", "teacher"}))
    return comparison


def read_json(store: ObjectStore, uri: str) -> Any:
    """A small JSON document the generate stage left next to the dataset, or None."""
    try:
        return json.loads(store.get_bytes(uri)) if store.exists(uri) else None
    except (StorageError, ValueError) as err:
        log.warning("%s is unreadable: %s", uri, err)
        return None


def read_teacher_speed(store: ObjectStore, config: EvaluateConfig) -> SpeedReport | None:
    uri = join(config.dataset_uri, TEACHER_SPEED_NAME)
    try:
        return SpeedReport.model_validate_json(store.get_bytes(uri)) if store.exists(uri) else None
    except (StorageError, ValueError) as err:
        log.warning("the teacher's speed at %s is unreadable: %s", uri, err)
        return None


def teacher_cost_per_answer(config: EvaluateConfig, records: list[DatasetRecord]) -> float | None:
    """What one of these answers costs at the teacher's online prices: their own bills, averaged.

    Online prices, not batch: the comparison is with serving, where the teacher is asked online.
    """
    if config.teacher_pricing is None or not records:
        return None
    usage = TokenSpend(
        prompt_tokens=sum(record.usage.prompt_tokens for record in records),
        completion_tokens=sum(record.usage.completion_tokens for record in records),
    )
    return config.teacher_pricing.cost(usage) / len(records)


def load_eval_records(store: ObjectStore, config: EvaluateConfig) -> list[DatasetRecord]:
    try:
        _, records = load_records(store, config.dataset_uri, split="eval")
    except (DatasetError, StorageError) as err:
        raise WorkerError(str(err)) from err
    if not records:
        raise WorkerError(f"the dataset at {config.dataset_uri} has no eval records: raise dataset.evalFraction")
    records.sort(key=lambda record: record.key)  # deterministic subset when max_examples cuts
    return records[: config.evaluation.max_examples] if config.evaluation.max_examples else records


def prompt_id(messages: list[Message]) -> str:
    return json.dumps([m.to_wire() for m in messages], sort_keys=True)


def unique_prompts(records: list[DatasetRecord]) -> dict[str, Conversation]:
    """Distinct prompts in first-seen order: with n > 1 the student answers each once."""
    out: dict[str, Conversation] = {}
    for record in records:
        out.setdefault(prompt_id(record.prompt), [m.to_wire() for m in record.prompt])
    return out


def score_records(
    config: EvaluateConfig, records: list[DatasetRecord], answers: dict[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        student = answers[prompt_id(record.prompt)]
        teacher = record.completion[0].content
        rows.append(
            {
                "key": record.key,
                "id": record.id,
                "teacher": teacher,
                "student": student,
                "scores": metrics.score(config.evaluation.metrics, student, teacher),
            }
        )
    return rows


def summarise(config: EvaluateConfig, examples: list[dict[str, Any]]) -> dict[str, Any]:
    means = metrics.mean_scores([e["scores"] for e in examples], config.evaluation.metrics)
    return {
        "teacherAgreement": means[config.evaluation.agreement_metric],
        "metrics": {name: round(value, 6) for name, value in means.items()},
    }


def write_report(config: EvaluateConfig, report: dict[str, Any], uri: str) -> None:
    try:
        open_store(uri, config.storage).put_bytes(
            uri, json.dumps(report, indent=1).encode(), content_type="application/json"
        )
    except StorageError as err:
        raise WorkerError(f"cannot write the evaluation report: {err}") from err


def training_summary(model_dir: Path) -> dict[str, Any] | None:
    """How the student was trained, from its export's kubedistill.json: the objective and its final losses."""
    try:
        metadata = json.loads((model_dir / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return None
    metrics = metadata.get("metrics") or {}
    return {
        "objective": (metadata.get("trainer_config") or {}).get("objective", "sft"),
        "globalStep": metadata.get("global_step"),
        "losses": metrics.get("losses") or {},
        "teacherTokensScored": metrics.get("teacher_tokens_scored"),
    }


def resolve_model(config: EvaluateConfig) -> Path:
    """A local directory holding the student (downloaded when it lives in S3)."""
    if not is_s3(config.model_uri):
        path = Path(config.model_uri.removeprefix("file://"))
        if not path.is_dir():
            raise WorkerError(f"student model directory {path} does not exist")
        return path
    dest = Path(config.work_dir) / "student"
    try:
        files = download_prefix(open_store(config.model_uri, config.storage), config.model_uri, dest)
    except StorageError as err:
        raise WorkerError(f"cannot download the student model: {err}") from err
    if not files:
        raise WorkerError(f"no student model at {config.model_uri}: did the train stage export it?")
    return dest


def generate_answers(
    config: EvaluateConfig, model_dir: Path, conversations: list[Conversation], reporter: ProgressReporter | None = None
) -> tuple[list[str], SpeedReport | None]:
    """The student's answers, and (vLLM, evaluation.speed) its measured speed."""
    reporter = reporter or ProgressReporter(None, "evaluate", "examples", total=len(conversations))
    if config.engine == "vllm":
        return generate_with_vllm(config, model_dir, conversations, reporter)
    return generate_with_transformers(config, model_dir, conversations, reporter), None


# vLLM answers in chunks of at least this many prompts (and about ten chunks), so progress moves
# while its scheduler still gets full batches.
MIN_CHUNK = 32


def generate_with_vllm(
    config: EvaluateConfig, model_dir: Path, conversations: list[Conversation], reporter: ProgressReporter
) -> tuple[list[str], SpeedReport | None]:
    from vllm import LLM, SamplingParams

    from kubedistill.worker.speed import probe_offline

    sampling = config.sampling
    params = SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
    )
    # Per-request metrics (RequestOutput.metrics) are what the speed is measured from.
    engine_args: dict[str, Any] = {"seed": sampling.seed or 0, "disable_log_stats": False}
    if config.max_model_len:
        engine_args["max_model_len"] = config.max_model_len
    lora_request = None
    if config.base_model:
        from vllm.lora.request import LoRARequest

        engine_args |= {"enable_lora": True, "max_lora_rank": adapter_rank(model_dir)}
        lora_request = LoRARequest("student", 1, str(model_dir))
        llm = LLM(model=config.base_model, **engine_args)
    else:
        llm = LLM(model=str(model_dir), **engine_args)
    chunk = max(MIN_CHUNK, -(-len(conversations) // 10))
    answers: list[str] = []
    for start in range(0, len(conversations), chunk):
        part = conversations[start : start + chunk]
        outputs = llm.chat(part, params, lora_request=lora_request, use_tqdm=False)  # type: ignore[arg-type]
        answers += [output.outputs[0].text for output in outputs]
        reporter.update(len(answers))
    speed = config.evaluation.speed
    if not speed.enabled:
        return answers, None
    timed = SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        ignore_eos=True,  # every measured answer has maxTokens tokens, as the teacher's (worker/speed.py)
    )
    measured = probe_offline(
        llm, conversations[: speed.prompts], timed, speed.concurrency, gpus=config.gpus, lora_request=lora_request
    )
    log.info("student speed: %s", measured.model_dump_json(by_alias=True, exclude_none=True))
    return answers, measured


def adapter_rank(model_dir: Path) -> int:
    rank = int(json.loads((model_dir / "adapter_config.json").read_text()).get("r", 16))
    # vLLM accepts only a fixed set of maximum ranks.
    return next(size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= rank)


def generate_with_transformers(
    config: EvaluateConfig, model_dir: Path, conversations: list[Conversation], reporter: ProgressReporter
) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any
    if config.base_model:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    if config.sampling.seed is not None:
        torch.manual_seed(config.sampling.seed)
    greedy = config.sampling.temperature == 0.0
    answers = []
    for conversation in conversations:
        inputs: Any = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=config.sampling.max_tokens,
                do_sample=not greedy,
                temperature=None if greedy else config.sampling.temperature,
                top_p=None if greedy else config.sampling.top_p,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        answers.append(str(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
        reporter.update(len(answers))
    return answers
