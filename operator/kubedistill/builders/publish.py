"""The DistilledModel a successful DistillationJob run publishes."""

from __future__ import annotations

from typing import Any

from kubedistill.api.v1alpha1 import API_VERSION, ModelArtifact
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan


def build_distilled_model(plan: RunPlan, artifact: ModelArtifact, adapter: bool) -> dict[str, Any]:
    """``spec.output.model`` as a DistilledModel serving ``artifact`` (server-side applied).

    Not owned by the job: deleting a DistillationJob must not take its model offline. The
    ``kubedistill.io/published-by`` label says which job may update it.
    """
    spec = plan.job.spec
    output = spec.output.model
    model_spec: dict[str, Any] = {"model": artifact.to_wire()}
    if output.pool is not None:
        model_spec["pool"] = output.pool.to_wire()  # the pool's model is the base
    elif adapter:
        model_spec["baseModel"] = spec.student.model
    if output.serving is not None:
        model_spec["serving"] = output.serving.to_wire()
    if output.routing is not None:
        model_spec["routing"] = output.routing.to_wire()
    model_spec["storage"] = spec.storage.to_wire()
    return {
        "apiVersion": API_VERSION,
        "kind": "DistilledModel",
        "metadata": {
            "name": output.name,
            "namespace": plan.namespace,
            "labels": {
                names.LABEL_MANAGED_BY: names.MANAGED_BY,
                names.LABEL_PART_OF: names.APP,
                names.LABEL_PUBLISHED_BY: names.label_value(plan.name),
                names.LABEL_RUN: plan.run_id,
            },
        },
        "spec": model_spec,
    }
