"""Operator scale: N DistillationJobs on the simulated H100 cluster, N side by side in one run.

    python bench/operator_scale.py                    # N = 100 and 1000 (~6-10 min on 2 cores)
    python bench/operator_scale.py --sizes 10,100     # quicker
    python bench/operator_scale.py --sizes 1000 --timeout 1200

The same harness with every stage running and reporting live progress (what 1,000 running jobs'
reports cost the API server and the reactions): bench/progress_scale.py.

For each N, on the local cluster of hack/cluster (real API server, etcd, Job controller,
scheduler; kwok plays the kubelet), in a fresh namespace:

1. start the operator (`python -m kubedistill operator`, a real process) watching it;
2. create N DistillationJobs as fast as 8 client threads can;
3. watch Jobs: when each DistillationJob's generate Job appears (its first reconcile),
   and its train Job (generate's pod ran to completion under kwok, the operator saw the
   Job finish, read the pod's termination message and created the train stage);
4. stop when every train Job exists; read the operator's peak RSS (VmHWM) and CPU time;
5. scrape the operator's /metrics every 2 s meanwhile (the deepest reconcile queue seen) and once
   at the end, and check its counts against what the bench saw: DistillationJobs by phase add up
   to N, finished generate stages equal the generate Jobs the watcher saw complete, and the
   reconciles counted equal the operator's own stop line.

Reported: time until every train Job exists (from the first create); per DistillationJob
(p50/p99): create -> generate Job ("gen": the first reconcile), create -> train Job ("train":
includes the Job controller, scheduler and kwok running generate's pod), and generate Job
complete -> train Job ("react": the operator's own reaction to a finished stage: watch event,
read the pod's termination message, create the next stage); the operator's reconcile wall
time p50/p99, peak RSS (VmHWM), CPU seconds, reconciles and API requests (from its stop log
line).

On the shared 2-core test machine the API server and kube-controller-manager (default client
QPS 20) are the bottleneck, not the operator: compare its CPU seconds with the wall time.

The train pods ask for 8 GPUs on 2 simulated H100 nodes: all but two stay Pending, as they
would on a real pool, so the numbers are the operator's, not the GPUs'. Stage pods request
10m CPU so the CPU nodes (110 pods each) never throttle generate. DistilledModels are not
published (output.model.serve: false): serving is not what this measures.

Prints a table and writes bench/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.cluster import (  # noqa: E402
    ANN_MESSAGE,
    Cluster,
    ensure_cluster,
    wait_for,
)
from tests.support.crds import install_crds  # noqa: E402
from tests.support.djobs import distillation_job, evaluate_result, generate_result, train_result  # noqa: E402
from tests.support.operator_proc import OperatorProcess  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "operator_scale.json"
RESULTS_BY_STAGE = {"generate": generate_result(), "train": train_result(), "evaluate": evaluate_result()}
GROUP, VERSION, PLURAL = "kubedistill.io", "v1alpha1", "distillationjobs"
SETTINGS: dict[str, Any] = {
    "cpuPool": {"cpu": "10m", "memory": "32Mi"},
    # Each simulated stage pod ends as a worker does: with its one-line result (no result, no success).
    "stagePodAnnotations": {stage: {ANN_MESSAGE: message} for stage, message in RESULTS_BY_STAGE.items()},
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    peak = int(match.group(1)) / 1024 if match else float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak, cpu


class JobWatcher:
    """Records when each (DistillationJob, stage) Job is first seen, by watching the namespace."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        from kubernetes import watch

        self.batch = cluster.batch()
        self.namespace = namespace
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.watch = watch.Watch()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                for event in self.watch.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    label_selector="app.kubernetes.io/managed-by=kubedistill",
                    timeout_seconds=600,
                ):
                    job = event["object"]
                    labels = job.metadata.labels or {}
                    dj, stage = labels.get("kubedistill.io/job", ""), labels.get("kubedistill.io/stage", "")
                    done = any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or [])
                    now = time.monotonic()
                    with self.lock:
                        self.seen.setdefault((dj, stage), now)
                        if done:
                            self.seen.setdefault((dj, f"{stage}-complete"), now)
            except Exception:
                if self.stopped:
                    return
                time.sleep(0.2)

    stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.watch.stop()

    def count(self, stage: str) -> int:
        with self.lock:
            return sum(1 for (_, s) in self.seen if s == stage)


