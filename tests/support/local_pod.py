"""Run the containers of a pod the operator renders as processes on this machine (no kubelet, no image).

    from tests.support.local_pod import container_argv, container_env

    argv = container_argv(container, config_dir)          # the image's entry point -> this venv's module
    env = container_env(container, secrets, scratch_dir)  # Secret keys looked up, /tmp -> scratch_dir

The images' entry points are this repository's modules (``kubedistill-worker`` ->
``python -m kubedistill.worker``) and vLLM's server module (``python3 -m vllm...``), so a
rendered container runs here with its own arguments and environment. What a kubelet would
provide is mapped: files mounted under the worker config directory come from ``config_dir``,
``/tmp`` (an emptyDir in every pod) is ``scratch_dir``, Secret keys come from ``secrets``, and
``0.0.0.0`` binds ``127.0.0.1`` (a shared machine).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import CONFIG_DIR


def container_env(container: Mapping[str, Any], secrets: Mapping[str, str], scratch_dir: Path) -> dict[str, str]:
    """The container's environment here (plus PATH and PYTHONPATH, which the image would set)."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for item in container.get("env", []):
        if "value" in item:
            value = str(item["value"])
            env[item["name"]] = str(scratch_dir) + value[len("/tmp") :] if value.startswith("/tmp") else value
        else:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
    return env


def container_argv(container: Mapping[str, Any], config_dir: Path) -> list[str]:
    """The container's command and arguments as a local process."""
    command = [str(a) for a in [*container["command"], *container.get("args", [])]]
    if command[0] == "kubedistill-worker":
        command = [sys.executable, "-m", "kubedistill.worker", *command[1:]]
    elif command[0] == "python3":
        command[0] = sys.executable
    command = [arg.replace(CONFIG_DIR, str(config_dir)) for arg in command]
    return ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in command]
