"""Builders: DistillationJob stage children from a CR + settings, as plain manifests."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistillationJob
from kubedistill.api.worker_config import EvaluateConfig, GenerateConfig, TrainConfig
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan
from kubedistill.builders.publish import build_distilled_model
from kubedistill.builders.resources import scale_quantity
from kubedistill.builders.stages import (
    build_stage_children,
    build_stage_config_map,
    build_stage_job,
    plan_stage,
    stage_placement,
)
from kubedistill.reconcile.keys import compute_stage_keys
from tests.support.djobs import distillation_job

SETTINGS = OperatorSettings()
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def plan_of(manifest: dict[str, Any], uid: str = "uid-1") -> RunPlan:
    manifest = {**manifest, "metadata": {**manifest["metadata"], "namespace": "ml", "uid": uid, "generation": 1}}
    dj = DistillationJob.model_validate(manifest)
    return RunPlan(job=dj, keys=compute_stage_keys(dj.spec))


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def assert_restricted(pod: dict[str, Any]) -> None:
    """The `restricted` Pod Security Standard, field by field."""
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod.get("initContainers", []) + pod["containers"]:
        csc = container["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["runAsNonRoot"] is True
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
        # A read-only root; /tmp (scratch, HOME, caches) is an emptyDir.
        assert csc["readOnlyRootFilesystem"] is True
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert {"name": "HOME", "value": "/tmp"} in container["env"]
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= {"configMap", "emptyDir", "secret", "projected"}, volume


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def test_generate_with_an_api_teacher_is_cpu_only_and_gets_the_key_by_reference() -> None:
    plan = plan_of(distillation_job("demo", api_key_secret="teacher", storage_secret="s3creds"))
    job = build_stage_job(plan, "generate", SETTINGS)
    pod = pod_of(job)
    [container] = pod["containers"]
    assert job["metadata"]["name"] == plan.job_name("generate")
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(container["resources"])
    env = env_of(container)
    assert env["KUBEDISTILL_TEACHER_API_KEY"] == {
        "name": "KUBEDISTILL_TEACHER_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "teacher", "key": "api-key"}},
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3creds", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3creds"
    plain = {"KUBEDISTILL_LOG_LEVEL", "KUBEDISTILL_GRACE_SECONDS", "HOME", "HF_HOME"}
    assert all("value" not in e or e["name"] in plain for e in env.values())
    # The worker knows its grace period, to exit within it (and say so) rather than be SIGKILLed.
    assert env["KUBEDISTILL_GRACE_SECONDS"]["value"] == str(pod["terminationGracePeriodSeconds"]) == "30"
    assert container["command"] == ["kubedistill-worker", "generate", "--config", "/etc/kubedistill/generate.yaml"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert_restricted(pod)


def test_a_writable_root_only_when_the_settings_ask_for_it() -> None:
    plan = plan_of(distillation_job("demo"))
    writable = OperatorSettings.model_validate({"security": {"readOnlyRootFilesystem": False}})
    for stage in ("generate", "train", "evaluate"):
        [container] = pod_of(build_stage_job(plan, stage, SETTINGS))["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        [container] = pod_of(build_stage_job(plan, stage, writable))["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is False


def test_job_owner_labels_and_failure_policy() -> None:
    plan = plan_of(distillation_job("demo"))
    job = build_stage_job(plan, "train", SETTINGS)
    [owner] = job["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "name": "demo",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = job["metadata"]["labels"]
    assert labels[names.LABEL_JOB] == "demo" and labels[names.LABEL_STAGE] == "train"
    assert labels[names.LABEL_STAGE_KEY] == plan.keys.train and labels[names.LABEL_RUN] == plan.run_id
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [143] for r in rules)
    assert any(r["action"] == "FailJob" and r.get("onExitCodes", {}).get("values") == [1] for r in rules)
    assert job["spec"]["backoffLimit"] == SETTINGS.jobs.backoff_limit
    assert "ttlSecondsAfterFinished" not in job["spec"]


def test_train_goes_to_the_h100_pool_with_gpus_shm_and_torchrun() -> None:
    plan = plan_of(distillation_job("demo"))
    pod = pod_of(build_stage_job(plan, "train", SETTINGS))
    [container] = pod["containers"]
    assert pod["nodeSelector"] == H100
    assert pod["tolerations"] == [GPU_TOLERATION]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["cpu"] == "96"
    assert container["resources"]["limits"]["memory"] == "960Gi"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["command"][:2] == ["torchrun", "--standalone"]
    assert container["command"][-5:] == ["-m", "kubedistill.worker", "train", "--config", "/etc/kubedistill/train.yaml"]
    assert "--nproc-per-node" in container["command"] and "8" in container["command"]
    assert_restricted(pod)


def test_job_placement_overrides_the_pool_defaults() -> None:
    manifest = distillation_job("demo", gpus_per_node=2)
    manifest["spec"]["resources"] |= {
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "shmSize": "8Gi",
        "memory": "100Gi",
        "priorityClassName": "high",
        "queueName": "team-a",
    }
    job = build_stage_job(plan_of(manifest), "train", SETTINGS)
    pod = pod_of(job)
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "high"
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "100Gi", "nvidia.com/gpu": "2"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert job["metadata"]["labels"][names.LABEL_KUEUE_QUEUE] == "team-a"


def test_single_gpu_training_runs_the_worker_directly() -> None:
    pod = pod_of(build_stage_job(plan_of(distillation_job("demo", gpus_per_node=1)), "train", SETTINGS))
    assert pod["containers"][0]["command"][0] == "kubedistill-worker"


def test_multi_node_training_is_an_indexed_job_with_a_headless_service() -> None:
    plan = plan_of(distillation_job("demo", nodes=4))
    children = build_stage_children(plan_stage(plan, "train", SETTINGS), SETTINGS)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "Service", "Job"]
    _config_map, service, job = children
    job_name = plan.job_name("train")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = pod_of(job)
    assert pod["subdomain"] == service["metadata"]["name"] == job_name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert set(service["spec"]["selector"].items()) <= set(job["spec"]["template"]["metadata"]["labels"].items())
    command = pod["containers"][0]["command"]
    joined = " ".join(command)
    assert "--nnodes 4" in joined and "--nproc-per-node 8" in joined
    assert "--node-rank $(NODE_RANK)" in joined
    assert f"--master-addr {job_name}-0.{job_name}" in joined and "--master-port 29500" in joined
    env = env_of(pod["containers"][0])
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_in_cluster_vllm_teacher_generates_on_gpus() -> None:
    manifest = distillation_job("demo")
    manifest["spec"]["teacher"] = {"vllm": {"model": "s3://kd-test/teacher", "gpus": 4, "tensorParallelSize": 4}}
    pod = pod_of(build_stage_job(plan_of(manifest), "generate", SETTINGS))
    assert pod["nodeSelector"] == H100
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_evaluate_uses_one_gpu_and_vllm() -> None:
    plan = plan_of(distillation_job("demo"))
    assert stage_placement(plan, "evaluate", SETTINGS).gpus == 1
    config = yaml.safe_load(build_stage_config_map(plan, "evaluate", SETTINGS)["data"]["evaluate.yaml"])
    assert EvaluateConfig.model_validate(config).engine == "vllm"
    cpu = plan_of(distillation_job("demo", gpus_per_node=0))
    assert stage_placement(cpu, "evaluate", SETTINGS).gpus == 0
    config = yaml.safe_load(build_stage_config_map(cpu, "evaluate", SETTINGS)["data"]["evaluate.yaml"])
    assert EvaluateConfig.model_validate(config).engine == "transformers"


def test_worker_configs_validate_and_point_at_keyed_artifacts() -> None:
    plan = plan_of(distillation_job("demo", api_key_secret="teacher"))
    docs = {}
    for stage, model in (("generate", GenerateConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)):
        config_map = build_stage_config_map(plan, stage, SETTINGS)
        assert config_map["metadata"]["name"] == plan.job_name(stage)
        assert config_map["immutable"] is True
        docs[stage] = model.model_validate(yaml.safe_load(config_map["data"][f"{stage}.yaml"]))
    base = "s3://kd-test/runs/demo"
    assert docs["generate"].output_uri == f"{base}/datasets/{plan.keys.dataset}"
    assert docs["generate"].answer_store_uri == f"{base}/teacher-answers"
    assert docs["generate"].api_key_env == "KUBEDISTILL_TEACHER_API_KEY"
    assert docs["train"].dataset_uri == docs["generate"].output_uri
    assert docs["train"].output_uri == f"{base}/models/{plan.keys.train}"
    assert docs["train"].checkpoint_uri == f"{base}/checkpoints/{plan.keys.train}"
    assert docs["evaluate"].model_uri == docs["train"].output_uri
    assert docs["evaluate"].report_uri == f"{base}/reports/{plan.keys.evaluate}"
    assert docs["evaluate"].base_model is None
    assert docs["generate"].storage.endpoint == "http://s3.storage.svc:9000"


def test_config_map_prompts_are_mounted_as_a_file() -> None:
    manifest = distillation_job("demo")
    manifest["spec"]["dataset"]["prompts"] = {"configMapRef": {"name": "prompts", "key": "p.jsonl"}}
    plan = plan_of(manifest)
    config = GenerateConfig.model_validate(
        yaml.safe_load(build_stage_config_map(plan, "generate", SETTINGS)["data"]["generate.yaml"])
    )
    pod = pod_of(build_stage_job(plan, "generate", SETTINGS))
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "prompts-prompts")
    assert mount["mountPath"] == config.prompts
    volume = next(v for v in pod["volumes"] if v["name"] == "prompts-prompts")
    assert volume["configMap"] == {"name": "prompts", "items": [{"key": "p.jsonl", "path": "prompts.jsonl"}]}


def test_settings_annotations_reach_the_pods_of_their_stage() -> None:
    settings = OperatorSettings.model_validate(
        {"podAnnotations": {"a": "1"}, "stagePodAnnotations": {"evaluate": {"b": "2"}}}
    )
    plan = plan_of(distillation_job("demo"))
    assert build_stage_job(plan, "evaluate", settings)["spec"]["template"]["metadata"]["annotations"] == {
        "a": "1",
        "b": "2",
    }
    assert build_stage_job(plan, "train", settings)["spec"]["template"]["metadata"]["annotations"] == {"a": "1"}


def test_published_model() -> None:
    from kubedistill.api.v1alpha1 import DistilledModel, ModelArtifact

    plan = plan_of(distillation_job("demo", model_name="demo-bot"))
    manifest = build_distilled_model(plan, ModelArtifact(uri=plan.model_uri, digest="b" * 64), adapter=True)
    model = DistilledModel.model_validate(manifest)
    assert model.metadata.name == "demo-bot"
    assert model.spec.model is not None and model.spec.model.uri == plan.model_uri
    assert model.spec.base_model == "s3://kd-test/base/tiny"
    assert manifest["metadata"]["labels"][names.LABEL_PUBLISHED_BY] == "demo"
    assert "ownerReferences" not in manifest["metadata"]


@pytest.mark.parametrize(
    ("quantity", "factor", "expected"),
    [("12", 8, "96"), ("120Gi", 2, "240Gi"), ("500m", 3, "1500m"), ("1.5", 2, "3"), ("1e3", 2, "1e3")],
)
def test_scale_quantity(quantity: str, factor: int, expected: str) -> None:
    assert scale_quantity(quantity, factor) == expected


def test_on_policy_train_stage_gets_the_teacher_and_its_key_as_a_secret_ref() -> None:
    manifest = distillation_job("demo", api_key_secret="teacher")
    manifest["spec"]["teacher"]["endpoint"]["promptLogprobs"] = True
    manifest["spec"]["student"]["objective"] = "onPolicy"
    plan = plan_of(manifest)
    text = build_stage_config_map(plan, "train", SETTINGS)["data"]["train.yaml"]
    config = TrainConfig.model_validate(yaml.safe_load(text))
    assert config.teacher is not None and config.teacher.endpoint is not None
    assert config.teacher.endpoint.base_url == "http://teacher.models.svc:8000/v1"
    assert config.student.objective == "onPolicy"
    env = env_of(pod_of(build_stage_job(plan, "train", SETTINGS))["containers"][0])
    assert env["KUBEDISTILL_TEACHER_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "teacher", "key": "api-key"}}


def test_sft_and_kd_train_stages_neither_see_the_teacher_nor_its_key() -> None:
    for objective in ("sft", "kd"):
        manifest = distillation_job("demo", api_key_secret="teacher")
        manifest["spec"]["teacher"]["logprobs"] = 20
        manifest["spec"]["student"]["objective"] = objective
        plan = plan_of(manifest)
        config = yaml.safe_load(build_stage_config_map(plan, "train", SETTINGS)["data"]["train.yaml"])
        assert "teacher" not in config
        env = env_of(pod_of(build_stage_job(plan, "train", SETTINGS))["containers"][0])
        assert "KUBEDISTILL_TEACHER_API_KEY" not in env


def test_objective_changes_the_train_key_but_not_the_generate_key() -> None:
    sft = distillation_job("demo")
    sft["spec"]["teacher"]["logprobs"] = 20
    kd = distillation_job("demo")
    kd["spec"]["teacher"]["logprobs"] = 20
    kd["spec"]["student"]["objective"] = "kd"
    a, b = plan_of(sft).keys, plan_of(kd).keys
    assert a.generate == b.generate and a.train != b.train
    # spelling out the default objective re-runs nothing
    explicit = distillation_job("demo")
    explicit["spec"]["teacher"]["logprobs"] = 20
    explicit["spec"]["student"]["objective"] = "sft"
    assert plan_of(explicit).keys == a
    # an endpoint declared able to score changes no answer
    scoring = distillation_job("demo")
    scoring["spec"]["teacher"]["logprobs"] = 20
    scoring["spec"]["teacher"]["endpoint"]["promptLogprobs"] = True
    assert plan_of(scoring).keys.generate == a.generate


def test_an_fsdp_run_on_two_nodes_gets_its_rendezvous_and_its_strategy() -> None:
    manifest = distillation_job("big", nodes=2, gpus_per_node=8)
    manifest["spec"]["student"]["method"] = "full"
    manifest["spec"]["student"]["training"] = {"strategy": "fsdp"}
    plan = plan_of(manifest)
    children = {c["kind"]: c for c in build_stage_children(plan_stage(plan, "train", SETTINGS), SETTINGS)}
    assert set(children) == {"ConfigMap", "Service", "Job"}
    job = children["Job"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:7] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "$(NODE_RANK)"]
    assert (
        command[command.index("--master-addr") + 1]
        == f"{job['metadata']['name']}-0.{children['Service']['metadata']['name']}"
    )
    config = yaml.safe_load(children["ConfigMap"]["data"]["train.yaml"])
    assert config["student"]["training"]["strategy"] == "fsdp"


def test_the_generate_pod_projects_the_spend_first_without_the_key_or_a_gpu() -> None:
    plan = plan_of(distillation_job("demo", api_key_secret="teacher", storage_secret="s3creds"))
    job = build_stage_job(plan, "generate", SETTINGS)
    pod = pod_of(job)
    [estimate] = pod["initContainers"]
    [worker] = pod["containers"]
    assert estimate["name"] == names.ESTIMATE_CONTAINER == "estimate"
    assert estimate["command"] == ["kubedistill-worker", "estimate", "--config", "/etc/kubedistill/generate.yaml"]
    assert "KUBEDISTILL_TEACHER_API_KEY" not in env_of(estimate) and "KUBEDISTILL_TEACHER_API_KEY" in env_of(worker)
    assert env_of(estimate)["AWS_ACCESS_KEY_ID"] == env_of(worker)["AWS_ACCESS_KEY_ID"]
    # The same volumes but the API token: the worker's progress reports need it, the projection does not.
    assert estimate["volumeMounts"] == [m for m in worker["volumeMounts"] if m["name"] != "api-token"]
    assert any(m["name"] == "api-token" for m in worker["volumeMounts"])
    assert estimate["terminationMessagePath"] == "/dev/termination-log"
    assert_restricted(pod)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "estimate", "operator": "In", "values": [1]}} in rules
    for stage in ("train", "evaluate"):
        other = build_stage_job(plan, stage, SETTINGS)
        assert "initContainers" not in pod_of(other)
        assert "estimate" not in str(other["spec"]["podFailurePolicy"])  # the API server refuses unknown containers

    manifest = distillation_job("demo")
    manifest["spec"]["teacher"] = {"vllm": {"model": "s3://kd-test/teacher", "gpus": 4}}
    pod = pod_of(build_stage_job(plan_of(manifest), "generate", SETTINGS))
    assert "nvidia.com/gpu" not in str(pod["initContainers"][0]["resources"])  # tokenizer only
    assert (
        pod["initContainers"][0]["resources"]["limits"]["memory"]
        == pod["containers"][0]["resources"]["limits"]["memory"]
    )


def test_the_workers_get_the_prices_and_speed_settings() -> None:
    manifest = distillation_job("demo", budget={"maxCost": 5}, pricing={"inputPerMillion": 2, "outputPerMillion": 8})
    manifest["spec"]["evaluation"] = {"speed": {"prompts": 8, "concurrency": 4, "gpuHourPrice": 3.5}}
    plan = plan_of(manifest)
    generate = GenerateConfig.model_validate(
        yaml.safe_load(build_stage_config_map(plan, "generate", SETTINGS)["data"]["generate.yaml"])
    )
    evaluate = EvaluateConfig.model_validate(
        yaml.safe_load(build_stage_config_map(plan, "evaluate", SETTINGS)["data"]["evaluate.yaml"])
    )
    assert generate.teacher.budget is not None and generate.teacher.budget.max_cost == 5
    assert generate.speed is not None and (generate.speed.prompts, generate.speed.concurrency) == (8, 4)
    assert evaluate.evaluation.speed.gpu_hour_price == 3.5 and evaluate.gpus == 1
    assert evaluate.teacher_pricing is not None and evaluate.teacher_pricing.output_per_million == 8
    # The dataset lives under the dataset key: a budget names the Job, not the data.
    assert generate.output_uri == f"s3://kd-test/runs/demo/datasets/{plan.keys.dataset}"
    assert plan.keys.dataset != plan.keys.generate
    manifest["spec"]["evaluation"] = {"speed": {"enabled": False}}
    off = build_stage_config_map(plan_of(manifest), "generate", SETTINGS)["data"]["generate.yaml"]
    assert GenerateConfig.model_validate(yaml.safe_load(off)).speed is None
