"""Reads a worker's progress file while it runs, as local mode does: every distinct report, in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydantic import ValidationError

from kubedistill.api.worker_config import StageProgress


class ProgressSampler:
    """Polls ``path`` every ``interval`` seconds in a thread; ``reports`` holds each new one with its arrival time."""

    def __init__(self, path: Path, interval: float = 0.1) -> None:
        self.path = path
        self.interval = interval
        self.reports: list[tuple[float, StageProgress]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            report = StageProgress.model_validate_json(self.path.read_text())
        except (OSError, ValidationError):
            return
        if not self.reports or self.reports[-1][1] != report:
            self.reports.append((time.monotonic(), report))

    def stop(self) -> list[StageProgress]:
        self._stop.set()
        self._thread.join(5)
        self.sample()
        return [report for _, report in self.reports]

    def check_eta(self, finished_at: float, tolerance: float = 0.6, slack: float = 3.0) -> None:
        """Each ETA was within ``tolerance`` (fraction) + ``slack`` seconds of the time that was actually left."""
        for seen, report in self.reports:
            if report.eta_seconds is None or report.done >= (report.total or 0):
                continue
            left = finished_at - seen
            assert abs(report.eta_seconds - left) <= tolerance * left + slack, (report, left)
