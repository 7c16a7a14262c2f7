"""kubedistill: the command line of the project.

    kubedistill crds                    # regenerate crds/ and charts/kubedistill/crds/ from the API models
    kubedistill crds --check            # exit 1 when the committed CRDs drift from the models
    kubedistill crds --stdout | kubectl apply -f -
    kubedistill operator                # run the operator (kopf) against $KUBECONFIG or in-cluster
    kubedistill operator --namespace ml-team --settings /etc/kubedistill-operator/settings.yaml
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


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
    parser.add_argument("--liveness", help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: the settings'")


def _run_operator(args: argparse.Namespace) -> int:
    import logging

    import kopf

    from kubedistill.handlers import register
    from kubedistill.settings import load_settings

    settings = load_settings(args.settings)
    if args.namespace:
        settings = settings.model_copy(update={"namespaces": list(args.namespace)})
    level = getattr(logging, args.log_level or settings.log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler run at INFO (a line per object per event); keep it to problems.
    # The kubernetes client logs request bodies at DEBUG: never let that through.
    logging.getLogger("kopf").setLevel(level if level == logging.DEBUG else logging.WARNING)
    for noisy in ("kubernetes", "urllib3", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        registry=register(settings),
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(),
    )
    return 0


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

                run_demo(options)
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
