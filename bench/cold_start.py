"""Cold start of a served model: the fetch copy vs streaming from the object store (time to Ready).

    python bench/cold_start.py                          # a 1.6 GB model, 3 runs of each mode: ~16 min on 2 busy cores
    python bench/cold_start.py --runs 5
    python bench/cold_start.py --hidden 128 --layers 2  # the tests' tiny model (weights < 2 MB)
    python bench/cold_start.py --model-dir DIR          # any saved model (safetensors) instead of a built one

Both modes serve the same model, uploaded once to the same local S3 server (versitygw,
tests/support/s3.py), with vLLM's CPU build, started exactly as the operator renders a
DistilledModel's pod (``builders.serving.build_serving_children``: the vLLM container's arguments
and environment, the fetch init container's command and config), with processes on this machine in
place of a kubelet:

* fetch (``serving.weights: fetch``, the default): the fetch worker (``kubedistill-worker fetch``,
  a process of its own, as the init container is) copies the model into a local directory and
  verifies its digest, then vLLM starts from that directory;
* stream (``serving.weights: stream``): vLLM starts on the ``s3://`` URI with ``--load-format
  runai_streamer``: it pulls config and tokenizer, and streams the safetensors from the store
  (needs ``runai-model-streamer[s3]``, the ``stream`` extra).

Time to Ready = from the pod's first process to vLLM's ``/health`` answering 200 (what the
readiness probe asks). Also reported: the fetch step, vLLM's weight-loading phase (from "Starting
to load model" to "Warming up model" in its log, seen as the lines are written, ~0.1 s
resolution), weights = the two together (the part of a cold start that moves weights; the rest
is vLLM's start-up and compile warm-up, the same in both modes), and the first answer after
Ready. Every run gets a fresh HOME and inductor cache
(a new pod's empty ``/tmp``; vLLM's compile cache is off, as in every CPU run here), the modes
alternate (fetch, stream, stream, fetch, ...), and the ratio is stream / fetch of the medians of
this one run. If streaming fails, its error is recorded and the fetch path is still measured.

Prints a table and writes bench/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kubedistill.api.settings import OperatorSettings  # noqa: E402
from kubedistill.api.v1alpha1 import DistilledModel  # noqa: E402
from kubedistill.api.worker_config import StorageSettings  # noqa: E402
from kubedistill.builders.serving import ServingPlan, build_serving_children  # noqa: E402
from kubedistill.local.serve import VLLM_CPU_ENV  # noqa: E402
from kubedistill.storage.objectstore import S3Store, upload_dir  # noqa: E402
from tests.support.local_pod import container_argv, container_env  # noqa: E402
from tests.support.procs import ManagedProcess, ProcessFailed, free_port  # noqa: E402
from tests.support.s3 import S3Server  # noqa: E402
from tests.support.tiny_model import build_tiny_chat_model  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "cold_start.json"
MODES = ("fetch", "stream")
# vLLM's log lines around the weight loading (both modes), seen as they are written.
LOAD_START, LOAD_END = "Starting to load model", "Warming up model for the compilation"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts per mode")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size of the built model (head_dim 64)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the built model")
    parser.add_argument("--model-dir", type=Path, default=None, help="serve this saved model instead")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one cold start may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args()


# --------------------------------------------------------------------------- what the operator renders


def render_pod(mode: str, uri: str, endpoint: str, run_dir: Path, port: int, max_model_len: int) -> dict[str, Any]:
    """The Deployment's pod spec and the fetch ConfigMap's files for one cold start of ``mode``."""
    manifest = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistilledModel",
        "metadata": {"name": "coldstart", "namespace": "bench", "uid": "bench"},
        "spec": {
            "model": {"uri": uri},
            "serving": {"gpus": 0, "weights": mode, "vllm": {"maxModelLen": max_model_len}},
            "storage": {"endpoint": endpoint, "addressingStyle": "path", "credentialsSecretRef": {"name": "s3"}},
        },
    }
    dm = DistilledModel.model_validate(manifest)
    assert dm.spec.model is not None and dm.spec.storage is not None
    plan = ServingPlan(model=dm, source=dm.spec.model, base_model=None, storage=dm.spec.storage)
    settings = OperatorSettings.model_validate({"serving": {"port": port, "modelDir": str(run_dir / "models")}})
    children = {c["kind"]: c for c in build_serving_children(plan, settings)}
    pod = children["Deployment"]["spec"]["template"]["spec"]
    files = children["ConfigMap"]["data"] if "ConfigMap" in children else {}
    return {"pod": pod, "files": files}


# --------------------------------------------------------------------------- one cold start


def cold_start(mode: str, uri: str, s3: S3Server, root: Path, index: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = root / f"{index:02d}-{mode}"
    (run_dir / "tmp").mkdir(parents=True)  # the pod's /tmp: HOME, caches
    port = free_port()
    rendered = render_pod(mode, uri, s3.endpoint_url, run_dir, port, args.max_model_len)
    pod, secrets = rendered["pod"], s3.env()
    scratch, termination = run_dir / "tmp", {"KUBEDISTILL_TERMINATION_LOG": str(run_dir / "termination")}
    config_dir = run_dir / "config"
    config_dir.mkdir()
    for name, text in rendered["files"].items():
        (config_dir / name).write_text(text)
    result: dict[str, Any] = {"mode": mode, "run": index}
    begin = time.monotonic()
    for init in pod["initContainers"]:  # fetch: runs to completion before vLLM starts
        env = {**container_env(init, secrets, scratch), **termination}
        with (run_dir / f"{init['name']}.log").open("wb") as log:
            done = subprocess.run(container_argv(init, config_dir), env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{init['name']} exited {done.returncode}: {(run_dir / 'termination').read_text()}")
    result["fetch_s"] = time.monotonic() - begin
    [vllm] = pod["containers"]
    env = {
        **container_env(vllm, secrets, scratch),
        **VLLM_CPU_ENV,
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
    }
    argv = [*container_argv(vllm, config_dir), "--distributed-executor-backend", "uni"]  # CPU: see tests/support
    log_path = run_dir / "vllm.log"
    proc = ManagedProcess(argv, log_path=log_path, env=env, name=f"vllm-{mode}").start()
    try:
        seen = wait_ready(proc, port, log_path, args.timeout)
        result["ready_s"] = seen["ready"] - begin
        if LOAD_START in seen and LOAD_END in seen:
            result["load_s"] = seen[LOAD_END] - seen[LOAD_START]
            result["weights_s"] = result["fetch_s"] + result["load_s"]
        first = time.monotonic()
        answer(port)
        result["first_answer_s"] = time.monotonic() - first
    finally:
        proc.stop()
    if not args.keep:  # the fetched copy and the pulled config: the next pod has neither
        shutil.rmtree(run_dir, ignore_errors=True)
    result["argv"] = argv[1:]
    return result


def answer(port: int) -> None:
    body = {"model": "coldstart", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        json.load(response)


def wait_ready(proc: ManagedProcess, port: int, log_path: Path, timeout: float) -> dict[str, float]:
    """Poll /health (the readiness probe) and vLLM's log: when each of them first answered or appeared."""
    seen: dict[str, float] = {}
    offset, text, deadline = 0, "", time.monotonic() + timeout
    while True:
        now = time.monotonic()
        with log_path.open("rb") as log:  # only what was appended since the last look
            log.seek(offset)
            chunk = log.read()
        offset += len(chunk)
        text = text[-200:] + chunk.decode(errors="replace")
        for marker in (LOAD_START, LOAD_END):
            if marker not in seen and marker in text:
                seen[marker] = now
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    seen["ready"] = now
                    return seen
        except OSError:
            pass
        if not proc.alive() or now > deadline:
            raise proc.failure(f"not healthy within {timeout:.0f}s" if proc.alive() else "exited before /health")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the run


