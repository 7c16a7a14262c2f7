"""Names, labels and selectors of every object the operator creates: decided here and nowhere else.

DistillationJob ``<dj>`` (names are at most 50 characters, see api/v1alpha1.py):

=================================  ================================  ==========================
object                             name                              why
=================================  ================================  ==========================
stage Job                          ``<dj>-<stage>-<key8>[-r<n>]``    one Job per stage *input*
                                                                     (and group restart)
stage config ConfigMap             same as its Job                   never changes under a pod
progress ConfigMap                 ``<dj>-progress``                 stage pods write live progress
stage pods' ServiceAccount         ``<dj>-worker``                   (unless the settings name one)
its Role and RoleBinding           ``<dj>-progress-writer``          update that ConfigMap only
rendezvous Service (nodes > 1)     same as its Job                   pods are ``<job>-<i>.<job>``
DistilledModel                     ``spec.output.model.name``        chosen by the user
=================================  ================================  ==========================

``<key8>`` is the start of the stage key (a hash of the stage's inputs, see
reconcile/keys.py). Because a stage's name is a function of its inputs, an operator
that restarts (or runs a reconcile twice) computes the same name, and the API server's
409 on create is what makes "exactly one Job per stage" true. A spec edit that changes
the training settings gives the train stage a new key, hence a new Job, while the
generate stage keeps its key, its Job and its dataset.

DistilledModel ``<m>`` (at most 53 characters): Deployment ``<m>-vllm``, Service ``<m>``
(the endpoint ``http://<m>.<ns>.svc:8000/v1``), PodDisruptionBudget,
HorizontalPodAutoscaler or ScaledObject, PodMonitor or ServiceMonitor ``<m>-vllm``, fetch
config ConfigMap ``<m>-fetch-<hash8>``, InferencePool and InferenceObjective ``<m>``. An adapter
pool ``<p>`` also has the adapters ConfigMap ``<p>-adapters`` (what every replica loads) and the
sidecar's ServiceAccount, Role and RoleBinding ``<p>-adapter-sync``.

Every object carries the ``app.kubernetes.io/*`` labels plus ``kubedistill.io/job`` (the
DistillationJob), ``kubedistill.io/stage``, ``kubedistill.io/run`` and
``kubedistill.io/stage-key`` and ``kubedistill.io/attempt`` (whole-group restarts of a stage),
or ``kubedistill.io/model`` for serving objects.
"""

from __future__ import annotations

import hashlib
from typing import Final

from kubedistill.api.v1alpha1 import GROUP as GROUP  # the API group is named once, with the API

FIELD_MANAGER: Final = "kubedistill"

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_JOB: Final = "kubedistill.io/job"
LABEL_STAGE: Final = "kubedistill.io/stage"
LABEL_RUN: Final = "kubedistill.io/run"
LABEL_STAGE_KEY: Final = "kubedistill.io/stage-key"
LABEL_ATTEMPT: Final = "kubedistill.io/attempt"
LABEL_MODEL: Final = "kubedistill.io/model"
LABEL_PUBLISHED_BY: Final = "kubedistill.io/published-by"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

ANNOTATION_MODEL_URI: Final = "kubedistill.io/model-uri"
ANNOTATION_MODEL_DIGEST: Final = "kubedistill.io/model-digest"
# On a serving Deployment: an HPA owns its replicas. When autoscaling is switched off, the
# annotation on the observed Deployment is how the next reconcile knows an HPA is left to delete.
ANNOTATION_AUTOSCALED: Final = "kubedistill.io/autoscaled"

# On a pool's pods: what the adapter sidecar has loaded, {adapter: revision} as JSON in the message.
CONDITION_ADAPTERS: Final = "kubedistill.io/adapters"
# On a pool's adapters ConfigMap: what each adapter entry was built from.
ADAPTERS_KEY: Final = "adapters.yaml"

APP: Final = "kubedistill"
MANAGED_BY: Final = "kubedistill"
SERVING_COMPONENT: Final = "serving"
PROGRESS_COMPONENT: Final = "progress"
WORKER_CONTAINER: Final = "worker"
ESTIMATE_CONTAINER: Final = "estimate"  # the generate pod's init container: the teacher spend, projected
VLLM_CONTAINER: Final = "vllm"
FETCH_CONTAINER: Final = "fetch"
ADAPTER_SYNC_CONTAINER: Final = "adapter-sync"

# An Indexed Job's pods are called <job>-<index> (their hostname, a DNS label of at most 63
# characters); with up to 1024 nodes the index takes 4 digits and a dash.
JOB_NAME_MAX: Final = 58
LABEL_VALUE_MAX: Final = 63
KEY_IN_NAME: Final = 8