class MetricsScraper:
    """Scrapes the operator's /metrics every ``interval`` seconds; keeps the deepest queues seen."""

    def __init__(self, op: OperatorProcess, interval: float = 2.0) -> None:
        self.op = op
        self.interval = interval
        self.deepest: dict[str, float] = {}
        self.scrapes = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                samples = self.op.metrics()
            except OSError:
                continue
            self.scrapes += 1
            for queue in ("slots", "api"):
                value = samples.get(f'kubedistill_reconcile_queue_depth{{queue="{queue}"}}', 0.0)
                self.deepest[queue] = max(self.deepest.get(queue, 0.0), value)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def quiescent_metrics(op: OperatorProcess, settle: float = 3.0, limit: float = 60.0) -> dict[str, float]:
    """/metrics once no reconcile has run for ``settle`` seconds (so the stop line counts the same)."""

    def reconciles(samples: dict[str, float]) -> float:
        return sum(v for k, v in samples.items() if k.startswith("kubedistill_reconcile_duration_seconds_count{"))

    deadline = time.monotonic() + limit
    samples = op.metrics()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        latest = op.metrics()
        if reconciles(latest) != reconciles(samples):
            stable_since = time.monotonic()
        samples = latest
        if time.monotonic() - stable_since >= settle:
            break
    return samples


def check_metrics(samples: dict[str, float], n: int, generate_done: int, reconciles: int | None) -> dict[str, Any]:
    """The operator's own counts against the bench's; each check is reported, a mismatch fails the run."""
    by_phase = {k: v for k, v in samples.items() if k.startswith("kubedistill_distillation_jobs{")}
    finished = samples.get('kubedistill_stages_finished_total{result="succeeded",stage="generate"}', 0.0)
    counted = sum(v for k, v in samples.items() if k.startswith("kubedistill_reconcile_duration_seconds_count{"))
    checks = {
        "jobs_by_phase_sum": (sum(by_phase.values()), n),
        "generate_finished": (finished, generate_done),
        "reconciles": (counted, reconciles),
    }
    return {
        "phases": {k.split('"')[1]: v for k, v in by_phase.items() if v},
        "checks": {name: {"metrics": got, "bench": want, "ok": want is None or got == want}
                   for name, (got, want) in checks.items()},
    }  # fmt: skip


