"""Fleet-grade operation on the real local cluster: no silent success, bounded history,
whole-group restarts, leader election with failover, and metrics that agree with the cluster.

kwok plays the pods (annotations set by the operator's ``stagePodAnnotations`` or patched onto a
running pod decide how each ends); everything else is real: API server, Job controller with
pod failure policies, scheduler, Leases, and the operator as a process.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import yaml

from tests.support import operator_proc
from tests.support.cluster import ANN_EXIT_CODE, ANN_HOLD, ANN_MESSAGE, Cluster, wait_for
from tests.support.djobs import distillation_job, evaluate_result, train_result
from tests.support.operator_proc import OperatorFactory, Run

pytestmark = pytest.mark.cluster
crds = operator_proc.crds
start_operator = operator_proc.start_operator


def release(run: Run, pod: Any, **annotations: str) -> None:
    """Let a held pod end: drop the hold, and set how it ends (exit code, message)."""
    patch: dict[str, Any] = {ANN_HOLD: None, **annotations}
    run.core.patch_namespaced_pod(pod.metadata.name, run.namespace, {"metadata": {"annotations": patch}})


def running_pods(run: Run, stage: str, job: str) -> list[Any]:
    return [p for p in run.pods(stage) if p.metadata.labels.get("job-name") == job and p.status.phase == "Running"]


def test_a_stage_that_succeeds_without_a_result_fails_the_run(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"generate": {}})  # the pod exits 0 and leaves no termination message
    run = Run(cluster, namespace, "silent", op).apply(distillation_job("silent"))
    status = run.wait_phase("Failed")
    failed = run.condition("Failed")
    job = status["stages"]["generate"]["job"]
    assert failed["reason"] == "StageResultMissing"
    assert f"Job {job} exited 0 without a result" in failed["message"]
    assert status["stages"]["generate"]["reason"] == "StageResultMissing"
    assert "train" not in run.jobs_by_stage()  # nothing downstream trusts a result nobody reported
    assert "StageResultMissing" in {e.reason for e in run.events()}


def test_history_beyond_the_limit_is_deleted_but_never_the_latest_success(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    jobs_setting = {"historyLimit": 1}
    op = start_operator(jobs=jobs_setting)
    run = Run(cluster, namespace, "hist", op).apply(distillation_job("hist", epochs=1))
    first = run.wait_phase("Succeeded")
    succeeded_jobs = set(first["history"][0]["jobs"])
    op.stop()
    # From now on every student fails the gate: runs 2, 3 and 4 fail.
    run.op = start_operator({"evaluate": {ANN_MESSAGE: evaluate_result(0.5)}}, jobs=jobs_setting)
    runs: list[set[str]] = []
    for epochs in (2, 3, 4):
        run.apply(distillation_job("hist", epochs=epochs))
        status = run.wait(
            lambda s, e=epochs: s.get("phase") == "Failed" and s.get("observedGeneration") == e,
            f"run with {epochs} epochs failed",
        )
        runs.append(set(status["history"][0]["jobs"]))
    second, third, _fourth = runs
    gone = second - third - succeeded_jobs  # run 2's own Jobs (its dataset Job is everyone's)
    assert gone, "run 2 had Jobs of its own"

    def pruned() -> bool:
        existing = {j.metadata.name for j in run.jobs()}
        return not gone & existing

    wait_for(pruned, timeout=60, what="run 2's Jobs deleted")
    existing = {j.metadata.name for j in run.jobs()}
    assert succeeded_jobs <= existing, "the latest successful run's Jobs must stay"
    assert third <= existing
    config_maps = {c.metadata.name for c in run.core.list_namespaced_config_map(namespace).items}
    assert not gone & config_maps and succeeded_jobs <= config_maps
    history = run.status()["history"]
    assert [r["phase"] for r in history] == ["Failed", "Failed", "Succeeded"]


def test_a_rank_failure_restarts_the_whole_group_from_the_checkpoint(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"train": {ANN_HOLD: "true", ANN_MESSAGE: train_result()}})
    run = Run(cluster, namespace, "group", op).apply(distillation_job("group", nodes=2, gpus_per_node=1))
    status = run.wait(lambda s: (s.get("stages") or {}).get("train", {}).get("phase") == "Running", "train running")
    first = status["stages"]["train"]["job"]
    wait_for(lambda: len(running_pods(run, "train", first)) == 2, timeout=60, what="both ranks running")

    rank1 = next(p for p in running_pods(run, "train", first) if p.metadata.name.startswith(f"{first}-1-"))
    release(run, rank1, **{ANN_EXIT_CODE: "137", ANN_MESSAGE: "rank 1: node lost"})
    status = run.wait(lambda s: s["stages"]["train"].get("restarts") == 1, "the group restarted")
    second = status["stages"]["train"]["job"]
    assert second == f"{first}-r1"
    condition = run.condition("Trained")
    assert condition["reason"] == "GroupRestarted" and "rank 1: node lost" in condition["message"]
    # Both ranks start again, in a new Job with its own rendezvous Service, from the same checkpoints.
    wait_for(lambda: len(running_pods(run, "train", second)) == 2, timeout=60, what="both ranks of attempt 1")
    old_job = run.batch.read_namespaced_job(first, namespace)
    assert any(c.type == "Failed" and c.status == "True" for c in old_job.status.conditions or [])
    train_configs = run.core.list_namespaced_config_map(namespace, label_selector="kubedistill.io/stage=train")
    config = {c.metadata.name: yaml.safe_load(c.data["train.yaml"]) for c in train_configs.items}
    assert config[first]["checkpointUri"] == config[second]["checkpointUri"]  # resume, not redo
    assert (config[first]["progress"]["job"], config[second]["progress"]["job"]) == (first, second)
    assert run.core.read_namespaced_service(second, namespace).spec.selector["kubedistill.io/attempt"] == "1"

    for pod in running_pods(run, "train", second):
        release(run, pod)
    status = run.wait_phase("Succeeded")
    assert status["stages"]["train"]["restarts"] == 1
    assert "GroupRestarted" in {e.reason for e in run.events()}


def test_a_second_replica_takes_over_a_run_in_flight_when_the_leader_dies(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    lease = ["--leader-elect", "--lease-namespace", namespace, "--lease-seconds", "4",
             "--lease-renew-deadline", "3", "--lease-retry", "0.5"]  # fmt: skip
    stages = {"train": {ANN_HOLD: "true", ANN_MESSAGE: train_result()}}
    leader = start_operator(stages, args=lease)
    standby = start_operator(stages, args=lease, ready=False)
    assert leader.ready() and not standby.ready()

    run = Run(cluster, namespace, "failover", leader).apply(distillation_job("failover", gpus_per_node=1))
    status = run.wait(lambda s: (s.get("stages") or {}).get("train", {}).get("phase") == "Running", "train running")
    train_job = status["stages"]["train"]["job"]

    killed = time.monotonic()
    leader.kill()
    wait_for(standby.ready, timeout=30, interval=0.1, what="the standby takes the Lease")
    failover = time.monotonic() - killed
    print(f"\nfailover: the standby leads {failover:.1f}s after the leader was SIGKILLed (Lease 4 s)")
    assert failover < 15

    run.op = standby
    [pod] = running_pods(run, "train", train_job)
    release(run, pod)
    run.wait_phase("Succeeded")
    assert {stage: len(jobs) for stage, jobs in run.jobs_by_stage().items()} == {
        "generate": 1,
        "train": 1,
        "evaluate": 1,
    }, "a failover must not duplicate a stage Job"

    metrics = standby.metrics()
    assert metrics["kubedistill_leader"] == 1
    assert metrics['kubedistill_distillation_jobs{phase="Succeeded"}'] == 1
    # The new leader saw train and evaluate finish (generate finished under the old one).
    assert metrics['kubedistill_stages_finished_total{result="succeeded",stage="train"}'] == 1
    assert metrics['kubedistill_stages_finished_total{result="succeeded",stage="evaluate"}'] == 1
    assert metrics['kubedistill_quality_gate_total{result="passed"}'] == 1
    assert metrics['kubedistill_reconcile_duration_seconds_count{kind="DistillationJob"}'] >= 2
    from kubernetes import client as k8s

    lease_object = k8s.CoordinationV1Api(cluster.custom().api_client).read_namespaced_lease(
        "kubedistill-operator", namespace
    )
    assert lease_object.spec.lease_transitions >= 1
    identity = re.search(r"leader after [\d.]+s as (\S+)", standby.log())
    assert identity and lease_object.spec.holder_identity == identity.group(1)
