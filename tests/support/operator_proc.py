"""Run the real operator (`python -m kubedistill operator`) against the local test cluster.

    from tests.support.operator_proc import OperatorProcess

    with OperatorProcess(cluster, namespace, settings={...}, log_dir=tmp_path) as op:
        ...                      # the operator reconciles `namespace` only
        op.kill()                # SIGKILL, as a node failure would
        op.start()               # a fresh process resumes from what it finds

Test modules take the fixtures by assignment (``crds = operator_proc.crds``,
``start_operator = operator_proc.start_operator``) and look at a DistillationJob through
``Run``.

One operator per test, watching only the test's namespace: tests do not see each other's
resources, and each may give the operator its own settings (e.g. pod annotations that tell
kwok how a stage's pod ends). The log is kept in `log_dir` and its tail is printed when a
wait fails.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import ANN_MESSAGE, Cluster, wait_for
from tests.support.crds import install_crds
from tests.support.djobs import evaluate_result, generate_result, train_result
from tests.support.procs import ManagedProcess, free_port, wait_for_http

REPO_ROOT = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """One operator process at a time; `start()` again after `kill()`/`stop()` for a restart."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str | None,
        *,
        log_dir: Path,
        settings: Mapping[str, Any] | None = None,
        log_level: str = "INFO",
        args: Sequence[str] = (),
        log_name: str = "operator.log",
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_dir = log_dir
        self.settings = dict(settings or {})
        self.log_level = log_level
        self.args = list(args)
        self.log_name = log_name
        self.proc: ManagedProcess | None = None
        self.starts = 0
        self.port = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / self.log_name

    @property
    def url(self) -> str:
        """Base URL of the operator's /metrics, /healthz and /readyz."""
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, timeout: float = 60, settings: Mapping[str, Any] | None = None, *, ready: bool = True
    ) -> OperatorProcess:
        """Start it and wait until it reconciles (``ready``), or only until it answers (a standby replica)."""
        if settings is not None:
            self.settings = dict(settings)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.log_dir / f"settings-{self.log_name}-{self.starts}.yaml"
        settings_file.write_text(yaml.safe_dump(self.settings))
        self.port = free_port()
        argv = [
            sys.executable, "-m", "kubedistill", "operator",
            "--settings", str(settings_file),
            "--metrics-host", "127.0.0.1",
            "--metrics-port", str(self.port),
            "--log-level", self.log_level,
            *self.args,
        ]  # fmt: skip
        if self.namespace:
            argv += ["--namespace", self.namespace]
        env = self.cluster.env(PYTHONPATH=str(REPO_ROOT / "operator"))
        with open(self.log_path, "a") as log:
            log.write(f"---- start {self.starts}: {' '.join(argv)}\n")
        self.proc = ManagedProcess(argv, log_path=self.log_path, env=env, cwd=REPO_ROOT, name="operator").start()
        self.starts += 1
        wait_for_http(f"{self.url}/{'readyz' if ready else 'healthz'}", timeout=timeout, proc=self.proc)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as 'name{label="v",...}' -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; whatever was in flight is lost."""
        assert self.proc is not None and self.proc.popen is not None
        os.kill(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> OperatorProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- fixtures and helpers

GROUP, VERSION, PLURAL = "kubedistill.io", "v1alpha1", "distillationjobs"
OK = {
    "generate": {ANN_MESSAGE: generate_result()},
    "train": {ANN_MESSAGE: train_result()},
    "evaluate": {ANN_MESSAGE: evaluate_result(0.97)},
}
H100 = "NVIDIA-H100-80GB-HBM3"

OperatorFactory = Callable[..., OperatorProcess]


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    install_crds(cluster)


@pytest.fixture
def start_operator(
    cluster: Cluster, namespace: str, crds: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorFactory]:
    """Operators for the test's namespace; when the test fails, their log tails go to its report."""
    started: list[OperatorProcess] = []

    def start(
        stages: dict[str, dict[str, str]] | None = None,
        *,
        args: Sequence[str] = (),
        ready: bool = True,
        **settings: Any,
    ) -> OperatorProcess:
        annotations = {**OK, **(stages or {})}
        settings = {"stagePodAnnotations": annotations, **settings}
        op = OperatorProcess(
            cluster, namespace, log_dir=tmp_path, settings=settings, args=args, log_name=f"operator-{len(started)}.log"
        )
        started.append(op)
        return op.start(ready=ready)

    yield start
    for op in started:
        op.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for op in started:
            sys.stderr.write(f"---- {op.log_path.name}, last lines:\n{op.tail(80)}\n")


class Run:
    """One DistillationJob in the test namespace, and the ways to look at it."""

    def __init__(self, cluster: Cluster, namespace: str, name: str, op: OperatorProcess | None = None) -> None:
        self.cluster, self.namespace, self.name, self.op = cluster, namespace, name, op
        self.custom, self.batch, self.core = cluster.custom(), cluster.batch(), cluster.core()

    def apply(self, manifest: dict[str, Any]) -> Run:
        self.cluster.apply(manifest, namespace=self.namespace)
        return self

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return obj

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status().get("conditions", []) if c["type"] == type_)

    def wait(self, check: Callable[[dict[str, Any]], Any], what: str, timeout: float = 90) -> dict[str, Any]:
        try:
            wait_for(lambda: check(self.status()), timeout=timeout, interval=0.5, what=what)
        except TimeoutError as err:
            log = self.op.tail(80) if self.op else ""
            raise AssertionError(
                f"{err}\nstatus: {json.dumps(self.status(), indent=1)}\noperator log:\n{log}"
            ) from None
        return self.status()

    def wait_phase(self, phase: str, timeout: float = 90) -> dict[str, Any]:
        return self.wait(lambda s: s.get("phase") == phase, f"{self.name} phase {phase}", timeout)

    def jobs(self) -> list[Any]:
        items: list[Any] = self.batch.list_namespaced_job(
            self.namespace, label_selector=f"kubedistill.io/job={self.name}"
        ).items
        return items

    def jobs_by_stage(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for job in self.jobs():
            out.setdefault(job.metadata.labels["kubedistill.io/stage"], []).append(job.metadata.name)
        return {k: sorted(v) for k, v in out.items()}

    def pods(self, stage: str) -> list[Any]:
        items: list[Any] = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"kubedistill.io/job={self.name},kubedistill.io/stage={stage}"
        ).items
        return items

    def events(self) -> list[Any]:
        events = self.core.list_namespaced_event(self.namespace, field_selector=f"involvedObject.name={self.name}")
        items: list[Any] = sorted(events.items, key=lambda e: e.metadata.creation_timestamp)
        return items
