"""``kubedistill local run``: a DistillationJob's stages as processes on this machine.

    kubedistill local run job.yaml                          # s3:// URIs -> ~/.cache/kubedistill/local/s3
    kubedistill local run job.yaml --storage-root ./data    # ...or a directory of your choice
    kubedistill local run job.yaml --s3                     # the real store in spec.storage (AWS_* env)
    kubedistill local run job.yaml --serve-seconds 0        # stop after the gate, serve nothing
    kubedistill local run job.yaml --estimate               # what the teacher will cost; nothing is sent

The same manifest that ``kubectl apply`` takes, the same worker configs the
operator renders (builders/stages.py), the same worker processes the pods run,
the same stage keys (reconcile/keys.py): a run here is what the cluster will do,
before anyone spends H100 hours on it. Then the gate, then the distilled model
served by vLLM on localhost.

Without ``--s3``, an ``s3://bucket/key`` URI means ``<storage-root>/bucket/key``, so
a laptop needs no object store. A stage whose result for the same key is already
recorded under ``--workdir`` is not run again (like the operator reusing an
artifact), and the workers themselves resume: generate asks the teacher only for
answers it has not stored, train resumes from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from kubedistill.api.base import describe_validation_error
from kubedistill.api.savings import (
    SpeedComparison,
    TeacherSpend,
    format_money,
    format_tokens,
    savings_line,
    spend_summary,
)
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistillationJob
from kubedistill.api.worker_config import (
    TEACHER_API_KEY_ENV,
    EvaluateResult,
    FetchConfig,
    GenerateResult,
    StorageSettings,
    TrainResult,
)
from kubedistill.builders.plan import STAGES, RunPlan, Stage
from kubedistill.builders.stages import build_stage_config
from kubedistill.local import serve
from kubedistill.local.live import LiveProgress
from kubedistill.local.processes import die_with_parent, terminate
from kubedistill.reconcile.keys import compute_stage_keys

log = logging.getLogger("kubedistill.local")

DEFAULT_HOME = Path(os.environ.get("KUBEDISTILL_LOCAL_HOME", Path.home() / ".cache" / "kubedistill" / "local"))
RESULT_MODELS: dict[str, type[BaseModel]] = {
    "generate": GenerateResult,
    "train": TrainResult,
    "evaluate": EvaluateResult,
}


# A worker stopped by local mode gets this long to save its work, as a pod's grace period.
WORKER_GRACE_SECONDS = 30.0


class LocalRunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class StageFailed(LocalRunError):
    def __init__(self, stage: str, code: int, message: str, log_path: Path) -> None:
        super().__init__(f"{stage} failed (exit code {code}): {message}\n  full log: {log_path}")
        self.stage, self.code, self.reason = stage, code, message


class QualityGateFailed(LocalRunError):
    """The student's teacher agreement is below evaluation.minTeacherAgreement."""


@dataclass(frozen=True)
class LocalOptions:
    """How ``local run`` maps the cluster's world onto this machine."""

    workdir: Path = DEFAULT_HOME / "runs"
    storage_root: Path | None = DEFAULT_HOME / "s3"  # None: use the real store of spec.storage
    serve_seconds: float | None = None  # None: serve until Ctrl-C; 0: do not serve
    port: int = 8000
    evaluate_engine: Literal["vllm", "transformers"] = "vllm"
    python: str = sys.executable
    echo: Callable[[str], None] = field(default=print)
    progress_seconds: float = 5.0  # how often a running stage reports (its live line)
    estimate: bool = False  # project the teacher spend and stop: nothing is sent


@dataclass
class LocalRun:
    """What a run produced: each stage's result and, when it served, the endpoint."""

    job: DistillationJob
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    endpoint: str | None = None
    sample_answer: str | None = None


# --------------------------------------------------------------------------- manifests


def load_documents(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, yaml.YAMLError) as err:
        raise LocalRunError(f"cannot read {path}: {err}") from err
    return docs


def find_job(docs: list[dict[str, Any]], name: str | None = None) -> DistillationJob:
    """The DistillationJob in the file (by name when there are several), validated like the API server would."""
    candidates = [d for d in docs if d.get("kind") == "DistillationJob"]
    if name:
        candidates = [d for d in candidates if d.get("metadata", {}).get("name") == name]
    if len(candidates) != 1:
        found = ", ".join(d.get("metadata", {}).get("name", "?") for d in candidates) or "none"
        raise LocalRunError(f"expected exactly one DistillationJob{f' named {name}' if name else ''}, found: {found}")
    doc = candidates[0]
    doc.setdefault("metadata", {}).setdefault("namespace", "local")
    try:
        return DistillationJob.model_validate(doc)
    except ValidationError as err:
        raise LocalRunError(f"invalid DistillationJob: {describe_validation_error(err)}") from err


