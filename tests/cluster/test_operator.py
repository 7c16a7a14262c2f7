"""The operator for real: a kopf process reconciling DistillationJobs on the local cluster.

kwok plays the stage pods: each stage's pod template carries (through the operator's
``stagePodAnnotations`` setting) the annotations that make kwok end it with a chosen exit
code and termination message, i.e. the one-line JSON result a worker writes. Everything
else is real: the API server admits the pods under the `restricted` Pod Security
Standard, the Job controller runs the Jobs, the scheduler places pods on simulated H100
or CPU nodes, and the operator only learns what happened by watching.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
import yaml

from tests.support import operator_proc
from tests.support.cluster import ANN_EXIT_CODE, ANN_HOLD, ANN_MESSAGE, Cluster, wait_for
from tests.support.djobs import distillation_job, evaluate_result
from tests.support.operator_proc import GROUP, H100, OK, PLURAL, VERSION, OperatorFactory, Run

pytestmark = pytest.mark.cluster
# Fixtures shared with the other operator test modules.
crds = operator_proc.crds
start_operator = operator_proc.start_operator


def test_a_distillation_job_runs_every_stage_and_publishes_its_model(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator()
    run = Run(cluster, namespace, "quick", op).apply(distillation_job("quick", model_name="quick-bot"))
    status = run.wait_phase("Succeeded")

    # One Job per stage, named after its stage key, owned by the DistillationJob.
    jobs = {j.metadata.labels["kubedistill.io/stage"]: j for j in run.jobs()}
    assert sorted(jobs) == ["evaluate", "generate", "train"]
    uid = run.get()["metadata"]["uid"]
    for stage, job in jobs.items():
        assert job.metadata.name == status["stages"][stage]["job"]
        assert job.metadata.name.startswith(f"quick-{stage}-")
        assert job.metadata.labels["app.kubernetes.io/managed-by"] == "kubedistill"
        assert job.metadata.labels["kubedistill.io/run"] == status["runId"]
        [owner] = job.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("DistillationJob", uid, True)

    # Placement: train and evaluate on the H100 pool, generate (an API teacher) on a CPU node.
    nodes = {n.metadata.name: n.metadata.labels for n in run.core.list_node().items}
    for stage in ("train", "evaluate"):
        [pod] = run.pods(stage)
        assert nodes[pod.spec.node_name].get("nvidia.com/gpu.product") == H100, stage
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] in ("8", "1")
    [generate_pod] = run.pods("generate")
    assert "nvidia.com/gpu.product" not in nodes[generate_pod.spec.node_name]
    assert [p.spec.containers[0].resources.limits["nvidia.com/gpu"] for p in run.pods("train")] == ["8"]

    # Status: summaries from the workers' termination messages, every condition True.
    assert status["dataset"]["examples"] == 100 and status["dataset"]["uri"].startswith("s3://kd-test/runs/quick/")
    assert status["model"]["uri"].startswith("s3://kd-test/runs/quick/models/")
    assert status["evaluation"]["teacherAgreement"] == 0.97 and status["evaluation"]["passed"] is True
    assert status["distilledModel"] == "quick-bot"
    assert status["observedGeneration"] == 1
    for type_ in ("Generated", "Trained", "Evaluated", "Published", "Succeeded"):
        assert run.condition(type_)["status"] == "True", type_
    assert run.condition("Failed")["status"] == "False"
    assert not any(k.startswith("kopf") for k in status), "kopf bookkeeping leaked into the status"

    # An Event for every stage transition.
    reasons = [e.reason for e in run.events()]
    assert reasons.count("StageSucceeded") == 3 and reasons.count("StagePending") == 3
    assert {"QualityGatePassed", "ModelPublished", "RunSucceeded"} <= set(reasons)

    # The printer columns.
    table = cluster.kubectl("-n", namespace, "get", "dj", "quick").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "TEACHER",
        "AGREEMENT",
        "SPEND",
        "BUDGET",
        "SPEEDUP",
        "COSTRATIO",
        "AGE",
    ]
    # A finished run has no stage in progress: that column is empty.
    progress_column = table[0].index("PROGRESS")
    assert table[1][progress_column : table[0].index("TEACHER")].strip() == ""
    assert table[1].split()[:4] == ["quick", "Succeeded", "big-teacher", "0.97"]

    # The published model, served: kwok runs the vLLM pod, the Deployment becomes available.
    model = run.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels", "quick-bot")
    assert model["spec"]["model"] == status["model"]
    assert model["metadata"]["labels"]["kubedistill.io/published-by"] == "quick"
    wait_for(
        lambda: (run.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels", "quick-bot")
                 .get("status", {}).get("phase")) == "Ready",
        timeout=60, what="DistilledModel quick-bot Ready",
    )  # fmt: skip


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
def test_a_failing_stage_fails_the_run_with_the_worker_message(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory, stage: str
) -> None:
    reason = f"{stage} worker: CUDA out of memory at step 7 ({secrets.token_hex(3)})"
    op = start_operator({stage: {ANN_EXIT_CODE: "1", ANN_MESSAGE: reason}})
    run = Run(cluster, namespace, "doomed", op).apply(distillation_job("doomed"))
    status = run.wait_phase("Failed")
    assert status["stages"][stage]["phase"] == "Failed"
    assert status["stages"][stage]["message"] == reason
    failed = run.condition("Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed" and reason in failed["message"]
    assert run.condition("Succeeded")["status"] == "False"
    warnings = [e for e in run.events() if e.type == "Warning" and e.reason == "StageFailed"]
    assert warnings and reason in warnings[0].message
    # Exit code 1 is a worker error: FailJob at once, no retries paid for.
    [pod] = run.pods(stage)
    assert pod.status.phase == "Failed"
    assert "distilledModel" not in status


def test_a_gate_miss_fails_with_quality_gate_failed_and_no_model(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"evaluate": {ANN_MESSAGE: evaluate_result(0.62)}})
    run = Run(cluster, namespace, "meh", op).apply(distillation_job("meh", min_agreement=0.9))
    status = run.wait_phase("Failed")
    failed = run.condition("Failed")
    assert failed["reason"] == "QualityGateFailed" and "0.62" in failed["message"]
    assert status["evaluation"]["teacherAgreement"] == 0.62 and status["evaluation"]["passed"] is False
    assert "QualityGateFailed" in [e.reason for e in run.events() if e.type == "Warning"]
    models = run.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels")["items"]
    assert models == []


def test_operator_killed_mid_run_resumes_without_duplicates(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    held = {"generate": {ANN_HOLD: "true"}}
    op = start_operator(held)
    run = Run(cluster, namespace, "phoenix", op).apply(distillation_job("phoenix"))
    wait_for(lambda: run.jobs_by_stage().get("generate"), timeout=60, what="the generate Job")
    wait_for(lambda: run.pods("generate"), timeout=60, what="the generate pod")
    op.kill()
    assert not op.alive()

    # The pod finishes while no operator runs.
    [pod] = run.pods("generate")
    run.core.patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: "false", **OK["generate"]}}}
    )
    wait_for(lambda: run.pods("generate")[0].status.phase == "Succeeded", timeout=60, what="generate pod done")
    op.start(settings={"stagePodAnnotations": OK})
    status = run.wait_phase("Succeeded")

    assert {stage: len(names) for stage, names in run.jobs_by_stage().items()} == {
        "generate": 1,
        "train": 1,
        "evaluate": 1,
    }
    config_maps = run.core.list_namespaced_config_map(
        namespace, label_selector="kubedistill.io/job=phoenix,app.kubernetes.io/component!=progress"
    ).items
    assert len(config_maps) == 3  # one worker config per stage, each created once
    assert status["dataset"]["examples"] == 100
    assert [e.reason for e in run.events()].count("StagePending") == 3
    assert op.starts == 2


def test_a_spec_edit_starts_a_new_run_that_reuses_the_teacher_dataset(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator()
    run = Run(cluster, namespace, "edit", op).apply(distillation_job("edit", epochs=1))
    first = run.wait_phase("Succeeded")

    run.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "edit", {"spec": {"student": {"training": {"epochs": 2}}}}
    )
    second = run.wait(
        lambda s: s.get("runId") != first["runId"] and s.get("phase") == "Succeeded", "the second run to succeed"
    )
    jobs = run.jobs_by_stage()
    assert jobs["generate"] == [first["stages"]["generate"]["job"]]  # never re-run
    assert len(jobs["train"]) == 2 and len(jobs["evaluate"]) == 2
    assert second["stages"]["generate"] == first["stages"]["generate"]
    assert second["dataset"]["uri"] == first["dataset"]["uri"]
    assert second["stages"]["train"]["job"] != first["stages"]["train"]["job"]
    assert second["model"]["uri"] != first["model"]["uri"]
    assert second["observedGeneration"] == 2
    assert run.condition("Generated")["reason"] == "ArtifactReused"
    reasons = [e.reason for e in run.events()]
    assert {"SpecChanged", "ArtifactReused"} <= set(reasons)
    model = run.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels", "edit-model")
    assert model["spec"]["model"]["uri"] == second["model"]["uri"]


def test_secrets_are_referenced_never_copied(cluster: Cluster, namespace: str, start_operator: OperatorFactory) -> None:
    api_key = f"sk-kd-{secrets.token_hex(12)}"
    s3_secret = f"s3-kd-{secrets.token_hex(12)}"
    core = cluster.core()
    core.create_namespaced_secret(namespace, {"metadata": {"name": "teacher-key"}, "stringData": {"api-key": api_key}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "kd-access-id", "AWS_SECRET_ACCESS_KEY": s3_secret},
        },
    )
    op = start_operator(log_level="DEBUG")
    run = Run(cluster, namespace, "hush", op).apply(
        distillation_job("hush", api_key_secret="teacher-key", storage_secret="s3-creds")
    )
    run.wait_phase("Succeeded")
    wait_for(
        lambda: (
            run.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels", "hush-model")
            .get("status", {})
            .get("phase")
            == "Ready"
        ),
        timeout=60,
        what="hush-model Ready",
    )

    # The generate pod gets the key as a secretKeyRef, and only the generate pod.
    [generate] = [j for j in run.jobs() if j.metadata.labels["kubedistill.io/stage"] == "generate"]
    env = {e.name: e for e in generate.spec.template.spec.containers[0].env}
    ref = env["KUBEDISTILL_TEACHER_API_KEY"].value_from.secret_key_ref
    assert (ref.name, ref.key, env["KUBEDISTILL_TEACHER_API_KEY"].value) == ("teacher-key", "api-key", None)
    for job in run.jobs():
        if job.metadata.labels["kubedistill.io/stage"] != "generate":
            assert "KUBEDISTILL_TEACHER_API_KEY" not in {e.name for e in job.spec.template.spec.containers[0].env}

    # The values appear nowhere but in their Secrets.
    def dump(items: Any) -> str:
        return json.dumps(cluster.api_client().sanitize_for_serialization(items))

    everything = {
        "configmaps": dump(core.list_namespaced_config_map(namespace).items),
        "jobs": dump(run.jobs()),
        "pods": dump(core.list_namespaced_pod(namespace).items),
        "deployments": dump(cluster.apps().list_namespaced_deployment(namespace).items),
        "distillationjobs": json.dumps(run.get()),
        "distilledmodels": json.dumps(
            run.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels")
        ),
        "events": dump(core.list_namespaced_event(namespace).items),
        "operator log": op.log(),
    }
    assert "teacher-key" in everything["jobs"]  # the reference is there...
    for where, text in everything.items():
        for value in (api_key, s3_secret):
            assert value not in text, f"a secret value leaked into {where}"


def test_pods_are_admitted_under_the_restricted_standard(cluster: Cluster, namespace: str) -> None:
    """The namespace enforces `restricted`: the stage pods above exist, so they passed. Here, the proof
    that enforcement is on: the same Job without our hardening is refused."""
    labels = cluster.core().read_namespace(namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    proc = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "violates PodSecurity" in proc.stderr


def test_multi_node_training_is_an_indexed_job_with_a_rendezvous_service(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"train": {ANN_HOLD: "true"}})
    manifest = distillation_job("wide", nodes=2, gpus_per_node=2)
    manifest["spec"]["student"]["training"] = {"strategy": "fsdp"}
    run = Run(cluster, namespace, "wide", op).apply(manifest)
    status = run.wait(lambda s: (s.get("stages") or {}).get("train", {}).get("phase") == "Running", "train running")
    job_name = status["stages"]["train"]["job"]
    job = run.batch.read_namespaced_job(job_name, namespace)
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 2, 2)
    # every rank reads the FSDP strategy from the stage's config
    config = yaml.safe_load(run.core.read_namespaced_config_map(job_name, namespace).data["train.yaml"])
    assert config["student"]["training"]["strategy"] == "fsdp"
    service = run.core.read_namespaced_service(job_name, namespace)
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses is True
    wait_for(lambda: len([p for p in run.pods("train") if p.status.phase == "Running"]) == 2, what="2 train pods")
    pods = sorted(run.pods("train"), key=lambda p: p.metadata.annotations["batch.kubernetes.io/job-completion-index"])
    assert [p.spec.hostname for p in pods] == [f"{job_name}-0", f"{job_name}-1"]
    assert {p.spec.subdomain for p in pods} == {job_name}
    for pod in pods:
        assert set(service.spec.selector.items()) <= set(pod.metadata.labels.items())
        command = " ".join(pod.spec.containers[0].command)
        assert (
            f"--nnodes 2 --nproc-per-node 2 --node-rank $(NODE_RANK) --master-addr {job_name}-0.{job_name}" in command
        )
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
        assert pod.spec.node_name.startswith("h100-")
    # Let the pods finish: a Job pod deleted while Running keeps its tracking finalizer under kwok
    # (no kubelet moves it to Failed), which would hold the namespace and the GPUs.
    for pod in pods:
        run.core.patch_namespaced_pod(
            pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: "false", **OK["train"]}}}
        )
    run.wait_phase("Succeeded")


def test_sharded_generation_is_an_indexed_job_of_independent_shards(
    cluster: Cluster, namespace: str, start_operator: OperatorFactory
) -> None:
    op = start_operator({"generate": {ANN_HOLD: "true"}})
    manifest = distillation_job("sharded")
    manifest["spec"]["teacher"]["shards"] = 3
    run = Run(cluster, namespace, "sharded", op).apply(manifest)
    status = run.wait(
        lambda s: (s.get("stages") or {}).get("generate", {}).get("phase") == "Running", "generate running"
    )
    job_name = status["stages"]["generate"]["job"]
    job = run.batch.read_namespaced_job(job_name, namespace)
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 3, 3)
    wait_for(lambda: len([p for p in run.pods("generate") if p.status.phase == "Running"]) == 3, what="3 shards")
    pods = run.pods("generate")
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1", "2"]
    for pod in pods:  # the Job's uid, through the downward API: names the run's shard reports
        env = {e.name: e for e in pod.spec.containers[0].env}
        field = env["KUBEDISTILL_SHARD_RUN"].value_from.field_ref.field_path
        assert field == "metadata.labels['batch.kubernetes.io/controller-uid']"
        assert pod.metadata.labels["batch.kubernetes.io/controller-uid"] == job.metadata.uid
    for pod in pods:
        run.core.patch_namespaced_pod(
            pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: "false", **OK["generate"]}}}
        )
    run.wait_phase("Succeeded")
