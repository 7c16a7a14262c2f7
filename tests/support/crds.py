"""Install the generated CRDs (crds/) into the local cluster and wait until they serve.

from tests.support.crds import install_crds
install_crds(cluster)     # idempotent: server-side apply, then Established + NamesAccepted
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO_ROOT / "crds"
CRD_NAMES = ("distillationjobs.kubedistill.io", "distilledmodels.kubedistill.io")
FIELD_MANAGER = "kubedistill-tests"


def install_crds(cluster: Cluster, timeout: float = 60) -> None:
    """Apply crds/*.yaml (server-side, so repeated and concurrent installs agree) and wait."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}", "-f", str(CRDS_DIR)
    )
    for name in CRD_NAMES:
        wait_for(lambda name=name: _serving(cluster, name), timeout=timeout, what=f"CRD {name} established")


def _serving(cluster: Cluster, name: str) -> bool:
    crd: dict[str, Any] = cluster.kubectl_json("get", "crd", name)
    conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
    return conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True"
