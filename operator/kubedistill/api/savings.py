"""What a distillation costs and what it saves: the teacher's prices and budget, its spend, and
the student's speed against the teacher's.

Spec side (set by the user): ``teacher.pricing`` (per million tokens, with batch prices),
``teacher.budget`` (tokens and/or cost one generate run may spend), ``evaluation.speed`` (how
the student and the teacher are measured, and the student's GPU-hour price).

Status side (set by the workers, copied by the operator): ``TeacherSpend`` (projected before
the first request, spent, reused, the budget's state) and ``SpeedComparison`` (both models'
time to first token and output tokens/s at concurrency 1 and at a loaded level, the speedup
and the cost ratio per million answers).

Prices are inputs; the measured token counts and speeds are the product. The arithmetic is
here, pure, so that the workers, local mode and the operator compute the same numbers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kubedistill.api.base import ApiModel

CURRENCY_PATTERN = r"^[A-Z]{3}$"
MILLION = 1_000_000

TeacherMode = Literal["online", "batch", "offline"]
BudgetState = Literal["Within", "Exceeded"]


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


# --------------------------------------------------------------------------- spec


class TokenPrices(ApiModel):
    """Prices of one million tokens."""

    input_per_million: float = Field(ge=0, description="Price of 1M prompt tokens.")
    cached_input_per_million: float | None = Field(
        default=None,
        ge=0,
        description="Price of 1M prompt tokens the API reports as cached (prompt caching); the input price when unset.",
    )
    output_per_million: float = Field(ge=0, description="Price of 1M completion tokens.")

    def cost(self, spend: TokenSpend) -> float:
        """What ``spend`` costs at these prices (cached prompt tokens are part of prompt tokens)."""
        cached = min(spend.cached_prompt_tokens, spend.prompt_tokens)
        cached_price = (
            self.input_per_million if self.cached_input_per_million is None else self.cached_input_per_million
        )
        return (
            (spend.prompt_tokens - cached) * self.input_per_million
            + cached * cached_price
            + spend.completion_tokens * self.output_per_million
        ) / MILLION


class TeacherPricing(TokenPrices):
    """The teacher's price table: with it, the teacher's spend is also a cost."""

    currency: str = Field(default="USD", pattern=CURRENCY_PATTERN, description="ISO 4217 code, e.g. USD or EUR.")
    batch: TokenPrices | None = Field(
        default=None,
        description="Prices in batch mode (teacher.endpoint.mode: batch), usually half the online ones; "
        "the online prices when unset.",
    )

    def for_mode(self, mode: TeacherMode) -> TokenPrices:
        return self.batch if (mode == "batch" and self.batch is not None) else self


_BUDGET_NEEDS_A_LIMIT = "set teacher.budget.maxTokens and/or teacher.budget.maxCost"


class TeacherBudget(ApiModel):
    """The most one run of the generate stage may spend on the teacher.

    Answers already in the answer store cost nothing and do not count; a request that could take
    the spend past the budget is never sent. When the budget is reached the stage stops with
    reason BudgetExceeded, keeps every answer paid for, and a run with a larger budget asks only
    for the rest.
    """

    model_config = ApiModel.model_config | {
        "json_schema_extra": _cel("has(self.maxTokens) || has(self.maxCost)", _BUDGET_NEEDS_A_LIMIT)
    }

    max_tokens: int | None = Field(
        default=None, ge=1, description="Billed tokens (prompt + completion, retries included) the run may spend."
    )
    max_cost: float | None = Field(
        default=None, gt=0, description="Cost the run may spend, in teacher.pricing.currency (needs teacher.pricing)."
    )

    @model_validator(mode="after")
    def _some_limit(self) -> TeacherBudget:
        if self.max_tokens is None and self.max_cost is None:
            raise ValueError(_BUDGET_NEEDS_A_LIMIT)
        return self


class BatchSettings(ApiModel):
    """How requests go through the OpenAI Batch API (teacher.endpoint.mode: batch)."""

    completion_window: Literal["24h"] = Field(default="24h", description="The batch completion window.")
    max_requests_per_batch: int = Field(
        default=50000, ge=1, le=50000, description="Most requests in one batch (the API allows 50,000)."
    )
    max_bytes_per_batch: int = Field(
        default=200_000_000, ge=1024, le=200_000_000, description="Largest batch input file (the API allows 200 MB)."
    )
    poll_seconds: float = Field(default=30.0, gt=0, le=3600, description="Interval between status checks of a batch.")
    max_rounds: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Batches a request may go through: a line that failed or expired is resubmitted in a new "
        "batch until this many rounds are used.",
    )


class SpeedSpec(ApiModel):
    """Student vs teacher serving speed and cost, measured on the held-out prompts."""

    enabled: bool = Field(
        default=True, description="Measure speed (evaluate stage) and the teacher's (generate stage)."
    )
    prompts: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Held-out prompts measured at each concurrency level. An endpoint teacher is asked them "
        "(streamed, counted in the spend) at each level.",
    )
    concurrency: int = Field(
        default=8, ge=2, le=1024, description="The loaded level (requests in flight); the other level is 1."
    )
    gpu_hour_price: float | None = Field(
        default=None,
        ge=0,
        description="Price of one GPU-hour in teacher.pricing.currency: the student's (and an in-cluster teacher's) "
        "cost per answer is this divided by its measured throughput. A CPU-only pod counts as one GPU.",
    )


# --------------------------------------------------------------------------- spend (status and results)


class TokenSpend(ApiModel):
    """Teacher tokens as the bill counts them."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    requests: int = Field(default=0, ge=0, description="Billed requests, retries included.")
    prompt_tokens: int = Field(default=0, ge=0, description="Billed prompt tokens (cached ones included).")
    cached_prompt_tokens: int = Field(default=0, ge=0, description="Prompt tokens the API reported as cached.")
    completion_tokens: int = Field(default=0, ge=0, description="Billed completion tokens.")
    cost: float | None = Field(default=None, ge=0, description="The cost at teacher.pricing, when set.")

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenSpend) -> TokenSpend:
        cost = None if self.cost is None and other.cost is None else (self.cost or 0.0) + (other.cost or 0.0)
        return TokenSpend(
            requests=self.requests + other.requests,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens + other.cached_prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost=cost,
        )


