"""What a run cost and what it saves, on the resource: the operator for real, kwok playing the stage pods.

The generate pod's ``estimate`` init container reports the projected teacher spend (kwok gives it the
termination message of ``kwok.kubedistill.io/init-message``), then the worker its result; evaluate
reports the student's speed against the teacher's. Checked where a user looks: the status, the
printer columns of ``kubectl get dj``, the conditions and events of ``kubectl describe``.
"""

from __future__ import annotations

import pytest

from tests.support import operator_proc
from tests.support.cluster import ANN_EXIT_CODE, ANN_HOLD, ANN_INIT_MESSAGE, ANN_MESSAGE, Cluster, wait_for
from tests.support.djobs import (
    PRICES,
    budget_exceeded,
    distillation_job,
    estimate_message,
    evaluate_result,
    generate_result,
    speed_comparison,
    spend,
)
from tests.support.operator_proc import OperatorFactory, Run

pytestmark = pytest.mark.cluster
crds = operator_proc.crds
start_operator = operator_proc.start_operator

SAVINGS = "keeps 97% of the teacher's tokenF1, 11\u00d7 faster, 14\u00d7 cheaper per 1M answers"


def columns(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get dj NAME` as {column: cell}; cells may hold spaces, so they are cut at the header's offsets."""
    header, row = cluster.kubectl("-n", namespace, "get", "dj", name).stdout.splitlines()[:2]
    starts = [i for i, char in enumerate(header) if char != " " and (i == 0 or header[i - 1] == " ")]
    bounds = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, bounds, strict=True)}


def test_the_projection_shows_while_generating_then_spend_speedup_and_cost_ratio(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    budget = {"maxCost": 1.0}
    generate = {
        ANN_HOLD: "true",  # running until the test lets it finish
        ANN_INIT_MESSAGE: estimate_message(cost=0.21),
        ANN_MESSAGE: generate_result(spent=spend(cost=0.1234, budget=budget)),
    }
    evaluate = {ANN_MESSAGE: evaluate_result(0.97, speed=speed_comparison(11.2, 14.3))}
    op = start_operator({"generate": generate, "evaluate": evaluate})
    run = Run(cluster, namespace, "thrifty", op).apply(distillation_job("thrifty", budget=budget, pricing=PRICES))

    # As soon as generation runs: what it may cost.
    status = run.wait(lambda s: (s.get("teacherSpend") or {}).get("projected"), "the projected spend")
    assert status["phase"] == "Generating" and status["teacherSpend"]["projected"]["cost"] == 0.21
    assert status["teacherSpend"]["summary"] == "~$0.21 projected"
    assert columns(cluster, namespace, "thrifty")["SPEND"] == "~$0.21 projected"

    [pod] = run.pods("generate")
    run.core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: "false"}}})
    status = run.wait_phase("Succeeded")

    spent = status["teacherSpend"]
    assert spent["spent"]["cost"] == 0.1234 and spent["budget"]["state"] == "Within"
    assert spent["summary"] == "$0.12 of $1.00" and spent["projected"]["cost"] == 0.21
    speed = status["evaluation"]["speed"]
    assert (speed["speedup"], speed["costRatio"], speed["teacherCostPerMillionAnswers"]) == (11.2, 14.3, 1430.0)
    assert status["evaluation"]["summary"] == SAVINGS
    table = columns(cluster, namespace, "thrifty")
    assert list(table) == [
        "NAME", "PHASE", "PROGRESS", "TEACHER", "AGREEMENT", "SPEND", "BUDGET", "SPEEDUP", "COSTRATIO", "AGE"
    ]  # fmt: skip
    assert (table["PHASE"], table["AGREEMENT"], table["SPEND"], table["BUDGET"]) == (
        "Succeeded", "0.97", "$0.12 of $1.00", "Within",
    )  # fmt: skip
    assert (table["SPEEDUP"], table["COSTRATIO"]) == ("11.2", "14.3")
    described = cluster.kubectl("-n", namespace, "describe", "dj", "thrifty").stdout
    assert SAVINGS in described
    assert run.condition("Evaluated")["message"] == SAVINGS


def test_a_run_stopped_at_its_budget_says_what_was_spent_and_what_to_raise(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"generate": {ANN_EXIT_CODE: "1", ANN_MESSAGE: budget_exceeded(5000)}})
    run = Run(cluster, namespace, "capped", op).apply(distillation_job("capped", budget={"maxTokens": 5000}))
    status = run.wait_phase("Failed")

    failed = run.condition("Failed")
    assert failed["reason"] == "BudgetExceeded"
    assert "is spent: $0.0301, 4,920 tokens" in failed["message"]
    assert "raise spec.teacher.budget.maxTokens to at least 15,694" in failed["message"]
    assert run.condition("Generated")["reason"] == "BudgetExceeded"
    assert status["stages"]["generate"]["reason"] == "BudgetExceeded"
    assert status["teacherSpend"]["budget"] == {"maxTokens": 5000, "state": "Exceeded", "remainingAnswers": 59}
    assert status["teacherSpend"]["spent"]["requests"] == 41
    assert columns(cluster, namespace, "capped")["BUDGET"] == "Exceeded"
    warnings = [e for e in run.events() if e.type == "Warning" and e.reason == "BudgetExceeded"]
    assert warnings and "raise spec.teacher.budget.maxTokens" in warnings[0].message
    [job] = run.jobs_by_stage()["generate"]
    assert "train" not in run.jobs_by_stage()

    # Raising the budget starts a new generate Job: it would ask only for the rest.
    run.custom.patch_namespaced_custom_object(
        operator_proc.GROUP, operator_proc.VERSION, namespace, operator_proc.PLURAL, "capped",
        {"spec": {"teacher": {"budget": {"maxTokens": 20000}}}},
    )  # fmt: skip
    # (The stopped Job is superseded in the same run: the operator's history keeps only the current one.)
    wait_for(lambda: set(run.jobs_by_stage().get("generate", [])) - {job}, timeout=60, what="a new generate Job")
    assert "train" not in run.jobs_by_stage()
