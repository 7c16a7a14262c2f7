"""DistillationJob stage children: worker config, its ConfigMap, the Job, the rendezvous Service.

Pure: a RunPlan and the operator settings in, manifests (plain dicts) out. Decide first, then
build once: ``plan_stage`` computes what a stage's Job needs (its placement, its name, its pod
count) once, and every object of the stage is built from that ``StagePlan``.

Every stage pod runs ``kubedistill-worker <stage> --config /etc/kubedistill/<stage>.yaml``
(through ``torchrun`` when training spans several GPUs or nodes). The generate pod first runs
``kubedistill-worker estimate`` on the same config as an init container: its termination
message, the projected teacher spend, is in the status while generation runs. Secrets reach the pod
only as ``secretKeyRef`` environment variables: the teacher API key in the generate pod
(and the train pod of objective onPolicy, which asks the teacher to score), the S3 credentials
in every pod. Pods pass the `restricted` Pod Security Standard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import Toleration
from kubedistill.api.worker_config import (
    CONFIG_DIR,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    GRACE_SECONDS_ENV,
    SHARD_RUN_ENV,
    TEACHER_API_KEY_ENV,
    TERMINATION_LOG,
    EvaluateConfig,
    GenerateConfig,
    ProgressTarget,
    StorageSettings,
    TrainConfig,
)
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan, Stage
from kubedistill.builders.progress import worker_service_account
from kubedistill.builders.resources import (
    HOME_ENV,
    SHM_MOUNT,
    TMP_MOUNT,
    TMP_VOLUME,
    api_token_mount,
    api_token_volume,
    container_security_context,
    image_pull_secrets,
    pod_security_context,
    scale_quantity,
    secret_env,
    shm_volume,
    storage_env,
)

PROMPTS_DIR = "/var/run/kubedistill/prompts"
TRAIN_GRACE_SECONDS = 300  # time to write a checkpoint after SIGTERM
WORKER_TOKEN_VOLUME = "api-token"
GRACE_SECONDS = 30  # the other stages: drain requests in flight, store answers (Kubernetes' default)


@dataclass(frozen=True)
class Placement:
    """Where a stage pod runs and what it asks for."""

    gpus: int
    node_selector: dict[str, str]
    tolerations: list[Toleration]
    cpu: str
    memory: str
    shm: str | None
    nodes: int = 1
    extra_limits: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """What one stage's Job needs, computed once; its ConfigMap, Service and Job are built from it."""

    run: RunPlan
    stage: Stage
    placement: Placement
    job_name: str
    shards: int = 1  # pods of a sharded generate stage (teacher.shards), each answering its part


