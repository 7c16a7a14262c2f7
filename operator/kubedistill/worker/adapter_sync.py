"""adapter-sync: the sidecar that keeps one vLLM replica's LoRA adapters equal to its pool's adapter set.

    kubedistill-worker adapter-sync --adapters /etc/kubedistill/adapters/adapters.yaml \\
        --dir /adapters --vllm-url http://127.0.0.1:8000 --port 8001

    # on a laptop, against a vLLM started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True:
    python -m kubedistill.worker.adapter_sync --adapters set.yaml --dir /tmp/adapters \\
        --vllm-url http://127.0.0.1:8000 --port 8001 --no-report

Every second it reads the adapter set (a ConfigMap the kubelet keeps up to date in the pod) and
asks vLLM what it holds (``GET /v1/models``: an adapter loaded from ``--dir/<name>/<revision>``
is held at that revision). What vLLM holds is the truth, not this process's memory: a vLLM
container restarted by its liveness probe holds nothing, and the sidecar loads everything again;
a restarted sidecar finds what vLLM still holds and loads nothing twice. For each adapter of the
set that vLLM does not hold at its revision: fetch it from the object store (digest-verified, as
the fetch worker does) into ``--dir/<name>/<revision>``, then ``POST /v1/load_lora_adapter``
(``load_inplace`` when another revision of that name is held: promotion without a gap). Adapters
that left the set are unloaded (``/v1/unload_lora_adapter``) and their files removed.

``GET /ready`` (the pod's readiness) asks vLLM on every probe. Until the replica has held the
whole set once it answers 503: a new replica never turns Ready without its adapters. After
that it answers 200 while vLLM still holds every adapter this sidecar loaded that is still in the
set: a newly added adapter (or one that cannot be fetched) does not take a serving replica out
of the Service, the others keep serving, and the operator counts the new one only where it is
reported; a vLLM that lost its adapters (restarted) is unready until they are back.
What vLLM holds is reported as the pod condition ``kubedistill.io/adapters`` (message:
``{name: revision}`` as JSON) through the API server, with the token projected into this
container alone (outside a pod: ``$KUBECONFIG``); ``--no-report`` skips that. A bad adapter
(missing, wrong digest, refused by vLLM) is logged and retried; the others load regardless.
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
    """What this replica holds and promises (readiness reads it from another thread: fields are replaced, not mutated).

    ``held``: what vLLM held after the last pass (adapter name -> revision). ``promised``: what a
    Ready replica must keep holding; None until vLLM has held the whole set once.
    """

    held: dict[str, str] = field(default_factory=dict)
    promised: dict[str, str] | None = None
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

    def held(self, directory: Path, timeout: float = 4.0) -> dict[str, str] | None:
        """Adapters vLLM holds from ``directory/<name>/<revision>``: name -> revision (None: vLLM is not up).

        The timeout stays under the readiness probe's (5 s), which asks this on every probe.
        """
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=timeout) as response:
                cards = json.load(response).get("data") or []
        except (OSError, ValueError):
            return None
        return held_adapters(cards, directory)

    def load(self, name: str, path: Path, inplace: bool) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": inplace})

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})


# --------------------------------------------------------------------------- decisions (pure)


def held_adapters(cards: Sequence[dict[str, Any]], directory: Path) -> dict[str, str]:
    """From vLLM's model cards: the adapters loaded from ``directory`` (others, e.g. --lora-modules, are not ours)."""
    held: dict[str, str] = {}
    for card in cards:
        root = Path(str(card.get("root") or ""))
        if card.get("parent") and root.parent.parent == directory and root.parent.name == card.get("id"):
            held[str(card["id"])] = root.name
    return held


def plan_sync(wanted: dict[str, AdapterEntry], held: dict[str, str]) -> tuple[list[str], list[AdapterEntry]]:
    """What to unload (held, not wanted) and what to load (wanted, not held at its revision)."""
    unload = sorted(set(held) - set(wanted))
    load = [entry for name, entry in sorted(wanted.items()) if held.get(name) != entry.revision]
    return unload, load


