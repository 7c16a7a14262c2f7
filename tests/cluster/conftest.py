"""Fixtures for tests against the real local cluster (hack/cluster).

`cluster` (session): the cluster, brought up once per session (built first if needed) and
stopped at the end if this session started it, unless KUBEDISTILL_KEEP_CLUSTER=1.
`namespace` (function): a fresh namespace labelled pod-security.kubernetes.io/enforce=restricted,
deleted after the test.

While cluster tests run, the machine's load average is sampled; the terminal summary reports it
with the cluster's start time and the CPU time its processes used (numbers for the CI log).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, cluster_session

_report: dict[str, Any] = {}


def _cpu_seconds(pids: set[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while True:
            samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            if stop.wait(1.0):
                return

    with cluster_session() as running:
        _report["up_seconds"] = running.up_seconds
        cpu_before = _cpu_seconds(running.pids())
        t0 = time.monotonic()
        sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
        sampler.start()
        try:
            yield running
        finally:
            stop.set()
            sampler.join()
            _report["wall_seconds"] = time.monotonic() - t0
            _report["cluster_cpu_seconds"] = _cpu_seconds(running.pids()) - cpu_before
            _report["load"] = samples


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    with cluster.new_namespace(request.node.name) as name:
        yield name


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "wall_seconds" not in _report:
        return
    load = _report["load"] or [0.0]
    terminalreporter.write_sep("-", "kubedistill local cluster")
    terminalreporter.write_line(
        f"cluster ready in {_report['up_seconds']:.1f}s; tests ran {_report['wall_seconds']:.0f}s; "
        f"control plane + kwok used {_report['cluster_cpu_seconds']:.1f} CPU-s "
        f"({_report['cluster_cpu_seconds'] / max(_report['wall_seconds'], 1e-9):.2f} cores); "
        f"load1 min/mean/max {min(load):.2f}/{sum(load) / len(load):.2f}/{max(load):.2f} "
        f"on {os.cpu_count()} CPUs"
    )
