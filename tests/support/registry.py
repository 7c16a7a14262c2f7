"""A real OCI registry for tests: CNCF Distribution (`registry`), plain HTTP on 127.0.0.1.

The binary is built once from the Go module proxy by `hack/registry/build` (cached under
~/.cache/kubedistill/registry); its storage is a directory removed at stop().

    from tests.support.registry import RegistryServer

    with RegistryServer() as registry:
        registry.host                                  # 127.0.0.1:PORT (image references start with it)
        registry.manifest("kubedistill/operator", "0.1.0")
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import ManagedProcess, ProcessFailed, free_port, wait_for_http

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def registry_binary() -> Path:
    out = subprocess.run(
        [str(REPO_ROOT / "hack" / "registry" / "build")], check=True, capture_output=True, text=True, timeout=1800
    )
    return Path(out.stdout.strip().splitlines()[-1])


class RegistryServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="registry-"))
        self.port: int | None = None
        self.proc: ManagedProcess | None = None

    @property
    def host(self) -> str:
        assert self.port is not None, "not started"
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> RegistryServer:
        binary = registry_binary()
        for attempt in range(3):
            port = free_port()
            config = self.root / "config.yml"
            config.write_text(
                json.dumps(  # YAML is a superset of JSON
                    {
                        "version": 0.1,
                        "log": {"level": "warn"},
                        "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
                        "http": {"addr": f"127.0.0.1:{port}"},
                    }
                )
            )
            proc = ManagedProcess(
                [str(binary), "serve", str(config)], log_path=self.root / "registry.log", name="registry"
            ).start()
            try:
                wait_for_http(f"http://127.0.0.1:{port}/v2/", timeout=timeout, proc=proc)
            except ProcessFailed:
                proc.stop()
                if attempt == 2:
                    raise
                continue
            self.port, self.proc = port, proc
            return self
        raise AssertionError("unreachable")

    def manifest(self, repository: str, reference: str) -> dict[str, Any]:
        """The image manifest the registry serves for repository:reference."""
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repository}/manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