class SpendProjection(ApiModel):
    """What the teacher may cost, worked out before the first request."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    answers: int = Field(default=0, ge=0, description="Answers to ask for (not in the answer store).")
    reused: int = Field(default=0, ge=0, description="Answers found in the answer store: they cost nothing.")
    prompt_tokens: int = Field(default=0, ge=0, description="Prompt tokens of the requests to send.")
    completion_tokens: int = Field(default=0, ge=0, description="maxTokens x answers: the most they can bill.")
    tokens: int = Field(default=0, ge=0, description="Prompt + completion tokens.")
    cost: float | None = Field(default=None, ge=0, description="The cost at teacher.pricing, when set.")
    counted_with: Literal["tokenizer", "estimate"] = Field(
        default="estimate",
        description="tokenizer: prompt tokens counted with the teacher's tokenizer and chat template; "
        "estimate: 4 characters per token plus 4 per message (no tokenizer for an API teacher).",
    )


class BudgetStatus(ApiModel):
    """The budget of the run and where the spend stands against it."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    max_tokens: int | None = Field(default=None, description="teacher.budget.maxTokens.")
    max_cost: float | None = Field(default=None, description="teacher.budget.maxCost.")
    state: BudgetState = Field(default="Within", description="Within, or Exceeded: the run stopped at the budget.")
    remaining_answers: int | None = Field(
        default=None, ge=0, description="Answers still to ask for when the budget stopped the run."
    )