def config_map_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc.get("metadata", {}).get("name") == name:
            value = (doc.get("data") or {}).get(key)
            if value is not None:
                return str(value)
    raise LocalRunError(f"ConfigMap {name} with key {key} is referenced but not in the manifest file")


# --------------------------------------------------------------------------- configs


def localise(value: Any, storage_root: Path | None) -> Any:
    """Every ``s3://bucket/key`` string in a config -> ``<storage_root>/bucket/key``."""
    if storage_root is None:
        return value
    if isinstance(value, str) and value.startswith("s3://"):
        return str(storage_root / value.removeprefix("s3://"))
    if isinstance(value, dict):
        return {k: localise(v, storage_root) for k, v in value.items()}
    if isinstance(value, list):
        return [localise(v, storage_root) for v in value]
    return value


def stage_configs(
    plan: RunPlan, docs: list[dict[str, Any]], options: LocalOptions, run_dir: Path
) -> dict[Stage, dict[str, Any]]:
    """The operator's worker configs for this run, rewritten for this machine."""
    settings = OperatorSettings()
    configs = {stage: build_stage_config(plan, stage, settings) for stage in STAGES}
    dataset = plan.job.spec.dataset
    for field_name, source in (("prompts", dataset.prompts), ("evalPrompts", dataset.eval_prompts)):
        if source is not None and source.config_map_ref is not None:
            ref = source.config_map_ref
            path = run_dir / f"{field_name}.jsonl"
            path.write_text(config_map_value(docs, ref.name, ref.key))
            configs["generate"][field_name] = str(path)
    configs["evaluate"]["engine"] = options.evaluate_engine
    # One machine asks from one process: the shards' answers and dataset would be the same.
    configs["generate"]["teacher"].pop("shards", None)
    for stage in STAGES:
        configs[stage]["workDir"] = str(run_dir / "work" / stage)
        # Progress goes to a file the runner shows live, instead of the DistillationJob's ConfigMap.
        progress = {"file": str(run_dir / f"{stage}.progress.json"), "intervalSeconds": options.progress_seconds}
        configs[stage]["progress"] = progress
    return {stage: localise(config, options.storage_root) for stage, config in configs.items()}


# --------------------------------------------------------------------------- stages


def worker_env(stage: str, termination_log: Path) -> dict[str, str]:
    env = serve.vllm_env() if stage in ("generate", "evaluate") else dict(os.environ)
    env["KUBEDISTILL_TERMINATION_LOG"] = str(termination_log)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_worker(stage: str, config: Mapping[str, Any], run_dir: Path, options: LocalOptions) -> dict[str, Any]:
    """One stage as the pod runs it: ``python -m kubedistill.worker <stage> --config <file>``."""
    config_path = run_dir / f"{stage}.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=True))
    termination_log = run_dir / f"{stage}.termination-log"
    termination_log.unlink(missing_ok=True)
    log_path = run_dir / f"{stage}.log"
    argv = [options.python, "-m", "kubedistill.worker", stage, "--config", str(config_path)]
    progress_file = (config.get("progress") or {}).get("file")
    if progress_file:
        Path(progress_file).unlink(missing_ok=True)
    live = LiveProgress(Path(progress_file) if progress_file else None, stage, options.echo)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(stage, termination_log),
            preexec_fn=die_with_parent,
        )
        try:
            code = _wait_showing_progress(proc, live)
        finally:
            # Stopped (SIGTERM/SIGHUP), Ctrl-C or a bug here: the worker gets its SIGTERM, as a pod
            # would, saves what it must, and is killed if it takes longer than a pod's grace.
            terminate(proc, WORKER_GRACE_SECONDS)
    message = termination_log.read_text() if termination_log.exists() else ""
    if code != 0:
        raise StageFailed(stage, code, failure_message(message) or serve.log_tail(log_path, 5), log_path)
    try:
        result: dict[str, Any] = json.loads(message)
    except ValueError as err:
        raise StageFailed(stage, code, f"unreadable result {message!r}", log_path) from err
    return result


