"""Optional integrations of a served model: which of them a cluster has, and their objects.

The operator writes KEDA ScaledObjects, Prometheus Operator monitors and Gateway API Inference
Extension objects only where their CRDs are installed (``Capabilities``, discovered by the
reconcile cycle); elsewhere a condition says what is missing. Pure: models in, manifests out.

Every object here carries the model's labels, so that the reconcile cycle can list what exists
and delete what is no longer wanted (a metric switched from queue to cpu leaves no ScaledObject).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import AutoscalingSpec, RoutingSpec
from kubedistill.builders import names

HPA = ("autoscaling/v2", "HorizontalPodAutoscaler")
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")
INFERENCE_POOL = ("inference.networking.k8s.io/v1", "InferencePool")
INFERENCE_OBJECTIVE = ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective")
CUSTOM_METRICS = "custom.metrics.k8s.io"
# Kinds the operator prunes when a model no longer wants them (listed by the model's labels).
OPTIONAL_KINDS: tuple[tuple[str, str], ...] = (
    HPA,
    SCALED_OBJECT,
    POD_MONITOR,
    SERVICE_MONITOR,
    INFERENCE_POOL,
    INFERENCE_OBJECTIVE,
)
# The label Prometheus gets from podTargetLabels: what the KEDA queries select a model's pods by.
PROMETHEUS_MODEL_LABEL = "kubedistill_io_model"
WAKE_THRESHOLD = "1000000"  # a wake trigger only activates the first replica, it never scales further


@dataclass(frozen=True)
class Capabilities:
    """What the cluster serves: (apiVersion, kind) pairs of installed CRDs, and the custom metrics API."""

    kinds: frozenset[tuple[str, str]] = frozenset({HPA})
    custom_metrics: bool = False

    def has(self, kind: tuple[str, str]) -> bool:
        return kind in self.kinds


def _metadata(name: str, namespace: str, model: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": names.model_labels(model), "ownerReferences": [owner]}


def _deployment_ref(model: str) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.model_deployment_name(model)}


def _quantity(value: float) -> str:
    """A float as a Kubernetes quantity: 4 -> "4", 2.5 -> "2500m"."""
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


# --------------------------------------------------------------------------- autoscaling


@dataclass(frozen=True)
class AutoscalerChoice:
    """Which autoscaler a model gets here: ``kind`` is HPA or SCALED_OBJECT, or None with ``missing`` set."""

    kind: tuple[str, str] | None
    missing: str = ""


def choose_autoscaler(autoscaling: AutoscalingSpec, caps: Capabilities) -> AutoscalerChoice:
    if autoscaling.metric == "cpu":
        return AutoscalerChoice(HPA)
    if caps.has(SCALED_OBJECT):
        return AutoscalerChoice(SCALED_OBJECT)
    if autoscaling.min_replicas == 0:
        return AutoscalerChoice(None, "minReplicas 0 needs KEDA (keda.sh/v1alpha1 ScaledObject), not installed")
    if caps.custom_metrics:
        return AutoscalerChoice(HPA)
    return AutoscalerChoice(
        None,
        "autoscaling metric queue needs KEDA (keda.sh/v1alpha1 ScaledObject) or a custom metrics API serving "
        "vLLM's pod metrics (custom.metrics.k8s.io, e.g. the Prometheus adapter); neither is installed",
    )


def build_hpa(model: str, namespace: str, owner: dict[str, Any], autoscaling: AutoscalingSpec) -> dict[str, Any]:
    """autoscaling/v2 on CPU utilisation, or on vLLM's per-pod queue metrics (the Prometheus adapter's)."""
    if autoscaling.metric == "cpu":
        metrics: list[dict[str, Any]] = [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": autoscaling.target_cpu_utilization},
                },
            }
        ]
    else:
        metrics = [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": metric},
                    "target": {"type": "AverageValue", "averageValue": _quantity(target)},
                },
            }
            for metric, target in autoscaling.queue_targets().items()
        ]
    return {
        "apiVersion": HPA[0],
        "kind": HPA[1],
        "metadata": _metadata(names.model_autoscaler_name(model), namespace, model, owner),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": names.model_deployment_name(model),
            },
            # An HPA cannot scale to zero (without a feature gate): minReplicas 0 is KEDA's.
            "minReplicas": max(autoscaling.min_replicas, 1),
            "maxReplicas": autoscaling.max_replicas,
            "metrics": metrics,
        },
    }


def build_scaled_object(
    model: str, namespace: str, owner: dict[str, Any], autoscaling: AutoscalingSpec, settings: OperatorSettings
) -> dict[str, Any]:
    """KEDA ScaledObject: one Prometheus trigger per queue target, plus the wake trigger for scale to zero."""
    selector = f'namespace="{namespace}",{PROMETHEUS_MODEL_LABEL}="{names.label_value(model)}"'
    address = settings.serving.prometheus_address
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": metric.removeprefix("vllm:").replace("_", "-"),
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": address,
                "query": f"sum({metric}{{{selector}}})",
                "threshold": _quantity(target),
                "activationThreshold": "0",
            },
        }
        for metric, target in autoscaling.queue_targets().items()
    ]
    if autoscaling.wake_query:
        triggers.append(
            {
                "type": "prometheus",
                "name": "wake",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": address,
                    "query": autoscaling.wake_query,
                    "threshold": WAKE_THRESHOLD,
                    "activationThreshold": "0",
                },
            }
        )
    return {
        "apiVersion": SCALED_OBJECT[0],
        "kind": SCALED_OBJECT[1],
        "metadata": _metadata(names.model_autoscaler_name(model), namespace, model, owner),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": names.model_deployment_name(model),
            },
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": triggers,
        },
    }


# --------------------------------------------------------------------------- metrics


def build_monitor(
    model: str, namespace: str, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any] | None:
    """A PodMonitor or ServiceMonitor of vLLM's /metrics (settings.serving.monitor), or None."""
    serving = settings.serving
    if serving.monitor == "none":
        return None
    metadata = _metadata(names.model_monitor_name(model), namespace, model, owner)
    metadata["labels"] = {**serving.monitor_labels, **metadata["labels"]}
    endpoint = {"port": "http", "path": "/metrics", "interval": serving.monitor_interval}
    selector = {"matchLabels": names.model_selector(model)}
    # The model label becomes a Prometheus label (kubedistill_io_model): KEDA's queries select by it.
    if serving.monitor == "PodMonitor":
        spec = {"selector": selector, "podMetricsEndpoints": [endpoint], "podTargetLabels": [names.LABEL_MODEL]}
        kind = POD_MONITOR
    else:
        spec = {"selector": selector, "endpoints": [endpoint], "podTargetLabels": [names.LABEL_MODEL]}
        kind = SERVICE_MONITOR
    return {"apiVersion": kind[0], "kind": kind[1], "metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------- routing


def build_inference_pool(
    model: str, namespace: str, owner: dict[str, Any], routing: RoutingSpec, settings: OperatorSettings
) -> dict[str, Any]:
    """The InferencePool of a Deployment's pods: a gateway asks the endpoint picker which one takes a request."""
    picker = routing.endpoint_picker
    picker_name = (picker.name if picker else None) or f"{model}-epp"
    return {
        "apiVersion": INFERENCE_POOL[0],
        "kind": INFERENCE_POOL[1],
        "metadata": _metadata(names.inference_pool_name(model), namespace, model, owner),
        "spec": {
            "selector": {"matchLabels": names.model_selector(model)},
            "targetPorts": [{"number": settings.serving.port}],
            "endpointPickerRef": {
                "name": picker_name,
                "port": {"number": picker.port if picker else 9002},
                "failureMode": picker.failure_mode if picker else "FailClose",
            },
        },
    }


def build_inference_objective(
    model: str, namespace: str, owner: dict[str, Any], routing: RoutingSpec, pool: str
) -> dict[str, Any]:
    """The InferenceObjective of one served model (a pool's base or one of its adapters) in pool ``pool``."""
    spec: dict[str, Any] = {
        "poolRef": {"group": INFERENCE_POOL[0].split("/")[0], "name": names.inference_pool_name(pool)}
    }
    if routing.priority is not None:
        spec["priority"] = routing.priority
    return {
        "apiVersion": INFERENCE_OBJECTIVE[0],
        "kind": INFERENCE_OBJECTIVE[1],
        "metadata": _metadata(names.inference_objective_name(model), namespace, model, owner),
        "spec": spec,
    }
