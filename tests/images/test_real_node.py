"""A real node in the local cluster (hack/cluster/node: kubelet + containerd + runc + CNI bridge +
kube-proxy): the whole product runs there as real pods, and the model answers through its Service.

- the operator: the chart's Deployment, scheduled on the real node (the chart's nodeSelector and
  tolerations), with host networking and KUBERNETES_SERVICE_HOST=127.0.0.1: the local API server
  listens on loopback only, so that is the one way a pod reaches it (its namespace is therefore
  `privileged`; everything else runs under `restricted`);
- a DistillationJob whose stages (generate against the fault stub, train, evaluate) are real pods
  of the CPU worker image on that node, under the `restricted` Pod Security Standard, talking to
  the S3 server and the stub on the node's gateway address;
- the DistilledModel it publishes: a Deployment whose pod (fetch init container, then vLLM's CPU
  build) the kubelet starts, probes and reports Ready; `/v1/chat/completions` through the
  Service's ClusterIP (kube-proxy's rules) answers.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.local.serve import VLLM_CPU_ENV
from tests.images.conftest import Images
from tests.images.test_operator_image import CHART, LIVENESS_PORT, _port_free, helm
from tests.support.cluster import HACK_DIR, Cluster, wait_for
from tests.support.datasets import copy_task, task_corpus
from tests.support.fault_stub import FaultStub
from tests.support.operator_proc import GROUP, VERSION
from tests.support.pods import Engine
from tests.support.s3 import S3Server
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = [pytest.mark.images, pytest.mark.cluster, pytest.mark.slow]

NODE_SELECTOR = {"kubedistill.io/node": "real"}
TOLERATIONS = [{"key": "kubedistill.io/real-node", "operator": "Exists", "effect": "NoSchedule"}]
GATEWAY = "10.250.0.1"  # the host, seen from the node's pods (hack/cluster/node)
API_KEY = "sk-real-node-0123456789"
PROMPTS = list(dict.fromkeys(p for p, _ in copy_task(300, seed=5)))[:120]
MODEL = "real-bot"


def node_script(cluster: Cluster, *args: str, timeout: float = 900) -> str:
    env = cluster.env(KUBEDISTILL_CLUSTER_NAME=cluster.name)
    proc = subprocess.run([str(HACK_DIR / "node"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"hack/cluster/node {' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def real_node(cluster: Cluster, engine: Engine, images: Images) -> Iterator[str]:
    name = node_script(cluster, "up")
    try:
        node_script(cluster, "load", images.operator, images.worker)
        yield name
    finally:
        node_script(cluster, "down", timeout=300)


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", selector)["items"]
    return items


def _pod_logs(node: str, namespace: str) -> str:
    """The kubelet's container logs on this machine (`kubectl logs` needs apiserver -> kubelet credentials
    the local control plane does not have)."""
    out = []
    for path in sorted(Path("/var/log/pods").glob(f"{namespace}_*/*/*.log")):
        out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(out)[-8000:]


def _chat(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def test_operator_stages_and_vllm_run_as_real_pods_and_the_service_answers(
    cluster: Cluster, real_node: str, images: Images, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert _port_free(LIVENESS_PORT), f"port {LIVENESS_PORT} is taken: the operator pod (host network) needs it"
    with (
        S3Server(host=GATEWAY) as s3,
        FaultStub(api_key=API_KEY, host=GATEWAY) as stub,
        cluster.new_namespace("real-op", pod_security="privileged") as op_ns,
        cluster.new_namespace("real-work") as work,
    ):
        # The student and the prompts, in the S3 server the pods reach on the node's gateway.
        bucket = s3.make_bucket()
        client = s3.client()
        student = cached_tiny_chat_model(tmp_path_factory.getbasetemp(), corpus=task_corpus(), vocab_size=512)
        for path in sorted(p for p in student.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"base/student/{path.relative_to(student)}")
        lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
        client.put_object(Bucket=bucket, Key="prompts.jsonl", Body=("\n".join(lines) + "\n").encode())
        credentials = s3.env()
        cluster.kubectl("-n", work, "create", "secret", "generic", "teacher-key", f"--from-literal=api-key={API_KEY}")
        cluster.kubectl("-n", work, "create", "secret", "generic", "s3-creds",
                        f"--from-literal=AWS_ACCESS_KEY_ID={credentials['AWS_ACCESS_KEY_ID']}",
                        f"--from-literal=AWS_SECRET_ACCESS_KEY={credentials['AWS_SECRET_ACCESS_KEY']}")  # fmt: skip

        # The chart, with the values hack/images printed, on the real node.
        release = f"kd{secrets.token_hex(3)}"
        values = {
            **images.values,
            "rbac": {"aggregateToDefaultRoles": False},
            "operator": {
                "nodeSelector": NODE_SELECTOR,
                "tolerations": TOLERATIONS,
                "extraEnv": [
                    {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": str(cluster.ports()["apiserver"])},
                ],
            },
            "settings": {
                **images.values["settings"],
                "namespaces": [work],
                "cpuPool": {"nodeSelector": NODE_SELECTOR, "tolerations": TOLERATIONS, "cpu": "500m", "memory": "3Gi"},
                "serving": {"cpu": "500m", "memory": "6Gi", "startupSeconds": 900},
            },
        }
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        helm(cluster, "install", release, str(CHART), "-n", op_ns, "--values", str(values_file))
        try:
            # The API server listens on loopback: the operator pod shares the node's network.
            patch = {"spec": {"template": {"spec": {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}}}}
            cluster.kubectl("-n", op_ns, "patch", "deployment", f"{release}-kubedistill", "--type=merge",
                            "-p", json.dumps(patch))  # fmt: skip
            _run_distillation(cluster, real_node, op_ns, work, bucket, s3, stub)
        finally:
            helm(cluster, "uninstall", release, "-n", op_ns, "--wait")


def _run_distillation(
    cluster: Cluster, node: str, op_ns: str, work: str, bucket: str, s3: S3Server, stub: FaultStub
) -> None:
    def operator_ready() -> bool:
        pods = _pods(cluster, op_ns, "app.kubernetes.io/component=operator")
        return any(
            p["spec"].get("hostNetwork") and p["spec"].get("nodeName") == node
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            for p in pods
        )  # fmt: skip

    try:
        wait_for(operator_ready, timeout=240, interval=2, what="the operator pod Ready on the real node")
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{_pod_logs(node, op_ns)}") from None

    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": "real"},
        "spec": {
            "teacher": {
                "endpoint": {
                    "baseURL": stub.base_url,
                    "model": "stub-teacher",
                    "apiKeySecretRef": {"name": "teacher-key", "key": "api-key"},
                    "maxConcurrency": 8,
                },
                "sampling": {"temperature": 0, "maxTokens": 32},
            },
            "dataset": {"prompts": {"uri": f"s3://{bucket}/prompts.jsonl"}, "evalFraction": 0.1},
            "student": {
                "model": f"s3://{bucket}/base/student",
                "method": "full",
                "training": {"maxSteps": 30, "learningRate": 1e-3, "batchSize": 16, "maxSeqLength": 64},
            },
            # The point here is where things run, not how well the student learns.
            "evaluation": {"minTeacherAgreement": 0.0},
            "resources": {"gpusPerNode": 0},
            "output": {
                "uri": f"s3://{bucket}/runs/real",
                "model": {
                    "name": MODEL,
                    "serving": {
                        "gpus": 0,
                        "vllm": {
                            "dtype": "float32",
                            "maxModelLen": 512,
                            "extraArgs": ["--distributed-executor-backend", "uni"],
                            "env": [{"name": k, "value": v} for k, v in VLLM_CPU_ENV.items()],
                        },
                    },
                },
            },
            "storage": {
                "endpoint": s3.endpoint_url,
                "addressingStyle": "path",
                "credentialsSecretRef": {"name": "s3-creds"},
            },
        },
    }
    cluster.apply(manifest, namespace=work)
    custom = cluster.custom()

    def status(plural: str, name: str) -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, work, plural, name)
        return dict(obj.get("status") or {})

    started = time.monotonic()
    try:
        wait_for(lambda: status("distillationjobs", "real").get("phase") in ("Succeeded", "Failed"),
                 timeout=1500, interval=3, what="the DistillationJob to end")  # fmt: skip
        assert status("distillationjobs", "real")["phase"] == "Succeeded", status("distillationjobs", "real")
        job_seconds = time.monotonic() - started
        wait_for(lambda: status("distilledmodels", MODEL).get("phase") == "Ready",
                 timeout=900, interval=3, what="the DistilledModel Ready")  # fmt: skip
    except (TimeoutError, AssertionError) as err:
        raise AssertionError(
            f"{err}\njob: {status('distillationjobs', 'real')}\n{_pod_logs(node, op_ns)}\n{_pod_logs(node, work)}"
        ) from None
    serve_seconds = time.monotonic() - started - job_seconds

    # Every stage ran as a real pod on the real node, and exited 0.
    stages = _pods(cluster, work, "kubedistill.io/job=real")
    assert {p["metadata"]["labels"]["kubedistill.io/stage"] for p in stages} >= {"generate", "train", "evaluate"}
    for pod in stages:
        assert pod["spec"]["nodeName"] == node and pod["status"]["phase"] == "Succeeded", pod["status"]
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert {e["prompt"] for e in stub.requests() if e["fault"] == "ok"} == set(PROMPTS)
    assert all(e["auth"] for e in stub.requests())

    # The model's pod: a real vLLM container on the node, on the pod network.
    [vllm_pod] = _pods(cluster, work, f"app.kubernetes.io/instance={MODEL}")
    assert vllm_pod["spec"]["nodeName"] == node and vllm_pod["status"]["podIP"].startswith("10.250.0.")
    assert vllm_pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    service = cluster.kubectl_json("-n", work, "get", "service", MODEL)
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}/v1/chat/completions"
    reply = _chat(url, {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16})
    assert reply["choices"][0]["message"]["content"] is not None and reply["model"] == MODEL
    print(f"real node: job Succeeded in {job_seconds:.0f}s, model Ready {serve_seconds:.0f}s later; {url} -> {reply}")
