"""The Helm chart end to end: rendered, validated, installed into the local cluster, and run.

- `helm lint` and `helm template` with the defaults and with options; values.schema.json refuses
  unknown keys and bad values with a message naming them;
- `helm install` into a namespace under the `restricted` Pod Security Standard: the operator pod
  is admitted and runs (kwok plays it), the CRDs are there, the aggregated roles give namespace
  editors DistillationJobs; `helm uninstall` keeps the CRDs and the resources;
- the chart's RBAC is enough and no more: the real operator runs here as a process with a token
  of the chart's ServiceAccount (`kubectl create token`) and the chart's settings, and takes a
  DistillationJob to Succeeded and its DistilledModel to Ready without a single refused call;
  `kubectl auth can-i` shows what the ServiceAccount may not do (read Secrets, delete namespaces,
  touch namespaces it does not watch).

The cluster's API server listens on loopback only, so the operator cannot run in the cluster
(hack/cluster/README.md): the pod the chart deploys is kwok's, and the process that does the work
is this machine's, with exactly the pod's credentials and settings.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.api.settings import OperatorSettings
from tests.support import cluster as cluster_support
from tests.support.cluster import Cluster, wait_for
from tests.support.crds import CRD_NAMES
from tests.support.djobs import distillation_job
from tests.support.operator_proc import GROUP, OK, VERSION, OperatorProcess, Run

pytestmark = pytest.mark.e2e
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubedistill"
SETTINGS_PATH = "/etc/kubedistill-operator/settings.yaml"

# A values file that turns every kind of knob.
OPTIONS: dict[str, Any] = {
    "fullnameOverride": "distill",
    "image": {"repository": "registry.example.com/kubedistill/operator", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": ["registry-creds"],
    "serviceAccount": {"name": "distill-operator", "annotations": {"example.com/owner": "platform"}},
    "rbac": {"aggregateToDefaultRoles": False},
    "operator": {
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "podAnnotations": {"prometheus.io/scrape": "false"},
        "podLabels": {"team": "platform"},
        "nodeSelector": {"node-role.example.com/system": "true"},
        "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"}],
        "replicas": 1,
        "leaderElection": {"enabled": False},
        "logFormat": "text",
    },
    "metrics": {
        "port": 9090,
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True},
    },
    "settings": {
        "namespaces": ["team-a", "team-b"],
        "workerImage": "registry.example.com/kubedistill/worker:0.1.0",
        "serviceAccountName": "distill-workers",
        "gpuPool": {
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
            "gpusPerNode": 4,
        },
        "jobs": {"activeDeadlineSeconds": 86400},
        "stagePodAnnotations": {"train": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}},
        "reconcile": {"apiQps": 20.5},
        "logLevel": "DEBUG",
    },
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def helm_path() -> Path:
    """The pinned helm of hack/cluster (built with the cluster binaries)."""
    path = cluster_support.bin_dir() / "helm"
    return path if path.exists() else cluster_support.build() / "helm"


def helm(
    helm_path: Path, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm_path), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(helm_path: Path, tmp_path: Path, values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    args = ["template", "kd", str(CHART), "--namespace", "kd-system", *extra]
    if values is not None:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["--values", str(values_file)]
    return [d for d in yaml.safe_load_all(helm(helm_path, *args).stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def rendered_settings(docs: list[dict[str, Any]]) -> OperatorSettings:
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    return OperatorSettings.model_validate(yaml.safe_load(config["data"]["settings.yaml"]))


# --------------------------------------------------------------------------- (a) lint and render


def test_chart_lints_clean(helm_path: Path, tmp_path: Path) -> None:
    out = helm(helm_path, "lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out
    values_file = tmp_path / "options.yaml"
    values_file.write_text(yaml.safe_dump(OPTIONS))
    assert "0 chart(s) failed" in helm(helm_path, "lint", "--strict", str(CHART), "--values", str(values_file)).stdout


def test_default_render(helm_path: Path, tmp_path: Path) -> None:
    docs = render(helm_path, tmp_path)
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment",
         "Role", "RoleBinding", "Service"]
    )  # fmt: skip
    assert all(d["metadata"].get("namespace") == "kd-system" for d in docs if not d["kind"].startswith("Cluster"))

    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one leader (a Lease in the release namespace), handed over in rolling upgrades.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/kubedistill/operator:0.1.0"
    assert container["command"] == ["kubedistill"]
    assert container["args"] == [
        "operator", "--settings", SETTINGS_PATH, "--metrics-port", "8080", "--log-format", "json",
        "--leader-elect", "--lease-name", "kd-kubedistill", "--lease-namespace", "kd-system",
        "--lease-seconds", "15", "--lease-renew-deadline", "10", "--lease-retry", "2",
    ]  # fmt: skip
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"containerPort": 8080, "name": "metrics", "protocol": "TCP"} in container["ports"]
    lease_role = one(docs, "Role", "kd-kubedistill-leader-election")
    assert {(tuple(r["verbs"]), tuple(r.get("resourceNames", []))) for r in lease_role["rules"]} == {
        (("create",), ()),
        (("get", "update"), ("kd-kubedistill",)),
    }
    assert one(docs, "RoleBinding")["roleRef"]["name"] == "kd-kubedistill-leader-election"
    metrics_service = one(docs, "Service")
    assert metrics_service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics",
                                                 "protocol": "TCP"}]  # fmt: skip
    # The restricted Pod Security Standard, and a read-only root with a writable /tmp.
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/kubedistill-operator"]]["configMap"]["name"] == "kd-kubedistill-settings"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"] == "kd-kubedistill"
    # The operator's Deployment must never look like one of its serving Deployments.
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

    assert rendered_settings(docs) == OperatorSettings()

    # Every namespace: the operator's rules in one ClusterRole, bound to the ServiceAccount.
    role = one(docs, "ClusterRole", "kd-kubedistill-operator")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kd-kubedistill", "namespace": "kd-system"}]
    edit = one(docs, "ClusterRole", "kd-kubedistill-edit")["metadata"]["labels"]
    view = one(docs, "ClusterRole", "kd-kubedistill-view")["metadata"]["labels"]
    assert edit["rbac.authorization.k8s.io/aggregate-to-edit"] == view["rbac.authorization.k8s.io/aggregate-to-view"]


def test_render_with_options(helm_path: Path, tmp_path: Path) -> None:
    docs = render(helm_path, tmp_path, OPTIONS)
    settings = rendered_settings(docs)
    # Helm merges maps key by key and replaces lists: the defaults fill in what OPTIONS leaves out.
    assert settings == OperatorSettings.model_validate(_merge(OperatorSettings().to_wire(), OPTIONS["settings"]))
    assert settings.jobs.active_deadline_seconds == 86400 and settings.jobs.backoff_limit == 2

    pod = one(docs, "Deployment", "distill")["spec"]["template"]
    spec = pod["spec"]
    assert spec["containers"][0]["image"] == "registry.example.com/kubedistill/operator:0.1.0-rc1"
    assert spec["containers"][0]["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert spec["serviceAccountName"] == "distill-operator"
    assert spec["nodeSelector"] == OPTIONS["operator"]["nodeSelector"]
    assert spec["tolerations"] == OPTIONS["operator"]["tolerations"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["containers"][0]["resources"] == OPTIONS["operator"]["resources"]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"} in spec["containers"][0]["env"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    assert pod["metadata"]["labels"]["team"] == "platform"
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == {"example.com/owner": "platform"}
    # One replica without leader election: Recreate, never two operators at once.
    deployment = one(docs, "Deployment", "distill")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    args = spec["containers"][0]["args"]
    assert "--leader-elect" not in args and args[-4:] == ["--metrics-port", "9090", "--log-format", "text"]
    # Prometheus Operator and Grafana: a ServiceMonitor on the metrics Service, the dashboard ConfigMap.
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    service = one(docs, "Service", "distill-metrics")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())  # it selects it
    dashboard = one(docs, "ConfigMap", "distill-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubedistill.json"])["uid"] == "kubedistill-operator"

    # Watched namespaces: a Role and RoleBinding in each, no cluster-wide write anywhere.
    roles = [d for d in docs if d["kind"] == "Role"]  # no leader-election Role: it is off here
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == "distill-operator"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "distill-operator", "namespace": "kd-system"}]
    [cluster_role] = [d for d in docs if d["kind"] == "ClusterRole"]  # no aggregated roles either
    assert {(g, r, v) for rule in cluster_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }  # fmt: skip


def test_a_settings_change_rolls_the_operator(helm_path: Path, tmp_path: Path) -> None:
    def checksum(*extra: str) -> str:
        docs = render(helm_path, tmp_path, None, *extra)
        return str(one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/settings"])

    assert checksum() == checksum("--set", "operator.podLabels.a=b")
    assert checksum() != checksum("--set", "settings.gpuPool.gpusPerNode=4")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "settings.bogus=1"], "at '/settings': additional properties 'bogus' not allowed"),
        (["--set", "operator.replica=2"], "at '/operator': additional properties 'replica' not allowed"),
        (
            ["--set", "operator.replicas=2", "--set", "operator.leaderElection.enabled=false"],
            "operator.replicas above 1 needs operator.leaderElection.enabled",
        ),
        (["--set", "operator.logFormat=xml"], "at '/operator/logFormat'"),
        (
            ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"],
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        (["--set", "settings.gpuPool.gpusPerNode=x"], "at '/settings/gpuPool/gpusPerNode': got string, want integer"),
        (["--set", "settings.gpuPool.gpusPerNode=65"], "maximum: got 65, want 64"),
        (["--set", "settings.logLevel=LOUD"], "at '/settings/logLevel'"),
        (["--set", "settings.cpuPool.memory=lots"], "at '/settings/cpuPool/memory'"),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(
    helm_path: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = helm(helm_path, "template", "kd", str(CHART), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- (b)-(d) in the cluster


@dataclasses.dataclass
class Release:
    name: str
    namespace: str
    cluster: Cluster
    helm_path: Path

    @property
    def service_account(self) -> str:
        return f"{self.name}-kubedistill"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return helm(self.helm_path, *args, "--namespace", self.namespace, env=self.cluster.env(), check=check,
                    timeout=timeout)  # fmt: skip

    def can(self, verb: str, resource: str, namespace: str | None = None, *, user: str | None = None) -> bool:
        """`kubectl auth can-i` as the ServiceAccount (or another user): --all-namespaces without a namespace."""
        where = ["-n", namespace] if namespace else ["--all-namespaces"]
        resource, _, subresource = resource.partition("/")  # kubectl would read "x/status" as the x named status
        where += [f"--subresource={subresource}"] if subresource else []
        proc = self.cluster.kubectl("auth", "can-i", verb, resource, *where, "--as", user or self.user, check=False)
        assert proc.stdout.strip() in ("yes", "no"), proc.stderr
        return proc.stdout.strip() == "yes"


@pytest.fixture
def install(cluster: Cluster, namespace: str, helm_path: Path, tmp_path: Path) -> Iterator[Any]:
    """helm install into the test's (restricted) namespace; uninstalled afterwards if still there."""
    releases: list[Release] = []

    def run(values: dict[str, Any], *extra: str) -> tuple[Release, subprocess.CompletedProcess[str]]:
        # Cluster-scoped objects (ClusterRoles) carry the release name: unique per test.
        release = Release(f"kd{secrets.token_hex(3)}", namespace, cluster, helm_path)
        values_file = tmp_path / f"{release.name}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        proc = release.helm("install", release.name, str(CHART), "--values", str(values_file), *extra)
        releases.append(release)
        return release, proc

    yield run
    for release in releases:
        release.helm("uninstall", release.name, "--wait", check=False)


