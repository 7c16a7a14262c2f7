"""The image build's pure parts, without an engine: requirements from pyproject.toml, the chart
values hack/images prints, and the Dockerfiles' contract with the chart and the operator.

tests/images/ builds the images and runs them for real.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

from kubedistill import __version__
from kubedistill.api.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCHEMA = json.loads((ROOT / "charts" / "kubedistill" / "values.schema.json").read_text())
DOCKERFILES = {name: (ROOT / "images" / name / "Dockerfile").read_text() for name in ("operator", "worker")}


def requirements(*extras: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "images" / "requirements.py"
    return subprocess.run(
        [sys.executable, str(script), str(ROOT / "pyproject.toml"), *extras], capture_output=True, text=True
    )


def values(*args: str) -> dict[str, object]:
    out = subprocess.run([str(ROOT / "hack" / "images"), "values", *args], capture_output=True, text=True, check=True)
    loaded: dict[str, object] = yaml.safe_load(out.stdout)
    return loaded


def test_requirements_are_the_dependencies_and_the_extras() -> None:
    operator = requirements()
    assert operator.returncode == 0 and operator.stdout.splitlines() == PROJECT["dependencies"]
    worker = requirements("worker", "serve-cpu").stdout.splitlines()
    extras = PROJECT["optional-dependencies"]
    assert worker == PROJECT["dependencies"] + extras["worker"] + extras["serve-cpu"]
    assert not any(line.startswith("torch") for line in operator.stdout.splitlines()), "the operator image has no torch"


def test_requirements_refuse_an_unknown_extra() -> None:
    proc = requirements("worker", "gpu")
    assert proc.returncode != 0 and "no extra ['gpu']" in proc.stderr


def test_printed_values_are_valid_chart_values() -> None:
    printed = values("--registry", "registry.example.com/ml/", "--tag", "1.2.3", "operator", "worker-cpu")
    assert printed == {
        "image": {"repository": "registry.example.com/ml/operator", "tag": "1.2.3"},
        "settings": {
            "workerImage": "registry.example.com/ml/worker:1.2.3-cpu",
            "vllmImage": "registry.example.com/ml/worker:1.2.3-cpu",
        },
    }
    validator = jsonschema.Draft7Validator(SCHEMA)
    assert [e.message for e in validator.iter_errors(printed)] == []
    settings = OperatorSettings.model_validate(printed["settings"])
    assert settings.worker_image == settings.vllm_image == "registry.example.com/ml/worker:1.2.3-cpu"


def test_values_prefer_the_cuda_worker_and_default_to_the_project_version() -> None:
    printed = values("worker", "worker-cpu", "operator")
    assert printed["image"] == {"repository": "localhost/kubedistill/operator", "tag": __version__}
    assert printed["settings"] == {
        "workerImage": f"localhost/kubedistill/worker:{__version__}",
        "vllmImage": f"localhost/kubedistill/worker:{__version__}",
    }


def test_an_unknown_image_is_refused() -> None:
    proc = subprocess.run([str(ROOT / "hack" / "images"), "values", "workr"], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown image 'workr' (operator, worker, worker-cpu)" in proc.stderr


def test_dockerfiles_take_their_base_and_run_as_the_pods_user() -> None:
    user = OperatorSettings().security.run_as_user
    chart = yaml.safe_load((ROOT / "charts" / "kubedistill" / "values.yaml").read_text())
    assert chart["operator"]["podSecurityContext"]["runAsUser"] == user
    for name, text in DOCKERFILES.items():
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert re.fullmatch(r"ARG BASE_IMAGE=\S+", lines[0]), f"{name}: the first instruction declares BASE_IMAGE"
        froms = [line for line in lines if line.startswith("FROM")]
        assert froms == ["FROM ${BASE_IMAGE} AS requirements", "FROM ${BASE_IMAGE}"], name
        assert f"USER {user}:{user}" in lines, name
        assert f"useradd --uid {user}" in text, name
    # The defaults are the public images users expect (hack/images --base overrides them).
    assert "\nARG BASE_IMAGE=python:3.11-slim\n" in DOCKERFILES["operator"]
    assert "\nARG BASE_IMAGE=nvidia/cuda:" in DOCKERFILES["worker"]
