"""kubedistill: the command line of the project.

    kubedistill crds                    # regenerate crds/ and charts/kubedistill/crds/ from the API models
    kubedistill crds --check            # exit 1 when the committed CRDs drift from the models
    kubedistill crds --stdout | kubectl apply -f -
    kubedistill operator                # run the operator (kopf) against $KUBECONFIG or in-cluster
    kubedistill operator --namespace ml-team --settings /etc/kubedistill-operator/settings.yaml
    kubedistill operator --leader-elect --metrics-port 8080 --log-format json   # one of 2 replicas (the chart)
    kubedistill local run job.yaml      # run a DistillationJob's stages on this machine, then serve the model
    kubedistill local run job.yaml --estimate   # what the teacher will cost, asking it nothing
    kubedistill local demo              # a complete distillation on a laptop: tiny teacher, student, vLLM
    kubedistill version

Each subcommand is one ``Command`` in ``COMMANDS``: a name, a help line, a
function that adds its arguments and a function that runs it and returns the
exit code. Subcommands import what they need inside ``run`` (kopf, torch...),
so ``kubedistill --help`` stays fast and light.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """For subcommands without arguments."""


@dataclass(frozen=True)
class Command:
    """One ``kubedistill <name>`` subcommand."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=_no_arguments)


# --------------------------------------------------------------------------- crds

CRDS_DIR = Path("crds")
CHART_CRDS_DIR = Path("charts/kubedistill/crds")


def _crds_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        action="append",
        help=f"directory to write into (repeatable; default: {CRDS_DIR} and {CHART_CRDS_DIR}, relative to the "
        "current directory, which hack/gen-crds sets to the repository root)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stdout", action="store_true", help="print every CRD as one YAML stream instead")
    mode.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")


def _run_crds(args: argparse.Namespace) -> int:
    from kubedistill.api import crdgen

    rendered = crdgen.render_all()
    if args.stdout:
        sys.stdout.write("---\n".join(rendered.values()))
        return 0
    directories: list[Path] = args.out or [CRDS_DIR, CHART_CRDS_DIR]
    stale = [d / name for d in directories for name, text in rendered.items() if _read(d / name) != text]
    if args.check:
        for path in stale:
            print(f"{path}: differs from the API models; run hack/gen-crds", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered[path.name])
        print(f"wrote {path}")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- operator


def _operator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch only this namespace (repeatable; default: the settings' namespaces, else all)",
    )
    parser.add_argument("--settings", help="operator settings YAML (default: $KUBEDISTILL_SETTINGS)")
    parser.add_argument(
        "--liveness", help="also serve kopf's own liveness probe here, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: the settings'")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one JSON object a line")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics, /healthz and /readyz on this port (0: any free)"
    )
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics server")
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="one of several replicas: reconcile only while holding the Lease",
    )
    parser.add_argument("--lease-name", default="kubedistill-operator", help="name of the leader Lease")
    parser.add_argument(
        "--lease-namespace", default=None, help="namespace of the leader Lease (default: $POD_NAMESPACE, else default)"
    )
    parser.add_argument("--lease-seconds", type=float, default=15.0, help="how long the Lease holds without renewal")
    parser.add_argument("--lease-renew-deadline", type=float, default=10.0, help="leader steps down after this")
    parser.add_argument("--lease-retry", type=float, default=2.0, help="seconds between Lease attempts")


EXIT_LOST_LEASE = 3  # the leader Lease was lost: Kubernetes restarts the pod as a standby