def short_hash(text: str, length: int = 8) -> str:
    """A stable hex digest prefix of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fit(base: str, suffix: str, limit: int) -> str:
    """``<base>-<suffix>`` when it fits in ``limit``; else ``base`` is cut and a hash of it keeps names unique."""
    name = f"{base}-{suffix}" if suffix else base
    if len(name) <= limit:
        return name
    tag = short_hash(base, 6)
    room = limit - len(suffix) - len(tag) - (2 if suffix else 1)
    cut = base[: max(room, 1)].rstrip("-.")
    return f"{cut}-{tag}-{suffix}" if suffix else f"{cut}-{tag}"


def label_value(value: str) -> str:
    """A label value (at most 63 characters) that still identifies ``value``."""
    return fit(value, "", LABEL_VALUE_MAX)


# --------------------------------------------------------------------------- DistillationJob children


def stage_job_name(job: str, stage: str, key: str, attempt: int = 0) -> str:
    """The Job of one stage of DistillationJob ``job`` whose inputs hash to ``key``.

    ``attempt`` counts whole-group restarts of a multi-node stage: attempt 2 is ``...-r2``.
    """
    suffix = f"{stage}-{key[:KEY_IN_NAME]}" + (f"-r{attempt}" if attempt else "")
    return fit(job, suffix, JOB_NAME_MAX)


def stage_config_name(job_name: str) -> str:
    """The ConfigMap holding one stage Job's worker config: named after (and made with) its Job."""
    return job_name


def rendezvous_service_name(job_name: str) -> str:
    """The headless Service that gives a multi-node Job's pods their DNS names."""
    return job_name


def rendezvous_address(job_name: str) -> str:
    """torchrun's master address: the pod of completion index 0."""
    return f"{job_name}-0.{rendezvous_service_name(job_name)}"


def progress_config_name(job: str) -> str:
    """The ConfigMap the stage pods of DistillationJob ``job`` write their live progress to."""
    return fit(job, "progress", 63)


def worker_service_account_name(job: str) -> str:
    """The ServiceAccount of ``job``'s stage pods (unless the settings name one): it may write progress only."""
    return fit(job, "worker", 63)


def progress_role_name(job: str) -> str:
    """Role and RoleBinding that let the stage pods update the progress ConfigMap, and nothing else."""
    return fit(job, "progress-writer", 63)


def progress_labels(job: str) -> dict[str, str]:
    """Labels of the progress ConfigMap and its RBAC (the operator watches ConfigMaps with these)."""
    return {
        LABEL_NAME: APP,
        LABEL_INSTANCE: label_value(job),
        LABEL_COMPONENT: PROGRESS_COMPONENT,
        LABEL_PART_OF: APP,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: label_value(job),
    }


def job_labels(job: str, stage: str, run_id: str, key: str, attempt: int = 0) -> dict[str, str]:
    """Labels of a stage Job, its pods, ConfigMap and Service."""
    return {
        LABEL_NAME: APP,
        LABEL_INSTANCE: label_value(job),
        LABEL_COMPONENT: stage,
        LABEL_PART_OF: APP,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: label_value(job),
        LABEL_STAGE: stage,
        LABEL_RUN: run_id,
        LABEL_STAGE_KEY: key,
        LABEL_ATTEMPT: str(attempt),
    }


def stage_selector(job: str, stage: str, key: str, attempt: int = 0) -> dict[str, str]:
    """Selects the pods of one stage Job (the rendezvous Service's selector): one attempt's."""
    return {LABEL_JOB: label_value(job), LABEL_STAGE: stage, LABEL_STAGE_KEY: key, LABEL_ATTEMPT: str(attempt)}


def children_selector(job: str) -> str:
    """Label selector (string form) of everything made for DistillationJob ``job``."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_JOB}={label_value(job)}"


# --------------------------------------------------------------------------- DistilledModel children


def model_deployment_name(model: str) -> str:
    return fit(model, "vllm", 63)


def model_service_name(model: str) -> str:
    # The endpoint is http://<model>.<namespace>.svc:8000/v1: the Service has the model's name.
    return model


def model_pdb_name(model: str) -> str:
    return model_deployment_name(model)


def model_hpa_name(model: str) -> str:
    return model_deployment_name(model)


def model_autoscaler_name(model: str) -> str:
    """The HPA or KEDA ScaledObject (never both) of a served model."""
    return model_deployment_name(model)


def model_monitor_name(model: str) -> str:
    return model_deployment_name(model)


def inference_pool_name(model: str) -> str:
    return model


def inference_objective_name(model: str) -> str:
    return model


def pool_adapters_config_name(pool: str) -> str:
    """What every replica of adapter pool ``pool`` loads: one ConfigMap, updated in place."""
    return fit(pool, "adapters", 63)


def adapter_sync_name(pool: str) -> str:
    """ServiceAccount, Role and RoleBinding of a pool's adapter sidecars."""
    return fit(pool, "adapter-sync", 63)


def model_fetch_config_name(model: str, source_hash: str) -> str:
    """One ConfigMap per served model version, so a pod of an old ReplicaSet never fetches a newer model."""
    return fit(model, f"fetch-{source_hash[:KEY_IN_NAME]}", 63)


def model_selector(model: str) -> dict[str, str]:
    """The serving pods of DistilledModel ``model`` (Deployment, Service and PDB selector; immutable)."""
    return {LABEL_NAME: APP, LABEL_COMPONENT: SERVING_COMPONENT, LABEL_MODEL: label_value(model)}


def model_labels(model: str) -> dict[str, str]:
    return {
        **model_selector(model),
        LABEL_INSTANCE: label_value(model),
        LABEL_PART_OF: APP,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def model_children_selector(model: str) -> str:
    return ",".join(f"{k}={v}" for k, v in model_selector(model).items())


def endpoint(model: str, namespace: str, port: int) -> str:
    """The OpenAI-compatible base URL of a served model inside the cluster."""
    return f"http://{model_service_name(model)}.{namespace}.svc:{port}/v1"
