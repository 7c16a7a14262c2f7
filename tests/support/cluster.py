"""The real local Kubernetes cluster of hack/cluster, for tests, benchmarks and demos.

A real kube-apiserver, etcd, kube-controller-manager and kube-scheduler on 127.0.0.1, with kwok
playing the kubelet of simulated nodes (2 H100 nodes, 2 CPU nodes). No mocks: what a test sees is
what an API server does. See hack/cluster/README.md for the pod annotations that make a
simulated container fail, succeed with a termination message, or keep running.

    from tests.support.cluster import ensure_cluster, wait_for

    cluster = ensure_cluster()            # builds once per machine, then `hack/cluster/up`
    with cluster.new_namespace("demo") as ns:
        cluster.kubectl("-n", ns, "apply", "-f", "job.yaml")
        core = cluster.core()
        wait_for(lambda: core.list_namespaced_pod(ns).items, timeout=30, what="pods")

`cluster_session()` is the context manager behind the pytest fixture: it brings the cluster up
and, at exit, stops it again only if this process started it and KUBEDISTILL_KEEP_CLUSTER is not
set, so a cluster a developer started with `hack/cluster/up` outlives the test run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = REPO_ROOT / "hack" / "cluster"
DEFAULT_NAME = os.environ.get("KUBEDISTILL_CLUSTER_NAME") or "cluster"

# Simulated GPU pool, as the NVIDIA GPU operator labels real H100 nodes (see hack/cluster/nodes).
H100_PRODUCT = "NVIDIA-H100-80GB-HBM3"
H100_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.product": H100_PRODUCT}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION: dict[str, str] = {
    "key": "nvidia.com/gpu",
    "operator": "Exists",
    "effect": "NoSchedule",
}
H100_INSTANCE_TYPE = "p5.48xlarge"
CPU_INSTANCE_TYPE = "m7i.4xlarge"

# Pod annotations read by the kwok stages in hack/cluster/kwok/stages.yaml.
ANN_EXIT_CODE = "kwok.kubedistill.io/exit-code"
ANN_MESSAGE = "kwok.kubedistill.io/message"
ANN_INIT_MESSAGE = "kwok.kubedistill.io/init-message"
ANN_REASON = "kwok.kubedistill.io/reason"
ANN_HOLD = "kwok.kubedistill.io/hold"
ANN_RUN_DURATION = "kwok.kubedistill.io/run-duration"

RESTRICTED_LABELS: dict[str, str] = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/audit": "restricted",
}

T = TypeVar("T")


def cache_root() -> Path:
    """Where hack/cluster keeps binaries and cluster state (outside the repository)."""
    if override := os.environ.get("KUBEDISTILL_CACHE"):
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kubedistill"


def bin_dir() -> Path:
    """The directory holding kubectl, helm, kube-apiserver, ... once `build()` ran."""
    out = subprocess.run([str(HACK_DIR / "build"), "--bin-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _script_env(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBEDISTILL_CLUSTER_NAME"] = name
    env.update(extra or {})
    return env


def build() -> Path:
    """Build (or find cached) binaries; return the bin directory."""
    subprocess.run([str(HACK_DIR / "build")], check=True)
    return bin_dir()


def up(
    name: str = DEFAULT_NAME,
    *,
    fresh: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
) -> Cluster:
    """Run hack/cluster/up (builds first if needed) and return the running cluster."""
    args = [str(HACK_DIR / "up")] + (["--fresh"] if fresh else [])
    out = subprocess.run(
        args,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=_script_env(name, env),
        timeout=timeout,
    )
    kubeconfig = Path(out.stdout.strip().splitlines()[-1])
    return Cluster(name=name, kubeconfig=kubeconfig, bin_dir=bin_dir())


def down(name: str = DEFAULT_NAME, *, purge: bool = False, timeout: float = 120) -> None:
    """Run hack/cluster/down: stop every process of the cluster (and delete its state if purge)."""
    args = [str(HACK_DIR / "down")] + (["--purge"] if purge else [])
    subprocess.run(args, check=True, env=_script_env(name), timeout=timeout)


def cluster_dir(name: str = DEFAULT_NAME) -> Path:
    return cache_root() / name


def is_running(name: str = DEFAULT_NAME) -> bool:
    """True when every component of the named cluster runs (pid files verified against /proc)."""
    run = cluster_dir(name) / "run"
    components = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    for component in components:
        try:
            pid = int((run / f"{component}.pid").read_text().strip())
        except (OSError, ValueError):
            return False
        if pid not in component_pids(name):
            return False
    return True


def process_alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has closed its files and ports already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def component_pids(name: str = DEFAULT_NAME) -> set[int]:
    """Live processes of the named cluster: our binaries whose command line names its directory."""
    marker = str(cluster_dir(name)) + "/"
    binaries = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            exe = os.readlink(proc / "exe")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if not process_alive(int(proc.name)):
            continue
        if os.path.basename(exe) in binaries and marker in cmdline:
            pids.add(int(proc.name))
    return pids


def ensure_cluster(name: str = DEFAULT_NAME) -> Cluster:
    """The running cluster, started (from an empty state) when it is not running yet."""
    cluster = up(name, fresh=not is_running(name))
    cluster.wait_ready()
    return cluster


@contextlib.contextmanager
def cluster_session(name: str = DEFAULT_NAME) -> Iterator[Cluster]:
    """Bring the cluster up for a test session; leave it as found at exit.

    Stops it at exit only when this call started it, unless KUBEDISTILL_KEEP_CLUSTER=1.
    """
    started_here = not is_running(name)
    t0 = time.monotonic()
    cluster = ensure_cluster(name)
    cluster.up_seconds = time.monotonic() - t0
    try:
        yield cluster
    finally:
        if started_here and os.environ.get("KUBEDISTILL_KEEP_CLUSTER", "") not in ("1", "true"):
            down(name)


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.25,
    what: str = "condition",
) -> T:
    """Poll predicate until it returns something truthy; return that value.

    Exceptions from the predicate propagate (a 404 is the caller's to handle). On timeout,
    raises TimeoutError naming `what` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)
        last = predicate()
    return last


