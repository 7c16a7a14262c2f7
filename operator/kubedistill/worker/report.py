"""Live progress of a running stage: how far, how fast, how long to go, to where someone looks.

Every long stage (generate, train, evaluate) calls ``ProgressReporter.update(done, ...)`` as
it goes; the reporter turns the counts into a ``StageProgress`` (api/worker_config.py: rate
over the last minute, ETA) and sends it at most every ``intervalSeconds`` (and once more at
the end) to the config's ``progress`` target:

* in a pod, the DistillationJob's progress ConfigMap (key = the stage). The pod's own
  ServiceAccount token is mounted in the worker container only, and its Role lets it update
  that one ConfigMap by name and nothing else; the operator folds the reports into the
  DistillationJob's status (rate-limited) and ``kubectl get dj`` shows them;
* in local mode, a JSON file that ``kubedistill local run`` renders as a live line.

Writes happen on a background thread that always sends the latest report: a slow or failing
API server never slows the stage, and a failed write is logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kubedistill.api.worker_config import ProgressTarget, Stage, StageProgress

log = logging.getLogger("kubedistill.worker.report")
RATE_WINDOW_SECONDS = 60.0


class Sink(Protocol):
    def write(self, progress: StageProgress) -> None: ...


class FileSink:
    """Local mode: the latest report as a JSON file, replaced atomically."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def write(self, progress: StageProgress) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(progress.to_wire()))
        os.replace(tmp, self.path)


class ConfigMapSink:
    """In a pod: ``data[<stage>]`` of the DistillationJob's progress ConfigMap, by merge patch."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self._api: Any = None

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=configuration)
            else:  # a worker run by hand or a test: $KUBECONFIG, read now (the client reads it at import)
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
            self._api = client.CoreV1Api(client.ApiClient(configuration))
        return self._api

    def write(self, progress: StageProgress) -> None:
        body = {"data": {progress.key: json.dumps(progress.to_wire(), separators=(",", ":"))}}
        self._client().patch_namespaced_config_map(self.name, self.namespace, body, _request_timeout=10)


class ProgressReporter:
    """Counts in, reports out: ``update`` as often as you like, sinks see one report per interval."""

    def __init__(self, target: ProgressTarget | None, stage: Stage, unit: str, total: float | None = None) -> None:
        self.target = target or ProgressTarget()
        self.stage = stage
        self.unit = unit
        self.total = total
        self.sinks: list[Sink] = []
        if self.target.file:
            self.sinks.append(FileSink(self.target.file))
        if self.target.config_map:
            namespace = self.target.namespace or _pod_namespace()
            self.sinks.append(ConfigMapSink(self.target.config_map, namespace))
        self.latest: StageProgress | None = None
        self.sent = 0  # reports handed to the sinks (tests and logs read it)
        self._history: deque[tuple[float, float]] = deque()
        self._last_sent = float("-inf")
        self._pending: StageProgress | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ counting

    def update(self, done: float, *, total: float | None = None, force: bool = False, **details: Any) -> None:
        now = time.monotonic()
        if total is not None:
            self.total = total
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[1][0] > RATE_WINDOW_SECONDS:
            self._history.popleft()
        self.latest = self._progress(done, now, details)
        if force or now - self._last_sent >= self.target.interval_seconds:
            self._last_sent = now
            self._send(self.latest)

    def _progress(self, done: float, now: float, details: dict[str, Any]) -> StageProgress:
        first_time, first_done = self._history[0]
        rate = (done - first_done) / (now - first_time) if now - first_time > 0.5 else None
        eta = None
        if rate and self.total is not None:
            eta = max(0.0, self.total - done) / rate
        return StageProgress(
            stage=self.stage,
            job=self.target.job,
            shard=self.target.shard,
            done=done,
            total=self.total,
            unit=self.unit,
            rate=None if rate is None else max(0.0, rate),
            eta_seconds=eta,
            details={k: v for k, v in details.items() if v is not None},
            updated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def finish(self) -> None:
        """Send the last report now and wait (a few seconds at most) until the sinks have it."""
        if self.latest is not None:
            self._send(self.latest)
        self._idle.wait(10)
        self._closed = True
        self._wake.set()

    # ------------------------------------------------------------------ sending

    def _send(self, progress: StageProgress) -> None:
        if not self.sinks:
            return
        self._pending = progress
        self._idle.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"progress-{self.stage}", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            progress, self._pending = self._pending, None
            if progress is not None:
                for sink in self.sinks:
                    try:
                        sink.write(progress)
                    except Exception as err:  # progress is a courtesy: never fail the stage for it
                        log.warning("progress report to %s failed: %s", type(sink).__name__, err)
                self.sent += 1
            if self._pending is None:
                self._idle.set()


def _pod_namespace() -> str:
    try:
        return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")
