"""Progress: a tqdm bar in a terminal, periodic key=value log lines otherwise (pod logs)."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

log = logging.getLogger("kubedistill.worker.generate")


class Progress:
    """Counts answers done/failed out of ``total`` and reports them."""

    def __init__(self, total: int, *, interval: float = 30.0, stream: IO[str] | None = None, label: str = "teacher"):
        self.total = total
        self.done = 0
        self.failed = 0
        self.interval = interval
        self.label = label
        self._start = time.monotonic()
        self._last_log = self._start
        stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        if _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="ans", file=stream, dynamic_ncols=True)

    def update(self, done: int = 0, failed: int = 0, **extra: Any) -> None:
        self.done += done
        self.failed += failed
        if self._bar is not None:
            self._bar.update(done + failed)
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        else:
            self.maybe_log(**extra)

    def maybe_log(self, **extra: Any) -> None:
        now = time.monotonic()
        if self._bar is None and now - self._last_log >= self.interval:
            self._last_log = now
            self.log_line(**extra)

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
            "eta": "-" if eta is None else f"{eta:.0f}s",
            **extra,
        }
        log.info("progress %s", " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self.log_line()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