def hardened_container(
    name: str = "main",
    image: str = "registry.k8s.io/pause:3.10",
    **extra: Any,
) -> dict[str, Any]:
    """A container that passes the `restricted` Pod Security Standard."""
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    container.update(extra)
    return container


def hardened_pod_spec(containers: Sequence[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """A pod spec that passes the `restricted` Pod Security Standard."""
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": list(containers) if containers else [hardened_container()],
        "terminationGracePeriodSeconds": 0,
    }
    spec.update(extra)
    return spec


def gpu_pod_spec(gpus: int = 8, *, tolerate: bool = True, **extra: Any) -> dict[str, Any]:
    """A hardened pod spec for the H100 pool asking for `gpus` GPUs."""
    container = hardened_container(
        resources={"limits": {GPU_RESOURCE: str(gpus)}, "requests": {GPU_RESOURCE: str(gpus)}}
    )
    spec = hardened_pod_spec([container], nodeSelector=dict(H100_NODE_SELECTOR), **extra)
    if tolerate:
        spec["tolerations"] = [dict(GPU_TOLERATION)]
    return spec


def job_manifest(
    name: str,
    pod_spec: dict[str, Any],
    *,
    annotations: Mapping[str, str] | None = None,
    backoff_limit: int = 0,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A batch/v1 Job running pod_spec (restartPolicy Never unless set)."""
    spec = {"restartPolicy": "Never", **pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": dict(annotations or {}), "labels": dict(labels or {})},
                "spec": spec,
            },
        },
    }


@dataclass
class Cluster:
    """A running local cluster: its kubeconfig, binaries and API clients."""

    name: str
    kubeconfig: Path
    bin_dir: Path
    up_seconds: float | None = None

    @property
    def dir(self) -> Path:
        return self.kubeconfig.parent

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.bin_dir / "helm"

    def ports(self) -> dict[str, int]:
        """The loopback ports of the components: etcd_client, etcd_peer, apiserver, ..."""
        ports: dict[str, int] = {}
        for line in (self.dir / "ports.env").read_text().splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                ports[key] = int(value)
        return ports

    def pids(self) -> set[int]:
        return component_pids(self.name)

    def as_service_account(self, namespace: str, account: str, path: Path, duration: str = "15m") -> Cluster:
        """This cluster seen with a fresh token of ``namespace/account`` (a bearer token only, no admin)."""
        import yaml

        token = self.kubectl("-n", namespace, "create", "token", account, f"--duration={duration}").stdout.strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
        server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [server],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": account, "context": {"cluster": server["name"], "user": account}}],
            "current-context": account,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return dataclasses.replace(self, kubeconfig=path)

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with KUBECONFIG set and the cluster's bin dir (kubectl, helm) first on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    # --- clients -------------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A new kubernetes.client.ApiClient for this cluster (admin credentials)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api_client())

    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client())

    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client())

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the cluster's kubectl (same version as the API server) against this cluster."""
        proc = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, output=proc.stdout, stderr=proc.stderr)
        return proc

    def kubectl_json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, manifest: Mapping[str, Any] | str, namespace: str | None = None) -> str:
        """kubectl apply a manifest (dict or YAML/JSON text); returns kubectl's output."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns_args = ["-n", namespace] if namespace else []
        return self.kubectl(*ns_args, "apply", "-f", "-", input=text).stdout

    def ensure_nodes(self, h100: int = 2, cpu: int = 2, timeout: float = 120) -> None:
        """Make sure at least h100-0..h100-{h100-1} and cpu-0..cpu-{cpu-1} exist and are Ready.

        For benchmarks that want a bigger simulated pool than `up` creates; nodes are never removed.
        """
        nodes = subprocess.run(
            [str(HACK_DIR / "nodes"), str(h100), str(cpu)], check=True, capture_output=True, text=True
        ).stdout
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=nodes, timeout=timeout)
        self.wait_ready(timeout=timeout)

    # --- readiness and namespaces --------------------------------------------------------------

    def wait_ready(self, timeout: float = 120) -> None:
        """Every node Ready and the default namespace's ServiceAccount present."""
        core = self.core()

        def nodes_ready() -> bool:
            nodes = core.list_node().items
            return bool(nodes) and all(
                any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])) for n in nodes
            )

        wait_for(nodes_ready, timeout=timeout, what="all nodes Ready")
        wait_for(
            lambda: _exists(lambda: core.read_namespaced_service_account("default", "default")),
            timeout=timeout,
            what="default ServiceAccount",
        )

    @contextlib.contextmanager
    def new_namespace(
        self,
        prefix: str = "t",
        *,
        labels: Mapping[str, str] | None = None,
        pod_security: str | None = "restricted",
        wait_deleted: bool = False,
    ) -> Iterator[str]:
        """A fresh namespace, deleted afterwards.

        Labelled pod-security.kubernetes.io/{enforce,warn,audit}=restricted unless pod_security
        is None (or another level). Yields once its default ServiceAccount exists, so pods can
        be created at once.
        """
        from kubernetes.client.rest import ApiException

        stem = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:50] or "t"
        name = f"{stem}-{secrets.token_hex(3)}"
        ns_labels = {"kubedistill.io/test": "true", **(labels or {})}
        if pod_security:
            for mode in ("enforce", "warn", "audit"):
                ns_labels[f"pod-security.kubernetes.io/{mode}"] = pod_security
            ns_labels["pod-security.kubernetes.io/enforce-version"] = "latest"
        core = self.core()
        core.create_namespace({"metadata": {"name": name, "labels": ns_labels}})
        try:
            wait_for(
                lambda: _exists(lambda: core.read_namespaced_service_account("default", name)),
                timeout=60,
                what=f"default ServiceAccount in {name}",
            )
            yield name
        finally:
            try:
                core.delete_namespace(name, propagation_policy="Background")
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if wait_deleted:
                wait_for(
                    lambda: not _exists(lambda: core.read_namespace(name)),
                    timeout=120,
                    what=f"namespace {name} deleted",
                )


def _exists(read: Callable[[], Any]) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
