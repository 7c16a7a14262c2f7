"""generate's progress: a tqdm bar in a terminal, key=value log lines otherwise, and live reports.

Counts answers done and failed out of the answers to ask; every ``intervalSeconds`` a log line
(pod logs) and a ``StageProgress`` report (worker/report.py: the DistillationJob's status,
local mode's live line) with the answers reused from the store, the retries and the teacher
tokens so far.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from kubedistill.api.worker_config import ProgressTarget, format_duration
from kubedistill.worker.report import ProgressReporter

log = logging.getLogger("kubedistill.worker.generate")


class Progress:
    """Counts answers done/failed out of ``total`` and reports them."""

    def __init__(
        self,
        total: int,
        target: ProgressTarget | None = None,
        *,
        stream: IO[str] | None = None,
        label: str = "teacher",
        reused: int = 0,
    ):
        self.total = total
        self.done = 0
        self.failed = 0
        self.reused = reused
        self.target = target or ProgressTarget()
        self.label = label
        self.reporter = ProgressReporter(self.target, "generate", "answers", total=total)
        self.extra: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_log = self._start
        stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        if _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="ans", file=stream, dynamic_ncols=True)

    @property
    def interval(self) -> float:
        return self.target.interval_seconds

    def update(self, done: int = 0, failed: int = 0, **extra: Any) -> None:
        self.done += done
        self.failed += failed
        if self._bar is not None:
            self._bar.update(done + failed)
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        self.maybe_log(**extra)

    def maybe_log(self, **extra: Any) -> None:
        self.extra.update(extra)
        self._report()
        now = time.monotonic()
        if self._bar is None and now - self._last_log >= self.interval:
            self._last_log = now
            self.log_line()

    def _report(self, force: bool = False) -> None:
        self.reporter.update(
            self.done + self.failed,
            force=force,
            failed=self.failed,
            reused=self.reused,
            retries=self.extra.get("retries"),
            teacherTokens=self.extra.get("teacher_tokens"),
        )

    def log_line(self, **extra: Any) -> None:
        elapsed = time.monotonic() - self._start
        finished = self.done + self.failed
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = (self.total - finished) / rate if rate > 0 else None
        fields: dict[str, Any] = {
            "stage": "generate",
            "teacher": self.label,
            "done": self.done,
            "failed": self.failed,
            "total": self.total,
            "rate": f"{rate:.2f}/s",
            "elapsed": f"{elapsed:.0f}s",
            "eta": "-" if eta is None else format_duration(eta),
            **self.extra,
            **extra,
        }
        log.info("progress %s", " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self.log_line()
        self._report(force=True)
        self.reporter.finish()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
