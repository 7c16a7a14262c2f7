"""Phases, condition types and reasons of the kubedistill.io API.

Every string the operator writes into ``status.phase``, ``status.conditions[].type``
or ``status.conditions[].reason`` is a constant here, so that the operator,
tests, health checks (Argo CD) and docs agree on one spelling.

DistillationJob conditions
    One condition per stage, ``True`` once the stage's output exists:

    ========== ============================================ ==========================
    type       True when                                    False reasons
    ========== ============================================ ==========================
    Generated  the teacher dataset is complete (or reused)  StagePending, StageRunning,
                                                            StageFailed, Preempted
    Trained    the student is trained and exported          (same)
    Evaluated  the student was compared with the teacher    (same), QualityGateFailed
    Published  the DistilledModel was created or updated    Pending, PublishDisabled,
                                                            ModelConflict
    Succeeded  the whole run finished                       the failed stage's reason
    Failed     the run stopped and will not retry           (never False; absent or
                                                            False while healthy)
    ========== ============================================ ==========================

    ``Failed=True`` carries the reason that says what to fix: InvalidSpec,
    StageFailed, StageResultMissing, BudgetExceeded, QualityGateFailed, ModelConflict. Editing the spec starts a new
    run (reason SpecChanged on the stage conditions that reset).

DistilledModel conditions
    Ready (the endpoint answers: every desired replica is available; for an adapter
    in a pool: every ready replica of the pool serves its current version),
    Progressing (a rollout is under way), Degraded (fewer available replicas
    than desired, or the source cannot be resolved). Where the model asks for them:
    Autoscaling (an HPA or KEDA ScaledObject runs, or AutoscalerUnavailable says what
    is missing), Monitoring (a PodMonitor/ServiceMonitor exists, or CRDMissing), Routing
    (an InferencePool/InferenceObjective exists, or CRDMissing).

Conditions follow metav1.Condition: ``lastTransitionTime`` changes only when
``status`` flips (see :func:`set_condition`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Final


class JobPhase(StrEnum):
    """``DistillationJob.status.phase``: where the run stands, one word."""

    PENDING = "Pending"
    GENERATING = "Generating"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    PUBLISHING = "Publishing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        """True for phases a run does not leave unless its spec changes."""
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


class ModelPhase(StrEnum):
    """``DistilledModel.status.phase``."""

    PENDING = "Pending"  # source not resolved yet (fromJob not succeeded), nothing deployed
    DEPLOYING = "Deploying"  # Deployment rolling out, not every replica available
    READY = "Ready"  # every desired replica available
    DEGRADED = "Degraded"  # was ready, fewer replicas available now
    STOPPED = "Stopped"  # scaled to zero replicas on purpose
    FAILED = "Failed"  # cannot be served as specified (invalid spec, source job failed)


class StagePhase(StrEnum):
    """``DistillationJob.status.stages.<stage>.phase``."""

    PENDING = "Pending"  # not started, or its Job waits for pods (GPUs, Kueue admission)
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionStatus(StrEnum):
    """metav1.ConditionStatus."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# --------------------------------------------------------------------------- condition types

# DistillationJob
GENERATED: Final = "Generated"
TRAINED: Final = "Trained"
EVALUATED: Final = "Evaluated"
PUBLISHED: Final = "Published"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"

# DistilledModel
READY: Final = "Ready"
PROGRESSING: Final = "Progressing"
DEGRADED: Final = "Degraded"

JOB_CONDITION_TYPES: Final = (GENERATED, TRAINED, EVALUATED, PUBLISHED, SUCCEEDED, FAILED)
AUTOSCALING: Final = "Autoscaling"
MONITORING: Final = "Monitoring"
ROUTING: Final = "Routing"
MODEL_CONDITION_TYPES: Final = (READY, PROGRESSING, DEGRADED, AUTOSCALING, MONITORING, ROUTING)