def _crds_established(cluster: Cluster) -> bool:
    for name in CRD_NAMES:
        proc = cluster.kubectl("get", "crd", name, "-o", "json", check=False)
        if proc.returncode != 0:
            return False
        conditions = {c["type"]: c["status"] for c in json.loads(proc.stdout).get("status", {}).get("conditions", [])}
        if conditions.get("Established") != "True":
            return False
    return True


@pytest.mark.cluster
def test_install_runs_under_restricted_and_uninstall_keeps_the_crds(
    cluster: Cluster, namespace: str, install: Any
) -> None:
    crds_before = _crds_established(cluster)
    release, proc = install({}, "--wait", "--timeout", "90s")
    # The namespace enforces *and warns* restricted: no warning means nothing came close.
    assert "PodSecurity" not in proc.stderr and "violate" not in proc.stderr, proc.stderr

    # (b) The operator pod was admitted under `restricted` and runs (kwok plays it).
    pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component=operator")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running", "Running"]  # a leader and a standby
    assert pods[0]["spec"]["serviceAccountName"] == release.service_account
    assert pods[0]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # The CRDs: Helm installed them when they were missing (other tests of this session install
    # them too, so they may have been there already: Helm leaves existing CRDs alone).
    wait_for(lambda: _crds_established(cluster), timeout=30, what="the CRDs Established")
    manifest = release.helm("get", "manifest", release.name).stdout
    assert "CustomResourceDefinition" not in manifest, "CRDs in the release would be deleted by helm uninstall"
    if not crds_before:
        for name in CRD_NAMES:
            assert cluster.kubectl("get", "crd", name).returncode == 0

    # Cluster-wide rights, but only the operator's: spot checks of what it may not do.
    assert release.can("watch", "jobs.batch") and release.can("create", "jobs.batch", "default")
    assert release.can("patch", "distillationjobs.kubedistill.io/status", "default")
    for verb, resource in [
        ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "namespaces"),
        ("list", "namespaces"), ("update", "deployments.apps"), ("delete", "deployments.apps"),
        # It creates Roles (adapter sidecars, progress writers), never beyond its own rights.
        ("escalate", "roles.rbac.authorization.k8s.io"), ("bind", "roles.rbac.authorization.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("update", "distillationjobs.kubedistill.io"), ("delete", "distillationjobs.kubedistill.io"),
        ("create", "leases.coordination.k8s.io"),
    ]:  # fmt: skip
        assert not release.can(verb, resource), f"the operator may {verb} {resource}"

    # The aggregated roles: a namespace editor may run distillations, a viewer only look.
    cluster.kubectl("-n", namespace, "create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice")
    cluster.kubectl("-n", namespace, "create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob")
    wait_for(lambda: release.can("create", "distillationjobs.kubedistill.io", namespace, user="alice"),
             timeout=30, what="edit aggregates kubedistill-edit")  # fmt: skip
    assert release.can("patch", "distilledmodels.kubedistill.io/scale", namespace, user="alice")
    assert not release.can("patch", "distillationjobs.kubedistill.io/status", namespace, user="alice")
    wait_for(lambda: release.can("list", "distillationjobs.kubedistill.io", namespace, user="bob"),
             timeout=30, what="view aggregates kubedistill-view")  # fmt: skip
    assert not release.can("create", "distillationjobs.kubedistill.io", namespace, user="bob")

    # (d) helm uninstall removes the operator and its RBAC, and keeps the CRDs and every resource.
    cluster.apply(distillation_job("kept"), namespace=namespace)
    release.helm("uninstall", release.name, "--wait")
    assert cluster.kubectl("get", "clusterrole", f"{release.name}-kubedistill-operator", check=False).returncode != 0
    assert _crds_established(cluster)
    assert cluster.kubectl("-n", namespace, "get", "distillationjob", "kept").returncode == 0


