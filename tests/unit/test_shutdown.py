"""Nothing finishes and then hangs: the building blocks that bound every shutdown.

* ``wait_event`` (the generate flusher's wait) keeps a cancellation that arrives in the same
  loop turn as the event; ``asyncio.wait_for`` on Python 3.11 drops it, which is how a
  finished generate worker once looped forever instead of exiting.
* The exit deadline ends a worker process that is done but cannot exit, with a stack dump
  and the exit code it was given; after SIGTERM it ends the process as preempted, with a
  message saying so, before the kubelet's SIGKILL would.
* Local mode's children die with their parent: SIGTERM/SIGHUP unwind the parent so it stops
  them, and a SIGKILLed parent's children get SIGTERM from the kernel.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubedistill.worker.teacher.online import settle, wait_event

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the generate flusher's wait


@pytest.mark.parametrize("turns", range(6))
async def test_wait_event_keeps_a_cancellation_that_arrives_with_the_event(turns):
    event = asyncio.Event()
    loops = 0

    async def flusher() -> None:
        nonlocal loops
        while loops < 100:  # the bug was an endless loop; 100 turns is proof enough of it
            loops += 1
            await wait_event(event, 0.05)
            event.clear()

    task = asyncio.create_task(flusher())
    await asyncio.sleep(0.01)
    event.set()
    for _ in range(turns):  # every interleaving of "the event wakes the waiter" and "cancel"
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert loops < 5


async def test_wait_event_reports_set_and_timeout():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True


async def test_settle_never_waits_past_its_deadline(caplog):
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # a task that swallows every cancellation

    task = asyncio.create_task(stubborn(), name="stubborn-task")
    await asyncio.sleep(0)
    task.cancel()
    started = time.monotonic()
    await settle([task], 0.3, "test shutdown")
    assert time.monotonic() - started < 2
    assert not task.done()
    assert "stubborn-task" in caplog.text and "abandoned" in caplog.text
    # Clean up the stubborn task for the test's own loop.
    task.get_coro().close()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the exit deadline


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_exit_deadline_ends_a_process_that_cannot_exit(tmp_path):
    started = time.monotonic()
    result = _python(
        """
        import threading, time
        from kubedistill.worker.common import exit_deadline
        exit_deadline.enabled = True
        threading.Thread(target=lambda: time.sleep(3600), name="never-ends").start()  # not a daemon
        exit_deadline.arm(0.5, 7, "the stage ended")
        """
    )
    assert result.returncode == 7, result.stderr
    assert time.monotonic() - started < 20
    assert "exit deadline: the stage ended" in result.stderr
    assert "never-ends" in result.stderr or "Thread" in result.stderr  # every thread's stack is dumped


def test_exit_deadline_is_off_in_process_and_disarms():
    result = _python(
        """
        import time
        from kubedistill.worker.common import exit_deadline
        exit_deadline.arm(0.2, 7, "in-process: never fires")
        exit_deadline.enabled = True
        exit_deadline.arm(0.3, 8, "disarmed in time")
        exit_deadline.disarm()
        time.sleep(0.8)
        print("exited normally")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "exited normally" in result.stdout


def test_sigterm_gives_the_stage_its_grace_then_exits_preempted(tmp_path):
    termination_log = tmp_path / "termination-log"
    result = _python(
        """
        import time
        from kubedistill.worker.common import exit_deadline, on_sigterm
        exit_deadline.enabled = True
        on_sigterm("a checkpoint uploads")
        time.sleep(60)  # the upload hangs
        """,
        env={"KUBEDISTILL_GRACE_SECONDS": "6", "KUBEDISTILL_TERMINATION_LOG": str(termination_log)},
    )
    assert result.returncode == 143, result.stderr
    message = termination_log.read_text()
    assert message.startswith("Preempted: SIGTERM, and a checkpoint uploads did not finish within 1s"), message


def test_worker_exits_after_its_stage_even_with_a_thread_left_running(tmp_path, monkeypatch):
    """``kubedistill-worker`` itself: a stage that returns but leaves a non-daemon thread behind still exits."""
    termination_log = tmp_path / "termination-log"
    result = _python(
        """
        import sys, threading, time
        from kubedistill.worker import __main__ as entry
        entry.EXIT_AFTER_STAGE_SECONDS = 0.5
        def leaky(stage, path):
            threading.Thread(target=lambda: time.sleep(3600)).start()
            return 0
        entry.run_stage = leaky
        sys.exit(entry.main(["fetch", "--config", "unused.yaml"]))
        """,
        env={"KUBEDISTILL_TERMINATION_LOG": str(termination_log)},
    )
    assert result.returncode == 0, result.stderr
    assert "exit deadline: fetch ended with exit code 0" in result.stderr


# --------------------------------------------------------------------------- local mode's children


PARENT = """
import subprocess, sys, time
from kubedistill.local.processes import Stopped, die_with_parent, stop_signals, terminate
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], preexec_fn=die_with_parent)
try:
    with stop_signals():
        print(child.pid, flush=True)  # ready: the handlers are in place
        try:
            child.wait()
        finally:
            terminate(child, 5)
except Stopped as stop:
    print("stopped", stop.signum, flush=True)
    sys.exit(stop.exit_code)
"""


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_children_end_when_their_parent_is_stopped_by_any_signal(sig):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, sig)  # the parent alone, as a process manager or `timeout` does
        parent.wait(20)
        assert _gone(child, 10), f"child {child} outlived its parent stopped by {sig.name}"
        if sig != signal.SIGKILL:
            assert parent.returncode == 128 + sig
    finally:
        if parent.poll() is None:
            parent.kill()
