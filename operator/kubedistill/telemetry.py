"""What the operator tells the platform team: Prometheus metrics, health endpoints, JSON logs.

    kubedistill operator --metrics-port 8080 --log-format json

One small HTTP server (a thread, so it also answers while a standby replica waits for the
leader Lease and before kopf starts) serves:

* ``/metrics``: Prometheus text format (prometheus_client);
* ``/healthz``: liveness, 200 while the process works (the leader's event loop turned
  within the last minute, or the standby's election loop is alive);
* ``/readyz``: 200 on the leader once kopf runs, 503 on a standby.

Metrics (every name starts with ``kubedistill_``):

==============================================  =========  =========================================
name                                            type       labels
==============================================  =========  =========================================
reconcile_duration_seconds                      histogram  kind
reconcile_errors_total                          counter    kind
reconcile_queue_depth                           gauge      queue (slots, api)
api_requests_total                              counter
distillation_jobs                               gauge      phase (every DistillationJob watched)
distilled_models                                gauge      phase
stages_finished_total                           counter    stage, result (succeeded, failed)
stage_duration_seconds                          histogram  stage, result
quality_gate_total                              counter    result (passed, failed)
teacher_tokens_total                            counter    type (prompt, cached_prompt, completion)
teacher_cost_total                              counter    currency (at teacher.pricing, when set)
leader                                          gauge      (1 on the replica that reconciles)
==============================================  =========  =========================================

The per-resource counts come from kopf's indices (its watch caches) at scrape time, so a
scrape costs no API request. Stage outcomes are counted once per finished Job, when the
operator first reads its result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from kubedistill.api.conditions import JobPhase, ModelPhase, StagePhase
from kubedistill.api.worker_config import EvaluateResult, GenerateResult
from kubedistill.reconcile.distillation import StageFinished

if TYPE_CHECKING:
    from kubedistill.scheduler import Scheduler

log = logging.getLogger("kubedistill.telemetry")

# A stage takes minutes to days.
STAGE_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200, float("inf"))
HEARTBEAT_STALE_SECONDS = 60.0


class OperatorMetrics:
    """Every metric of one operator process, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconcile_seconds = Histogram(
            "kubedistill_reconcile_duration_seconds", "Wall time of one reconcile.", ["kind"], registry=r
        )
        self.reconcile_errors = Counter(
            "kubedistill_reconcile_errors", "Reconciles that raised (and will be retried).", ["kind"], registry=r
        )
        self.stages_finished = Counter(
            "kubedistill_stages_finished", "Stage Jobs seen finishing.", ["stage", "result"], registry=r
        )
        self.stage_seconds = Histogram(
            "kubedistill_stage_duration_seconds",
            "Start to completion of a stage Job.",
            ["stage", "result"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.quality_gate = Counter(
            "kubedistill_quality_gate", "Evaluations against the quality gate.", ["result"], registry=r
        )
        self.teacher_tokens = Counter(
            "kubedistill_teacher_tokens", "Teacher tokens billed to generate stages.", ["type"], registry=r
        )
        self.teacher_cost = Counter(
            "kubedistill_teacher_cost",
            "Teacher cost billed to generate stages (teacher.pricing).",
            ["currency"],
            registry=r,
        )
        self.leader = Gauge("kubedistill_leader", "1 on the replica that reconciles, 0 on a standby.", registry=r)
        self.scheduler_view = _RuntimeCollector()
        r.register(self.scheduler_view)

    def bind(self, scheduler: Scheduler) -> None:
        """Count the scheduler's queues and kopf's indices at every scrape."""
        self.scheduler_view.scheduler = scheduler

    def observe_reconcile(self, kind: str, seconds: float, finished: Iterable[StageFinished] = ()) -> None:
        self.reconcile_seconds.labels(kind).observe(seconds)
        for stage in finished:
            self.observe_stage(stage)

    def observe_error(self, kind: str) -> None:
        self.reconcile_errors.labels(kind).inc()

    def _observe_spend(self, result: GenerateResult) -> None:
        """The bill as the generate worker metered it (retries included); else the answers' usage."""
        spend = result.spend
        spent = spend.spent if spend is not None else None
        if spend is None or spent is None:
            self.teacher_tokens.labels("prompt").inc(result.prompt_tokens)
            self.teacher_tokens.labels("completion").inc(result.completion_tokens)
            return
        self.teacher_tokens.labels("prompt").inc(spent.prompt_tokens)
        self.teacher_tokens.labels("cached_prompt").inc(spent.cached_prompt_tokens)
        self.teacher_tokens.labels("completion").inc(spent.completion_tokens)
        if spent.cost is not None:
            self.teacher_cost.labels(spend.currency or "USD").inc(spent.cost)

    def observe_stage(self, finished: StageFinished) -> None:
        result = "succeeded" if finished.phase == StagePhase.SUCCEEDED else "failed"
        self.stages_finished.labels(finished.stage, result).inc()
        if finished.seconds is not None:
            self.stage_seconds.labels(finished.stage, result).observe(finished.seconds)
        if isinstance(finished.result, GenerateResult):
            self._observe_spend(finished.result)
        elif isinstance(finished.result, EvaluateResult) and finished.gate_passed is not None:
            self.quality_gate.labels("passed" if finished.gate_passed else "failed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeCollector(Collector):
    """Gauges read from the scheduler when scraped: resources by phase, queue depths, API requests."""

    scheduler: Scheduler | None = None

    def collect(self) -> Iterator[Any]:
        scheduler = self.scheduler
        jobs = GaugeMetricFamily("kubedistill_distillation_jobs", "DistillationJobs by phase.", labels=["phase"])
        models = GaugeMetricFamily("kubedistill_distilled_models", "DistilledModels by phase.", labels=["phase"])
        queue = GaugeMetricFamily("kubedistill_reconcile_queue_depth", "Waiting reconciles.", labels=["queue"])
        requests = CounterMetricFamily("kubedistill_api_requests", "Requests sent to the API server.")
        job_counts = _by_phase(scheduler.job_phases if scheduler else None, [p.value for p in JobPhase])
        model_counts = _by_phase(scheduler.model_phases if scheduler else None, [p.value for p in ModelPhase])
        for phase, count in job_counts.items():
            jobs.add_metric([phase], count)
        for phase, count in model_counts.items():
            models.add_metric([phase], count)
        queue.add_metric(["slots"], scheduler.queue_depth if scheduler else 0)
        queue.add_metric(["api"], scheduler.api_queue_depth if scheduler else 0)
        requests.add_metric([], scheduler.cluster.requests if scheduler else 0)
        yield from (jobs, models, queue, requests)


def _by_phase(index: Any, phases: list[str]) -> dict[str, int]:
    """Counts by phase from a kopf index {(namespace, name): [phase]}; "None" for a resource not yet reconciled."""
    counts: Tally[str] = Tally({phase: 0 for phase in phases})
    if index:
        for values in list(index.values()):
            for phase in values:
                counts[phase or "None"] += 1
    return dict(counts)


# --------------------------------------------------------------------------- health


class Health:
    """Liveness and readiness as the HTTP server reports them."""

    def __init__(self) -> None:
        self.leading = False  # kopf runs in this process
        self.standby_alive: Callable[[], bool] = lambda: True
        self._beat = time.monotonic()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def live(self) -> tuple[bool, str]:
        if not self.leading:
            return self.standby_alive(), "standby"
        age = time.monotonic() - self._beat
        return age < HEARTBEAT_STALE_SECONDS, f"event loop turned {age:.0f}s ago"

    def ready(self) -> tuple[bool, str]:
        return self.leading, "leader" if self.leading else "standby: waiting for the leader Lease"


class TelemetryServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a daemon thread."""

    def __init__(self, metrics: OperatorMetrics, health: Health, host: str = "0.0.0.0", port: int = 8080) -> None:
        self.metrics = metrics
        self.health = health
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="telemetry", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> TelemetryServer:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(HTTPStatus.OK, server.metrics.render(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, detail = server.health.live() if path == "/healthz" else server.health.ready()
                    status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                    self._send(status, f"{'ok' if ok else 'not ok'}: {detail}\n".encode(), "text/plain")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

            def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: not worth a log line
                return

        return Handler


# --------------------------------------------------------------------------- logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message (and the exception, if any)."""

    def __init__(self) -> None:
        super().__init__()
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: int, log_format: str) -> None:
    """Plain text (``%(asctime)s LEVEL logger message``) or JSON lines, in UTC."""
    handler = logging.StreamHandler()
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)