def _wait_showing_progress(proc: subprocess.Popen[bytes], live: LiveProgress) -> int:
    """The worker's exit code; meanwhile its progress reports, as they come."""
    code: int | None = None
    try:
        while code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=0.5)
            live.poll()  # after the exit too: the final report, written just before the worker exited
        return code
    finally:
        live.close()


def run_stage(
    stage: Stage, plan: RunPlan, config: Mapping[str, Any], run_dir: Path, options: LocalOptions, run: LocalRun
) -> dict[str, Any]:
    """Run a stage unless a result for the same stage key is recorded; record it."""
    recorded = run_dir.parent / "results" / f"{stage}-{plan.keys.of(stage)}.json"
    result: dict[str, Any] | None = json.loads(recorded.read_text()) if recorded.exists() else None
    storage = StorageSettings.model_validate(config.get("storage", {}))
    if result is not None and artifact_exists(stage, result, storage):
        run.reused.append(stage)
        options.echo(f"  {stage:<9} reused   (key {plan.keys.of(stage)}: inputs unchanged)")
    else:
        options.echo(f"  {stage:<9} running  (log: {run_dir / f'{stage}.log'})")
        started = time.monotonic()
        result = run_worker(stage, config, run_dir, options)
        run.seconds[stage] = time.monotonic() - started
        RESULT_MODELS[stage].model_validate(result)
        recorded.parent.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(result, indent=1, sort_keys=True))
        options.echo(f"  {stage:<9} done     in {run.seconds[stage]:.0f}s: {describe(stage, result)}")
    run.results[stage] = result
    return result


def artifact_exists(stage: str, result: Mapping[str, Any], storage: StorageSettings) -> bool:
    """A recorded result counts only while what it describes is still in storage."""
    from kubedistill.api.dataset import MANIFEST_NAME
    from kubedistill.storage.objectstore import join, open_store
    from kubedistill.worker.fetch import METADATA_NAME

    if stage == "generate":
        uri = join(result["datasetUri"], MANIFEST_NAME)
    elif stage == "train":
        uri = join(result["modelUri"], METADATA_NAME)
    else:
        uri = str(result["reportUri"])
    return open_store(uri, storage).exists(uri)


def failure_message(message: str) -> str:
    """A structured failure (BudgetExceeded, api/worker_config.StageFailure) as its human message."""
    from kubedistill.api.worker_config import StageFailure

    if message.startswith("{"):
        try:
            return StageFailure.model_validate_json(message).message
        except ValidationError:
            pass
    return message


def describe(stage: str, result: Mapping[str, Any]) -> str:
    if stage == "generate":
        spend = TeacherSpend.model_validate(result["spend"]) if result.get("spend") else None
        spent = f", spent {describe_spent(spend)}" if spend is not None and spend.spent is not None else ""
        return (
            f"{result['examples']} examples ({result['train']} train, {result['eval']} eval), "
            f"{result.get('requested', 0)} teacher requests, {result.get('failed', 0)} failed{spent}"
        )
    if stage == "train":
        objective = result.get("objective", "sft")
        losses = result.get("losses") or {}
        terms = sorted(losses.items(), key=lambda item: item[0] != "loss")  # the total first, then its terms
        final = " ".join(f"{name} {value:.4f}" for name, value in terms)
        scored = result.get("teacherTokensScored")
        extra = f", {scored} tokens scored by the teacher" if scored else ""
        return f"objective {objective}, step {result['globalStep']}, final {final or 'loss n/a'}{extra}"
    return f"teacher agreement {result['teacherAgreement']:.3f} over {result['examples']} examples"


def describe_spent(spend: TeacherSpend) -> str:
    spent = spend.spent
    assert spent is not None
    money = f"{format_money(spent.cost, spend.currency)}, " if spent.cost is not None and spend.currency else ""
    return f"{money}{format_tokens(spent.tokens)} on {spent.requests:,} requests"


def describe_projection(spend: TeacherSpend, max_tokens: int) -> list[str]:
    """The estimate's lines: what is left to ask and what it may cost, against the budget."""
    projected = spend.projected
    assert projected is not None
    lines = [
        f"  answers   {projected.answers:,} to ask ({projected.reused:,} already in the answer store, free)",
        f"  tokens    at most {projected.tokens:,} ({projected.prompt_tokens:,} prompt tokens counted with the "
        f"{projected.counted_with} + {projected.answers:,} answers x maxTokens {max_tokens})",
    ]
    if projected.cost is not None and spend.currency:
        lines.append(f"  cost      at most {format_money(projected.cost, spend.currency)} at teacher.pricing")
    if spend.budget is not None:
        limits = {"maxTokens": (spend.budget.max_tokens, projected.tokens), "maxCost": (spend.budget.max_cost,
                  projected.cost)}  # fmt: skip
        over = [
            name for name, (limit, need) in limits.items() if limit is not None and need is not None and need > limit
        ]
        verdict = f"may stop at {' and '.join(over)} (BudgetExceeded)" if over else "the projection fits"
        lines.append(f"  budget    {verdict}")
    return lines


