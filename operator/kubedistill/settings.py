"""Operator settings: cluster-wide defaults a platform team sets once (the Helm values).

A DistillationJob says *what* to distil; these settings say how pods look on this cluster
when the job does not: the GPU pool (the H100 node selector, the ``nvidia.com/gpu``
toleration, GPUs per node), images, the memory-backed /dev/shm, pod security, which
namespaces the operator watches, and how hard it may push the API server.

Sources, later ones win:

1. the defaults below (they describe an H100 pool labelled by the NVIDIA GPU operator);
2. a YAML file, camelCase keys as in the Helm chart: ``kubedistill operator --settings FILE``
   or ``KUBEDISTILL_SETTINGS=FILE``;
3. a few environment variables for the knobs people change by hand:
   ``KUBEDISTILL_NAMESPACES`` (comma-separated; empty = every namespace),
   ``KUBEDISTILL_WORKER_IMAGE``, ``KUBEDISTILL_VLLM_IMAGE``.

Example file::

    namespaces: [ml-team]
    workerImage: registry.example.com/kubedistill/worker:0.1.0
    gpuPool:
      nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
      gpusPerNode: 8
    stagePodAnnotations:
      train: {cluster-autoscaler.kubernetes.io/safe-to-evict: "false"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from kubedistill.api.settings import OperatorSettings

__all__ = ["SETTINGS_ENV", "load_settings"]

SETTINGS_ENV = "KUBEDISTILL_SETTINGS"


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> OperatorSettings:
    """Defaults, then the YAML file (``path`` or $KUBEDISTILL_SETTINGS), then environment overrides."""
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    file = path or env.get(SETTINGS_ENV)
    if file:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"settings file {file} must hold a mapping, not {type(loaded).__name__}")
        raw.update(loaded)
    if "KUBEDISTILL_NAMESPACES" in env:
        raw["namespaces"] = [ns.strip() for ns in env["KUBEDISTILL_NAMESPACES"].split(",") if ns.strip()]
    if env.get("KUBEDISTILL_WORKER_IMAGE"):
        raw["workerImage"] = env["KUBEDISTILL_WORKER_IMAGE"]
    if env.get("KUBEDISTILL_VLLM_IMAGE"):
        raw["vllmImage"] = env["KUBEDISTILL_VLLM_IMAGE"]
    return OperatorSettings.model_validate(raw)
