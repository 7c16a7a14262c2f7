"""Live progress at scale: N running stages reporting, what it costs the API server and the reactions.

    python bench/progress_scale.py --n 1000             # default intervals
    python bench/progress_scale.py --n 100 --window 60  # quicker

On the local cluster (real API server, kwok pods), in a fresh namespace, with the real operator:

0. if the CPU pool's nodes hold fewer than N + ``--release`` pods, add kwok nodes cloned from its
   largest node (the local cluster's two hold 220), and remove them at the end;
1. create N + ``--release`` DistillationJobs whose generate pods kwok keeps running (the stage
   never ends until the bench lets it);
2. baseline: the operator's API requests per second over ``--window`` seconds, nothing reporting;
   then ``--release`` generate pods finish, nothing reporting: per DistillationJob, generate Job
   complete -> train Job created (p50/p99), as in bench/operator_scale.py;
3. reporting: the N other stages report as workers would (a merge patch of the job's progress
   ConfigMap every ``progress.reportSeconds``, staggered), for the same window: the operator's
   requests per second again (the difference is what progress adds), and how long a report took
   to show in the status (sampled);
4. reactions under reporting: ``--release`` of the N finish while the rest keep reporting; the
   same latencies, to compare with step 2's in the same run.

The reports are written by this process with the admin credentials, at the workers' rate: the
API server sees the same load; what a worker's own token may do is tested in tests/cluster.

Prints a table and writes bench/results/progress_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.operator_scale import SETTINGS, JobWatcher, percentile, proc_stats  # noqa: E402
from kubedistill.api.settings import ProgressSettings  # noqa: E402
from tests.support.cluster import ANN_HOLD, ANN_MESSAGE, Cluster, ensure_cluster, wait_for  # noqa: E402
from tests.support.crds import install_crds  # noqa: E402
from tests.support.djobs import distillation_job, generate_result  # noqa: E402
from tests.support.operator_proc import OperatorProcess  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "progress_scale.json"
GROUP, VERSION, PLURAL = "kubedistill.io", "v1alpha1", "distillationjobs"


def api_requests(op: OperatorProcess) -> float:
    return op.metrics().get("kubedistill_api_requests_total", 0.0)


def statuses(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    items = cluster.custom().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return {item["metadata"]["name"]: item.get("status") or {} for item in items}


class Reporters:
    """Every running stage's worker, played by a thread pool: one progress patch per job per interval."""

    def __init__(self, cluster: Cluster, namespace: str, jobs: dict[str, str], interval: float) -> None:
        self.core = cluster.core()
        self.namespace = namespace
        self.jobs = jobs  # DistillationJob -> its generate Job
        self.interval = interval
        self.written: dict[str, tuple[float, float]] = {}  # job -> (monotonic time, done) of its last report
        self.patches = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _report(self, name: str, done: float) -> None:
        report = {
            "stage": "generate", "job": self.jobs[name], "done": done, "total": 100000.0, "unit": "answers",
            "rate": 10.0, "etaSeconds": (100000 - done) / 10, "details": {"reused": 0, "failed": 0},
            "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }  # fmt: skip
        try:
            self.core.patch_namespaced_config_map(
                f"{name}-progress", self.namespace, {"data": {"generate": json.dumps(report)}}
            )
            self.written[name] = (time.monotonic(), done)
            self.patches += 1
        except Exception:
            self.errors += 1

    def _run(self) -> None:
        names = sorted(self.jobs)
        step = self.interval / max(len(names), 1)
        round_ = 0
        with ThreadPoolExecutor(8) as pool:
            while not self._stop.is_set():
                round_ += 1
                start = time.monotonic()
                for i, name in enumerate(names):
                    if self._stop.is_set():
                        return
                    pool.submit(self._report, name, float(round_ * 1000))
                    delay = start + (i + 1) * step - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def cpu_pool_nodes(cluster: Cluster) -> list[Any]:
    """The nodes a CPU stage pod can land on: the pool's labels, no NoSchedule taint (GPU nodes have one)."""
    from kubedistill.api.settings import OperatorSettings

    selector = OperatorSettings().cpu_pool.node_selector
    return [
        node
        for node in cluster.core().list_node().items
        if all((node.metadata.labels or {}).get(k) == v for k, v in selector.items())
        and not any(t.effect in ("NoSchedule", "NoExecute") for t in node.spec.taints or [])
    ]


def pod_capacity(nodes: list[Any]) -> int:
    return sum(int((node.status.allocatable or {}).get("pods", 0)) for node in nodes)


class ExtraNodes:
    """kwok nodes cloned from the CPU pool's largest node, so that N generate pods can all be Running.

    The local cluster has two CPU nodes (220 pods); every pod of this bench stays Running, so an N
    above that needs more nodes. They are removed when the bench ends.
    """

    PREFIX = "bench-progress-cpu-"

    def __init__(self, cluster: Cluster, n: int) -> None:
        self.core = cluster.core()
        self.names: list[str] = []
        nodes = cpu_pool_nodes(cluster)
        missing = n - pod_capacity(nodes)
        if missing <= 0:
            return
        template = max(nodes, key=lambda node: pod_capacity([node]), default=None)
        pods = pod_capacity([template]) if template is not None else 0
        if template is None or pods < 1:
            raise SystemExit("no CPU pool node that holds pods to copy: start the cluster with hack/cluster/up")
        for i in range(-(-missing // pods)):
            name = f"{self.PREFIX}{i}"
            labels = {**(template.metadata.labels or {}), "kubernetes.io/hostname": name}
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels, "annotations": dict(template.metadata.annotations or {})},
                "status": {
                    "capacity": dict(template.status.capacity),
                    "allocatable": dict(template.status.allocatable),
                    "addresses": [{"type": "Hostname", "address": name}],
                },
            }
            self.core.create_node(body)
            self.names.append(name)
        wait_for(lambda: all(self._ready(name) for name in self.names), timeout=120, interval=1,
                 what=f"{len(self.names)} extra kwok nodes Ready")  # fmt: skip
        print(f"added {len(self.names)} kwok CPU nodes ({len(self.names) * pods} pods) for --n {n}", flush=True)

    def _ready(self, name: str) -> bool:
        conditions = self.core.read_node(name).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    def remove(self) -> None:
        for name in self.names:
            try:
                self.core.delete_node(name)
            except Exception as exc:  # report it and remove the rest
                print(f"could not remove node {name}: {exc}", file=sys.stderr)


def release_and_time(cluster: Cluster, namespace: str, watcher: JobWatcher, released: list[str]) -> list[float]:
    """Let these generate pods finish; per DistillationJob, seconds from generate Job complete to train Job created."""
    core = cluster.core()
    for name in released:
        for pod in core.list_namespaced_pod(namespace, label_selector=f"kubedistill.io/job={name}").items:
            core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: None}}})
    wait_for(lambda: all((name, "train") in watcher.seen for name in released), timeout=600, interval=1,
             what=f"{len(released)} train Jobs")  # fmt: skip
    with watcher.lock:
        seen = dict(watcher.seen)
    return [seen[(name, "train")] - seen[(name, "generate-complete")] for name in released
            if (name, "generate-complete") in seen]  # fmt: skip