def plan_stage(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> StagePlan:
    """Decide once where and how the stage runs (the attempt of a restarted group is in ``plan``)."""
    return StagePlan(
        run=plan,
        stage=stage,
        placement=stage_placement(plan, stage, settings),
        job_name=plan.job_name(stage),
        shards=generate_shards(plan, stage),
    )


def config_path(stage: Stage) -> str:
    return f"{CONFIG_DIR}/{stage}.yaml"


# --------------------------------------------------------------------------- worker configs


def _storage(plan: RunPlan) -> StorageSettings:
    storage = plan.job.spec.storage
    return StorageSettings(endpoint=storage.endpoint, region=storage.region, addressing_style=storage.addressing_style)


def _prompts_file(kind: str) -> str:
    return f"{PROMPTS_DIR}/{kind}.jsonl"


def build_generate_config(plan: RunPlan) -> GenerateConfig:
    spec = plan.job.spec
    dataset = spec.dataset
    prompts = dataset.prompts.uri or _prompts_file("prompts")
    eval_prompts = None
    if dataset.eval_prompts is not None:
        eval_prompts = dataset.eval_prompts.uri or _prompts_file("eval")
    return GenerateConfig(
        prompts=prompts,
        eval_prompts=eval_prompts,
        format=dataset.format,
        teacher=spec.teacher,
        eval_fraction=dataset.eval_fraction,
        max_examples=dataset.max_examples,
        max_prompt_chars=dataset.max_prompt_chars,
        max_failure_fraction=dataset.max_failure_fraction,
        output_uri=plan.dataset_uri,
        answer_store_uri=plan.answer_store_uri,
        api_key_env=TEACHER_API_KEY_ENV,
        storage=_storage(plan),
        speed=spec.evaluation.speed if spec.evaluation.speed.enabled else None,
    )


def build_train_config(plan: RunPlan) -> TrainConfig:
    spec = plan.job.spec
    return TrainConfig(
        student=spec.student,
        # onPolicy: the teacher scores the student's samples during training
        teacher=spec.teacher if spec.student.objective == "onPolicy" else None,
        api_key_env=TEACHER_API_KEY_ENV,
        dataset_uri=plan.dataset_uri,
        output_uri=plan.model_uri,
        checkpoint_uri=plan.checkpoint_uri,
        storage=_storage(plan),
    )


def build_evaluate_config(plan: RunPlan, placement: Placement) -> EvaluateConfig:
    spec = plan.job.spec
    adapter = spec.student.exports_adapter
    gpus = placement.gpus
    return EvaluateConfig(
        model_uri=plan.model_uri,
        base_model=spec.student.model if adapter else None,
        dataset_uri=plan.dataset_uri,
        evaluation=spec.evaluation,
        # The student answers as the teacher did (same length budget, one answer per prompt).
        sampling=spec.teacher.sampling.model_copy(update={"n": 1}),
        report_uri=plan.report_uri,
        engine="vllm" if gpus > 0 else "transformers",
        storage=_storage(plan),
        gpus=gpus,
        teacher_pricing=spec.teacher.pricing,
    )


def build_progress_target(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> ProgressTarget:
    """Where the stage's pod reports progress: the DistillationJob's progress ConfigMap, as this Job."""
    return ProgressTarget(
        config_map=names.progress_config_name(plan.name),
        namespace=plan.namespace,
        job=plan.job_name(stage),
        interval_seconds=settings.progress.report_seconds,
    )


def build_stage_config(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> dict[str, Any]:
    """The worker config of one stage, as the YAML file holds it (camelCase)."""
    return _stage_config(plan_stage(plan, stage, settings), settings)


def _stage_config(sp: StagePlan, settings: OperatorSettings) -> dict[str, Any]:
    plan, stage = sp.run, sp.stage
    config: GenerateConfig | TrainConfig | EvaluateConfig
    if stage == "generate":
        config = build_generate_config(plan)
    elif stage == "train":
        config = build_train_config(plan)
    else:
        config = build_evaluate_config(plan, sp.placement)
    config.progress = build_progress_target(plan, stage, settings)
    return config.to_wire()


def build_stage_config_map(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> dict[str, Any]:
    """The ConfigMap of one stage Job. Immutable: its name changes whenever its content may."""
    return _config_map(plan_stage(plan, stage, settings), settings)


def _config_map(sp: StagePlan, settings: OperatorSettings) -> dict[str, Any]:
    plan, stage, job_name = sp.run, sp.stage, sp.job_name
    text = yaml.safe_dump(_stage_config(sp, settings), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": names.stage_config_name(job_name),
            "namespace": plan.namespace,
            "labels": plan.labels(stage),
            "ownerReferences": [plan.owner_reference()],
        },
        "immutable": True,
        "data": {f"{stage}.yaml": text},
    }


# --------------------------------------------------------------------------- placement


def _gpu_placement(
    plan: RunPlan,
    settings: OperatorSettings,
    gpus: int,
    per_pod_cpu: str | None = None,
    per_pod_memory: str | None = None,
    nodes: int = 1,
) -> Placement:
    res = plan.job.spec.resources
    pool = settings.gpu_pool
    cpu_pool = settings.cpu_pool
    if gpus > 0:
        cpu = per_pod_cpu or scale_quantity(pool.cpu_per_gpu, gpus)
        memory = per_pod_memory or scale_quantity(pool.memory_per_gpu, gpus)
        return Placement(
            gpus=gpus,
            node_selector=dict(res.node_selector if res.node_selector is not None else pool.node_selector),
            tolerations=list(res.tolerations if res.tolerations is not None else pool.tolerations),
            cpu=cpu,
            memory=memory,
            shm=res.shm_size or pool.shm_size,
            nodes=nodes,
        )
    # A CPU-only run of a GPU stage (small students, tests): the job's placement if it set one.
    return Placement(
        gpus=0,
        node_selector=dict(res.node_selector if res.node_selector is not None else cpu_pool.node_selector),
        tolerations=list(res.tolerations if res.tolerations is not None else cpu_pool.tolerations),
        cpu=per_pod_cpu or cpu_pool.cpu,
        memory=per_pod_memory or cpu_pool.memory,
        shm=res.shm_size or cpu_pool.shm_size,
        nodes=nodes,
    )


def stage_placement(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> Placement:
    """GPU pool for train, evaluate and an in-cluster vLLM teacher; CPU pool for an API teacher."""
    spec = plan.job.spec
    res = spec.resources
    if stage == "generate":
        if spec.teacher.vllm is not None:
            return _gpu_placement(plan, settings, spec.teacher.vllm.gpus)
        cpu_pool = settings.cpu_pool
        return Placement(
            gpus=0,
            node_selector=dict(cpu_pool.node_selector),
            tolerations=list(cpu_pool.tolerations),
            cpu=cpu_pool.cpu,
            memory=cpu_pool.memory,
            shm=None,
        )
    if stage == "train":
        gpus = res.gpus_per_node if res.gpus_per_node is not None else settings.gpu_pool.gpus_per_node
        return _gpu_placement(plan, settings, gpus, res.cpu, res.memory, nodes=res.nodes)
    gpus = settings.jobs.evaluate_gpus if (res.gpus_per_node is None or res.gpus_per_node > 0) else 0
    return _gpu_placement(plan, settings, gpus)


# --------------------------------------------------------------------------- the Job


def _command(plan: RunPlan, stage: Stage, placement: Placement, settings: OperatorSettings) -> list[str]:
    worker_args = [stage, "--config", config_path(stage)]
    if stage != "train" or (placement.nodes == 1 and placement.gpus <= 1):
        return ["kubedistill-worker", *worker_args]
    procs = str(max(placement.gpus, 1))
    if placement.nodes == 1:
        return [
            "torchrun",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            procs,
            "-m",
            "kubedistill.worker",
            *worker_args,
        ]
    job_name = plan.job_name(stage)
    return [
        "torchrun",
        "--nnodes", str(placement.nodes),
        "--nproc-per-node", procs,
        "--node-rank", "$(NODE_RANK)",
        "--master-addr", names.rendezvous_address(job_name),
        "--master-port", str(settings.jobs.rendezvous_port),
        "-m", "kubedistill.worker", *worker_args,
    ]  # fmt: skip


def grace_seconds(stage: Stage) -> int:
    """The stage pod's terminationGracePeriodSeconds; the worker is told it too, to exit within it."""
    return TRAIN_GRACE_SECONDS if stage == "train" else GRACE_SECONDS


def _asks_teacher(plan: RunPlan, stage: Stage) -> bool:
    """generate asks the teacher for answers; train asks it to score the student's answers (onPolicy)."""
    return stage == "generate" or (stage == "train" and plan.job.spec.student.objective == "onPolicy")


def _env(plan: RunPlan, stage: Stage, placement: Placement, settings: OperatorSettings) -> list[dict[str, Any]]:
    spec = plan.job.spec
    env: list[dict[str, Any]] = [
        {"name": "KUBEDISTILL_LOG_LEVEL", "value": settings.log_level},
        {"name": GRACE_SECONDS_ENV, "value": str(grace_seconds(stage))},
        *HOME_ENV,
    ]
    if _asks_teacher(plan, stage) and spec.teacher.endpoint is not None and spec.teacher.endpoint.api_key_secret_ref:
        env.append(secret_env(TEACHER_API_KEY_ENV, spec.teacher.endpoint.api_key_secret_ref))
    env.extend(storage_env(spec.storage))
    if generate_shards(plan, stage) > 1:
        # The shard's index is JOB_COMPLETION_INDEX (the Job controller sets it); the Job's uid names
        # the run's shard reports, so those of an earlier Job are never read.
        env.append({"name": SHARD_RUN_ENV, "valueFrom": {"fieldRef": {"fieldPath": JOB_UID_LABEL_FIELD}}})
    if placement.nodes > 1:
        job_name = plan.job_name(stage)
        env += [
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            },
            {"name": "MASTER_ADDR", "value": names.rendezvous_address(job_name)},
            {"name": "MASTER_PORT", "value": str(settings.jobs.rendezvous_port)},
        ]
    return env


JOB_UID_LABEL_FIELD = "metadata.labels['batch.kubernetes.io/controller-uid']"


def generate_shards(plan: RunPlan, stage: Stage) -> int:
    """Pods of the generate stage's Indexed Job (teacher.shards); 1 for every other stage."""
    return plan.job.spec.teacher.shards if stage == "generate" else 1


def _resources(placement: Placement, settings: OperatorSettings) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": placement.cpu, "memory": placement.memory}
    limits: dict[str, str] = {"memory": placement.memory}
    if placement.gpus > 0:
        gpu = settings.gpu_pool.gpu_resource
        requests[gpu] = limits[gpu] = str(placement.gpus)
    return {"requests": requests, "limits": limits}


def _volumes(plan: RunPlan, stage: Stage, placement: Placement) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    job_name = plan.job_name(stage)
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": names.stage_config_name(job_name),
                "items": [{"key": f"{stage}.yaml", "path": f"{stage}.yaml"}],
            },
        },
        # The workers' scratch (workDir /tmp/kubedistill) and caches; the root filesystem is read-only.
        dict(TMP_VOLUME),
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        dict(TMP_MOUNT),
    ]
    volumes.append(api_token_volume(WORKER_TOKEN_VOLUME))
    mounts.append(api_token_mount(WORKER_TOKEN_VOLUME))
    if placement.shm:
        volumes.append(shm_volume(placement.shm))
        mounts.append(dict(SHM_MOUNT))
    if stage == "generate":
        dataset = plan.job.spec.dataset
        for kind, source in (("prompts", dataset.prompts), ("eval", dataset.eval_prompts)):
            if source is None or source.config_map_ref is None:
                continue
            ref = source.config_map_ref
            volumes.append(
                {
                    "name": f"{kind}-prompts",
                    "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": f"{kind}.jsonl"}]},
                }
            )
            mounts.append(
                {
                    "name": f"{kind}-prompts",
                    "mountPath": _prompts_file(kind),
                    "subPath": f"{kind}.jsonl",
                    "readOnly": True,
                }
            )
    return volumes, mounts