def promise(promised: dict[str, str] | None, wanted: dict[str, str], held: dict[str, str]) -> dict[str, str] | None:
    """What a Ready replica must keep holding after this pass.

    None until the whole set is held (the replica is not Ready before). Then: what it promised
    that is still wanted at that revision, plus every wanted adapter it now holds. An adapter
    vLLM lost (it restarted) stays promised, so the replica is unready until it is back.
    """
    converged = {name: rev for name, rev in held.items() if wanted.get(name) == rev}
    if promised is None:
        return converged if converged == wanted else None
    return {**{name: rev for name, rev in promised.items() if wanted.get(name) == rev}, **converged}


def is_ready(promised: dict[str, str] | None, held: dict[str, str] | None) -> bool:
    """Readiness: vLLM is up and holds everything promised (what it holds is asked at every probe)."""
    return promised is not None and held is not None and all(held.get(n) == r for n, r in promised.items())


# --------------------------------------------------------------------------- I/O


def fetch_adapter(entry: AdapterEntry, directory: Path) -> Path:
    """The adapter's files under ``directory/<name>/<revision>`` (fetched once, digest-verified)."""
    from kubedistill.worker.fetch import fetch_model

    target = directory / entry.name / entry.revision
    fetch_model(open_store(entry.uri, entry.storage), entry.uri.rstrip("/"), target, entry.digest)
    return target


def sync_once(
    adapter_set: AdapterSet,
    held: dict[str, str],
    state: SyncState,
    vllm: VLLM,
    directory: Path,
    fetch: Callable[[AdapterEntry, Path], Path] = fetch_adapter,
) -> None:
    """One pass from what vLLM ``held`` towards ``adapter_set``; updates ``state``."""
    wanted = {e.name: e for e in adapter_set.adapters}
    held = dict(held)
    unload, load = plan_sync(wanted, held)
    for name in unload:
        try:
            vllm.unload(name)
        except WorkerError as err:
            log.warning("unload %s: %s", name, err)  # gone already: forget it anyway
        held.pop(name)
        shutil.rmtree(directory / name, ignore_errors=True)
        log.info("unloaded %s", name)
    errors = dict(state.errors)
    for entry in load:
        try:
            path = fetch(entry, directory)
            vllm.load(entry.name, path, inplace=entry.name in held)
        except (WorkerError, OSError) as err:
            if errors.get(entry.name) != str(err):
                log.error("adapter %s (%s): %s", entry.name, entry.uri, err)
            errors[entry.name] = str(err)
            continue
        old = held.get(entry.name)
        held[entry.name] = entry.revision
        errors.pop(entry.name, None)
        if old is not None:
            shutil.rmtree(directory / entry.name / old, ignore_errors=True)
        log.info("loaded %s revision %s from %s", entry.name, entry.revision, entry.uri)
    revisions = {name: entry.revision for name, entry in wanted.items()}
    state.errors = {name: err for name, err in errors.items() if name in wanted}
    state.promised = promise(state.promised, revisions, held)
    state.complete = held == revisions
    state.held = held


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


def report(held: dict[str, str], complete: bool) -> None:
    """Write what this pod holds as its condition kubedistill.io/adapters (the operator counts it)."""
    import os

    from kubernetes import client, config

    try:
        config.load_incluster_config()  # the token projected into this container
    except config.ConfigException:  # outside a pod (a laptop, the tests): $KUBECONFIG
        config.load_kube_config()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {
        "type": CONDITION,
        "status": "True" if complete else "False",
        "reason": "AdaptersLoaded" if complete else "AdaptersLoading",
        "message": json.dumps(held, sort_keys=True),
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
    serve_readiness(args.port, lambda: is_ready(state.promised, vllm.held(args.dir)))
    reported: tuple[dict[str, str], bool] | None = None
    while True:
        adapter_set = read_set(args.adapters)
        held = vllm.held(args.dir)
        if adapter_set is not None and held is not None:
            sync_once(adapter_set, held, state, vllm, args.dir)
        current = (dict(state.held), state.complete)
        if not args.no_report and current != reported:
            try:
                report(*current)
                reported = current
            except Exception as err:  # the API server may be briefly away: serving goes on, report later
                log.warning("could not report loaded adapters: %s", err)
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
