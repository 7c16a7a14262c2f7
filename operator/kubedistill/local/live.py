"""Local mode's live progress: the running stage's latest report, on one line.

The worker writes its ``StageProgress`` to a file (the config's ``progress.file``, local mode's
stand-in for the DistillationJob's progress ConfigMap); ``kubedistill local run`` reads it while
it waits for the worker and shows the same fields ``kubectl get dj`` would:

    generate  41%  612/1,500 answers, 118/s, ETA 8s

On a terminal the line is redrawn in place; in a pipe or a log (CI, ``| tee``) a new line is
printed for every new report, so the output stays readable as plain text.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from kubedistill.api.worker_config import StageProgress


class LiveProgress:
    """Shows each new report of one stage's progress file."""

    def __init__(
        self, path: Path | None, stage: str, echo: Callable[[str], None], stream: IO[str] | None = None
    ) -> None:
        self.path = path
        self.stage = stage
        self.echo = echo
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _isatty(self.stream)
        self.shown: StageProgress | None = None
        self.lines = 0  # reports shown (a test reads it)

    def poll(self) -> None:
        report = self._read()
        if report is None:
            return
        if self.shown is not None and report.done == self.shown.done and report.total == self.shown.total:
            # Nothing moved since the last line. (Not ``updated_at``: it has one-second resolution,
            # and the final report often lands in the same second as the one before it.)
            return
        self.shown = report
        self.lines += 1
        line = format_line(report)
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
            self.stream.flush()
        else:
            self.echo(line)

    def close(self) -> None:
        """Leave the terminal on a fresh line (the stage's summary line follows)."""
        if self.tty and self.shown is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _read(self) -> StageProgress | None:
        if self.path is None:
            return None
        try:
            return StageProgress.model_validate_json(self.path.read_text())
        except (OSError, ValidationError):
            return None  # not written yet, or caught mid-replace on a filesystem without atomic rename


def format_line(report: StageProgress) -> str:
    percent = f"{report.fraction:4.0%}" if report.fraction is not None else "    "
    return f"  {report.stage:<9} {percent}  {report.summary()}"


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
