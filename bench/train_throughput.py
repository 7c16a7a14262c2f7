"""Training throughput of the train worker vs trl's own ``trl sft`` script; packing on vs off.

    python bench/train_throughput.py                      # CPU: fp32, ~8-10 min on 2 shared cores
    python bench/train_throughput.py --repeats 3 --examples 2000
    python bench/train_throughput.py --method lora
    python bench/train_throughput.py --threads 2          # OMP threads per training process (CPU)

Both contenders train the same model (a Llama built from a config, saved with
``save_pretrained``) on the same length-skewed dataset (nine answers in ten are 1-4 words,
one in ten is 60-120 words) with the same settings: one epoch, batch size, max length,
learning-rate schedule, seed, no gradient checkpointing, a checkpoint at the end. Each
combination runs as its own process, the two tools alternate who goes first, and the
ratios are taken inside this one run:

* ours: ``python -m kubedistill.worker train --config ...`` reading the dataset in the
  generate worker's format (manifest + shards) from a local object store, uploading its
  checkpoint and export there;
* baseline: ``trl sft --model_name_or_path ... --dataset_name DIR`` on the same records as
  plain prompt-completion JSONL.

With packing, trl concatenates a micro-batch's packed rows into one padding-free sequence;
without flash-attention (CPU, or a GPU without flash-attn) the worker instead runs one packed
row per micro-batch and accumulates to the same batch (``train.decisions.batch_layout``): the same
rows per optimizer step and the same token-weighted loss, which the loss column shows.

tokens/s = real (non-padding) tokens of the epoch / the Trainer's ``train_runtime`` (the
training loop, its final checkpoint included; the same definition for both). The token count
is computed here from the data (chat template applied, truncated to max length) and
cross-checked against the count the worker reports. Wall seconds are whole processes
(imports, data preparation, export and uploads included).

On a CUDA machine the matrix runs in bf16 (``--precision fp32`` to override), and each
row also reports the peak GPU memory of the training process
(``torch.cuda.max_memory_allocated``, recorded at exit by a ``sitecustomize`` hook that
this bench puts on ``PYTHONPATH`` for both tools alike). On CPU the hook reports peak RSS.

Prints a table and writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kubedistill.storage.objectstore import LocalStore  # noqa: E402
from kubedistill.worker.train.decisions import load_dtype_name  # noqa: E402
from tests.support.datasets import skewed_lengths_task, task_corpus, trl_rows, write_dataset  # noqa: E402
from tests.support.tiny_model import build_tiny_chat_model  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "train_throughput.json"

PEAK_HOOK = """
import atexit, json, os, resource, sys

