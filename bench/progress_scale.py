"""Live progress at scale: N running stages reporting, what it costs the API server and the reactions.

    python bench/progress_scale.py --n 200              # default intervals (the CPU pool holds 220 pods)
    python bench/progress_scale.py --n 100 --window 60  # quicker

On the local cluster (real API server, kwok pods), in a fresh namespace, with the real operator:

1. create N DistillationJobs whose generate pods kwok keeps running (the stage never ends);
2. baseline: the operator's API requests per second over ``--window`` seconds, nothing reporting;
3. reporting: every running stage reports as a worker would (a merge patch of its job's progress
   ConfigMap every ``progress.reportSeconds``, staggered), for the same window: the operator's
   requests per second again (the difference is what progress adds), the status writes it made,
   and how long a report took to show in the status (sampled);
4. reactions under reporting: ``--release`` generate pods finish while every other stage keeps
   reporting; per DistillationJob, generate Job complete -> train Job created (p50/p99), as in
   bench/operator_scale.py.

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


def check_pod_capacity(cluster: Cluster, n: int) -> None:
    """N generate pods stay Running at once: the CPU pool must hold them all, or the bench would wait forever."""
    from kubedistill.api.settings import OperatorSettings

    selector = OperatorSettings().cpu_pool.node_selector
    nodes = cluster.core().list_node().items
    capacity = sum(
        int((node.status.allocatable or {}).get("pods", 0))
        for node in nodes
        if all((node.metadata.labels or {}).get(k) == v for k, v in selector.items())
        and not any(t.effect in ("NoSchedule", "NoExecute") for t in node.spec.taints or [])  # GPU nodes
    )
    if capacity < n:
        raise SystemExit(
            f"--n {n}: the CPU pool's nodes hold {capacity} pods, and every generate pod stays Running here; "
            f"use --n {capacity} or less, or add kwok nodes with the pool's labels"
        )


def run(cluster: Cluster, n: int, window: float, release: int, workdir: Path) -> dict[str, Any]:
    check_pod_capacity(cluster, n)
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
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, distillation_job(name, serve=False)), names))  # fmt: skip

        def running() -> dict[str, str]:
            found = statuses(cluster, namespace)
            return {
                name: s["stages"]["generate"]["job"]
                for name, s in found.items()
                if (s.get("stages") or {}).get("generate", {}).get("phase") == "Running"
            }

        wait_for(lambda: len(running()) == n, timeout=1800, interval=5, what=f"{n} generate stages running")
        jobs = running()
        time.sleep(10)  # the start-up settles

        # Baseline: nothing reports.
        before = api_requests(op)
        time.sleep(window)
        baseline = (api_requests(op) - before) / window

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

        # Reactions while everyone reports: some generate pods finish.
        core = cluster.core()
        released = names[:release]
        for name in released:
            for pod in core.list_namespaced_pod(namespace, label_selector=f"kubedistill.io/job={name}").items:
                core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {ANN_HOLD: None}}})
        wait_for(lambda: all((name, "train") in watcher.seen for name in released), timeout=600, interval=1,
                 what=f"{release} train Jobs")  # fmt: skip
        reporters.stop()
        peak_rss, cpu = proc_stats(op.proc.pid)
        with watcher.lock:
            seen = dict(watcher.seen)
        reaction = [seen[(name, "train")] - seen[(name, "generate-complete")] for name in released
                    if (name, "generate-complete") in seen]  # fmt: skip
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
        "reaction_p50": percentile(reaction, 0.5),
        "reaction_p99": percentile(reaction, 0.99),
        "released": len(reaction),
        "operator_peak_rss_mib": peak_rss,
        "operator_cpu_seconds": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="running DistillationJobs (at most the CPU pool's pods)")
    parser.add_argument("--window", type=float, default=120, help="seconds each rate is measured over")
    parser.add_argument("--release", type=int, default=100, help="generate stages that finish while others report")
    args = parser.parse_args(argv)
    cluster = ensure_cluster()
    install_crds(cluster)
    row = run(cluster, args.n, args.window, min(args.release, args.n), RESULTS.parent / "progress_scale_logs")
    print(json.dumps(row, indent=1))
    print(
        f"{'N':>5} {'report s':>8} {'status s':>8} {'op req/s base':>13} {'op req/s reporting':>18} "
        f"{'added':>6} {'worker patch/s':>14} {'react p50/p99 s':>16} {'peak RSS MiB':>12}"
    )
    print(
        f"{row['n']:>5} {row['report_seconds']:>8.0f} {row['status_seconds']:>8.0f} "
        f"{row['operator_requests_per_second_baseline']:>13.1f} {row['operator_requests_per_second_reporting']:>18.1f} "
        f"{row['operator_requests_per_second_added']:>6.1f} {row['worker_patches_per_second']:>14.1f} "
        f"{row['reaction_p50']:>7.2f}/{row['reaction_p99']:<8.2f} {row['operator_peak_rss_mib']:>12.0f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"meta": meta, "row": row}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
