"""Start and stop real server processes for tests: free ports, process groups, readiness waits.

    from tests.support.procs import ManagedProcess, free_port, wait_for_http

    port = free_port()
    proc = ManagedProcess(["server", "--port", str(port)], log_path=tmp / "server.log").start()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        ...
    finally:
        proc.stop()

Every process runs in its own session (process group), and `stop()` signals the whole group:
servers that fork workers (vLLM's engine core) leave nothing behind. An `atexit` hook stops
whatever is still running when the interpreter exits, and each server gets SIGTERM from the
kernel if the test process dies without exiting (SIGKILL): an aborted run leaks no servers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubedistill.local.processes import die_with_parent

_RUNNING: set[ManagedProcess] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0).

    Another process can take it before the server binds it; `ManagedProcess` users retry
    when the server dies at start for that reason (rare on a test machine).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: str | os.PathLike[str], lines: int = 60) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class ProcessFailed(RuntimeError):
    """A managed server died or did not become ready; the message carries its log tail."""


class ManagedProcess:
    """A child process in its own process group, its stdout+stderr going to `log_path`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                # atexit does not run when pytest is killed (a CI timeout): the kernel's SIGTERM does.
                # It follows the spawning *thread*: start long-lived processes from the main thread.
                preexec_fn=die_with_parent,
            )
        _RUNNING.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def failure(self, what: str, lines: int = 60) -> ProcessFailed:
        rc = self.popen.poll() if self.popen else None
        state = f"exited with {rc}" if rc is not None else "still running"
        return ProcessFailed(f"{self.name} {what} ({state}); log {self.log_path}, last lines:\n{self.log_tail(lines)}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds. Idempotent."""
        _RUNNING.discard(self)
        if self.popen is None:
            return
        pgid = self.popen.pid  # session leader: its pid is the group id
        if self.popen.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Children may outlive the leader (or ignore SIGTERM): sweep the group either way.
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def __enter__(self) -> ManagedProcess:
        return self.start() if self.popen is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group of only zombies still answers signal 0; look for a live member.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@atexit.register
def _stop_all() -> None:
    for proc in list(_RUNNING):
        proc.stop(timeout=5)


def wait_for_http(
    url: str,
    *,
    timeout: float,
    proc: ManagedProcess | None = None,
    interval: float = 0.2,
) -> float:
    """Poll `url` until it answers 2xx; return the seconds waited.

    Raises `ProcessFailed` (with the server's log tail) when `proc` exits first or the
    timeout passes.
    """
    start = time.monotonic()
    last_error = "no attempt"
    while True:
        if proc is not None and not proc.alive():
            raise proc.failure(f"exited before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if 200 <= resp.status < 300:
                    return time.monotonic() - start
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last_error = str(e)
        if time.monotonic() - start > timeout:
            if proc is not None:
                raise proc.failure(f"not ready at {url} after {timeout:.0f}s ({last_error})")
            raise ProcessFailed(f"{url} not ready after {timeout:.0f}s ({last_error})")
        time.sleep(interval)