# The stage condition each worker stage sets when it succeeds.
STAGE_CONDITIONS: Final = {"generate": GENERATED, "train": TRAINED, "evaluate": EVALUATED}


# --------------------------------------------------------------------------- reasons
# CamelCase, as metav1.Condition.reason requires.


class Reason:
    """Condition reasons. ``message`` says the details; the reason is for machines."""

    # the spec
    INVALID_SPEC: Final = "InvalidSpec"  # refused by the operator's checks: the message says what to fix
    SPEC_CHANGED: Final = "SpecChanged"  # a spec edit started a new run

    # a stage
    STAGE_PENDING: Final = "StagePending"  # not started, or its pods are not running yet
    STAGE_RUNNING: Final = "StageRunning"
    STAGE_SUCCEEDED: Final = "StageSucceeded"
    STAGE_FAILED: Final = "StageFailed"  # the Job failed; the message holds the worker's termination message
    STAGE_RESULT_MISSING: Final = "StageResultMissing"  # the Job succeeded without the result its worker must report
    BUDGET_EXCEEDED: Final = "BudgetExceeded"  # generate stopped at spec.teacher.budget; the message says what to raise
    ARTIFACT_REUSED: Final = "ArtifactReused"  # the stage's output exists from an earlier run with the same inputs
    GROUP_RESTARTED: Final = "GroupRestarted"  # a rank of a multi-node stage failed: the whole group starts again

    # evaluation gate
    QUALITY_GATE_PASSED: Final = "QualityGatePassed"
    QUALITY_GATE_FAILED: Final = "QualityGateFailed"  # teacherAgreement < minTeacherAgreement

    # publication
    MODEL_PUBLISHED: Final = "ModelPublished"
    PUBLISH_DISABLED: Final = "PublishDisabled"  # spec.output.model.serve is false
    MODEL_CONFLICT: Final = "ModelConflict"  # the DistilledModel exists and belongs to someone else

    # the whole run
    RUN_SUCCEEDED: Final = "RunSucceeded"
    RUN_FAILED: Final = "RunFailed"

    # DistilledModel
    SOURCE_PENDING: Final = "SourcePending"  # fromJob has not succeeded yet
    SOURCE_NOT_FOUND: Final = "SourceNotFound"  # fromJob names no DistillationJob
    SOURCE_FAILED: Final = "SourceFailed"  # fromJob failed
    ROLLING_OUT: Final = "RollingOut"
    ROLLOUT_COMPLETE: Final = "RolloutComplete"
    REPLICAS_AVAILABLE: Final = "ReplicasAvailable"
    REPLICAS_UNAVAILABLE: Final = "ReplicasUnavailable"
    SCALED_TO_ZERO: Final = "ScaledToZero"
    AUTOSCALER_CONFIGURED: Final = "AutoscalerConfigured"  # an HPA or ScaledObject scales the Deployment
    AUTOSCALER_UNAVAILABLE: Final = "AutoscalerUnavailable"  # neither KEDA nor a custom metrics API is installed
    CRD_MISSING: Final = "CRDMissing"  # the integration's CRD is not installed: the message names it
    MONITOR_CONFIGURED: Final = "MonitorConfigured"
    ROUTING_CONFIGURED: Final = "RoutingConfigured"
    # an adapter in a pool
    POOL_NOT_FOUND: Final = "PoolNotFound"  # spec.pool names no DistilledModel
    NOT_AN_ADAPTER_POOL: Final = "NotAnAdapterPool"  # the pool's DistilledModel has no serving.adapters
    ADAPTER_LOADING: Final = "AdapterLoading"  # some ready replicas of the pool do not serve this version yet
    ADAPTER_SERVED: Final = "AdapterServed"  # every ready replica of the pool serves this version


# --------------------------------------------------------------------------- helpers


def now_rfc3339() -> str:
    """The current time as metav1.Time writes it (UTC, whole seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> datetime:
    """metav1.Time (or any RFC 3339 time with a zone) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
