"""Child processes that never outlive kubedistill, however it is stopped.

Local mode starts worker processes and a vLLM server; the tests start S3, vLLM and
fault servers. Each must end with its parent, by any signal:

* ``die_with_parent`` (the child's ``preexec_fn``): the kernel sends the child SIGTERM
  when the process that started it dies, even by SIGKILL, where no handler runs.
* ``stop_signals()``: SIGTERM and SIGHUP become a ``Stopped`` exception in the main
  thread, as Ctrl-C becomes KeyboardInterrupt, so every ``finally`` that stops a child
  runs. A terminal's Ctrl-C signals the whole foreground group; a process manager,
  ``timeout`` or a CI runner signals only the parent, which then stops its children.
* ``terminate(proc)``: SIGTERM (the whole process group for a session leader), then
  SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from types import FrameType

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def die_with_parent() -> None:
    """``preexec_fn`` of every child: SIGTERM from the kernel when the parent dies (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # Once: a second signal while the children are being stopped must not cut that short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Stopped`` in the main thread (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def terminate(proc: subprocess.Popen[bytes], grace: float = 15.0, *, group: bool = False) -> int | None:
    """SIGTERM ``proc`` (its whole process group with ``group``), SIGKILL after ``grace`` s; its exit code."""
    if proc.poll() is not None:
        return proc.returncode

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        return proc.wait()
