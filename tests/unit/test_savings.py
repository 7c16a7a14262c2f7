"""Spend, budgets and savings as plain functions: prices, the ledger, the projection, keys, summaries."""

from __future__ import annotations

import pytest

from kubedistill.api.savings import (
    SpeedComparison,
    SpeedLevel,
    SpeedReport,
    TeacherBudget,
    TeacherPricing,
    TeacherSpend,
    TokenPrices,
    TokenSpend,
    savings_line,
    spend_summary,
)
from kubedistill.api.v1alpha1 import DistillationJob
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.worker.speed import Timing, percentile, summarize
from kubedistill.worker.teacher.spend import (
    Charge,
    Ledger,
    Projection,
    prompt_upper_bound,
    usage_from_response,
    worst_case,
)
from tests.support.djobs import distillation_job

PRICES = TokenPrices(input_per_million=2.0, cached_input_per_million=0.5, output_per_million=8.0)


def test_a_bill_is_priced_as_providers_price_it() -> None:
    spend = TokenSpend(prompt_tokens=1_000_000, cached_prompt_tokens=400_000, completion_tokens=250_000)
    assert PRICES.cost(spend) == pytest.approx(0.6 * 2.0 + 0.4 * 0.5 + 0.25 * 8.0)
    no_cache_price = TokenPrices(input_per_million=2.0, output_per_million=8.0)
    assert no_cache_price.cost(spend) == pytest.approx(2.0 + 2.0)
    pricing = TeacherPricing(input_per_million=2, output_per_million=8, batch=TokenPrices(input_per_million=1,
                             output_per_million=4))  # fmt: skip
    assert pricing.for_mode("batch").output_per_million == 4 and pricing.for_mode("online").output_per_million == 8
    assert TeacherPricing(input_per_million=2, output_per_million=8).for_mode("batch").output_per_million == 8


def test_usage_with_cached_tokens_is_read_from_a_response() -> None:
    doc = {"usage": {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 64}}}
    assert usage_from_response(doc) == TokenSpend(
        requests=1, prompt_tokens=120, cached_prompt_tokens=64, completion_tokens=30
    )
    assert usage_from_response({"choices": []}) is None
    assert usage_from_response({"usage": {"prompt_tokens": "many"}}) is None


def test_the_prompt_bound_is_never_below_a_byte_level_tokenization() -> None:
    messages = (("system", "Be brief."), ("user", "naïve café ☕"))
    assert prompt_upper_bound(messages) >= len(b"Be brief.") + len("naïve café ☕".encode())


def test_the_ledger_never_lets_a_request_past_the_budget() -> None:
    ledger = Ledger(budget=TeacherBudget(max_tokens=100))
    charge = Charge(prompt_tokens=10, completion_tokens=30)
    assert ledger.reserve(charge) and ledger.reserve(charge)
    assert not ledger.reserve(charge)  # 3 x 40 > 100 while two are in flight
    ledger.settle(charge, TokenSpend(requests=1, prompt_tokens=8, completion_tokens=12))
    assert ledger.reserve(charge)  # 20 billed + 40 held + 40 fits
    ledger.settle(charge, None, confirmed=False)  # a lost response counts at its maximum
    assert (ledger.unconfirmed_requests, ledger.unconfirmed_tokens) == (1, 40)
    ledger.settle(charge, None)  # an error status bills nothing
    assert ledger.in_flight == 0 and ledger.committed() == (60, 0.0)
    assert ledger.reserve(charge)  # 60 + 40 = 100: exactly the budget is allowed
    assert not ledger.reserve(Charge(0, 1))


def test_a_cost_budget_counts_at_the_run_prices() -> None:
    ledger = Ledger(budget=TeacherBudget(max_cost=0.001), prices=PRICES)
    charge = worst_case(prompt_tokens=100, samples=2, max_tokens=50)  # 100 x 2 + 100 x 8 = 1000 micro
    assert charge == Charge(100, 100)
    assert ledger.reserve(charge) and not ledger.reserve(Charge(1, 0))
    ledger.settle(charge, TokenSpend(requests=1, prompt_tokens=100, cached_prompt_tokens=100, completion_tokens=10))
    assert ledger.spent().cost == pytest.approx((100 * 0.5 + 10 * 8) / 1e6)