def _pod_failure_policy(stage: Stage, nodes: int) -> dict[str, Any]:
    if nodes > 1:
        # A group: one rank lost leaves the others blocked in a collective, so any failure
        # (preemption included) ends the whole Job at once, and the operator starts the group
        # again from the last checkpoint (spec.resources.maxRestarts) as a new Job.
        return {
            "rules": [
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": names.WORKER_CONTAINER, "operator": "NotIn", "values": [0]},
                },
            ]
        }
    # Preemption (node drain, spot reclaim, Kueue) must not use up backoffLimit: the worker
    # checkpoints on SIGTERM and a new pod resumes. A worker error (exit 1) is deterministic
    # (bad input, unreachable model): fail at once instead of paying for retries. The API
    # server refuses a rule naming a container the pod does not have: estimate is generate's.
    containers = [names.WORKER_CONTAINER, names.ESTIMATE_CONTAINER] if stage == "generate" else [names.WORKER_CONTAINER]
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": names.WORKER_CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]},
            },
            *(
                {"action": "FailJob", "onExitCodes": {"containerName": name, "operator": "In", "values": [EXIT_FAILED]}}
                for name in containers
            ),
        ]
    }


def build_stage_job(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job of one stage (Indexed: one pod per node of multi-node training, or per shard)."""
    return _job(plan_stage(plan, stage, settings), settings)


def _job(sp: StagePlan, settings: OperatorSettings) -> dict[str, Any]:
    plan, stage, placement, job_name = sp.run, sp.stage, sp.placement, sp.job_name
    spec = plan.job.spec
    labels = plan.labels(stage)
    volumes, mounts = _volumes(plan, stage, placement)
    container: dict[str, Any] = {
        "name": names.WORKER_CONTAINER,
        "image": settings.worker_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _command(plan, stage, placement, settings),
        "env": _env(plan, stage, placement, settings),
        "resources": _resources(placement, settings),
        "volumeMounts": mounts,
        "securityContext": container_security_context(settings),
        "terminationMessagePath": TERMINATION_LOG,
        # A crash before the worker writes its reason still tells the operator something.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if placement.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": settings.jobs.rendezvous_port}]
    init_containers = [build_estimate_container(container)] if stage == "generate" else []
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(settings),
        "terminationGracePeriodSeconds": grace_seconds(stage),
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    # Its token reaches the worker container alone, for one right: updating the progress ConfigMap.
    pod_spec["serviceAccountName"] = worker_service_account(plan, settings)
    if placement.node_selector:
        pod_spec["nodeSelector"] = placement.node_selector
    if placement.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in placement.tolerations]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = image_pull_secrets(settings)
    if placement.nodes > 1:
        pod_spec["subdomain"] = names.rendezvous_service_name(job_name)

    annotations = {**settings.pod_annotations, **settings.stage_pod_annotations.get(stage, {})}
    template_meta: dict[str, Any] = {"labels": dict(labels)}
    if annotations:
        template_meta["annotations"] = annotations
    job_labels = dict(labels)
    if spec.resources.queue_name:
        job_labels[names.LABEL_KUEUE_QUEUE] = spec.resources.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": 0 if placement.nodes > 1 else settings.jobs.backoff_limit,
        "podFailurePolicy": _pod_failure_policy(stage, placement.nodes),
        "template": {"metadata": template_meta, "spec": pod_spec},
    }
    if placement.nodes > 1:
        job_spec |= {"completionMode": "Indexed", "completions": placement.nodes, "parallelism": placement.nodes}
    elif sp.shards > 1:
        # Shards are independent: a lost pod is replaced and resumes its shard alone (the failure
        # policy of a single pod applies to each), and shard 0 reports for the Job.
        job_spec |= {"completionMode": "Indexed", "completions": sp.shards, "parallelism": sp.shards}
    if settings.jobs.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = settings.jobs.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name,
            "namespace": plan.namespace,
            "labels": job_labels,
            "ownerReferences": [plan.owner_reference()],
        },
        "spec": job_spec,
    }


def build_estimate_container(worker: dict[str, Any]) -> dict[str, Any]:
    """The generate pod's init container: the teacher spend projected from the same config, asking nothing.

    No teacher API key (it sends nothing) and no GPU (it counts tokens with the tokenizer only).
    """
    resources = worker["resources"]
    return {
        **worker,
        "name": names.ESTIMATE_CONTAINER,
        "command": ["kubedistill-worker", "estimate", "--config", config_path("generate")],
        "env": [e for e in worker["env"] if e["name"] != TEACHER_API_KEY_ENV],
        # Nor the API token: it reports nothing while it runs; its termination message is the report.
        "volumeMounts": [m for m in worker["volumeMounts"] if m["name"] != WORKER_TOKEN_VOLUME],
        "resources": {
            kind: {k: v for k, v in values.items() if k in ("cpu", "memory")} for kind, values in resources.items()
        },
    }


def build_rendezvous_service(plan: RunPlan, stage: Stage, settings: OperatorSettings) -> dict[str, Any]:
    """Headless Service giving pod <job>-<i> the DNS name <job>-<i>.<job> (torchrun's master address)."""
    return _rendezvous_service(plan_stage(plan, stage, settings), settings)


def _rendezvous_service(sp: StagePlan, settings: OperatorSettings) -> dict[str, Any]:
    plan, stage, job_name = sp.run, sp.stage, sp.job_name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.rendezvous_service_name(job_name),
            "namespace": plan.namespace,
            "labels": plan.labels(stage),
            "ownerReferences": [plan.owner_reference()],
        },
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready.
            "publishNotReadyAddresses": True,
            "selector": names.stage_selector(plan.name, stage, plan.keys.of(stage), plan.attempts.get(stage, 0)),
            "ports": [{"name": "rendezvous", "port": settings.jobs.rendezvous_port}],
        },
    }


def build_stage_children(sp: StagePlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything one stage needs, built from its one plan, in creation order: config first, the Job last."""
    children = [_config_map(sp, settings)]
    if sp.placement.nodes > 1:
        children.append(_rendezvous_service(sp, settings))
    children.append(_job(sp, settings))
    return children