def run_one(cluster: Cluster, n: int, timeout: float, workdir: Path) -> dict[str, Any]:
    custom = cluster.custom()
    with cluster.new_namespace(f"bench-scale-{n}") as namespace:
        op = OperatorProcess(cluster, namespace, log_dir=workdir / f"n{n}", settings=SETTINGS)
        op.start()
        assert op.proc is not None
        watcher = JobWatcher(cluster, namespace)
        scraper = MetricsScraper(op)
        names = [f"dj-{i:04d}" for i in range(n)]
        created: dict[str, float] = {}

        def create(name: str) -> None:
            manifest = distillation_job(name, serve=False)
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
            created[name] = time.monotonic()

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names))
        create_seconds = time.monotonic() - t0
        try:
            wait_for(lambda: watcher.count("train") >= n, timeout=timeout, interval=0.5, what=f"{n} train Jobs")
            complete = True
        except TimeoutError:
            complete = False
        elapsed = time.monotonic() - t0
        peak_rss, cpu = proc_stats(op.proc.pid)
        scraper.stop()
        final_samples = quiescent_metrics(op)
        watcher.stop()
        op.stop()
        stats = re.findall(
            r"stops: (\d+) reconciles, (\d+) API requests, reconcile p50 ([\d.]+)s p99 ([\d.]+)s", op.log()
        )
        reconciles, requests, reconcile_p50, reconcile_p99 = stats[-1] if stats else (None, None, None, None)
        with watcher.lock:
            seen = dict(watcher.seen)
        first = [seen[(name, "generate")] - created[name] for name in names if (name, "generate") in seen]
        train = [seen[(name, "train")] - created[name] for name in names if (name, "train") in seen]
        # The operator's own reaction: generate Job complete (as a watcher sees it) -> train Job exists.
        reaction = [
            seen[(name, "train")] - seen[(name, "generate-complete")]
            for name in names
            if (name, "train") in seen and (name, "generate-complete") in seen
        ]
        generate_done = sum(1 for name in names if (name, "generate-complete") in seen)
        metrics = check_metrics(final_samples, n, generate_done, int(reconciles) if reconciles else None)
        result = {
            "n": n,
            "complete": complete,
            "train_jobs": len(train),
            "create_seconds": create_seconds,
            "all_train_jobs_seconds": elapsed if complete else None,
            "generate_latency_p50": percentile(first, 0.5),
            "generate_latency_p99": percentile(first, 0.99),
            "train_latency_p50": percentile(train, 0.5),
            "train_latency_p99": percentile(train, 0.99),
            "reaction_p50": percentile(reaction, 0.5),
            "reaction_p99": percentile(reaction, 0.99),
            "reconcile_seconds_p50": float(reconcile_p50) if reconcile_p50 else None,
            "reconcile_seconds_p99": float(reconcile_p99) if reconcile_p99 else None,
            "operator_peak_rss_mib": peak_rss,
            "operator_cpu_seconds": cpu,
            "reconciles": int(reconciles) if reconciles else None,
            "api_requests": int(requests) if requests else None,
            "operator_log": str(op.log_path),
            "deepest_queue": scraper.deepest,
            "scrapes": scraper.scrapes,
            "metrics": metrics,
        }
    # Let the namespace (N jobs, their Jobs, pods, events) go before the next N is measured.
    core = cluster.core()
    wait_for(lambda: namespace not in {ns.metadata.name for ns in core.list_namespace().items},
             timeout=900, interval=2, what=f"namespace {namespace} deleted")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated N values")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for every train Job, per N")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    cluster = ensure_cluster()
    install_crds(cluster)
    rows = []
    logs = RESULTS.parent / "operator_scale_logs"
    for n in sizes:
        print(f"N={n} ...", flush=True)
        rows.append(run_one(cluster, n, args.timeout, logs))
        print(json.dumps(rows[-1]), flush=True)

    header = (
        f"{'N':>5} {'create s':>8} {'all train Jobs s':>16} {'gen p50/p99 s':>14} {'train p50/p99 s':>16} "
        f"{'react p50/p99 s':>16} {'reconcile p50/p99 s':>20} {'peak RSS MiB':>12} {'CPU s':>6} "
        f"{'reconciles':>10} {'API req':>8}"
    )
    print(header)
    for r in rows:
        total = f"{r['all_train_jobs_seconds']:.1f}" if r["complete"] else f">{args.timeout:.0f} ({r['train_jobs']})"
        reconcile = (
            f"{r['reconcile_seconds_p50']:.3f}/{r['reconcile_seconds_p99']:.3f}"
            if r["reconcile_seconds_p50"] is not None
            else "?"
        )
        print(
            f"{r['n']:>5} {r['create_seconds']:>8.1f} {total:>16} "
            f"{r['generate_latency_p50']:>6.1f}/{r['generate_latency_p99']:<7.1f} "
            f"{r['train_latency_p50']:>7.1f}/{r['train_latency_p99']:<8.1f} "
            f"{r['reaction_p50']:>7.2f}/{r['reaction_p99']:<8.2f} {reconcile:>20} "
            f"{r['operator_peak_rss_mib']:>12.0f} {r['operator_cpu_seconds']:>6.1f} {r['reconciles'] or '?':>10} "
            f"{r['api_requests'] or '?':>8}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"meta": meta, "settings": SETTINGS, "rows": rows}, indent=2))
    for r in rows:
        checks = ", ".join(
            f"{name} {c['metrics']:.0f}/{c['bench'] if c['bench'] is not None else '?'}{'' if c['ok'] else ' MISMATCH'}"
            for name, c in r["metrics"]["checks"].items()
        )
        print(f"N={r['n']}: /metrics vs bench: {checks}; deepest queue {r['deepest_queue']} ({r['scrapes']} scrapes)")
    print(f"wrote {RESULTS}")
    metrics_ok = all(c["ok"] for r in rows for c in r["metrics"]["checks"].values())
    return 0 if all(r["complete"] for r in rows) and metrics_ok else 1


if __name__ == "__main__":
    sys.exit(main())
