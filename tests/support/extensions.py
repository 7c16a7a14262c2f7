"""The released CRDs of the serving integrations, installed into (and removed from) the local cluster.

hack/cluster/extension-crds fetches them (pinned in hack/cluster/versions.env, checked against
hack/cluster/extension-crds.sha256) from each project's Go module:

    from tests.support.extensions import install, uninstall
    install(cluster, "keda")            # ScaledObject
    install(cluster, "prometheus")      # PodMonitor, ServiceMonitor
    install(cluster, "inference")       # InferencePool, InferenceObjective
    uninstall(cluster, "keda")          # the CRD goes, and with it every ScaledObject

A cluster starts without them: tests that install one remove it again, so that the other
tests see a cluster without the integration.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.support.cluster import HACK_DIR, Cluster, wait_for

COMPONENTS: dict[str, tuple[str, ...]] = {
    "keda": ("scaledobjects.keda.sh",),
    "prometheus": ("podmonitors.monitoring.coreos.com", "servicemonitors.monitoring.coreos.com"),
    "inference": ("inferencepools.inference.networking.k8s.io", "inferenceobjectives.inference.networking.x-k8s.io"),
}


def crd_dir(component: str) -> Path:
    """The directory of one component's CRD files (fetched on first use)."""
    out = subprocess.run([str(HACK_DIR / "extension-crds")], check=True, capture_output=True, text=True)
    root = Path(out.stdout.strip().splitlines()[-1])
    [directory] = root.glob(f"{component}-v*")
    return directory


def install(cluster: Cluster, component: str, timeout: float = 60) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_dir(component)))
    for name in COMPONENTS[component]:
        wait_for(lambda name=name: _established(cluster, name), timeout=timeout, what=f"CRD {name}")


def uninstall(cluster: Cluster, component: str, timeout: float = 60) -> None:
    for name in COMPONENTS[component]:
        cluster.kubectl("delete", "crd", name, "--ignore-not-found", "--wait=true", f"--timeout={int(timeout)}s")


def _established(cluster: Cluster, name: str) -> bool:
    crd: dict[str, Any] = cluster.kubectl_json("get", "crd", name)
    conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
    return conditions.get("Established") == "True"