def _kd_bench_report():
    path = os.environ.get("KD_BENCH_PEAK_FILE")
    if not path:
        return
    record = {"pid": os.getpid(), "argv": sys.argv[:2],
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            record["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:
        pass
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\\n")

atexit.register(_kd_bench_report)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=800, help="training examples (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training process (CPU)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: 256 on CPU, 1024 on GPU)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: 4 on CPU, 8 on GPU)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser.parse_args()


# --------------------------------------------------------------------------- set-up


def build_inputs(root: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    hidden = args.hidden or (1024 if cuda else 256)
    layers = args.layers or (8 if cuda else 4)
    model_dir = build_tiny_chat_model(
        root / "model",
        corpus=task_corpus(),
        vocab_size=1024,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        intermediate_size=hidden * 11 // 4,
        max_position_embeddings=max(1024, args.max_length),
    )
    examples = skewed_lengths_task(args.examples, seed=0)
    write_dataset(LocalStore(), str(root / "dataset"), examples)
    trl_dir = root / "trl-dataset"
    trl_dir.mkdir()
    with (trl_dir / "train.jsonl").open("w") as handle:
        for row in trl_rows(examples):
            handle.write(json.dumps(row) + "\n")
    tokens, lengths = count_tokens(model_dir, examples, args.max_length)
    return {
        "model_dir": model_dir,
        "dataset_dir": root / "dataset",
        "trl_dir": trl_dir,
        "tokens": tokens,
        "lengths": lengths,
        "hidden": hidden,
        "layers": layers,
    }


def count_tokens(model_dir: Path, examples: list[tuple[str, str]], max_length: int) -> tuple[int, list[int]]:
    """Real tokens per example as trl tokenizes prompt + completion, truncated to max_length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    for prompt, answer in examples:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        lengths.append(min(len(ids), max_length))
    return sum(lengths), lengths


def hook_dir(root: Path) -> Path:
    path = root / "hook"
    path.mkdir(exist_ok=True)
    (path / "sitecustomize.py").write_text(PEAK_HOOK)
    return path


def run_env(root: Path, args: argparse.Namespace, peak_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir(root)), str(REPO_ROOT), env.get("PYTHONPATH")])),
            "KD_BENCH_PEAK_FILE": str(peak_file),
            "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(root / "hf-home"),
            "KUBEDISTILL_TERMINATION_LOG": str(root / "termination-log"),
            "WANDB_DISABLED": "true",
        }
    )
    return env


def read_peaks(peak_file: Path) -> dict[str, float | None]:
    records = [json.loads(line) for line in peak_file.read_text().splitlines()] if peak_file.exists() else []
    cuda = [r["cuda_peak_mb"] for r in records if "cuda_peak_mb" in r]
    return {
        "peak_rss_mb": max((r["max_rss_mb"] for r in records), default=None),
        "peak_cuda_mb": max(cuda) if cuda else None,
    }


# --------------------------------------------------------------------------- contenders


def run_worker(root: Path, inputs: dict[str, Any], args: argparse.Namespace, packing: bool, precision: str, tag: str):
    work = root / tag
    config = {
        "student": {
            "model": str(inputs["model_dir"]),
            "method": args.method,
            "training": {
                "epochs": 1,
                "learningRate": 2e-4,
                "lrScheduler": "cosine",
                "warmupRatio": 0.03,
                "batchSize": args.batch_size,
                "maxSeqLength": args.max_length,
                "packing": packing,
                "completionOnlyLoss": True,
                "gradientCheckpointing": False,
                "precision": precision,
                "seed": 42,
                "checkpointEverySteps": 1_000_000,  # the Trainer still saves at the end, as trl's does
            },
        },
        "datasetUri": str(inputs["dataset_dir"]),
        "outputUri": str(work / "out"),
        "checkpointUri": str(work / "ckpt"),
        "workDir": str(work / "scratch"),
        "logEverySteps": 10,
    }
    config_path = work / "train.yaml"
    work.mkdir(parents=True)
    config_path.write_text(json.dumps(config))
    peak_file = work / "peaks.jsonl"
    env = run_env(root, args, peak_file)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kubedistill.worker", "train", "--config", str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    (work / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {(root / 'termination-log').read_text()}")
    result = json.loads((root / "termination-log").read_text())
    return {
        "train_seconds": result["trainSeconds"],
        "train_loss": result["trainLoss"],
        "reported_tokens": result["tokens"],
        "wall_seconds": wall,
        **read_peaks(peak_file),
    }


def trl_command() -> list[str]:
    script = Path(sys.executable).with_name("trl")
    return [str(script)] if script.exists() else [shutil.which("trl") or "trl"]


def run_trl(root: Path, inputs: dict[str, Any], args: argparse.Namespace, packing: bool, precision: str, tag: str):
    work = root / tag
    work.mkdir(parents=True)
    cuda = _cuda()
    argv = [
        *trl_command(), "sft",
        "--model_name_or_path", str(inputs["model_dir"]),
        "--dataset_name", str(inputs["trl_dir"]),
        "--output_dir", str(work / "out"),
        "--num_train_epochs", "1",
        "--learning_rate", "2e-4",
        "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.03",
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1",
        "--max_length", str(args.max_length),
        "--packing", str(packing),
        "--completion_only_loss", "True",
        "--gradient_checkpointing", "False",
        "--bf16", str(precision == "bf16"),
        "--dtype", load_dtype_name(precision, args.method),  # what the worker loads the student in
        "--seed", "42",
        "--data_seed", "42",
        "--logging_steps", "10",
        "--save_strategy", "steps",
        "--save_steps", "1000000",
        "--report_to", "none",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    if not cuda:
        argv += ["--use_cpu", "True"]
    if args.method == "lora":
        argv += ["--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05"]
        argv += ["--lora_target_modules", "all-linear"]
    peak_file = work / "peaks.jsonl"
    env = run_env(root, args, peak_file)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    (work / "log.txt").write_text(log)
    match = re.search(r"'train_runtime': '?([0-9.eE+-]+)", log)
    loss = re.search(r"'train_loss': '?([0-9.eE+-]+)", log)
    if done.returncode != 0 or not match or not loss:
        raise RuntimeError(f"trl sft failed ({done.returncode}):\n{log[-3000:]}")
    return {
        "train_seconds": float(match.group(1)),
        "train_loss": float(loss.group(1)),
        "reported_tokens": None,
        "wall_seconds": wall,
        **read_peaks(peak_file),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the matrix


def main() -> int:
    args = parse_args()
    import torch
    import transformers
    import trl

    cuda = torch.cuda.is_available()
    precision = (
        args.precision if args.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    )
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        inputs = build_inputs(root, args, cuda)
        runs: list[dict[str, Any]] = []
        tools = {"worker": run_worker, "trl sft": run_trl}
        for packing in (False, True):
            for repeat in range(args.repeats):
                order = list(tools) if repeat % 2 == 0 else list(reversed(tools))
                for tool in order:
                    tag = f"{tool.replace(' ', '-')}-{'packed' if packing else 'padded'}-{repeat}"
                    print(f"running {tag} ...", flush=True)
                    measured = tools[tool](root, inputs, args, packing, precision, tag)
                    measured.update(
                        tool=tool,
                        packing=packing,
                        repeat=repeat,
                        tokens=inputs["tokens"],
                        tokens_per_second=inputs["tokens"] / measured["train_seconds"],
                    )
                    runs.append(measured)
                    print(
                        f"  {measured['tokens_per_second']:.0f} tokens/s, "
                        f"train {measured['train_seconds']:.1f}s, wall {measured['wall_seconds']:.1f}s",
                        flush=True,
                    )
        summary = summarise(runs)
        report = {
            "bench": "train_throughput",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "threads_per_process": args.threads,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
            "settings": {
                "method": args.method,
                "precision": precision,
                "examples": args.examples,
                "epochs": 1,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "model": {"hidden": inputs["hidden"], "layers": inputs["layers"]},
                "tokens_per_epoch": inputs["tokens"],
                "example_tokens": {
                    "median": statistics.median(inputs["lengths"]),
                    "max": max(inputs["lengths"]),
                    "share_over_64": sum(n > 64 for n in inputs["lengths"]) / len(inputs["lengths"]),
                },
            },
            "runs": runs,
            "summary": summary,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2))
        print_table(report)
        print(f"\nwrote {RESULTS}")
    finally:
        if args.keep:
            print(f"scratch kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(tool: str, packing: bool, key: str) -> float | None:
        values = [r[key] for r in runs if r["tool"] == tool and r["packing"] == packing and r[key] is not None]
        return statistics.median(values) if values else None

    rows = {}
    for packing in (False, True):
        for tool in ("worker", "trl sft"):
            rows[f"{tool}|{'packed' if packing else 'padded'}"] = {
                key: median(tool, packing, key)
                for key in (
                    "tokens_per_second",
                    "train_seconds",
                    "train_loss",
                    "wall_seconds",
                    "peak_rss_mb",
                    "peak_cuda_mb",
                )
            }
    out: dict[str, Any] = {"rows": rows}
    for layout in ("padded", "packed"):
        ours = rows[f"worker|{layout}"]["tokens_per_second"]
        theirs = rows[f"trl sft|{layout}"]["tokens_per_second"]
        out[f"worker_vs_trl_{layout}"] = ours / theirs
    for tool in ("worker", "trl sft"):
        out[f"packing_speedup_{tool.replace(' ', '_')}"] = (
            rows[f"{tool}|packed"]["tokens_per_second"] / rows[f"{tool}|padded"]["tokens_per_second"]
        )
    worker_counts = {r["reported_tokens"] for r in runs if r["tool"] == "worker"}
    out["worker_token_count_matches"] = worker_counts == {runs[0]["tokens"]}
    return out


def print_table(report: dict[str, Any]) -> None:
    s, m = report["settings"], report["machine"]
    print(
        f"\ntrain throughput: {m['device']}, {s['precision']}, {s['method']}, "
        f"hidden {s['model']['hidden']} x {s['model']['layers']} layers, {s['examples']} length-skewed examples "
        f"({s['tokens_per_epoch']} tokens), batch {s['batch_size']}, max length {s['max_length']}, "
        f"{m['threads_per_process']} thread(s)/process, medians of {max(r['repeat'] for r in report['runs']) + 1}"
    )
    header = (
        f"{'tool':<10}{'layout':<9}{'tokens/s':>10}{'train s':>9}{'loss':>8}{'wall s':>8}"
        f"{'peak RSS MB':>13}{'peak GPU MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for key, row in report["summary"]["rows"].items():
        tool, layout = key.split("|")
        gpu = f"{row['peak_cuda_mb']:.0f}" if row["peak_cuda_mb"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        print(
            f"{tool:<10}{layout:<9}{row['tokens_per_second']:>10.0f}{row['train_seconds']:>9.1f}"
            f"{row['train_loss']:>8.4f}{row['wall_seconds']:>8.1f}{rss:>13}{gpu:>13}"
        )
    summary = report["summary"]
    print(
        f"\nworker / trl sft tokens/s: padded {summary['worker_vs_trl_padded']:.2f}, "
        f"packed {summary['worker_vs_trl_packed']:.2f}"
    )
    print(
        f"packing on / off tokens/s: worker {summary['packing_speedup_worker']:.2f}, "
        f"trl sft {summary['packing_speedup_trl_sft']:.2f}"
    )
    print(f"worker's own token count equals the bench's: {summary['worker_token_count_matches']}")


if __name__ == "__main__":
    sys.exit(main())