class TeacherSpend(ApiModel):
    """What the generate stage spent on the teacher (this run's requests only)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    mode: TeacherMode | None = Field(default=None, description="online, batch (Batch API) or offline (in-pod vLLM).")
    currency: str | None = Field(default=None, description="Currency of every cost, from teacher.pricing.")
    projected: SpendProjection | None = Field(default=None, description="The projection made before the first request.")
    spent: TokenSpend | None = Field(default=None, description="Billed so far: every request, retries included.")
    reused_answers: int | None = Field(default=None, ge=0, description="Answers taken from the answer store (free).")
    budget: BudgetStatus | None = Field(default=None, description="The budget, when teacher.budget is set.")
    summary: str | None = Field(default=None, description="Spend in one phrase, e.g. '$1.84 of $2.00' (kubectl get).")


# --------------------------------------------------------------------------- speed (status and results)


class SpeedLevel(ApiModel):
    """Serving speed at one concurrency level."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    concurrency: int = Field(ge=1, description="Requests in flight.")
    requests: int = Field(ge=0, description="Requests measured.")
    ttft_p50: float | None = Field(default=None, ge=0, description="Time to first token, median, seconds.")
    ttft_p95: float | None = Field(default=None, ge=0, description="Time to first token, 95th percentile, seconds.")
    tokens_per_second_p50: float | None = Field(
        default=None, ge=0, description="Output tokens/s of one request after its first token, median."
    )
    tokens_per_second_p95: float | None = Field(
        default=None, ge=0, description="Output tokens/s of one request after its first token, 95th percentile."
    )
    answers_per_second: float | None = Field(default=None, ge=0, description="Answers completed per second, in all.")


class SpeedReport(ApiModel):
    """One model's measured serving speed."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    engine: str = Field(description="How it was measured, e.g. vllm-offline (per-request engine metrics).")
    gpus: int = Field(default=1, ge=0, description="GPUs of the pod that served it (0: CPU).")
    levels: list[SpeedLevel] = Field(default_factory=list, description="Concurrency 1, then the loaded level.")

    def level(self, concurrency: int) -> SpeedLevel | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)


class SpeedComparison(ApiModel):
    """The student against the teacher: speed and cost per million answers."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    speedup: float | None = Field(
        default=None, description="Student / teacher output tokens per second (median, concurrency 1)."
    )
    ttft_speedup: float | None = Field(
        default=None, description="Teacher / student time to first token (median, concurrency 1)."
    )
    loaded_speedup: float | None = Field(
        default=None, description="Student / teacher answers per second at the loaded level."
    )
    cost_ratio: float | None = Field(
        default=None, description="Teacher / student cost per 1M answers (how many times cheaper the student is)."
    )
    teacher_cost_per_million_answers: float | None = Field(default=None, description="In currency.")
    student_cost_per_million_answers: float | None = Field(default=None, description="In currency.")
    currency: str | None = Field(default=None, description="Currency of the costs.")
    student: SpeedReport | None = Field(default=None, description="The student's measured speed.")
    teacher: SpeedReport | None = Field(default=None, description="The teacher's measured speed.")
    note: str | None = Field(default=None, description="Why a figure is missing, when one is.")


# --------------------------------------------------------------------------- arithmetic


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def gpu_cost_per_million_answers(gpu_hour_price: float, gpus: int, answers_per_second: float | None) -> float | None:
    """A served model's cost of 1M answers: its pods' GPU-hours over its measured throughput."""
    if not answers_per_second:
        return None
    return gpu_hour_price * max(gpus, 1) / 3600 / answers_per_second * MILLION


def compare_speed(
    student: SpeedReport | None,
    teacher: SpeedReport | None,
    concurrency: int,
    *,
    teacher_cost_per_answer: float | None = None,
    gpu_hour_price: float | None = None,
    currency: str | None = None,
) -> SpeedComparison:
    """The student against the teacher, from their measured speeds and the prices given.

    Cost per 1M answers: a GPU-hour-priced model's is ``gpu_hour_price x GPUs / answers per
    second`` at the loaded level; a token-priced teacher's is its average bill per answer. Without
    a GPU-hour price, two models that are both GPU-priced (an in-cluster teacher) still have a
    cost ratio: the price cancels out.
    """
    if student is None or teacher is None:
        missing = "student" if student is None else "teacher"
        return SpeedComparison(
            student=student, teacher=teacher, currency=currency, note=f"the {missing} was not measured"
        )
    s1, t1 = student.level(1), teacher.level(1)
    sl, tl = student.level(concurrency), teacher.level(concurrency)
    student_aps, teacher_aps = _get(sl, "answers_per_second"), _get(tl, "answers_per_second")
    comparison = SpeedComparison(
        speedup=_r(ratio(_get(s1, "tokens_per_second_p50"), _get(t1, "tokens_per_second_p50"))),
        ttft_speedup=_r(ratio(_get(t1, "ttft_p50"), _get(s1, "ttft_p50"))),
        loaded_speedup=_r(ratio(student_aps, teacher_aps)),
        currency=currency,
        student=student,
        teacher=teacher,
    )
    gpu_priced_teacher = teacher_cost_per_answer is None and teacher.engine == "vllm-offline"
    if gpu_hour_price is not None:
        comparison.student_cost_per_million_answers = _r(
            gpu_cost_per_million_answers(gpu_hour_price, student.gpus, student_aps)
        )
    if teacher_cost_per_answer is not None:
        comparison.teacher_cost_per_million_answers = _r(teacher_cost_per_answer * MILLION)
    elif gpu_priced_teacher and gpu_hour_price is not None:
        comparison.teacher_cost_per_million_answers = _r(
            gpu_cost_per_million_answers(gpu_hour_price, teacher.gpus, teacher_aps)
        )
    comparison.cost_ratio = _r(
        ratio(comparison.teacher_cost_per_million_answers, comparison.student_cost_per_million_answers)
    )
    if comparison.cost_ratio is None and gpu_priced_teacher:
        # Same price per GPU-hour on both sides: the ratio of GPU-seconds per answer.
        comparison.cost_ratio = _r(
            ratio(
                ratio(max(teacher.gpus, 1), teacher_aps),
                ratio(max(student.gpus, 1), student_aps),
            )
        )
    if comparison.cost_ratio is None:
        comparison.note = "no cost ratio: set evaluation.speed.gpuHourPrice (and teacher.pricing for an API teacher)"
    return comparison


