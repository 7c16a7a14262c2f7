"""adapter-sync: the sidecar that keeps one vLLM replica's LoRA adapters equal to its pool's adapter set.

    kubedistill-worker adapter-sync --adapters /etc/kubedistill/adapters/adapters.yaml \\
        --dir /adapters --vllm-url http://127.0.0.1:8000 --port 8001

    # on a laptop, against a vLLM started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True:
    python -m kubedistill.worker.adapter_sync --adapters set.yaml --dir /tmp/adapters \\
        --vllm-url http://127.0.0.1:8000 --port 8001 --no-report

Every second it reads the adapter set (a ConfigMap the kubelet keeps up to date in the pod),
and for each adapter whose revision vLLM does not hold yet: fetch it from the object store
(digest-verified, as the fetch worker does) into ``--dir/<name>/<revision>``, then
``POST /v1/load_lora_adapter`` (``load_inplace`` when another revision of that name is
loaded: promotion without a gap); adapters that left the set are unloaded
(``/v1/unload_lora_adapter``) and their files removed.

``GET /ready`` answers 200 once every adapter of the set is loaded and vLLM is healthy, 503
before: the pod is not Ready until then (a new replica never serves without its adapters).
After that, a later change keeps the pod Ready while the new adapter loads: the other
adapters keep serving, and the operator counts the new one only where it is reported.
What is loaded is reported as the pod condition ``kubedistill.io/adapters`` (message:
``{name: revision}`` as JSON) through the API server, with the token projected into this
container alone; ``--no-report`` skips that. A bad adapter (missing, wrong digest, refused
by vLLM) is logged and retried; the others load regardless.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubedistill.api.worker_config import AdapterEntry, AdapterSet
from kubedistill.storage.objectstore import open_store
from kubedistill.worker.common import WorkerError, configure_logging

log = logging.getLogger("kubedistill.worker.adapter_sync")
CONDITION = "kubedistill.io/adapters"


@dataclass
class SyncState:
    """What this replica holds: adapter name -> revision loaded in vLLM; whether the set is complete."""

    loaded: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    errors: dict[str, str] = field(default_factory=dict)


def read_set(path: Path) -> AdapterSet | None:
    """The adapter set, or None while the file is missing or half-written (retried next tick)."""
    try:
        return AdapterSet.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError) as err:
        log.warning("adapter set %s unreadable: %s", path, err)
        return None


class VLLM:
    """vLLM's runtime LoRA API on localhost."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as err:
            raise WorkerError(f"{path} {body.get('lora_name')}: HTTP {err.code}: {err.read()[:300]!r}") from err

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def load(self, name: str, path: Path, inplace: bool) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": inplace})

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})


def fetch_adapter(entry: AdapterEntry, directory: Path) -> Path:
    """The adapter's files under ``directory/<name>/<revision>`` (fetched once, digest-verified)."""
    from kubedistill.worker.fetch import fetch_model

    target = directory / entry.name / entry.revision
    fetch_model(open_store(entry.uri, entry.storage), entry.uri.rstrip("/"), target, entry.digest)
    return target


def sync_once(
    adapter_set: AdapterSet,
    state: SyncState,
    vllm: VLLM,
    directory: Path,
    fetch: Callable[[AdapterEntry, Path], Path] = fetch_adapter,
) -> bool:
    """One pass towards ``adapter_set``; True when something changed."""
    wanted = {e.name: e for e in adapter_set.adapters}
    changed = False
    for name in sorted(set(state.loaded) - set(wanted)):
        try:
            vllm.unload(name)
        except WorkerError as err:
            log.warning("unload %s: %s", name, err)  # gone already (vLLM restarted): forget it anyway
        state.loaded.pop(name)
        shutil.rmtree(directory / name, ignore_errors=True)
        log.info("unloaded %s", name)
        changed = True
    for name, entry in sorted(wanted.items()):
        if state.loaded.get(name) == entry.revision:
            continue
        try:
            path = fetch(entry, directory)
            vllm.load(name, path, inplace=name in state.loaded)
        except (WorkerError, OSError) as err:
            if state.errors.get(name) != str(err):
                log.error("adapter %s (%s): %s", name, entry.uri, err)
            state.errors[name] = str(err)
            continue
        old = state.loaded.get(name)
        state.loaded[name] = entry.revision
        state.errors.pop(name, None)
        if old is not None:
            shutil.rmtree(directory / name / old, ignore_errors=True)
        log.info("loaded %s revision %s from %s", name, entry.revision, entry.uri)
        changed = True
    state.complete = all(state.loaded.get(n) == e.revision for n, e in wanted.items())
    return changed


def serve_readiness(port: int, ready: Callable[[], bool]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/ready" and ready()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"not ready\n")

        def log_message(self, *args: Any) -> None:  # probes every few seconds: keep the log for changes
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="readiness", daemon=True).start()
    return server


def report(loaded: dict[str, str], complete: bool) -> None:
    """Write what this pod holds as its condition kubedistill.io/adapters (the operator counts it)."""
    import os

    from kubernetes import client, config

    config.load_incluster_config()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {
        "type": CONDITION,
        "status": "True" if complete else "False",
        "reason": "AdaptersLoaded" if complete else "AdaptersLoading",
        "message": json.dumps(loaded, sort_keys=True),
        "lastTransitionTime": now,
    }
    body = {"status": {"conditions": [condition]}}  # strategic merge: conditions merge by type
    client.CoreV1Api().patch_namespaced_pod_status(os.environ["POD_NAME"], os.environ["POD_NAMESPACE"], body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubedistill-worker adapter-sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=Path, required=True, help="the adapter set (YAML, AdapterSet)")
    parser.add_argument("--dir", type=Path, required=True, help="where adapters are fetched (shared with vLLM)")
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8000")
    parser.add_argument("--port", type=int, default=8001, help="readiness port (GET /ready)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    parser.add_argument("--no-report", action="store_true", help="do not write the pod condition")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    vllm, state = VLLM(args.vllm_url), SyncState()
    serve_readiness(args.port, lambda: state.complete and vllm.healthy())
    reported: tuple[dict[str, str], bool] | None = None
    while True:
        adapter_set = read_set(args.adapters)
        if adapter_set is not None and vllm.healthy():
            sync_once(adapter_set, state, vllm, args.dir)
        current = (dict(state.loaded), state.complete)
        if not args.no_report and current != reported:
            try:
                report(*current)
                reported = current
            except Exception as err:  # the API server may be briefly away: serving goes on, report later
                log.warning("could not report loaded adapters: %s", err)
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
