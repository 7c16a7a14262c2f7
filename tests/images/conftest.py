"""Fixtures of the images tier: both images built here, and the engine that runs them.

`images` (session): `hack/images build --base debian operator worker-cpu`, the same command a
developer runs: the first build on a machine bootstraps the Debian base and installs everything
(minutes), later ones find every layer cached (seconds). Its output lands in the log on failure.
`engine` (session): podman (or docker) with hack/images' configuration for this machine;
`hack/images setup` installs podman, runc, mmdebstrap, containerd and the CNI plugins when missing.
`s3`, `cluster`, `namespace`: the worker and cluster tiers' fixtures.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest
import yaml

from tests.cluster.conftest import cluster, namespace
from tests.support.pods import HACK_IMAGES, Engine
from tests.support.s3 import shared_s3_server

__all__ = ["cluster", "engine", "images", "namespace", "s3"]


@dataclass(frozen=True)
class Images:
    operator: str
    worker: str
    build_seconds: float
    values: dict[str, object]


@pytest.fixture(scope="session")
def engine() -> Engine:
    # podman, runc and mmdebstrap from Debian's packages when missing (root), as CI needs them.
    setup = subprocess.run([str(HACK_IMAGES), "setup"], capture_output=True, text=True, timeout=1200)
    if setup.returncode != 0:
        pytest.fail(f"hack/images setup failed:\n{setup.stderr[-3000:]}", pytrace=False)
    found = Engine.from_hack()
    found.remove_orphans()
    return found


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    started = time.monotonic()
    proc = subprocess.run(
        [str(HACK_IMAGES), "build", "--base", "debian", "operator", "worker-cpu"],
        capture_output=True,
        text=True,
        env=engine.env,
        timeout=3600,
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/images build failed ({proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    values = yaml.safe_load(proc.stdout)
    repository, tag = values["image"]["repository"], values["image"]["tag"]
    return Images(
        operator=f"{repository}:{tag}",
        worker=values["settings"]["workerImage"],
        build_seconds=time.monotonic() - started,
        values=values,
    )


@pytest.fixture(scope="session")
def s3():
    return shared_s3_server()