def wait_model(cluster: Cluster, op: OperatorProcess, namespace: str, name: str, check: Any, what: str) -> None:
    custom = cluster.custom()

    def status() -> dict[str, Any]:
        model = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distilledmodels", name)
        return dict(model.get("status") or {})

    try:
        wait_for(lambda: check(status()), timeout=60, interval=0.5, what=f"DistilledModel {name} {what}")
    except TimeoutError as err:
        raise AssertionError(f"{err}\nstatus: {status()}\noperator log:\n{op.tail(80)}") from None


def _without_options(args: list[str], *options: str) -> list[str]:
    """``args`` without each ``option`` and the value that follows it."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            out.append(arg)
    return out


@pytest.mark.cluster
def test_the_operator_runs_a_distillation_with_the_chart_rbac_and_settings(
    cluster: Cluster, namespace: str, install: Any, tmp_path: Path
) -> None:
    with cluster.new_namespace("chart-work") as work:
        # The chart watches one namespace; kwok ends each stage's pod with a worker's result.
        release, _ = install({"settings": {"namespaces": [work], "stagePodAnnotations": OK},
                              "rbac": {"aggregateToDefaultRoles": False}})  # fmt: skip

        # The operator pod's credentials and settings file, for a process on this machine.
        as_pod = cluster.as_service_account(namespace, release.service_account, tmp_path / "operator.kubeconfig")
        config_map = cluster.kubectl_json("-n", namespace, "get", "configmap", f"{release.name}-kubedistill-settings")
        settings = yaml.safe_load(config_map["data"]["settings.yaml"])
        assert settings["namespaces"] == [work]
        assert as_pod.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout == release.user

        # The chart's own arguments (leader election on its Lease, JSON logs), with this process's
        # settings file and a free metrics port in place of the pod's.
        deployment = cluster.kubectl_json("-n", namespace, "get", "deployment", f"{release.name}-kubedistill")
        chart_args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        args = _without_options(chart_args[1:], "--settings", "--metrics-port")
        assert "--leader-elect" in args
        op = OperatorProcess(as_pod, None, log_dir=tmp_path / "operator", settings=settings, args=args)
        with op:
            # The run references Secrets (teacher API key, S3 credentials) that only its pods read.
            cluster.kubectl("-n", work, "create", "secret", "generic", "teacher-key", "--from-literal=api-key=sk-0")
            cluster.kubectl("-n", work, "create", "secret", "generic", "s3-creds", "--from-literal=AWS_ACCESS_KEY_ID=a")
            # Every kind the operator writes: two-node training (Indexed Job + headless Service), an
            # autoscaled model (HPA, PDB, Deployment, Service, fetch ConfigMap).
            manifest = distillation_job(
                "chart",
                model_name="chart-bot",
                api_key_secret="teacher-key",
                storage_secret="s3-creds",
                nodes=2,
                gpus_per_node=1,
            )
            serving = {"autoscaling": {"minReplicas": 1, "maxReplicas": 2}, "gpus": 1}
            manifest["spec"]["output"]["model"]["serving"] = serving
            run = Run(cluster, work, "chart", op).apply(manifest)
            status = run.wait_phase("Succeeded", timeout=120)
            assert status["distilledModel"] == "chart-bot"
            train_job = status["stages"]["train"]["job"]
            assert cluster.kubectl_json("-n", work, "get", "service", train_job)["spec"]["clusterIP"] == "None"
            wait_model(cluster, op, work, "chart-bot", lambda s: s.get("phase") == "Ready", "Ready")
            for child in ("deployment/chart-bot-vllm", "service/chart-bot", "pdb/chart-bot-vllm", "hpa/chart-bot-vllm"):
                cluster.kubectl("-n", work, "get", child)

            # A model of its own, rolled to a new version: the old version's fetch ConfigMap is pruned.
            model = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "DistilledModel",
                "metadata": {"name": "pinned"},
                "spec": {"model": {"uri": "s3://kd-test/models/v1"}, "serving": {"replicas": 1, "gpus": 0}},
            }
            cluster.apply(model, namespace=work)
            wait_model(cluster, op, work, "pinned", lambda s: s.get("phase") == "Ready", "Ready")
            cluster.kubectl("-n", work, "patch", "dm", "pinned", "--type=merge",
                            "-p", '{"spec":{"model":{"uri":"s3://kd-test/models/v2"}}}')  # fmt: skip
            wait_model(
                cluster, op, work, "pinned",
                lambda s: (s.get("currentModel") or {}).get("uri") == "s3://kd-test/models/v2", "serving v2",
            )  # fmt: skip
            wait_for(
                lambda: len(cluster.kubectl_json("-n", work, "get", "configmaps", "-l", "kubedistill.io/model=pinned")
                            ["items"]) == 1,
                timeout=30, what="the v1 fetch ConfigMap pruned",
            )  # fmt: skip
        lease = cluster.kubectl_json("-n", namespace, "get", "lease", f"{release.name}-kubedistill")
        assert lease["spec"]["leaseTransitions"] >= 0  # the operator took the chart's Lease with the chart's RBAC
        log = op.log()
        for refused in ("403", "Forbidden", "forbidden", "Not enough permissions"):
            assert refused not in log, f"{refused!r} in the operator log:\n{op.tail(80)}"

        # Namespaced RBAC: the watched namespace only, and still no Secrets.
        assert release.can("create", "jobs.batch", work) and release.can("list", "namespaces")
        for verb, resource, where in [
            ("create", "jobs.batch", namespace), ("create", "jobs.batch", "default"), ("list", "jobs.batch", None),
            ("get", "secrets", work), ("list", "secrets", work), ("delete", "namespaces", None),
            ("create", "pods", work), ("list", "configmaps", "kube-system"),
        ]:  # fmt: skip
            assert not release.can(verb, resource, where), f"the operator may {verb} {resource} in {where}"