def prepare_model(root: Path, s3: S3Server, args: argparse.Namespace) -> tuple[str, int]:
    if args.model_dir is not None:
        model_dir = args.model_dir
    else:
        hidden = args.hidden
        model_dir = build_tiny_chat_model(
            root / "model",
            hidden_size=hidden,
            num_layers=args.layers,
            num_heads=hidden // 64,
            intermediate_size=hidden * 11 // 4,
        )
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    store = S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())
    bucket = s3.make_bucket("coldstart")
    upload_dir(store, model_dir, f"s3://{bucket}/model")
    return f"s3://{bucket}/model", size


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], failures: dict[str, str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "runs": len(rows),
            "ready_s": median(rows, "ready_s"),
            "ready_all_s": [round(r["ready_s"], 1) for r in rows],
            "fetch_s": median(rows, "fetch_s"),
            "load_s": median(rows, "load_s"),
            "weights_s": median(rows, "weights_s"),
            "first_answer_s": median(rows, "first_answer_s"),
            "error": failures.get(mode),
        }
    for key in ("ready_s", "weights_s"):
        fetch, stream = summary["fetch"][key], summary["stream"][key]
        summary["stream"][f"{key.removesuffix('_s')}_vs_fetch"] = stream / fetch if fetch and stream else None
    return summary


def print_table(summary: dict[str, dict[str, Any]], size: int) -> None:
    def fmt(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"\nmodel {size / 2**20:.0f} MiB of files; medians over the runs of each mode (seconds)")
    print("weights = fetch step + vLLM's weight loading; ready = pod start to /health 200")
    header = ["mode", "runs", "ready", "fetch", "load", "weights", "1st ans", "ready/f", "weights/f"]
    print(f"{header[0]:8}" + "".join(f"{h:>10}" for h in header[1:]) + "  ready, each run")
    for mode, row in summary.items():
        ratios = [fmt(row.get(f"{key}_vs_fetch", 1.0), 2) for key in ("ready", "weights")]
        cells = [row["runs"], fmt(row["ready_s"]), fmt(row["fetch_s"]), fmt(row["load_s"]), fmt(row["weights_s"])]
        cells += [fmt(row["first_answer_s"]), *ratios]
        print(f"{mode:8}" + "".join(f"{c:>10}" for c in cells) + f"  {row['ready_all_s']}")
        if row["error"]:
            print(f"  {mode} failed: {row['error'][-600:]}")


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="kd-cold-start-"))
    s3 = S3Server(root / "s3").start()
    runs: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    try:
        uri, size = prepare_model(root, s3, args)
        order = [MODES[(i // 2 + i) % 2] for i in range(2 * args.runs)]  # fetch, stream, stream, fetch, ...
        for index, mode in enumerate(order):
            if mode in failures:
                continue
            try:
                runs.append(cold_start(mode, uri, s3, root, index, args))
                print(f"{mode:6} run {index}: ready in {runs[-1]['ready_s']:.1f}s", flush=True)
            except (ProcessFailed, RuntimeError) as err:
                failures[mode] = str(err)
                print(f"{mode:6} run {index}: FAILED: {str(err)[-400:]}", flush=True)
    finally:
        s3.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarize(runs, failures)
    print_table(summary, size)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": "cold_start",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load1": os.getloadavg()[0]},
        "model": {"bytes": size, "hidden": args.hidden, "layers": args.layers, "dir": str(args.model_dir or "")},
        "summary": summary,
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}" + (f"; scratch kept in {root}" if args.keep else ""))
    return 1 if "fetch" in failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