def describe_spend_line(generate: Mapping[str, Any]) -> list[str]:
    """What the teacher cost against the budget and the projection made before the first request."""
    if not generate.get("spend"):
        return []
    spend = TeacherSpend.model_validate(generate["spend"])
    line = f"  spend     {spend_summary(spend) or 'nothing'}"
    if spend.budget is not None:
        line += f", budget {spend.budget.state}"
    projected = spend.projected
    if projected is not None:
        line += (
            f" (projected before the first request: at most {format_tokens(projected.tokens)}"
            + (
                f", {format_money(projected.cost, spend.currency)}"
                if projected.cost is not None and spend.currency
                else ""
            )
            + f" for {projected.answers:,} answers; {projected.reused:,} reused from the answer store)"
        )
    return [line]


def describe_savings(job: DistillationJob, evaluate: Mapping[str, Any]) -> list[str]:
    """The trade in a few lines: quality kept, speed and cost per answer against the teacher."""
    speed = SpeedComparison.model_validate(evaluate["speed"]) if evaluate.get("speed") else None
    metric = job.spec.evaluation.agreement_metric
    lines = [f"  savings   {savings_line(float(evaluate['teacherAgreement']), metric, speed)}"]
    if speed is None:
        return lines
    for who, report in (("student", speed.student), ("teacher", speed.teacher)):
        if report is None:
            continue
        parts = []
        for level in report.levels:
            ttft = f"{level.ttft_p50 * 1000:.0f} ms" if level.ttft_p50 is not None else "-"
            tps = f"{level.tokens_per_second_p50:.0f} tok/s" if level.tokens_per_second_p50 is not None else "-"
            aps = f"{level.answers_per_second:.1f} answers/s" if level.answers_per_second is not None else "-"
            parts.append(f"c={level.concurrency}: TTFT p50 {ttft}, {tps} p50, {aps}")
        lines.append(f"            {who}  " + "; ".join(parts) + f"  [{report.engine}]")
    if speed.teacher_cost_per_million_answers is not None and speed.student_cost_per_million_answers is not None:
        currency = speed.currency or "USD"
        lines.append(
            f"            per 1M answers: teacher {format_money(speed.teacher_cost_per_million_answers, currency)}, "
            f"student {format_money(speed.student_cost_per_million_answers, currency)}"
        )
    if speed.note:
        lines.append(f"            ({speed.note})")
    return lines


def check_gate(job: DistillationJob, result: Mapping[str, Any], echo: Callable[[str], None]) -> None:
    evaluation = job.spec.evaluation
    agreement = float(result["teacherAgreement"])
    passed = evaluation.passes(agreement)
    verdict = "passed" if passed else "FAILED"
    echo(
        f"  gate      {verdict}   {evaluation.agreement_metric} agreement {agreement:.3f} "
        f"(minimum {evaluation.min_teacher_agreement:.3f})"
    )
    if not passed:
        raise QualityGateFailed(
            f"QualityGateFailed: teacher agreement {agreement:.3f} is below evaluation.minTeacherAgreement "
            f"{evaluation.min_teacher_agreement:.3f}; see the report at {result['reportUri']}"
        )


# --------------------------------------------------------------------------- serving


def fetch_model(train: Mapping[str, Any], run_dir: Path, options: LocalOptions, storage: StorageSettings) -> Path:
    """The exported model in a local directory, through the same fetch worker the serving pod's init container runs."""
    destination = run_dir / "served-model"
    config = FetchConfig(
        model_uri=localise(train["modelUri"], options.storage_root),
        destination=str(destination),
        digest=train.get("digest"),
        storage=storage,
    )
    run_worker("fetch", config.to_wire(), run_dir, options)
    return destination


