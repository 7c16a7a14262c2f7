"""ddp vs fsdp on one multi-GPU machine: peak GPU memory per process and tokens/s, the same run.

    python bench/fsdp_strategies.py                        # every GPU of the machine (needs 2 or more)
    python bench/fsdp_strategies.py --hidden 4096 --layers 16 --method full

For a GPU machine: it refuses to run on fewer than 2 CUDA devices (accelerate enables FSDP on
CUDA devices only; see worker/train/decisions.py's FSDP_NEEDS_CUDA). The train worker runs under
``torchrun --nproc-per-node <GPUs>`` on a Llama built from a config (random weights, the size
given) and bench/train_throughput.py's length-skewed dataset, once with
``strategy: ddp`` and once with ``strategy: fsdp``, bf16, the same steps and seed. Reported per
strategy: peak ``torch.cuda.max_memory_allocated`` of the busiest process, tokens/s of the
training loop, the final loss; and the fsdp/ddp ratios. A model too large for ddp shows as a
failed ddp row (out of memory) and an fsdp row that trains: the reason the strategy exists.

Prints a table and writes bench/results/fsdp_strategies.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.train_throughput import build_inputs, read_peaks, run_env  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "fsdp_strategies.json"


def run(root: Path, inputs: dict[str, Any], args: argparse.Namespace, strategy: str, gpus: int) -> dict[str, Any]:
    work = root / strategy
    work.mkdir(parents=True)
    config = {
        "student": {
            "model": str(inputs["model_dir"]),
            "method": args.method,
            "training": {
                "maxSteps": args.steps, "batchSize": args.batch_size, "maxSeqLength": args.max_length,
                "precision": "bf16", "seed": 42, "strategy": strategy, "checkpointEverySteps": args.steps,
            },
        },
        "datasetUri": str(inputs["dataset_dir"]),
        "outputUri": str(work / "out"),
        "checkpointUri": str(work / "ckpt"),
        "workDir": str(work / "scratch"),
        "logEverySteps": 5,
    }  # fmt: skip
    (work / "train.yaml").write_text(json.dumps(config))
    peak_file = work / "peaks.jsonl"
    env = run_env(root, args, peak_file)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
            "-m", "kubedistill.worker", "train", "--config", str(work / "train.yaml")]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    (work / "log.txt").write_text(done.stdout + done.stderr)
    row: dict[str, Any] = {"strategy": strategy, "wall_seconds": time.perf_counter() - start, **read_peaks(peak_file)}
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-400:]
        return {**row, "ok": False, "error": "out of memory" if "out of memory" in tail.lower() else tail}
    result = json.loads((root / "termination-log").read_text())
    return {**row, "ok": True, "reported_strategy": result.get("strategy"), "train_loss": result["trainLoss"],
            "tokens_per_second": result["tokensPerSecond"], "train_seconds": result["trainSeconds"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"bench/fsdp_strategies.py needs 2 or more CUDA devices, this machine has {gpus}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, args, cuda=True)
        rows = [run(root, inputs, args, strategy, gpus) for strategy in ("ddp", "fsdp")]
    ddp, fsdp = rows
    ratios = {}
    if ddp["ok"] and fsdp["ok"]:
        ratios = {
            "peak_memory_fsdp_over_ddp": (fsdp["peak_cuda_mb"] or 0) / (ddp["peak_cuda_mb"] or 1),
            "tokens_per_second_fsdp_over_ddp": fsdp["tokens_per_second"] / ddp["tokens_per_second"],
        }
    print(f"{'strategy':>8} {'ok':>3} {'peak GPU MiB':>12} {'tokens/s':>9} {'loss':>7}")
    for row in rows:
        print(f"{row['strategy']:>8} {'yes' if row['ok'] else 'no':>3} {row.get('peak_cuda_mb') or 0:>12.0f} "
              f"{row.get('tokens_per_second') or 0:>9.0f} {row.get('train_loss') or float('nan'):>7.3f}")  # fmt: skip
    print(json.dumps(ratios))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "gpus": gpus, "gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count()}
    RESULTS.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {RESULTS}")
    return 0 if all(r["ok"] for r in rows) or (fsdp["ok"] and not ddp["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
