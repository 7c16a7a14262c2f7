"""The operator's metrics, health endpoints and JSON logs, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kubedistill.api.conditions import StagePhase
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.worker_config import EvaluateResult, GenerateResult
from kubedistill.reconcile.distillation import StageFinished
from kubedistill.scheduler import Scheduler
from kubedistill.telemetry import Health, JsonFormatter, OperatorMetrics, TelemetryServer
from tests.support.djobs import distillation_job, evaluate_result, generate_result, train_result
from tests.support.fake_cluster import FakeCluster


def scrape(port: int) -> dict[str, float]:
    """Every sample as 'name{label="v",...}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_stage_outcomes_are_counted_once_with_their_durations_tokens_and_gate():
    metrics = OperatorMetrics()
    server = TelemetryServer(metrics, Health(), "127.0.0.1", 0).start()
    try:
        generate = GenerateResult.model_validate_json(generate_result(100))
        generate = generate.model_copy(update={"prompt_tokens": 1200, "completion_tokens": 3400})
        metrics.observe_reconcile(
            "DistillationJob",
            0.02,
            [
                StageFinished("generate", StagePhase.SUCCEEDED, 600.0, generate),
                StageFinished("train", StagePhase.FAILED, 42.0, None),
                StageFinished(
                    "evaluate", StagePhase.SUCCEEDED, 30.0, EvaluateResult.model_validate_json(evaluate_result()), True
                ),
            ],
        )
        samples = scrape(server.port)
    finally:
        server.stop()
    assert samples['kubedistill_reconcile_duration_seconds_count{kind="DistillationJob"}'] == 1
    assert samples['kubedistill_stages_finished_total{result="succeeded",stage="generate"}'] == 1
    assert samples['kubedistill_stages_finished_total{result="failed",stage="train"}'] == 1
    assert samples['kubedistill_stage_duration_seconds_sum{result="succeeded",stage="generate"}'] == 600.0
    assert samples['kubedistill_teacher_tokens_total{type="prompt"}'] == 1200
    assert samples['kubedistill_teacher_tokens_total{type="completion"}'] == 3400
    assert samples['kubedistill_quality_gate_total{result="passed"}'] == 1


def test_the_teacher_bill_is_counted_as_metered_retries_cached_tokens_and_cost_included():
    from kubedistill.api.savings import TeacherSpend
    from tests.support.djobs import spend

    metrics = OperatorMetrics()
    server = TelemetryServer(metrics, Health(), "127.0.0.1", 0).start()
    try:
        bill = TeacherSpend.model_validate(spend(requests=50, cost=0.25))
        assert bill.spent is not None
        bill.spent.cached_prompt_tokens = 120
        # the answers' own usage (1 and 2) is less than the metered bill: retries are billed too
        generate = GenerateResult.model_validate_json(generate_result(100)).model_copy(
            update={"prompt_tokens": 1, "completion_tokens": 2, "spend": bill}
        )
        for _ in range(2):
            metrics.observe_reconcile(
                "DistillationJob", 0.01, [StageFinished("generate", StagePhase.SUCCEEDED, 9.0, generate)]
            )
        samples = scrape(server.port)
    finally:
        server.stop()
    assert samples['kubedistill_teacher_tokens_total{type="prompt"}'] == 2 * 500
    assert samples['kubedistill_teacher_tokens_total{type="cached_prompt"}'] == 2 * 120
    assert samples['kubedistill_teacher_tokens_total{type="completion"}'] == 2 * 5500
    assert samples['kubedistill_teacher_cost_total{currency="USD"}'] == 0.5


