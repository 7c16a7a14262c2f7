"""The operator image for real: the chart's operator pod, run in a container against the local
cluster, takes a DistillationJob to Succeeded and its DistilledModel to Ready.

The pod is the one `helm install` rendered (its command, args, env, settings ConfigMap, /tmp
emptyDir, UID 65532, read-only root, no capabilities), run by tests/support/pods.py with what a
kubelet would give it: a token of the chart's ServiceAccount at
/var/run/secrets/kubernetes.io/serviceaccount and KUBERNETES_SERVICE_HOST/PORT, so the operator
logs in with its in-cluster configuration, as in a real cluster. The container shares the host's
network: the local API server listens on 127.0.0.1 only. Stage pods are kwok's (they end with a
worker's result); tests/images/test_worker_image.py runs those for real.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.images.conftest import Images
from tests.images.test_worker_image import assert_hardened
from tests.support import cluster as cluster_support
from tests.support.cluster import Cluster, wait_for
from tests.support.djobs import distillation_job
from tests.support.operator_proc import GROUP, OK, VERSION
from tests.support.pods import Engine, Pod, PodError, ServiceAccount, wait_http

pytestmark = [pytest.mark.images, pytest.mark.cluster]
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubedistill"
LIVENESS_PORT = 8080  # the chart's: every container here shares the host's ports


def helm(cluster: Cluster, *args: str) -> str:
    proc = subprocess.run(
        [str(cluster_support.bin_dir() / "helm"), *args], capture_output=True, text=True, env=cluster.env(), timeout=180
    )
    assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def release(cluster: Cluster, namespace: str, images: Images, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The chart installed with the values hack/images printed, watching a namespace of its own."""
    with cluster.new_namespace("op-image-work") as work:
        name = f"kd{secrets.token_hex(3)}"
        values = {
            **images.values,
            "settings": {**images.values["settings"], "namespaces": [work], "stagePodAnnotations": OK},
            "rbac": {"aggregateToDefaultRoles": False},
        }
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        helm(cluster, "install", name, str(CHART), "-n", namespace, "--values", str(values_file))
        try:
            manifest = list(yaml.safe_load_all(helm(cluster, "get", "manifest", name, "-n", namespace)))
            yield {"name": name, "work": work, "docs": [d for d in manifest if d]}
        finally:
            helm(cluster, "uninstall", name, "-n", namespace, "--wait")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_the_operator_image_runs_a_distillation_in_cluster(
    cluster: Cluster, namespace: str, engine: Engine, images: Images, release: dict[str, Any], tmp_path: Path
) -> None:
    docs = release["docs"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-settings"))
    pod_spec = deployment["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert container["image"] == images.operator
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == str(LIVENESS_PORT)  # /healthz, /readyz and /metrics
    if not _port_free(LIVENESS_PORT):
        raise PodError(f"port {LIVENESS_PORT} is taken on this machine: the operator's liveness endpoint needs it")

    service_account = pod_spec["serviceAccountName"]
    token = cluster.kubectl("-n", namespace, "create", "token", service_account, "--duration=20m").stdout.strip()
    account = ServiceAccount(
        token=token,
        ca_crt=(cluster.dir / "pki" / "ca.crt").read_text(),
        namespace=namespace,
        api_host="127.0.0.1",
        api_port=cluster.ports()["apiserver"],
    )
    pod = Pod(
        engine,
        pod_spec,
        workdir=tmp_path / "operator-pod",
        config_maps={config_map["metadata"]["name"]: config_map["data"]},
        field_values={"metadata.name": "operator-in-a-container"},
        service_account=account,
    )
    work = release["work"]
    with pod:
        operator = pod.start("operator")
        assert_hardened(operator)
        wait_http(f"http://127.0.0.1:{LIVENESS_PORT}/healthz", operator, timeout=120, what="operator liveness")
        # The chart elects a leader; the only replica takes the Lease and turns ready.
        wait_http(f"http://127.0.0.1:{LIVENESS_PORT}/readyz", operator, timeout=60, what="operator readiness")
        cluster.kubectl("-n", work, "create", "secret", "generic", "teacher-key", "--from-literal=api-key=sk-0")
        manifest = distillation_job("image", model_name="image-bot", api_key_secret="teacher-key")
        manifest["spec"]["output"]["model"]["serving"] = {"replicas": 1, "gpus": 0}
        cluster.apply(manifest, namespace=work)
        custom = cluster.custom()

        def phase(plural: str, name: str) -> str | None:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, work, plural, name)
            return (obj.get("status") or {}).get("phase")

        try:
            wait_for(lambda: phase("distillationjobs", "image") == "Succeeded", timeout=180, what="job Succeeded")
            wait_for(lambda: phase("distilledmodels", "image-bot") == "Ready", timeout=120, what="model Ready")
        except TimeoutError as err:
            raise AssertionError(f"{err}\noperator log:\n{operator.logs(80)}") from None
        # What the operator created runs the images hack/images built (kwok plays those pods).
        jobs = cluster.kubectl_json("-n", work, "get", "jobs")["items"]
        assert {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs} == {images.worker}
        serving = cluster.kubectl_json("-n", work, "get", "deployment", "image-bot-vllm")["spec"]["template"]["spec"]
        assert serving["containers"][0]["image"] == images.worker
        log = operator.logs()
        assert operator.running(), log[-3000:]
    # In-cluster login with the chart's ServiceAccount, and not a single refused call.
    assert token not in log
    for refused in ("403", "Forbidden", "forbidden", "Not enough permissions"):
        assert refused not in log, f"{refused!r} in the operator log:\n{log[-3000:]}"
