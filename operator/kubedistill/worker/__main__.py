"""kubedistill-worker: the one entry point of every stage pod.

    kubedistill-worker generate --config /etc/kubedistill/generate.yaml
    kubedistill-worker estimate --config /etc/kubedistill/generate.yaml   # the teacher spend, asking nothing
    kubedistill-worker train    --config /etc/kubedistill/train.yaml
    kubedistill-worker evaluate --config /etc/kubedistill/evaluate.yaml
    kubedistill-worker fetch    --config /etc/kubedistill/fetch.yaml
    kubedistill-worker adapter-sync --adapters FILE --dir DIR   (a sidecar, not a stage: see adapter_sync.py)

Each stage module exposes ``CONFIG`` (its pydantic config model) and
``main(config) -> dict`` (the success summary). Heavy imports (torch, trl,
vllm) happen inside the stage modules, so ``--help`` and the operator image
stay light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kubedistill.worker.common import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_PREEMPTED,
    Preempted,
    WorkerError,
    configure_logging,
    exit_deadline,
    load_config,
    write_termination_message,
)

STAGE_MODULES = {
    "generate": "kubedistill.worker.generate",
    "estimate": "kubedistill.worker.estimate",
    "train": "kubedistill.worker.train.run",
    "evaluate": "kubedistill.worker.evaluate",
    "fetch": "kubedistill.worker.fetch",
}
# After the stage has ended (its result written), the process has this long to exit.
EXIT_AFTER_STAGE_SECONDS = 60.0
log = logging.getLogger("kubedistill.worker")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubedistill-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(STAGE_MODULES))
    parser.add_argument("--config", required=True, help="stage config YAML (rendered by the operator)")
    return parser.parse_args(argv)


def run_stage(stage: str, config_path: str) -> int:
    """Run one stage and turn its outcome into an exit code + termination message."""
    try:
        module = importlib.import_module(STAGE_MODULES[stage])
        config = load_config(config_path, module.CONFIG)
        summary = module.main(config)
    except Preempted as err:
        write_termination_message(f"Preempted: {err}")
        log.warning("preempted: %s", err)
        return EXIT_PREEMPTED
    except WorkerError as err:
        write_termination_message(err.termination_message())
        log.error("%s failed: %s", stage, err)
        return EXIT_FAILED
    except Exception as err:  # a bug: still tell the operator something useful
        write_termination_message(f"internal error in {stage}: {type(err).__name__}: {err}")
        log.exception("%s crashed", stage)
        return EXIT_INTERNAL
    write_termination_message(summary)
    log.info("%s done: %s", stage, summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["adapter-sync"]:  # a long-running sidecar with its own flags
        from kubedistill.worker import adapter_sync

        return adapter_sync.main(argv[1:])
    configure_logging()
    args = parse_args(argv)
    exit_deadline.enabled = True
    code = run_stage(args.stage, args.config)
    # Nothing may hold a finished stage's pod: not a thread that never ends, not an exit handler.
    exit_deadline.arm(EXIT_AFTER_STAGE_SECONDS, code, f"{args.stage} ended with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