async def test_runs_by_phase_queue_depth_and_requests_come_from_the_runtime():
    cluster = FakeCluster()
    scheduler = Scheduler(OperatorSettings(), cluster)  # type: ignore[arg-type]
    for name in ("a", "b"):
        cluster.put(distillation_job(name))
        await scheduler.reconcile_job("ns", name)
    # kopf's index of DistillationJob phases, as the handlers bind it.
    scheduler.job_phases = {("ns", "a"): ["Generating"], ("ns", "b"): ["Succeeded"], ("ns", "c"): [None]}
    server = TelemetryServer(scheduler.metrics, Health(), "127.0.0.1", 0).start()
    try:
        samples = await asyncio.to_thread(scrape, server.port)
    finally:
        server.stop()
        await scheduler.close()
    assert samples['kubedistill_distillation_jobs{phase="Generating"}'] == 1
    assert samples['kubedistill_distillation_jobs{phase="Succeeded"}'] == 1
    assert samples['kubedistill_distillation_jobs{phase="None"}'] == 1
    assert samples['kubedistill_distillation_jobs{phase="Failed"}'] == 0
    assert samples['kubedistill_reconcile_queue_depth{queue="slots"}'] == 0
    assert samples["kubedistill_api_requests_total"] == cluster.requests > 0
    assert samples['kubedistill_reconcile_duration_seconds_count{kind="DistillationJob"}'] == 2


async def test_a_full_run_through_the_runtime_is_counted():
    cluster = FakeCluster()
    cluster.put(distillation_job("full", serve=False))
    scheduler = Scheduler(OperatorSettings(), cluster)  # type: ignore[arg-type]
    results = {"generate": generate_result(), "train": train_result(), "evaluate": evaluate_result(0.5)}
    for stage in ("generate", "train", "evaluate"):
        await scheduler.reconcile_job("ns", "full")
        [job] = [j for j in cluster.of_kind("Job") if j["metadata"]["labels"]["kubedistill.io/stage"] == stage]
        cluster.finish_job("ns", job["metadata"]["name"], message=results[stage])
    await scheduler.reconcile_job("ns", "full")
    await scheduler.reconcile_job("ns", "full")  # nothing new finished: nothing counted twice
    server = TelemetryServer(scheduler.metrics, Health(), "127.0.0.1", 0).start()
    try:
        samples = await asyncio.to_thread(scrape, server.port)
    finally:
        server.stop()
        await scheduler.close()
    for stage in ("generate", "train", "evaluate"):
        assert samples[f'kubedistill_stages_finished_total{{result="succeeded",stage="{stage}"}}'] == 1
    assert samples['kubedistill_quality_gate_total{result="failed"}'] == 1
    assert samples['kubedistill_teacher_tokens_total{type="prompt"}'] == 0  # the result reported none


def test_health_and_readiness_of_leader_and_standby():
    health = Health()
    server = TelemetryServer(OperatorMetrics(), health, "127.0.0.1", 0).start()
    try:
        assert get(server.port, "/healthz")[0] == 200  # a standby is alive
        status, body = get(server.port, "/readyz")
        assert status == 503 and "standby" in body
        health.leading = True
        health.beat()
        assert get(server.port, "/readyz")[0] == 200
        assert get(server.port, "/healthz")[0] == 200
        health._beat -= 120  # the event loop has not turned for two minutes
        status, body = get(server.port, "/healthz")
        assert status == 503 and "120s" in body
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.stop()


def test_json_logs_are_one_object_per_line():
    record = logging.LogRecord(
        "kubedistill.scheduler", logging.WARNING, __file__, 1, "reconcile of %s failed", ("x",), None
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "WARNING" and doc["logger"] == "kubedistill.scheduler"
    assert doc["message"] == "reconcile of x failed" and doc["time"].endswith("Z")


def test_the_chart_dashboard_queries_only_metrics_the_operator_exports():
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "charts/kubedistill/dashboards/kubedistill.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for e in exprs for m in re.findall(r"kubedistill_[a-z_]+", e)}
    metrics = OperatorMetrics()
    metrics.observe_stage(StageFinished("generate", StagePhase.SUCCEEDED, 1.0, None))
    metrics.observe_reconcile("DistillationJob", 0.1)
    metrics.observe_error("DistillationJob")
    metrics.quality_gate.labels("passed").inc()
    metrics.teacher_tokens.labels("prompt").inc()
    metrics.teacher_cost.labels("USD").inc()
    exported = {
        sample.name for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples
    }
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
