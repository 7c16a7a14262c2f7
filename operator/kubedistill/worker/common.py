"""What every worker shares: config loading, the termination message, failure types.

A worker ends in one of three ways, and the operator reads which from the exit
code and ``/dev/termination-log``:

* success: exit 0, a one-line JSON summary (counts, metrics, digests);
* a known failure (``WorkerError``): exit 1, a one-line human reason that the
  operator copies into the DistillationJob's condition message;
* preemption (``Preempted``, after SIGTERM and a checkpoint): exit 143, so the
  Job controller's pod failure policy can tell it from a real failure.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubedistill.api.base import describe_validation_error
from kubedistill.api.worker_config import EXIT_FAILED as EXIT_FAILED  # the worker contract, re-exported
from kubedistill.api.worker_config import EXIT_INTERNAL as EXIT_INTERNAL
from kubedistill.api.worker_config import EXIT_PREEMPTED as EXIT_PREEMPTED
from kubedistill.api.worker_config import GRACE_SECONDS_ENV, TERMINATION_LOG

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096

log = logging.getLogger("kubedistill.worker")
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class WorkerError(Exception):
    """A failure with a reason a user can act on (bad input, gate miss, unreachable store)."""

    def termination_message(self) -> str | dict[str, Any]:
        """What the operator reads: one line of text, the condition message."""
        return str(self)


class StageStopped(WorkerError):
    """A failure the operator reports with its own condition reason (e.g. BudgetExceeded).

    The termination message is a JSON ``StageFailure`` (api/worker_config.py): the reason, the
    message, and what the stage spent, so that the status shows the spend even of a stopped stage.
    """

    def __init__(self, reason: str, message: str, payload: dict[str, Any]) -> None:
        super().__init__(message)
        self.reason = reason
        self.payload = payload

    def termination_message(self) -> str | dict[str, Any]:
        return self.payload


class Preempted(Exception):
    """SIGTERM arrived; state was saved and a restart resumes from it."""


def termination_log_path() -> Path:
    return Path(os.environ.get("KUBEDISTILL_TERMINATION_LOG", TERMINATION_LOG))


def write_termination_message(message: str | dict[str, Any]) -> None:
    """Write the one-line result the operator reads; never fails the worker itself."""
    text = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"), sort_keys=True)
    text = " ".join(text.split())  # one line, whatever the reason contained
    encoded = text.encode()[:TERMINATION_MESSAGE_LIMIT]
    try:
        termination_log_path().write_bytes(encoded)
    except OSError as err:  # outside a pod /dev/termination-log may not be writable
        log.debug("termination log not written: %s", err)


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Read a stage config file and validate it; errors name the field to fix."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise WorkerError(f"cannot read config {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise WorkerError(f"config {path} is not valid YAML: {err}") from err
    try:
        return model.model_validate(raw or {})
    except ValidationError as err:
        raise WorkerError(f"invalid config {path}: {describe_validation_error(err)}") from err


def configure_logging() -> None:
    level = os.environ.get("KUBEDISTILL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


class ExitDeadline:
    """The last resort against a worker that is done, or told to stop, and still does not exit.

    ``arm(seconds, ...)`` starts (or moves) a deadline; when it passes, every thread's stack
    goes to stderr (the pod log says where it hung), the termination message is replaced
    when a ``message`` is given, and the process ends with ``code`` at once (``os._exit``:
    no cleanup that could hang again). ``disarm()`` cancels it. The timer thread is a daemon,
    so it also fires while the interpreter waits for other threads at exit.
    """

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        # Off unless the worker runs as its own process (kubedistill-worker): a stage that a
        # test or bench runs in-process must never end the caller's process.
        self.enabled = False

    def arm(self, seconds: float, code: int, reason: str, message: str | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(seconds, self._expire, args=(seconds, code, reason, message))
            self._timer.daemon = True
            self._timer.name = "kubedistill-exit-deadline"
            self._timer.start()

    def disarm(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    @property
    def armed(self) -> bool:
        return self._timer is not None and self._timer.is_alive()

    def _expire(self, seconds: float, code: int, reason: str, message: str | None) -> None:
        log.error("exit deadline: %s, and the process did not end within %.0fs; stacks follow", reason, seconds)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if message is not None:
            write_termination_message(message)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


exit_deadline = ExitDeadline()


# Time a stage keeps after SIGTERM for what it must not lose, below the pod's grace period,
# so that the stage, not the kubelet's SIGKILL, says how it ended.
EXIT_MARGIN_SECONDS = 5.0
DEFAULT_GRACE_SECONDS = 30.0


def grace_seconds() -> float:
    """The pod's terminationGracePeriodSeconds, as the operator passes it (30 s, Kubernetes' default, if unset)."""
    try:
        return float(os.environ.get(GRACE_SECONDS_ENV, DEFAULT_GRACE_SECONDS))
    except ValueError:
        return DEFAULT_GRACE_SECONDS


def on_sigterm(saving: str) -> None:
    """Every stage's SIGTERM handler calls this: ``saving`` (what it finishes first) gets the grace period.

    Past it, the exit deadline ends the process as preempted, with a message saying so,
    before the kubelet's SIGKILL would end it without one.
    """
    budget = max(1.0, grace_seconds() - EXIT_MARGIN_SECONDS)
    exit_deadline.arm(
        budget,
        EXIT_PREEMPTED,
        f"SIGTERM while {saving}",
        f"Preempted: SIGTERM, and {saving} did not finish within {budget:.0f}s; a restart resumes from what was saved",
    )
