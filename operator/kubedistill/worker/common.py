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

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubedistill.api.base import describe_validation_error
from kubedistill.api.worker_config import TERMINATION_LOG

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
EXIT_FAILED = 1
EXIT_PREEMPTED = 143

log = logging.getLogger("kubedistill.worker")
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class WorkerError(Exception):
    """A failure with a reason a user can act on (bad input, gate miss, unreachable store)."""


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
