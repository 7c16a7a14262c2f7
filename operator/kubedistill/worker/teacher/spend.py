"""What the teacher bills: counted per request, projected before the first one, held to a budget.

Counting. Every response that reports ``usage`` is billed as it says (prompt tokens, the cached
part of them where the API reports ``prompt_tokens_details.cached_tokens``, completion
tokens), whether its answer is kept, retried or thrown away. A request whose response never
arrived (a timeout, a dropped connection, a body cut short) may have been billed anyway: it is
counted as *unconfirmed*, at its maximum against the budget, and reported as such. Answers
found in the answer store cost nothing and are counted as reused.

The budget. Before a request is sent, its worst case is reserved: its prompt tokens at most
(a tokenizer count, or for an API teacher one token per UTF-8 byte plus the chat framing, which
no byte-level BPE tokenizer exceeds) plus ``n x maxTokens`` completion tokens, priced without
any cache discount. A request is sent only if everything billed, unconfirmed and reserved,
plus its own worst case, stays within the budget. When the next request does not fit even
with nothing in flight, the budget is exhausted and the stage stops (BudgetExceeded), so the
spend never passes the budget.

The projection. Before the first request the worker adds up what the missing answers may cost:
prompt tokens (counted with the teacher's tokenizer and chat template when it has one, else
estimated at 4 characters per token plus 4 per message) plus ``maxTokens x answers``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubedistill.api.savings import (
    BudgetStatus,
    SpendProjection,
    TeacherBudget,
    TeacherMode,
    TeacherSpend,
    TokenPrices,
    TokenSpend,
    format_money,
    format_tokens,
)
from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.api.worker_config import BUDGET_EXCEEDED, StageFailure
from kubedistill.worker.common import StageStopped
from kubedistill.worker.teacher.limits import estimate_prompt_tokens

Messages = Sequence[tuple[str, str]]
PromptCounter = Callable[[Messages], int]
# Chat framing an API adds around messages: OpenAI documents ~3 tokens per message plus 3 to prime the reply.
FRAMING_PER_MESSAGE = 4
FRAMING_PER_REQUEST = 3


def prompt_upper_bound(messages: Messages) -> int:
    """Prompt tokens no byte-level BPE tokenizer exceeds: one per UTF-8 byte, plus the chat framing."""
    return sum(len(content.encode()) + FRAMING_PER_MESSAGE for _, content in messages) + FRAMING_PER_REQUEST


def usage_from_response(doc: Any) -> TokenSpend | None:
    """The billed usage of one chat completion (OpenAI's ``usage`` block), or None when it has none."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        details = usage.get("prompt_tokens_details") or {}
        return TokenSpend(
            requests=1,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_prompt_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (TypeError, ValueError):
        return None


def usage_from_body(body: bytes) -> TokenSpend | None:
    try:
        return usage_from_response(json.loads(body))
    except ValueError:
        return None


@dataclass(frozen=True)
class Charge:
    """The most one request can bill."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def worst_case(prompt_tokens: int, samples: int, max_tokens: int) -> Charge:
    return Charge(prompt_tokens=prompt_tokens, completion_tokens=samples * max_tokens)


class BudgetExhausted(Exception):
    """The next request does not fit in what is left of the budget, with nothing in flight."""


@dataclass
class Ledger:
    """Billed, unconfirmed and reserved spend of one run, against its budget (if any).

    Not thread-safe: the endpoint pass uses it from one event loop, the other passes from one thread.
    """

    budget: TeacherBudget | None = None
    prices: TokenPrices | None = None
    billed: TokenSpend = field(default_factory=TokenSpend)
    unconfirmed_requests: int = 0
    unconfirmed_tokens: int = 0
    unconfirmed_cost: float = 0.0
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    in_flight: int = 0
    exhausted: bool = False

    def price(self, spend: TokenSpend) -> float:
        return self.prices.cost(spend) if self.prices is not None else 0.0

    def charge_cost(self, charge: Charge) -> float:
        spend = TokenSpend(prompt_tokens=charge.prompt_tokens, completion_tokens=charge.completion_tokens)
        return self.price(spend)

    def committed(self) -> tuple[int, float]:
        """(tokens, cost) billed, unconfirmed or reserved."""
        tokens = self.billed.tokens + self.unconfirmed_tokens + self.reserved_tokens
        cost = self.price(self.billed) + self.unconfirmed_cost + self.reserved_cost
        return tokens, cost

    def fits(self, charge: Charge) -> bool:
        if self.budget is None:
            return True
        tokens, cost = self.committed()
        if self.budget.max_tokens is not None and tokens + charge.tokens > self.budget.max_tokens:
            return False
        return self.budget.max_cost is None or cost + self.charge_cost(charge) <= self.budget.max_cost + 1e-12

    def reserve(self, charge: Charge) -> bool:
        """Hold ``charge`` for a request about to be sent; False (nothing held) when it does not fit."""
        if self.exhausted or not self.fits(charge):
            return False
        self.reserved_tokens += charge.tokens
        self.reserved_cost += self.charge_cost(charge)
        self.in_flight += 1
        return True

    def settle(self, charge: Charge, billed: TokenSpend | None, *, confirmed: bool = True) -> None:
        """The request is over: drop its hold, count what it billed (or, unconfirmed, its worst case)."""
        self.reserved_tokens -= charge.tokens
        self.reserved_cost -= self.charge_cost(charge)
        self.in_flight -= 1
        if billed is not None:
            self.record(billed)
        elif not confirmed:
            self.unconfirmed_requests += 1
            self.unconfirmed_tokens += charge.tokens
            self.unconfirmed_cost += self.charge_cost(charge)

    def record(self, billed: TokenSpend) -> None:
        """Count a billed response (also one outside a reservation: nothing is ever left out)."""
        self.billed = self.billed + billed.model_copy(update={"cost": None})

    def spent(self) -> TokenSpend:
        cost = self.price(self.billed) if self.prices is not None else None
        return self.billed.model_copy(update={"cost": None if cost is None else round(cost, 6)})


# --------------------------------------------------------------------------- projection


def prompt_counter(tokenizer: Any | None) -> tuple[PromptCounter, str]:
    """How prompt tokens are counted: the teacher's tokenizer and chat template, else the estimate."""
    if tokenizer is None:
        return estimate_prompt_tokens, "estimate"

    def count(messages: Messages) -> int:
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        except Exception:  # no chat template: the prompt text alone
            ids = tokenizer("\n".join(content for _, content in messages))["input_ids"]
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    return count, "tokenizer"


@dataclass
class Projection:
    """Accumulates the projected spend of the requests still to send."""

    max_tokens: int
    counter: PromptCounter
    counted_with: str
    requests: int = 0
    answers: int = 0
    reused: int = 0
    prompt_tokens: int = 0

    def add(self, messages: Messages, samples: int) -> None:
        self.requests += 1
        self.answers += samples
        self.prompt_tokens += self.counter(messages)

    def result(self, prices: TokenPrices | None) -> SpendProjection:
        completion = self.answers * self.max_tokens
        cost = None
        if prices is not None:
            cost = round(prices.cost(TokenSpend(prompt_tokens=self.prompt_tokens, completion_tokens=completion)), 6)
        return SpendProjection(
            answers=self.answers,
            reused=self.reused,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            tokens=self.prompt_tokens + completion,
            cost=cost,
            counted_with="tokenizer" if self.counted_with == "tokenizer" else "estimate",
        )


# --------------------------------------------------------------------------- reports


def prices_for(teacher: TeacherSpec) -> TokenPrices | None:
    return teacher.pricing.for_mode(teacher.mode) if teacher.pricing is not None else None


def new_ledger(teacher: TeacherSpec) -> Ledger:
    return Ledger(budget=teacher.budget, prices=prices_for(teacher))


def spend_report(
    teacher: TeacherSpec,
    ledger: Ledger | None,
    projected: SpendProjection | None,
    reused: int,
    *,
    exceeded: bool = False,
    remaining_answers: int | None = None,
) -> TeacherSpend:
    """What the run projected and spent, as the result and the status carry it."""
    budget = None
    if teacher.budget is not None:
        budget = BudgetStatus(
            max_tokens=teacher.budget.max_tokens,
            max_cost=teacher.budget.max_cost,
            state="Exceeded" if exceeded else "Within",
            remaining_answers=remaining_answers,
        )
    spent = None
    if ledger is not None:
        spent = ledger.spent().model_copy(update={"requests": ledger.billed.requests})
    mode: TeacherMode = teacher.mode
    return TeacherSpend(
        mode=mode,
        currency=teacher.pricing.currency if teacher.pricing is not None else None,
        projected=projected,
        spent=spent,
        reused_answers=reused,
        budget=budget,
    )


def describe_spend(spend: TokenSpend, currency: str | None) -> str:
    text = f"{format_tokens(spend.tokens)} ({spend.prompt_tokens:,} prompt, {spend.completion_tokens:,} completion)"
    if spend.cost is not None and currency:
        text = f"{format_money(spend.cost, currency)}, {text}"
    return f"{text} on {spend.requests:,} billed request{'s' if spend.requests != 1 else ''}"


def budget_exceeded(
    teacher: TeacherSpec,
    ledger: Ledger,
    projected: SpendProjection | None,
    reused: int,
    remaining: Projection,
    stored_this_run: int,
) -> StageStopped:
    """The BudgetExceeded stop: what was spent, what remains to ask, and what to raise."""
    budget = teacher.budget
    assert budget is not None
    left = remaining.result(ledger.prices)
    report = spend_report(teacher, ledger, projected, reused, exceeded=True, remaining_answers=left.answers)
    spent = report.spent or TokenSpend()
    currency = report.currency
    limits = []
    if budget.max_tokens is not None:
        limits.append(f"maxTokens {budget.max_tokens:,}")
    if budget.max_cost is not None and currency:
        limits.append(f"maxCost {format_money(budget.max_cost, currency)}")
    raise_to = []
    if budget.max_tokens is not None:
        raise_to.append(f"spec.teacher.budget.maxTokens to at least {left.tokens:,}")
    if budget.max_cost is not None and left.cost is not None and currency:
        raise_to.append(f"spec.teacher.budget.maxCost to at least {format_money(left.cost, currency)}")
    unconfirmed = (
        f" ({ledger.unconfirmed_requests} request(s) whose response was lost counted at their maximum)"
        if ledger.unconfirmed_requests
        else ""
    )
    left_cost = f" ({format_money(left.cost, currency)})" if left.cost is not None and currency else ""
    message = (
        f"BudgetExceeded: the teacher budget ({', '.join(limits)}) is spent: "
        f"{describe_spend(spent, currency)}{unconfirmed}; {left.answers:,} answer(s) for {remaining.requests:,} "
        f"prompt(s) are still to ask, at most {format_tokens(left.tokens)}{left_cost}; "
        f"raise {' and '.join(raise_to)} to finish. The {stored_this_run:,} answer(s) paid for in this run are "
        "stored: the next run asks only for the rest"
    )
    failure = StageFailure(reason=BUDGET_EXCEEDED, message=message, spend=report)
    return StageStopped(failure.reason, message, failure.to_wire())


def project(
    items: Iterable[tuple[Messages, int]], max_tokens: int, counter: PromptCounter, counted_with: str
) -> Projection:
    """A projection over (messages, samples) pairs."""
    projection = Projection(max_tokens=max_tokens, counter=counter, counted_with=counted_with)
    for messages, samples in items:
        projection.add(messages, samples)
    return projection
