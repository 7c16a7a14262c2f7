"""hack/cluster/up and down on a second, throwaway cluster (issue 2, requirement 6).

It runs beside the session cluster (own name, directory and ports), so stopping it proves that
`down` leaves nothing behind without disturbing the other tests.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cluster import DEFAULT_NAME, cluster_dir, component_pids, down, is_running, process_alive, up

pytestmark = pytest.mark.cluster


def _listeners() -> list[tuple[str, int, set[int]]]:
    """(local address, port, owning pids) of every listening TCP socket."""
    out = subprocess.run(["ss", "-Hltnp"], check=True, capture_output=True, text=True).stdout
    result = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[3]
        addr, _, port = local.rpartition(":")
        pids = {int(p.split("=")[1]) for p in line.split(",") if p.startswith("pid=")}
        result.append((addr, int(port), pids))
    return result


def _processes_naming(path: str) -> list[str]:
    """Live processes whose command line mentions path (any binary, not only ours)."""
    found = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit() or int(proc) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{proc}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if path in cmdline:
            found.append(f"{proc}: {cmdline}")
    return found


def test_up_is_idempotent_and_down_leaves_no_process_or_port() -> None:
    timings: dict[str, float] = {}
    session_cluster_was_running = is_running(DEFAULT_NAME)
    name = f"lifecycle-{secrets.token_hex(3)}"
    small = {"KUBEDISTILL_H100_NODES": "1", "KUBEDISTILL_CPU_NODES": "1"}
    try:
        t0 = time.monotonic()
        cluster = up(name, fresh=True, env=small)
        timings["up_fresh"] = round(time.monotonic() - t0, 1)
        cluster.wait_ready()
        pids = cluster.pids()
        ports = cluster.ports()
        assert len(pids) == 5, pids  # etcd, apiserver, controller-manager, scheduler, kwok

        # Everything listens on loopback only, and only on the recorded ports.
        ours = [(addr, port) for addr, port, owners in _listeners() if owners & pids]
        assert ours, "no listening socket found for the cluster's processes"
        assert {addr for addr, _ in ours} == {"127.0.0.1"}, ours
        assert {port for _, port in ours} == set(ports.values())

        # A second `up` finds it running and changes nothing.
        t0 = time.monotonic()
        again = up(name, env=small)
        timings["up_again"] = round(time.monotonic() - t0, 1)
        assert again.kubeconfig == cluster.kubeconfig
        assert cluster.pids() == pids
        assert cluster.ports() == ports
        assert len(cluster.core().list_node().items) == 2
    finally:
        t0 = time.monotonic()
        down(name)
        timings["down"] = round(time.monotonic() - t0, 1)

    try:
        assert not component_pids(name)
        for pid in pids:
            assert not process_alive(pid), pid
        assert not _processes_naming(str(cluster_dir(name)) + "/")
        listening = {port for _, port, _ in _listeners()}
        assert not listening & set(ports.values())
        # The session cluster was not touched.
        assert is_running(DEFAULT_NAME) == session_cluster_was_running
    finally:
        down(name, purge=True)
    assert not cluster_dir(name).exists()
    print(f"lifecycle timings: {timings}")
