"""Live progress on the real cluster: a running stage's pod reports, the DistillationJob shows it.

kwok holds the stage pod running (no worker runs inside it), so the test plays the worker: it
reports through the worker's own ``ProgressReporter`` and ``ConfigMapSink``, with a token of the
ServiceAccount the operator gave the stage pods. Everything else is real: the ConfigMap and its
RBAC as the operator created them, the API server's authorization, the operator's watch, its
rate-limited status writes, and ``kubectl get``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubedistill.api.worker_config import ProgressTarget
from kubedistill.worker.report import ProgressReporter
from tests.support import operator_proc
from tests.support.cluster import ANN_HOLD, ANN_MESSAGE, Cluster, wait_for
from tests.support.djobs import distillation_job, generate_result
from tests.support.operator_proc import OperatorFactory, Run

pytestmark = pytest.mark.cluster
crds = operator_proc.crds
start_operator = operator_proc.start_operator


def test_a_running_stage_reports_twice_and_the_status_follows(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = start_operator(
        {"generate": {ANN_HOLD: "true", ANN_MESSAGE: generate_result()}},
        progress={"reportSeconds": 5, "statusSeconds": 5},
    )
    run = Run(cluster, namespace, "live", op).apply(distillation_job("live"))
    status = run.wait(lambda s: (s.get("stages") or {}).get("generate", {}).get("phase") == "Running", "generate runs")
    job = status["stages"]["generate"]["job"]
    assert status["progress"] == "generate running"  # nothing reported yet
    [pod] = run.pods("generate")
    assert pod.spec.service_account_name == "live-worker" and pod.spec.automount_service_account_token is False

    # The worker's reporter, with the stage pod's credentials (a token of its ServiceAccount).
    as_pod = cluster.as_service_account(namespace, "live-worker", tmp_path / "worker.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(as_pod.kubeconfig))
    target = ProgressTarget(config_map="live-progress", namespace=namespace, job=job, interval_seconds=5)
    reporter = ProgressReporter(target, "generate", "answers", total=1000)

    reporter.update(250, force=True, failed=0, reused=100)
    reporter._idle.wait(10)
    first = run.wait(lambda s: (s.get("progress") or "").startswith("generate 25%"), "the first report")
    assert first["stages"]["generate"]["progress"] == 0.25
    assert first["stages"]["generate"]["progressMessage"].startswith("250/1,000 answers")
    assert "generate 25%" in cluster.kubectl("-n", namespace, "get", "dj", "live").stdout

    reporter.update(600, force=True, failed=2, reused=100)
    reporter.finish()
    second = run.wait(lambda s: (s.get("progress") or "").startswith("generate 60%"), "the second report", timeout=30)
    assert second["stages"]["generate"]["progress"] == 0.6
    table = cluster.kubectl("-n", namespace, "get", "dj", "live").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "PHASE", "PROGRESS"] and "generate 60%" in table[1]
    assert reporter.sent == 2
    data = run.core.read_namespaced_config_map("live-progress", namespace).data
    assert json.loads(data["generate"])["details"] == {"failed": 2, "reused": 100}

    # The stage's token may patch that ConfigMap and nothing else.
    def can(verb: str, resource: str) -> bool:
        result = as_pod.kubectl("-n", namespace, "auth", "can-i", verb, resource, check=False)
        return result.stdout.strip() == "yes"

    assert can("patch", "configmaps/live-progress") and can("get", "configmaps/live-progress")
    for verb, resource in [
        ("patch", "configmaps/live-generate-x"), ("update", "configmaps/live-progress"), ("list", "configmaps"),
        ("delete", "configmaps/live-progress"), ("get", "secrets"), ("list", "secrets"), ("create", "pods"),
        ("patch", "distillationjobs.kubedistill.io/live"), ("patch", "distillationjobs.kubedistill.io/status"),
        ("get", "pods"),
    ]:  # fmt: skip
        assert not can(verb, resource), f"the stage's ServiceAccount may {verb} {resource}"
    token = (tmp_path / "worker.kubeconfig").read_text().split("token: ")[1].split()[0]
    assert token not in json.dumps(run.get()) and token not in json.dumps(data)  # secrets stay out

    # The stage ends: the column moves on.
    [pod] = run.pods("generate")
    run.core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: None}}})
    done = run.wait(lambda s: s["stages"]["generate"]["phase"] == "Succeeded", "generate done")
    assert done["stages"]["generate"]["progress"] == 1.0
    wait_for(lambda: not (run.status().get("progress") or "").startswith("generate"), timeout=30, what="moved on")