def _run_operator(args: argparse.Namespace) -> int:
    import logging

    import kopf

    from kubedistill.handlers import register
    from kubedistill.settings import load_settings
    from kubedistill.telemetry import Health, OperatorMetrics, TelemetryServer, configure_logging

    settings = load_settings(args.settings)
    if args.namespace:
        settings = settings.model_copy(update={"namespaces": list(args.namespace)})
    level = getattr(logging, args.log_level or settings.log_level)
    configure_logging(level, args.log_format)
    # kopf logs every handler run at INFO (a line per object per event); keep it to problems.
    # The kubernetes client logs request bodies at DEBUG: never let that through.
    logging.getLogger("kopf").setLevel(level if level == logging.DEBUG else logging.WARNING)
    for noisy in ("kubernetes", "urllib3", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    metrics, health = OperatorMetrics(), Health()
    server = None
    if args.metrics_port is not None:
        server = TelemetryServer(metrics, health, args.metrics_host, args.metrics_port).start()
    elector = _elect_leader(args, health) if args.leader_elect else None
    metrics.leader.set(1)
    try:
        kopf.run(
            registry=register(settings, metrics=metrics, health=health),
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(),
        )
    finally:
        health.leading = False
        metrics.leader.set(0)
        if elector is not None:
            elector.release()
        if server is not None:
            server.stop()
    return 0


def _elect_leader(args: argparse.Namespace, health: Any) -> Any:
    """Block until this replica holds the leader Lease, then keep renewing it (or exit when it is lost)."""
    import os
    import threading

    from kubedistill.kube.client import load_api_client
    from kubedistill.kube.leader import LeaseElector, LeaseTiming

    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
    timing = LeaseTiming(args.lease_seconds, args.lease_renew_deadline, args.lease_retry)
    elector = LeaseElector(load_api_client(2), namespace, args.lease_name, timing=timing)
    waiting = threading.current_thread()
    health.standby_alive = waiting.is_alive
    started = time.monotonic()
    elector.acquire()
    print(f"kubedistill operator: leader after {time.monotonic() - started:.1f}s as {elector.identity}", flush=True)

    def lost() -> None:
        # Another replica may already reconcile: stop now, without kopf's graceful shutdown.
        os._exit(EXIT_LOST_LEASE)

    elector.hold(lost)
    return elector


# --------------------------------------------------------------------------- local


def _local_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="local_action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run a DistillationJob manifest's stages here, then serve the model")
    run.add_argument("manifest", type=Path, help="YAML with a DistillationJob (and the ConfigMaps it references)")
    run.add_argument("--name", help="which DistillationJob, when the file holds several")
    run.add_argument(
        "--estimate",
        action="store_true",
        help="project what the teacher will cost (tokens, and cost with teacher.pricing) and stop: nothing is sent",
    )
    demo = actions.add_parser("demo", help="prepare a tiny teacher, student and prompts, then run the demo job")
    demo.add_argument(
        "--objective",
        choices=["sft", "kd", "onPolicy"],
        default="sft",
        help="what the student learns from: the teacher's text (sft), also its top-k logprobs (kd), or the "
        "teacher's scores of the student's own answers (onPolicy)",
    )
    for sub in (run, demo):
        _local_common_arguments(sub)


def _local_common_arguments(parser: argparse.ArgumentParser) -> None:
    from kubedistill.local.runner import DEFAULT_HOME

    parser.add_argument("--workdir", type=Path, default=DEFAULT_HOME / "runs", help="configs, logs, results")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--storage-root",
        type=Path,
        default=DEFAULT_HOME / "s3",
        help="s3://bucket/key means <storage-root>/bucket/key (default: %(default)s)",
    )
    where.add_argument("--s3", action="store_true", help="use the real object store of spec.storage (AWS_* env)")
    parser.add_argument(
        "--serve-seconds",
        type=float,
        default=None,
        help="serve the distilled model this long (default: until Ctrl-C; 0: do not serve)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port of the local vLLM server")
    parser.add_argument(
        "--evaluate-engine", choices=["vllm", "transformers"], default="vllm", help="how the student answers"
    )


def _run_local(args: argparse.Namespace) -> int:
    import logging

    from kubedistill.local.processes import Stopped, stop_signals
    from kubedistill.local.runner import LocalOptions, LocalRunError, run_local

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    options = LocalOptions(
        workdir=args.workdir.expanduser(),
        storage_root=None if args.s3 else args.storage_root.expanduser(),
        serve_seconds=args.serve_seconds,
        port=args.port,
        evaluate_engine=args.evaluate_engine,
        estimate=getattr(args, "estimate", False),
    )
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the workers and the vLLM server are stopped on the way out.
    try:
        with stop_signals():
            if args.local_action == "demo":
                from kubedistill.local.demo import run_demo

                run_demo(options, args.objective)
            else:
                run_local(args.manifest, options, args.name)
    except LocalRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"kubedistill local: {stop}; the workers and the model server were stopped", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("kubedistill local: interrupted; the workers and the model server were stopped", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------- version


def _run_version(args: argparse.Namespace) -> int:
    from kubedistill import __version__
    from kubedistill.api.v1alpha1 import API_VERSION

    print(f"kubedistill {__version__} (API {API_VERSION})")
    return 0


# --------------------------------------------------------------------------- table and entry point

COMMANDS: list[Command] = [
    Command("crds", "generate the CustomResourceDefinitions from the API models", _run_crds, _crds_arguments),
    Command(
        "operator",
        "run the operator: reconcile DistillationJobs and DistilledModels",
        _run_operator,
        _operator_arguments,
    ),
    Command("local", "run DistillationJobs on this machine, no cluster needed", _run_local, _local_arguments),
    Command("version", "print the version", _run_version),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubedistill", description="Distill large language models on Kubernetes.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