def test_a_projection_counts_prompt_tokens_once_per_request_and_max_tokens_per_answer() -> None:
    projection = Projection(max_tokens=64, counter=lambda messages: 10 * len(messages), counted_with="tokenizer")
    projection.add((("user", "a"),), samples=3)
    projection.add((("system", "s"), ("user", "b")), samples=1)
    projection.reused = 5
    result = projection.result(PRICES)
    assert (result.answers, result.reused, result.prompt_tokens, result.completion_tokens) == (4, 5, 30, 256)
    assert result.tokens == 286 and result.counted_with == "tokenizer"
    assert result.cost == pytest.approx((30 * 2 + 256 * 8) / 1e6)


def test_spend_settings_name_the_generate_job_but_not_the_dataset() -> None:
    plain = compute_stage_keys(DistillationJob.model_validate(distillation_job("demo")).spec)
    budgeted = distillation_job("demo")
    budgeted["spec"]["teacher"] |= {"budget": {"maxTokens": 1000}, "pricing": {"inputPerMillion": 1,
                                                                            "outputPerMillion": 2}}  # fmt: skip
    budgeted["spec"]["teacher"]["endpoint"]["mode"] = "batch"
    keys = compute_stage_keys(DistillationJob.model_validate(budgeted).spec)
    assert keys.dataset == plain.dataset == plain.generate  # no spend settings: the key as before
    assert keys.generate != plain.generate  # a raised budget is a new generate Job...
    assert (keys.train, keys.evaluate, keys.run) == (plain.train, plain.evaluate, plain.run)  # ...and nothing else
    faster = distillation_job("demo")
    faster["spec"]["evaluation"] = {"speed": {"concurrency": 16}}
    probed = compute_stage_keys(DistillationJob.model_validate(faster).spec)
    assert probed.generate != plain.generate and probed.evaluate != plain.evaluate and probed.train == plain.train


def test_the_spend_in_one_phrase() -> None:
    budget = {"maxCost": 2.0, "state": "Within"}
    assert (
        spend_summary(TeacherSpend.model_validate({"currency": "USD", "spent": {"cost": 1.8412}, "budget": budget}))
        == "$1.84 of $2.00"
    )
    tokens = TeacherSpend.model_validate(
        {"spent": {"promptTokens": 31_000, "completionTokens": 10_230}, "budget": {"maxTokens": 50_000}}
    )
    assert spend_summary(tokens) == "41k of 50k tokens"
    projected = TeacherSpend.model_validate({"projected": {"tokens": 1234}})
    assert spend_summary(projected) == "~1,234 tokens projected"
    assert spend_summary(TeacherSpend()) is None


def test_the_savings_line() -> None:
    speed = SpeedComparison(speedup=11.2, cost_ratio=14.3)
    assert (
        savings_line(0.971, "rougeL", speed)
        == "keeps 97% of the teacher's rougeL, 11\u00d7 faster, 14\u00d7 cheaper per 1M answers"
    )
    assert (
        savings_line(0.5, "tokenF1", SpeedComparison(speedup=0.8))
        == "keeps 50% of the teacher's tokenF1, 1.2\u00d7 slower"
    )
    assert savings_line(0.9, "exactMatch", None) == "keeps 90% of the teacher's exactMatch"


def test_speed_statistics() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    timings = [Timing(ttft=0.1, tokens=11, decode_seconds=0.5), Timing(ttft=0.3, tokens=1, decode_seconds=0.0)]
    level = summarize(4, timings, wall_seconds=2.0)
    assert (level.requests, level.ttft_p50, level.tokens_per_second_p50, level.answers_per_second) == (
        2,
        0.2,
        20.0,
        1.0,
    )
    report = SpeedReport(engine="vllm-offline", levels=[level, SpeedLevel(concurrency=1, requests=0)])
    assert report.level(4) is level and report.level(8) is None