def run(cluster: Cluster, n: int, window: float, release: int, workdir: Path) -> dict[str, Any]:
    progress = ProgressSettings()
    settings = {
        **SETTINGS,
        "stagePodAnnotations": {
            **SETTINGS["stagePodAnnotations"],
            "generate": {ANN_HOLD: "true", ANN_MESSAGE: generate_result()},
        },
    }
    custom = cluster.custom()
    with cluster.new_namespace(f"bench-progress-{n}") as namespace:
        op = OperatorProcess(cluster, namespace, log_dir=workdir / f"n{n}", settings=settings)
        op.start()
        assert op.proc is not None
        watcher = JobWatcher(cluster, namespace)
        names = [f"dj-{i:04d}" for i in range(n)]
        quiet = [f"quiet-{i:04d}" for i in range(release)]  # finish before anyone reports: the baseline reactions
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, distillation_job(name, serve=False)), names + quiet))  # fmt: skip

        def running() -> dict[str, str]:
            found = statuses(cluster, namespace)
            return {
                name: s["stages"]["generate"]["job"]
                for name, s in found.items()
                if (s.get("stages") or {}).get("generate", {}).get("phase") == "Running"
            }

        total = n + release
        wait_for(lambda: len(running()) == total, timeout=1800, interval=5, what=f"{total} generate stages running")
        jobs = {name: job for name, job in running().items() if name in set(names)}
        time.sleep(10)  # the start-up settles

        # Baseline: nothing reports.
        before = api_requests(op)
        time.sleep(window)
        baseline = (api_requests(op) - before) / window
        reaction_quiet = release_and_time(cluster, namespace, watcher, quiet)

        # Reporting: every stage, at the workers' interval.
        reporters = Reporters(cluster, namespace, jobs, progress.report_seconds)
        time.sleep(progress.report_seconds)  # one full round before measuring
        before = api_requests(op)
        patches_before = reporters.patches
        time.sleep(window)
        reporting = (api_requests(op) - before) / window
        worker_patches = (reporters.patches - patches_before) / window

        # How long a report takes to show: the newest report of a sample of jobs vs their status.
        lags = []
        for name, s in list(statuses(cluster, namespace).items())[:200]:
            message = (s.get("stages") or {}).get("generate", {}).get("progressMessage") or ""
            written = reporters.written.get(name)
            if written and message.startswith(f"{written[1]:,.0f}/"):
                lags.append(0.0)  # already shows the latest
            elif written:
                lags.append(time.monotonic() - written[0])

        # Reactions while everyone else reports: as many generate pods finish.
        reaction = release_and_time(cluster, namespace, watcher, names[:release])
        reporters.stop()
        peak_rss, cpu = proc_stats(op.proc.pid)
        watcher.stop()
        op.stop()
    return {
        "n": n,
        "window_seconds": window,
        "report_seconds": progress.report_seconds,
        "status_seconds": progress.status_seconds,
        "operator_requests_per_second_baseline": baseline,
        "operator_requests_per_second_reporting": reporting,
        "operator_requests_per_second_added": reporting - baseline,
        "worker_patches_per_second": worker_patches,
        "report_errors": reporters.errors,
        "status_lag_sampled_max": max(lags) if lags else None,
        "reaction_p50_quiet": percentile(reaction_quiet, 0.5),
        "reaction_p99_quiet": percentile(reaction_quiet, 0.99),
        "reaction_p50": percentile(reaction, 0.5),
        "reaction_p99": percentile(reaction, 0.99),
        "released": len(reaction),
        "operator_peak_rss_mib": peak_rss,
        "operator_cpu_seconds": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="running DistillationJobs")
    parser.add_argument("--window", type=float, default=120, help="seconds each rate is measured over")
    parser.add_argument(
        "--release",
        type=int,
        default=100,
        help="generate stages that finish before reporting, and as many during it",
    )
    args = parser.parse_args(argv)
    cluster = ensure_cluster()
    install_crds(cluster)
    release = min(args.release, args.n)
    extra = ExtraNodes(cluster, args.n + release)
    try:
        row = run(cluster, args.n, args.window, release, RESULTS.parent / "progress_scale_logs")
    finally:
        extra.remove()
    print(json.dumps(row, indent=1))
    print(
        f"{'N':>5} {'report s':>8} {'status s':>8} {'op req/s base':>13} {'op req/s reporting':>18} "
        f"{'added':>6} {'worker patch/s':>14} {'react p50/p99 quiet':>19} {'reporting':>11} {'peak RSS MiB':>12}"
    )
    print(
        f"{row['n']:>5} {row['report_seconds']:>8.0f} {row['status_seconds']:>8.0f} "
        f"{row['operator_requests_per_second_baseline']:>13.1f} {row['operator_requests_per_second_reporting']:>18.1f} "
        f"{row['operator_requests_per_second_added']:>6.1f} {row['worker_patches_per_second']:>14.1f} "
        f"{row['reaction_p50_quiet']:>10.2f}/{row['reaction_p99_quiet']:<8.2f} "
        f"{row['reaction_p50']:>5.2f}/{row['reaction_p99']:<5.2f} {row['operator_peak_rss_mib']:>12.0f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"meta": meta, "row": row}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
