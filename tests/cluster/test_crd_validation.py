"""The generated CRDs on a real API server: examples accepted, bad input refused with a message
that names the field and says what to fix, defaults applied, status and scale subresources work,
and `kubectl explain` documents every field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.api import conditions as c
from kubedistill.api.conditions import ConditionStatus, JobPhase
from kubedistill.api.savings import SpeedComparison, TeacherSpend
from kubedistill.api.v1alpha1 import (
    Condition,
    DistillationJob,
    DistillationJobStatus,
    DistilledModel,
    EvaluationStatus,
    StagesStatus,
    StageStatus,
)
from tests.support.api_cases import INVALID, Invalid, valid_job, valid_model
from tests.support.cluster import Cluster, wait_for
from tests.support.crds import REPO_ROOT, install_crds
from tests.support.djobs import speed_comparison, spend

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kubedistill.io", "v1alpha1"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))
MODELS = {"DistillationJob": DistillationJob, "DistilledModel": DistilledModel}
PLURALS = {"DistillationJob": "distillationjobs", "DistilledModel": "distilledmodels"}


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    install_crds(cluster)
    return cluster


def _kubectl(cluster: Cluster, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(*args, input=input, check=False)


def _get(cluster: Cluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom().get_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], name)
    return obj


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_and_reads_back_valid(crds: Cluster, namespace: str, path: Path) -> None:
    proc = _kubectl(crds, "apply", "-n", namespace, "-f", str(path))
    assert proc.returncode == 0, proc.stderr
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] in MODELS:
            stored = _get(crds, namespace, doc["kind"], doc["metadata"]["name"])
            # what the API server stores (with its defaults) is what the operator parses
            MODELS[doc["kind"]].model_validate(stored)


@pytest.mark.parametrize("case", INVALID, ids=lambda case: case.id)
def test_invalid_manifest_is_refused_with_a_clear_message(crds: Cluster, namespace: str, case: Invalid) -> None:
    # what `kubectl apply` of the manifest does: strict field validation, the server decides
    proc = _kubectl(crds, "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(case.manifest()))
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    for expected in case.server:
        assert expected in proc.stderr, f"{expected!r} not in:\n{proc.stderr}"


def test_server_applies_the_model_defaults(crds: Cluster, namespace: str) -> None:
    crds.apply(valid_job(), namespace)
    crds.apply(valid_model(), namespace)
    job = _get(crds, namespace, "DistillationJob", "demo")
    spec = job["spec"]
    assert spec["student"]["lora"]["rank"] == 16  # a nested default inside a defaulted {}
    assert spec["student"]["training"]["completionOnlyLoss"] is True
    assert spec["evaluation"] == {
        "metrics": ["exactMatch", "tokenF1", "rougeL"],
        "agreementMetric": "tokenF1",
        "minTeacherAgreement": 0.95,
        "speed": {"enabled": True, "prompts": 16, "concurrency": 8},
    }
    assert spec["teacher"]["endpoint"]["mode"] == "online"
    assert spec["teacher"]["endpoint"]["batch"]["maxRequestsPerBatch"] == 50000
    assert spec["resources"] == {"nodes": 1, "maxRestarts": 3}  # the rest stays unset: the operator's defaults apply
    assert spec["teacher"]["endpoint"]["maxConcurrency"] == 32
    # pydantic, given what the server stored, agrees on every value
    assert DistillationJob.model_validate(job).spec == DistillationJob.model_validate(valid_job()).spec
    model = _get(crds, namespace, "DistilledModel", "demo-model")
    assert model["spec"]["serving"]["replicas"] == 1


def test_status_subresource_takes_the_operator_status(crds: Cluster, namespace: str) -> None:
    crds.apply(valid_job(), namespace)
    status = DistillationJobStatus(
        phase=JobPhase.SUCCEEDED,
        observed_generation=1,
        spec_hash="0123abcd",
        run_id="0123abcd",
        teacher="big",
        student="Qwen/Qwen2.5-0.5B-Instruct",
        conditions=[
            Condition(
                type=c.SUCCEEDED,
                status=ConditionStatus.TRUE,
                reason=c.Reason.RUN_SUCCEEDED,
                message="teacher agreement 0.971 >= 0.95",
                last_transition_time=c.now_rfc3339(),
                observed_generation=1,
            )
        ],
        stages=StagesStatus(
            generate=StageStatus(job="demo-generate", phase="Succeeded", progress=1.0),
            train=StageStatus(job="demo-train", phase="Succeeded", start_time="2026-01-01T00:00:00Z"),
        ),
        evaluation=EvaluationStatus(
            teacher_agreement=0.971,
            metrics={"tokenF1": 0.971, "exactMatch": 0.5},
            passed=True,
            speed=SpeedComparison.model_validate(speed_comparison(11.2, 14.3)),
            summary="keeps 97% of the teacher's tokenF1, 11\u00d7 faster, 14\u00d7 cheaper per 1M answers",
        ),
        teacher_spend=TeacherSpend.model_validate(
            {**spend(cost=0.1234, budget={"maxCost": 1.0}), "summary": "$0.12 of $1.00"}
        ),
        distilled_model="demo-student",
    )
    custom = crds.custom()
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "distillationjobs", "demo", {"status": status.to_wire()}
    )
    stored = _get(crds, namespace, "DistillationJob", "demo")
    assert stored["metadata"]["generation"] == 1  # status writes do not bump the generation
    assert DistillationJob.model_validate(stored).status == status
    table = crds.kubectl("get", "dj", "-n", namespace).stdout.split("\n")
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
    assert table[1].split()[:10] == [
        "demo",
        "Succeeded",
        "big",
        "0.971",
        "$0.12",
        "of",
        "$1.00",
        "Within",
        "11.2",
        "14.3",
    ]
    wide = crds.kubectl("get", "dj", "-n", namespace, "-o", "wide").stdout.split("\n")
    assert wide[0].split()[-5:] == ["STUDENT", "MODEL", "RUN", "OBJECTIVE", "LOSS"]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in wide[1]
    # the status has a schema: a phase outside the enum is refused too
    bad = _kubectl(
        crds, "patch", "dj", "demo", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"phase": "Cooking"}}),
    )  # fmt: skip
    assert bad.returncode != 0 and 'status.phase: Unsupported value: "Cooking"' in bad.stderr


def test_distilled_model_scale_subresource_and_columns(crds: Cluster, namespace: str) -> None:
    crds.apply(valid_model(), namespace)
    crds.custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "distilledmodels", "demo-model",
        {"status": {
            "replicas": 1, "readyReplicas": 1, "selector": "app.kubernetes.io/instance=demo-model",
            "endpoint": f"http://demo-model.{namespace}.svc:8000/v1",
            "currentModel": {"uri": "s3://artifacts/demo/model"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "ReplicasAvailable", "message": "",
                            "lastTransitionTime": c.now_rfc3339()}],
        }},
    )  # fmt: skip
    crds.kubectl("scale", "dm", "demo-model", "-n", namespace, "--replicas=3")
    assert _get(crds, namespace, "DistilledModel", "demo-model")["spec"]["serving"]["replicas"] == 3
    scale = crds.custom().get_namespaced_custom_object_scale(GROUP, VERSION, namespace, "distilledmodels", "demo-model")
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 1
    assert scale["status"]["selector"] == "app.kubernetes.io/instance=demo-model"
    table = crds.kubectl("get", "dm", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "READY", "REPLICAS", "ENDPOINT", "MODEL", "AGE"]
    assert table[1].split()[:5] == [
        "demo-model", "True", "1", f"http://demo-model.{namespace}.svc:8000/v1", "s3://artifacts/demo/model",
    ]  # fmt: skip


def test_short_names_and_category(crds: Cluster, namespace: str) -> None:
    crds.apply(valid_job(), namespace)
    crds.apply(valid_model(), namespace)
    assert crds.kubectl("get", "djob", "-n", namespace, "-o", "name").stdout.split() == [
        "distillationjob.kubedistill.io/demo"
    ]
    listed = crds.kubectl("get", "kubedistill", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == ["distillationjob.kubedistill.io/demo", "distilledmodel.kubedistill.io/demo-model"]


def test_kubectl_explain_shows_the_descriptions(crds: Cluster) -> None:
    def explain() -> str:
        proc = _kubectl(crds, "explain", "distillationjob.spec.teacher")
        return _words(proc.stdout) if proc.returncode == 0 and "endpoint" in proc.stdout else ""

    text = wait_for(explain, timeout=60, interval=1, what="kubectl explain (OpenAPI published)")
    assert "The large model whose answers the student learns." in text
    assert "Exactly one of endpoint or vllm." in text
    for field, description in (
        ("endpoint", "An OpenAI-compatible API."),
        ("vllm", "An open-weight model run with vLLM in the generate pod."),
        ("sampling", "Sampling settings of the teacher."),
        ("systemPrompt", "System prompt prepended to every prompt."),
    ):
        assert field in text and description in text, field
    nested = _words(crds.kubectl("explain", "dj.spec.teacher.endpoint.apiKeySecretRef").stdout)
    assert "passed to the pod as a secretKeyRef only" in nested
    replicas = _words(crds.kubectl("explain", "dm.spec.serving.replicas").stdout)
    assert "vLLM replicas" in replicas and "<integer>" in replicas


def _words(text: str) -> str:
    """kubectl explain wraps long descriptions: compare word sequences."""
    return " ".join(text.split())