def _get(level: SpeedLevel | None, name: str) -> float | None:
    value: float | None = None if level is None else getattr(level, name)
    return value


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3 if abs(value) < 100 else 1)


def format_money(amount: float, currency: str) -> str:
    symbol = {"USD": "$", "EUR": "\u20ac", "GBP": "\u00a3"}.get(currency)
    digits = 2 if amount >= 0.1 else (4 if amount >= 0.001 else 6)
    text = f"{amount:,.{digits}f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def format_tokens(tokens: int) -> str:
    return f"{format_count(tokens)} tokens"


def format_count(count: int) -> str:
    if count >= 10_000_000:
        return f"{count / 1_000_000:.0f}M"
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f}M"
    if count >= 10_000:
        return f"{count / 1000:.0f}k"
    return f"{count:,}"


def spend_summary(spend: TeacherSpend) -> str | None:
    """'$1.84 of $2.00', '41k of 50k tokens', '$0.12': the spend in one phrase (the Spend column)."""
    currency = spend.currency
    spent = spend.spent
    if spent is None:
        projected = spend.projected
        if projected is None:
            return None
        if projected.cost is not None and currency:
            return f"~{format_money(projected.cost, currency)} projected"
        return f"~{format_tokens(projected.tokens)} projected"
    money = format_money(spent.cost, currency) if spent.cost is not None and currency else None
    budget = spend.budget
    if budget is not None and budget.max_cost is not None and money and currency:
        return f"{money} of {format_money(budget.max_cost, currency)}"
    if budget is not None and budget.max_tokens is not None:
        tokens = f"{format_count(spent.tokens)} of {format_tokens(budget.max_tokens)}"
        return f"{money}, {tokens}" if money else tokens
    return money or format_tokens(spent.tokens)


TIMES = "\u00d7"  # the multiplication sign: "11\u00d7 faster"


def times(value: float) -> str:
    """11.2 -> '11x', 1.46 -> '1.5x', 0.8 -> '0.8x' (with the multiplication sign)."""
    return f"{value:.0f}{TIMES}" if value >= 10 else f"{value:.1f}{TIMES}"


def savings_line(agreement: float, metric: str, speed: SpeedComparison | None) -> str:
    """'keeps 97% of the teacher's rougeL, 11x faster, 14x cheaper per 1M answers' (multiplication signs)."""
    parts = [f"keeps {agreement * 100:.0f}% of the teacher's {metric}"]
    if speed is not None and speed.speedup:
        faster = speed.speedup >= 1
        parts.append(f"{times(speed.speedup if faster else 1 / speed.speedup)} {'faster' if faster else 'slower'}")
    if speed is not None and speed.cost_ratio:
        cheaper = speed.cost_ratio >= 1
        factor = speed.cost_ratio if cheaper else 1 / speed.cost_ratio
        parts.append(f"{times(factor)} {'cheaper' if cheaper else 'dearer'} per 1M answers")
    return ", ".join(parts)
