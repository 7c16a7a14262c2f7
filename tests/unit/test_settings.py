"""Operator settings: H100 pool defaults, YAML file, environment overrides, typos refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kubedistill.api.settings import OperatorSettings
from kubedistill.settings import load_settings


def test_defaults_describe_an_h100_pool() -> None:
    settings = OperatorSettings()
    assert settings.gpu_pool.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    [toleration] = settings.gpu_pool.tolerations
    assert toleration.to_wire() == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert settings.gpu_pool.gpus_per_node == 8
    assert settings.namespaces == []
    assert settings.security.run_as_user != 0


def test_yaml_file_then_environment(tmp_path: Path) -> None:
    file = tmp_path / "settings.yaml"
    file.write_text(
        "namespaces: [a, b]\n"
        "workerImage: registry.example/worker:1\n"
        "gpuPool: {gpusPerNode: 4, shmSize: 16Gi}\n"
        "stagePodAnnotations: {train: {x/y: z}}\n"
    )
    settings = load_settings(file, environ={"KUBEDISTILL_NAMESPACES": "ml, ops", "KUBEDISTILL_VLLM_IMAGE": "v:2"})
    assert settings.namespaces == ["ml", "ops"]
    assert settings.worker_image == "registry.example/worker:1"
    assert settings.vllm_image == "v:2"
    assert settings.gpu_pool.gpus_per_node == 4
    assert settings.gpu_pool.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert settings.stage_pod_annotations == {"train": {"x/y": "z"}}


def test_settings_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text("logLevel: DEBUG\n")
    assert load_settings(environ={"KUBEDISTILL_SETTINGS": str(file)}).log_level == "DEBUG"


@pytest.mark.parametrize("text", ["gpuPool: {gpusPerNod: 4}\n", "stagePodAnnotations: {fetch: {}}\n", "- a\n"])
def test_typos_are_refused(tmp_path: Path, text: str) -> None:
    file = tmp_path / "s.yaml"
    file.write_text(text)
    with pytest.raises((ValidationError, ValueError)):
        load_settings(file, environ={})