def serve_model(
    job: DistillationJob, model_dir: Path, adapter: bool, run_dir: Path, options: LocalOptions, run: LocalRun
) -> None:
    name = job.spec.output.model.name
    if adapter:
        base = localise(job.spec.student.model, options.storage_root)
        argv = serve.vllm_server_argv(
            base, served_model_name=f"{name}-base", port=options.port, lora_modules={name: str(model_dir)},
            python=options.python,
        )  # fmt: skip
    else:
        argv = serve.vllm_server_argv(str(model_dir), served_model_name=name, port=options.port, python=options.python)
    log_path = run_dir / "serve.log"
    options.echo(f"  serve     starting vLLM (log: {log_path})")
    proc = serve.start_server(argv, log_path, serve.vllm_env())
    try:
        seconds = serve.wait_healthy(f"http://127.0.0.1:{options.port}/health", proc, log_path)
        run.endpoint = f"http://127.0.0.1:{options.port}/v1"
        prompt = first_eval_prompt(run)
        answer = serve.chat(run.endpoint, name, prompt, max_tokens=64, temperature=0)
        run.sample_answer = answer["choices"][0]["message"]["content"]
        options.echo(f"  serve     ready in {seconds:.0f}s at {run.endpoint} (model {name!r})")
        options.echo(f"            {prompt[-1]['content']!r} -> {run.sample_answer!r}")
        options.echo(
            f"            curl {run.endpoint}/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "..."}}]}}\''
        )
        wait_while_serving(proc, options)
    finally:
        serve.stop_server(proc)


def first_eval_prompt(run: LocalRun) -> list[dict[str, str]]:
    report = run.results["evaluate"]["reportUri"]
    try:
        with open(report) as handle:
            key = json.load(handle)["examples"][0]["key"]
    except (OSError, ValueError, KeyError, IndexError):
        key = None
    return _prompt_for(run, key)


def _prompt_for(run: LocalRun, key: str | None) -> list[dict[str, str]]:
    from kubedistill.storage.datasets import load_records
    from kubedistill.storage.objectstore import open_store

    dataset_uri = run.results["generate"]["datasetUri"]
    _, records = load_records(open_store(dataset_uri), dataset_uri, split="eval")
    chosen = next((r for r in records if r.key == key), records[0])
    return [m.to_wire() for m in chosen.prompt]


def wait_while_serving(proc: subprocess.Popen[bytes], options: LocalOptions) -> None:
    if options.serve_seconds is None:
        options.echo("            serving until Ctrl-C")
        try:
            proc.wait()
        except KeyboardInterrupt:
            options.echo("\n  serve     stopping")
        return
    deadline = time.monotonic() + options.serve_seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)


# --------------------------------------------------------------------------- the run


def run_local(manifest: Path, options: LocalOptions, job_name: str | None = None) -> LocalRun:
    """Generate, train, evaluate, gate, serve: the whole DistillationJob on this machine."""
    docs = load_documents(manifest)
    job = find_job(docs, job_name)
    plan = RunPlan(job=job, keys=compute_stage_keys(job.spec))
    run_dir = options.workdir / (job.metadata.name or "job") / plan.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = stage_configs(plan, docs, options, run_dir)
    warn_missing_key(job, options)
    run = LocalRun(job=job)
    if options.estimate:
        options.echo(f"kubedistill local run {job.metadata.name} --estimate: nothing is sent to the teacher")
        projected = TeacherSpend.model_validate(run_worker("estimate", configs["generate"], run_dir, options))
        for line in describe_projection(projected, job.spec.teacher.sampling.max_tokens):
            options.echo(line)
        run.results["estimate"] = projected.to_wire()
        return run
    options.echo(f"kubedistill local run {job.metadata.name} (run {plan.run_id}, files in {run_dir})")
    for stage in STAGES:
        run_stage(stage, plan, configs[stage], run_dir, options, run)
    for line in [*describe_spend_line(run.results["generate"]), *describe_savings(job, run.results["evaluate"])]:
        options.echo(line)
    check_gate(job, run.results["evaluate"], options.echo)
    if job.spec.output.model.serve and options.serve_seconds != 0:
        storage = StorageSettings.model_validate(configs["train"]["storage"])
        model_dir = fetch_model(run.results["train"], run_dir, options, storage)
        serve_model(job, model_dir, bool(run.results["train"].get("adapter")), run_dir, options, run)
    return run


def warn_missing_key(job: DistillationJob, options: LocalOptions) -> None:
    endpoint = job.spec.teacher.endpoint
    if endpoint is not None and endpoint.api_key_secret_ref is not None and not os.environ.get(TEACHER_API_KEY_ENV):
        options.echo(
            "note: spec.teacher.endpoint.apiKeySecretRef is set; "
            f"in local mode the key comes from ${TEACHER_API_KEY_ENV}"
        )
