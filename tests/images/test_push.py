"""`hack/images push` for real: to a registry on this machine (CNCF Distribution, plain HTTP),
then the registry serves what was built and the printed values name it."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.images.conftest import Images
from tests.support.pods import HACK_IMAGES, Engine
from tests.support.registry import RegistryServer

pytestmark = pytest.mark.images


def test_push_tags_pushes_and_prints_the_values(engine: Engine, images: Images) -> None:
    tag = images.values["image"]["tag"]
    with RegistryServer() as registry:
        prefix = f"{registry.host}/kubedistill"
        proc = subprocess.run(
            [str(HACK_IMAGES), "push", "--base", "debian", "--registry", prefix, "--insecure", "operator"],
            capture_output=True,
            text=True,
            env=engine.env,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        values = yaml.safe_load(proc.stdout)
        assert values == {"image": {"repository": f"{prefix}/operator", "tag": tag}}
        # The registry serves the image that was built: same config (image ID), every layer.
        manifest = registry.manifest("kubedistill/operator", tag)
        local_id = engine("image", "inspect", "--format", "{{.Id}}", images.operator).stdout.strip()
        assert manifest["config"]["digest"] == f"sha256:{local_id}"
        assert len(manifest["layers"]) >= 2
    # The push only tagged the local image: nothing was rebuilt.
    pushed = f"{prefix}/operator:{tag}"
    assert engine("image", "inspect", "--format", "{{.Id}}", pushed).stdout.strip() == local_id
    engine("untag", images.operator, pushed)


def test_push_without_a_registry_is_refused(engine: Engine) -> None:
    proc = subprocess.run([str(HACK_IMAGES), "push", "operator"], capture_output=True, text=True, env=engine.env)
    assert proc.returncode != 0 and "push needs --registry" in proc.stderr
