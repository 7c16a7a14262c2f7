"""The worker contract: what the operator (or local mode) hands each stage.

The operator renders one YAML file per stage into the ``<job>-config``
ConfigMap (``generate.yaml``, ``train.yaml``, ``evaluate.yaml``); the pod runs
``kubedistill-worker <stage> --config /etc/kubedistill/<stage>.yaml`` and the
worker validates the file with these models. Secrets are never part of a
config: the teacher API key and the S3 credentials arrive as environment
variables (``secretKeyRef`` in the pod), named by ``*_env`` fields here.

URIs are ``s3://bucket/prefix`` or, for local mode and tests, local paths.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubedistill.api.base import ApiModel
from kubedistill.api.savings import SpeedComparison, SpeedReport, SpeedSpec, TeacherPricing, TeacherSpend
from kubedistill.api.v1alpha1 import EvaluationSpec, Objective, Sampling, StudentSpec, TeacherSpec

TEACHER_API_KEY_ENV = "KUBEDISTILL_TEACHER_API_KEY"
# teacher.shards: the pod's shard (an Indexed Job sets JOB_COMPLETION_INDEX in every pod) and the
# Job's uid (from the pod's controller-uid label), which names the run's shard reports.
SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"
SHARD_RUN_ENV = "KUBEDISTILL_SHARD_RUN"
CONFIG_DIR = "/etc/kubedistill"
TERMINATION_LOG = "/dev/termination-log"
# How a worker process ends (the operator reads the code from the pod, local mode from the process):
EXIT_OK = 0  # done; the one-line JSON result is in the termination log
EXIT_FAILED = 1  # a WorkerError: bad input or a gate the worker checks; retrying cannot help
EXIT_INTERNAL = 2  # a bug or a hang cut short: a retry may help
EXIT_PREEMPTED = 143  # SIGTERM, state saved: not the workload's fault, a restart resumes
# The pod's terminationGracePeriodSeconds: how long a stage has after SIGTERM.
GRACE_SECONDS_ENV = "KUBEDISTILL_GRACE_SECONDS"

# The stages of a DistillationJob run, in order: the operator, the workers and local mode all
# name them with these (the Job names, the status, the worker commands, the settings).
RunStage = Literal["generate", "train", "evaluate"]
STAGES: tuple[RunStage, ...] = ("generate", "train", "evaluate")
Stage = RunStage | Literal["fetch"]  # what reports progress: the run's stages and a serving pod's fetch


class ProgressTarget(ApiModel):
    """Where a running stage reports its progress, and how often.

    In a pod: a ConfigMap the operator created for the DistillationJob, which the pod's
    ServiceAccount may update and nothing else; in local mode: a file the runner renders.
    """

    config_map: str | None = Field(default=None, description="ConfigMap to write, in the pod's namespace.")
    namespace: str | None = Field(default=None, description="Namespace of that ConfigMap.")
    file: str | None = Field(default=None, description="Local mode: a JSON file, rewritten at each report.")
    job: str | None = Field(default=None, description="The stage's Job: reports carry it, so stale ones are ignored.")
    shard: int | None = Field(
        default=None, ge=0, description="teacher.shards: this pod's shard; its reports go under '<stage>.<shard>'."
    )
    interval_seconds: float = Field(default=30.0, ge=1.0, le=3600, description="Seconds between reports.")


class StageProgress(ApiModel):
    """One progress report of a running stage (the value a worker writes under its stage's key)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    stage: Stage
    job: str | None = Field(default=None, description="The Job that reports (see ProgressTarget.job).")
    shard: int | None = Field(default=None, ge=0, description="The shard that reports (teacher.shards), if any.")
    done: float = Field(ge=0, description="Units done so far (answers, optimizer steps, examples).")
    total: float | None = Field(default=None, ge=0, description="Units in all, where known.")
    unit: str = Field(description="What is counted: answers, steps or examples.")
    rate: float | None = Field(default=None, ge=0, description="Units per second, recently.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Seconds to go at that rate.")
    details: dict[str, float | int | str] = Field(
        default_factory=dict,
        description="Stage specifics: reused, failed, retries, teacherTokens (generate); epoch, loss, "
        "tokensPerSecond, checkpointStep (train).",
    )
    updated_at: str = Field(description="When the worker wrote it (RFC 3339, UTC).")

    @property
    def key(self) -> str:
        """Its key in the progress ConfigMap: the stage, or '<stage>.<shard>' for one shard of several."""
        return self.stage if self.shard is None else f"{self.stage}.{self.shard}"

    @classmethod
    def combined(cls, shards: list[StageProgress]) -> StageProgress:
        """The reports of a stage's shards as one: counts and rates added, the slowest shard's ETA, and
        each shard's percentage in ``details.shards`` (e.g. '0 41%, 1 38%, 2 done')."""
        ordered = sorted(shards, key=lambda r: r.shard or 0)
        first = ordered[0]
        totals = [r.total for r in ordered]
        rates = [r.rate for r in ordered if r.rate is not None]
        etas = [r.eta_seconds for r in ordered if r.eta_seconds is not None]
        each = ", ".join(
            f"{r.shard} " + ("?" if r.fraction is None else "done" if r.fraction >= 1 else f"{r.fraction:.0%}")
            for r in ordered
        )
        return first.model_copy(
            update={
                "shard": None,
                "done": sum(r.done for r in ordered),
                "total": None if any(t is None for t in totals) else sum(t or 0 for t in totals),
                "rate": sum(rates) if rates else None,
                "eta_seconds": max(etas) if etas else None,
                "details": {"shards": each},
                "updated_at": max(r.updated_at for r in ordered),
            }
        )

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def summary(self) -> str:
        """One short human line: '412,000/1,000,000 answers, 118/s, ETA 1h23m'."""
        done = f"{self.done:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        parts = [f"{done} {self.unit}"]
        if self.rate is not None:
            parts.append(f"{self.rate:,.1f}/s" if self.rate < 10 else f"{self.rate:,.0f}/s")
        loss = self.details.get("loss")
        if isinstance(loss, int | float):
            parts.append(f"loss {loss:.3f}")
        if self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        shards = self.details.get("shards")
        line = ", ".join(parts)
        return f"{line} (shards: {shards})" if shards else line


def format_duration(seconds: float) -> str:
    """3h05m, 12m07s, 45s."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class StorageSettings(ApiModel):
    """How workers reach the object store. Credentials come from AWS_* environment variables."""

    endpoint: str | None = Field(default=None, description="S3 endpoint URL; AWS when unset.")
    region: str = Field(default="us-east-1")
    addressing_style: Literal["auto", "path", "virtual"] = Field(default="auto")


class GenerateConfig(ApiModel):
    """generate: prompts -> teacher answers -> dataset shards + manifest."""

    prompts: str = Field(description="s3:// URI or local path of the prompts JSONL.")
    eval_prompts: str | None = Field(default=None, description="Separate held-out prompts JSONL.")
    format: Literal["chat", "prompt"] = "chat"
    teacher: TeacherSpec
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_examples: int | None = Field(default=None, ge=1)
    max_prompt_chars: int = Field(default=32000, ge=1)
    max_failure_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    output_uri: str = Field(description="Dataset prefix: shards/ and manifest.json are written here.")
    answer_store_uri: str = Field(
        description="Content-addressed store of teacher answers shared by every run of the job: "
        "an answer found here is never requested again."
    )
    api_key_env: str = Field(
        default=TEACHER_API_KEY_ENV, description="Environment variable holding the teacher API key."
    )
    storage: StorageSettings = Field(default_factory=StorageSettings)
    work_dir: str = Field(
        default="/tmp/kubedistill", description="Local scratch directory (prompts, shards, teacher model)."
    )
    flush_every: int = Field(
        default=500, ge=1, description="Write buffered answers to the answer store once this many are waiting."
    )
    flush_seconds: float = Field(
        default=5.0, gt=0, description="... or once the oldest waiting answer is this old: what a SIGKILL can lose."
    )
    shard_records: int = Field(default=10000, ge=1, description="Most records per dataset shard.")
    shard_poll_seconds: float = Field(
        default=5.0, gt=0, description="teacher.shards: how often shard 0 looks for the other shards' reports."
    )
    progress: ProgressTarget = Field(
        default_factory=ProgressTarget, description="Where live progress goes (and the interval of its log lines)."
    )
    backoff_initial_seconds: float = Field(default=1.0, gt=0, description="First retry backoff (doubles, full jitter).")
    backoff_max_seconds: float = Field(
        default=60.0, gt=0, description="Longest retry backoff (Retry-After may ask more)."
    )
    drain_seconds: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long requests in flight may finish before the worker exits."
    )
    offline_batch_size: int = Field(
        default=256, ge=1, description="vLLM teacher: prompts per generate call (answers are stored after each)."
    )
    speed: SpeedSpec | None = Field(
        default=None,
        description="Measure the teacher's speed on the held-out prompts as the evaluate stage measures the "
        "student's (evaluation.speed); unset: not measured.",
    )


class TrainConfig(ApiModel):
    """train: dataset -> fine-tuned student -> exported model."""

    student: StudentSpec
    teacher: TeacherSpec | None = Field(
        default=None,
        description="objective onPolicy: the teacher that scores the student's tokens (its vLLM server, "
        "or the model the worker serves with vLLM for the run).",
    )
    api_key_env: str = Field(
        default=TEACHER_API_KEY_ENV, description="objective onPolicy: environment variable holding the teacher API key."
    )
    dataset_uri: str = Field(description="Dataset prefix written by generate (manifest.json inside).")
    output_uri: str = Field(description="Prefix the exported model is uploaded to.")
    checkpoint_uri: str = Field(description="Prefix for checkpoints; a restarted run resumes from the newest one.")
    keep_checkpoints: int = Field(
        default=2, ge=1, le=100, description="Complete checkpoints kept under checkpoint_uri; older ones are deleted."
    )
    log_every_steps: int = Field(default=10, ge=1, description="Log loss, learning rate and tokens/s every N steps.")
    progress: ProgressTarget = Field(default_factory=ProgressTarget, description="Where live progress goes.")
    work_dir: str = Field(default="/tmp/kubedistill", description="Local scratch directory.")
    storage: StorageSettings = Field(default_factory=StorageSettings)

    @model_validator(mode="after")
    def _on_policy_has_teacher(self) -> TrainConfig:
        if self.student.objective == "onPolicy" and self.teacher is None:
            raise ValueError("student.objective onPolicy needs teacher: the model that scores the student's tokens")
        return self


class EvaluateConfig(ApiModel):
    """evaluate: student answers held-out prompts, compared with the teacher's answers; the gate."""

    model_uri: str = Field(description="Prefix of the exported student model.")
    base_model: str | None = Field(default=None, description="Base model when model_uri holds a LoRA adapter.")
    dataset_uri: str = Field(description="Dataset prefix; its eval split holds prompts and teacher answers.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    sampling: Sampling = Field(default_factory=Sampling, description="Student sampling (greedy by default).")
    report_uri: str = Field(description="Where report.json is written.")
    engine: Literal["vllm", "transformers"] = Field(default="vllm", description="How the student generates.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length vLLM allocates for.")
    progress: ProgressTarget = Field(default_factory=ProgressTarget, description="Where live progress goes.")
    work_dir: str = Field(default="/tmp/kubedistill")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    gpus: int = Field(default=1, ge=0, description="GPUs of the evaluate pod: the student's serving hardware.")
    teacher_pricing: TeacherPricing | None = Field(
        default=None, description="The teacher's price table (teacher.pricing): its cost per answer."
    )


class FetchConfig(ApiModel):
    """fetch: copy an exported model prefix into a local directory (serving init container)."""

    model_uri: str
    destination: str
    digest: str | None = Field(default=None, description="Expected model digest; fetch fails on mismatch.")
    storage: StorageSettings = Field(default_factory=StorageSettings)


class AdapterEntry(ApiModel):
    """One LoRA adapter every replica of a pool loads, at one version (its revision)."""

    name: str = Field(min_length=1, description="Served model name of the adapter (its DistilledModel).")
    uri: str = Field(min_length=1, description="s3:// prefix of the exported adapter.")
    digest: str | None = Field(default=None, description="Expected digest; the sidecar refuses another.")
    revision: str = Field(min_length=1, description="Identifies this version: a change reloads the adapter in place.")
    storage: StorageSettings = Field(default_factory=StorageSettings)


class AdapterSet(ApiModel):
    """adapter-sync: what a pool's replicas load (the pool's adapters ConfigMap, updated in place)."""

    adapters: list[AdapterEntry] = Field(default_factory=list)


# --------------------------------------------------------------------------- results
# Each stage's success summary: the worker writes it as one JSON line to
# /dev/termination-log (and returns it from main); the operator parses it with
# these models into DistillationJob.status. Keep them small: 4096 bytes at most.


class GenerateResult(ApiModel):
    """Summary of a finished generate stage."""

    dataset_uri: str
    digest: str = Field(description="The dataset manifest's digest.")
    examples: int = Field(description="Training + eval records written.")
    train: int
    eval: int
    failed: int = 0
    malformed: int = 0
    too_long: int = 0
    requested: int = Field(default=0, description="Teacher requests made by this run (0 when everything was stored).")
    reused: int = Field(default=0, description="Answers taken from the answer store instead of asking the teacher.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend: TeacherSpend | None = Field(default=None, description="What this run projected and spent on the teacher.")
    teacher_speed: SpeedReport | None = Field(
        default=None, description="The teacher's measured speed on the held-out prompts (when evaluation.speed)."
    )


class TrainResult(ApiModel):
    """Summary of a finished train stage."""

    model_uri: str
    digest: str = Field(description="sha256 over the exported files (names and contents).")
    global_step: int
    train_loss: float | None = None
    tokens_per_second: float | None = None
    adapter: bool = Field(default=False, description="True when model_uri holds a LoRA adapter, not merged weights.")
    tokens: int | None = Field(
        default=None, description="Tokens (prompt + completion, no padding) trained on by this run."
    )
    train_seconds: float | None = Field(default=None, description="Wall time of this run's training loop.")
    resumed_from_step: int | None = Field(default=None, description="Checkpoint step this run resumed from, if any.")
    objective: Objective = Field(default="sft", description="The objective trained: sft, kd or onPolicy.")
    strategy: Literal["single", "ddp", "fsdp"] = Field(
        default="single", description="How the processes shared the work: one process, ddp or fsdp."
    )
    losses: dict[str, float] = Field(
        default_factory=dict, description="Each loss term at the last logged step (ce, kl, divergence)."
    )
    teacher_tokens_scored: int | None = Field(
        default=None, description="onPolicy: student tokens the teacher scored during training."
    )


class FetchResult(ApiModel):
    """Summary of a finished fetch (serving init container)."""

    model_uri: str
    destination: str
    digest: str = Field(description="sha256 over the fetched files (names and contents), as TrainResult.digest.")
    files: int
    bytes: int
    reused: bool = Field(default=False, description="True when the destination already held this model.")


class EvaluateResult(ApiModel):
    """Summary of a finished evaluate stage. The operator applies the gate to teacher_agreement."""

    teacher_agreement: float = Field(ge=0.0, le=1.0)
    metrics: dict[str, float]
    examples: int
    report_uri: str
    speed: SpeedComparison | None = Field(default=None, description="Student vs teacher speed and cost per answer.")


# A stage that stops for a reason the operator must act on writes this instead of a plain line.
BUDGET_EXCEEDED: Literal["BudgetExceeded"] = "BudgetExceeded"


class StageFailure(ApiModel):
    """A failed stage's termination message when a line of text is not enough.

    ``reason`` becomes the condition reason (CamelCase), ``message`` the condition message; what
    the stage spent goes into the status even though it failed.
    """

    reason: Literal["BudgetExceeded"]
    message: str
    spend: TeacherSpend | None = None
