"""Decisions about a served model's optional integrations: conditions and what to prune.

``integration_conditions`` says, for each integration the model asks for, whether its objects
exist here or which CRD is missing; ``stale_children`` lists the optional objects that exist
but are no longer wanted (a metric switched from queue to cpu, routing switched off, a CRD
installed then the option removed), so that nothing stale keeps acting on the Deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubedistill.api import conditions as c
from kubedistill.api.conditions import Reason
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import Condition, DistilledModel
from kubedistill.builders import integrations
from kubedistill.builders.integrations import Capabilities
from kubedistill.reconcile.status import condition

Ref = tuple[str, str, str]  # (apiVersion, kind, name)


def _crd(kind: tuple[str, str]) -> str:
    return f"{kind[1]} ({kind[0]})"


def integration_conditions(
    dm: DistilledModel, settings: OperatorSettings, caps: Capabilities, now: str
) -> list[Condition]:
    generation = dm.metadata.generation
    found: list[Condition] = []
    autoscaling = dm.spec.serving.autoscaling
    if autoscaling is not None:
        choice = integrations.choose_autoscaler(autoscaling, caps)
        if choice.kind is None:
            found.append(
                condition(c.AUTOSCALING, False, Reason.AUTOSCALER_UNAVAILABLE, choice.missing, now, generation)
            )
        else:
            what = "KEDA ScaledObject" if choice.kind == integrations.SCALED_OBJECT else "HorizontalPodAutoscaler"
            message = f"{what} on {autoscaling.metric}, {autoscaling.min_replicas}-{autoscaling.max_replicas} replicas"
            found.append(condition(c.AUTOSCALING, True, Reason.AUTOSCALER_CONFIGURED, message, now, generation))
    monitor = settings.serving.monitor
    if monitor != "none":
        kind = integrations.POD_MONITOR if monitor == "PodMonitor" else integrations.SERVICE_MONITOR
        if caps.has(kind):
            found.append(
                condition(c.MONITORING, True, Reason.MONITOR_CONFIGURED, f"{monitor} of /metrics", now, generation)
            )
        else:
            message = f"the Prometheus Operator's {_crd(kind)} CRD is not installed: vLLM's metrics are not scraped"
            found.append(condition(c.MONITORING, False, Reason.CRD_MISSING, message, now, generation))
    if dm.spec.routing is not None:
        missing = [k for k in (integrations.INFERENCE_POOL, integrations.INFERENCE_OBJECTIVE) if not caps.has(k)]
        if missing:
            message = (
                "the Gateway API Inference Extension's "
                + ", ".join(_crd(k) for k in missing)
                + " CRD not installed: requests are routed by the Service only"
            )
            found.append(condition(c.ROUTING, False, Reason.CRD_MISSING, message, now, generation))
        else:
            message = "InferencePool and InferenceObjective written"
            found.append(condition(c.ROUTING, True, Reason.ROUTING_CONFIGURED, message, now, generation))
    return found


def optional_refs(objects: Iterable[Mapping[str, Any]]) -> set[Ref]:
    """The optional children among ``objects`` (desired manifests or listed objects)."""
    refs: set[Ref] = set()
    for obj in objects:
        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        if key in integrations.OPTIONAL_KINDS:
            refs.add((key[0], key[1], (obj.get("metadata") or {}).get("name", "")))
    return refs


def stale_children(observed: Iterable[Ref], desired: Iterable[Mapping[str, Any]]) -> list[Ref]:
    """Optional children that exist and are not desired, in a stable order."""
    return sorted(set(observed) - optional_refs(desired))
