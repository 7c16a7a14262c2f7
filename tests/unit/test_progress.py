"""Live progress, every piece but the API server: the worker's reporter, the operator's builders and
decision, the rate limit on status writes, and local mode's live line."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import API_VERSION
from kubedistill.api.worker_config import ProgressTarget, StageProgress, format_duration
from kubedistill.builders.plan import RunPlan
from kubedistill.builders.progress import build_progress_children
from kubedistill.builders.stages import build_stage_children, plan_stage
from kubedistill.kube.pacing import Priority
from kubedistill.local.live import LiveProgress
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.scheduler import Scheduler
from kubedistill.worker.report import ProgressReporter
from tests.support.djobs import distillation_job, generate_result
from tests.support.fake_cluster import FakeCluster

SETTINGS = OperatorSettings()


def plan_of(manifest: dict) -> RunPlan:
    from kubedistill.api.v1alpha1 import DistillationJob

    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": "ml", "uid": "u1"}}
    job = DistillationJob.model_validate(body)
    return RunPlan(job=job, keys=compute_stage_keys(job.spec))


def report(stage: str, job: str | None, done: float, total: float | None = 100.0, **extra: object) -> StageProgress:
    return StageProgress.model_validate(
        {"stage": stage, "job": job, "done": done, "total": total, "unit": "answers",
         "updatedAt": "2026-01-01T00:00:00Z", **extra}
    )  # fmt: skip


# --------------------------------------------------------------------------- the report


def test_summary_and_durations_read_like_a_person_would_write_them():
    assert format_duration(4980) == "1h23m" and format_duration(727) == "12m07s" and format_duration(45) == "45s"
    line = report("generate", "j", 412_000, 1_000_000, rate=118.4, etaSeconds=4980).summary()
    assert line == "412,000/1,000,000 answers, 118/s, ETA 1h23m"
    train = StageProgress.model_validate(
        {"stage": "train", "done": 10, "total": 40, "unit": "steps", "rate": 0.5, "details": {"loss": 1.23456},
         "updatedAt": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    assert train.summary() == "10/40 steps, 0.5/s, loss 1.235" and train.fraction == 0.25


def test_reporter_throttles_to_its_interval_and_measures_rate_and_eta(tmp_path: Path):
    path = tmp_path / "p.json"
    reporter = ProgressReporter(ProgressTarget(file=str(path), interval_seconds=1), "generate", "answers", total=100)
    reporter.update(0)
    time.sleep(0.6)
    reporter.update(30)  # inside the interval: not sent
    time.sleep(0.6)
    reporter.update(60, retries=2)  # 1.2 s after the first: sent
    reporter.finish()
    sent = StageProgress.model_validate_json(path.read_text())
    assert sent.done == 60 and sent.details == {"retries": 2}
    assert sent.rate is not None and 40 < sent.rate < 60  # 60 answers in ~1.2 s
    assert sent.eta_seconds is not None and 0.5 < sent.eta_seconds < 1.2  # 40 to go at ~50/s
    assert reporter.sent == 2  # the first update and the one after the interval


def test_a_failing_sink_never_fails_the_stage(caplog):
    class Broken:
        def write(self, progress: StageProgress) -> None:
            raise ConnectionError("API server unreachable")

    reporter = ProgressReporter(None, "train", "steps", total=10)
    reporter.sinks.append(Broken())
    reporter.update(5, force=True)
    reporter.finish()
    assert "progress report to Broken failed" in caplog.text


# --------------------------------------------------------------------------- what the operator creates


def test_the_progress_configmap_is_writable_by_the_stage_pods_and_nothing_else():
    plan = plan_of(distillation_job("live"))
    children = {(c["kind"], c["metadata"]["name"]): c for c in build_progress_children(plan, SETTINGS)}
    assert set(children) == {
        ("ServiceAccount", "live-worker"), ("Role", "live-progress-writer"),
        ("RoleBinding", "live-progress-writer"), ("ConfigMap", "live-progress"),
    }  # fmt: skip
    [rule] = children[("Role", "live-progress-writer")]["rules"]
    assert rule == {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["live-progress"],
                    "verbs": ["get", "patch"]}  # fmt: skip
    binding = children[("RoleBinding", "live-progress-writer")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "live-worker", "namespace": "ml"}]
    assert children[("ServiceAccount", "live-worker")]["automountServiceAccountToken"] is False

    # The stage pod runs as that ServiceAccount; only the worker container sees its token.
    children = build_stage_children(plan_stage(plan, "generate", SETTINGS), SETTINGS)
    job = next(c for c in children if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "live-worker" and pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    token = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]
    volume = next(v for v in pod["volumes"] if v["name"] == token)
    assert {"serviceAccountToken"} <= {k for source in volume["projected"]["sources"] for k in source}
    config = next(
        c for c in build_stage_children(plan_stage(plan, "generate", SETTINGS), SETTINGS) if c["kind"] == "ConfigMap"
    )
    assert "progress:" in config["data"]["generate.yaml"] and job["metadata"]["name"] in config["data"]["generate.yaml"]


def test_with_a_service_account_of_the_settings_no_account_is_created():
    settings = OperatorSettings(service_account_name="distill-workers")
    children = build_progress_children(plan_of(distillation_job("own")), settings)
    assert [c["kind"] for c in children] == ["Role", "RoleBinding", "ConfigMap"]
    assert children[1]["subjects"][0]["name"] == "distill-workers"


# --------------------------------------------------------------------------- the decision and the rate limit


async def test_reports_reach_the_status_of_the_running_stage_only_and_rate_limited():
    settings = OperatorSettings.model_validate({"progress": {"statusSeconds": 5}})
    cluster = FakeCluster()
    cluster.put(distillation_job("live"))
    scheduler = Scheduler(settings, cluster)  # type: ignore[arg-type]
    await scheduler.reconcile_job("ns", "live")
    assert cluster.peek("v1", "ConfigMap", "ns", "live-progress") is not None  # created with the first stage
    jobs = {j["metadata"]["labels"]["kubedistill.io/stage"]: j for j in cluster.of_kind("Job")}
    generate = jobs["generate"]["metadata"]["name"]
    jobs["generate"]["status"] = {"startTime": "2026-01-01T00:00:00Z", "active": 1, "ready": 1}

    def write(**fields: object) -> None:
        data = cluster.peek("v1", "ConfigMap", "ns", "live-progress")["data"]  # type: ignore[index]
        data["generate"] = json.dumps(report("generate", generate, **fields).to_wire())  # type: ignore[arg-type]

    write(done=41, rate=2.0, etaSeconds=29.5)
    scheduler.kick_progress("ns", "live")
    await asyncio.gather(*list(scheduler._tasks))
    status = cluster.peek(API_VERSION, "DistillationJob", "ns", "live")["status"]  # type: ignore[index]
    assert status["progress"] == "generate 41%, ETA 30s"
    assert status["stages"]["generate"]["progress"] == 0.41
    assert status["stages"]["generate"]["progressMessage"] == "41/100 answers, 2.0/s, ETA 30s"

    # Reports in quick succession: one status write per statusSeconds, then the latest.
    reconciles = scheduler.reconciles
    for done in (50, 60, 70):
        write(done=done)
        scheduler.kick_progress("ns", "live")
        await asyncio.sleep(0)
    await asyncio.gather(*list(scheduler._tasks))
    assert scheduler.reconciles == reconciles  # held back until the interval passes
    assert len(scheduler._progress_later) == 1
    assert [c.priority for c in cluster.calls if c.verb == "patch_status"][-1] == Priority.PROGRESS

    # A report of another Job (an earlier attempt, a previous run) is stale: ignored.
    data = cluster.peek("v1", "ConfigMap", "ns", "live-progress")["data"]  # type: ignore[index]
    data["generate"] = json.dumps(report("generate", "live-generate-old", 99).to_wire())
    scheduler._progress_due.clear()
    scheduler.kick_progress("ns", "live")
    await asyncio.gather(*list(scheduler._tasks))
    status = cluster.peek(API_VERSION, "DistillationJob", "ns", "live")["status"]  # type: ignore[index]
    assert status["progress"] == "generate running" and "progressMessage" not in status["stages"]["generate"]
    await scheduler.close()


async def test_a_finished_stage_shows_done_and_the_column_moves_on():
    cluster = FakeCluster()
    cluster.put(distillation_job("moves"))
    scheduler = Scheduler(OperatorSettings(), cluster)  # type: ignore[arg-type]
    await scheduler.reconcile_job("ns", "moves")
    generate = next(j for j in cluster.of_kind("Job"))["metadata"]["name"]
    cluster.finish_job("ns", generate, message=generate_result())
    await scheduler.reconcile_job("ns", "moves")
    status = cluster.peek(API_VERSION, "DistillationJob", "ns", "moves")["status"]  # type: ignore[index]
    assert status["stages"]["generate"]["progress"] == 1.0 and status["progress"] == "train pending"
    await scheduler.close()


# --------------------------------------------------------------------------- local mode's live line


@pytest.mark.parametrize("tty", [False, True])
def test_local_mode_shows_each_new_report(tmp_path: Path, tty: bool):
    path = tmp_path / "train.progress.json"
    lines: list[str] = []

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stream = Stream()
    live = LiveProgress(path, "train", lines.append, stream)
    live.poll()  # nothing yet
    for done, stamp in ((10, "2026-01-01T00:00:01Z"), (10, "2026-01-01T00:00:02Z"), (20, "2026-01-01T00:00:03Z")):
        path.write_text(json.dumps({**report("train", "j", done, 40).to_wire(), "updatedAt": stamp}))
        live.poll()
    live.close()
    assert live.lines == 2  # the second report moved nothing
    shown = lines if not tty else [part for part in stream.getvalue().split("\r\x1b[K") if part]
    assert [line.split()[:2] for line in shown] == [["train", "25%"], ["train", "50%"]]


def test_local_mode_shows_a_final_report_written_in_the_same_second(tmp_path: Path):
    """The last report (100%) often follows the one before within a second: it is still a new line."""
    path = tmp_path / "train.progress.json"
    lines: list[str] = []
    live = LiveProgress(path, "train", lines.append, io.StringIO())
    for done in (988, 1000):
        path.write_text(json.dumps({**report("train", "j", done, 1000).to_wire(), "updatedAt": "2026-01-01T00:00:01Z"}))
        live.poll()
    live.close()
    assert [line.split()[:2] for line in lines] == [["train", "99%"], ["train", "100%"]]


def test_local_run_shows_the_report_a_worker_writes_just_before_it_exits(tmp_path: Path):
    """The runner reads the progress file once more after the worker exits, so 100% is never lost."""
    import subprocess
    import sys

    from kubedistill.local.runner import _wait_showing_progress

    path = tmp_path / "train.progress.json"
    final = json.dumps(report("train", "j", 1000, 1000).to_wire())
    write_and_exit = f"import pathlib; pathlib.Path({str(path)!r}).write_text({final!r})"
    lines: list[str] = []
    live = LiveProgress(path, "train", lines.append, io.StringIO())
    proc = subprocess.Popen([sys.executable, "-c", write_and_exit])
    assert _wait_showing_progress(proc, live) == 0
    assert [line.split()[:2] for line in lines] == [["train", "100%"]]
