"""Teacher request throughput of the generate worker vs a plain openai client, by concurrency.

    python bench/generate_throughput.py                       # stub + vLLM CPU server, ~3-4 min
    python bench/generate_throughput.py --skip-vllm           # stub only, ~1 min
    python bench/generate_throughput.py --levels 1,16,256 --latency 0.25

Two teachers, each measured side by side in one run at concurrency 1 ... 256:

* the fault stub (tests/support/fault_stub.py) with a fixed latency L and no faults: the
  ideal rate is concurrency / L, so "efficiency" = measured / ideal shows what the client side
  costs (the stub runs in its own process);
* a real vLLM CPU server with the tiny test model (max_tokens 16, warmed up at every level
  first, median of 2 runs): compute-bound, so only the ratio to the baseline means something.
  Server and clients share the machine's cores, so a client's CPU cost shows up as server
  throughput lost.

Baseline: ``openai.AsyncOpenAI`` (max_retries=0) with ``asyncio.gather`` over every prompt and an
``asyncio.Semaphore(concurrency)``: the usual quick script. Ours: the real stage,
``kubedistill.worker.generate.run`` on a prompts file with ``maxConcurrency`` = concurrency, an
empty answer store and a local output directory; its rate is taken over the ask phase
(stats.ask_seconds: queue, retries machinery, answer-store flushes included) and over the whole
stage (reading prompts, planning, writing shards and manifest too). Baseline and ours get
different prompts of the same shape, so vLLM's prefix cache favours neither, and they alternate
who goes first at each level.

A third table backs the answer store's design: N answers written to a real S3-compatible server
(versitygw, tests/support/s3.py) as one object per answer vs batches of 100, and read back.

Prints the tables and writes bench/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kubedistill.api.worker_config import GenerateConfig  # noqa: E402
from kubedistill.worker import generate  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results" / "generate_throughput.json"


def prompt_texts(tag: str, n: int) -> list[str]:
    return [f"{tag} what is {i} plus {i + 1}" for i in range(n)]


async def baseline(base_url: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> float:
    """Plain openai async client + asyncio.gather + a semaphore; returns requests/s."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> None:
        async with gate:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0
            )

    start = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    elapsed = time.perf_counter() - start
    await client.close()
    return len(texts) / elapsed


def worker(base_url: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> tuple[float, float]:
    """The generate stage on these prompts; returns (requests/s over the ask phase, over the whole stage)."""
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        config = GenerateConfig.model_validate(
            {
                "prompts": str(prompts),
                "outputUri": f"{tmp}/dataset",
                "answerStoreUri": f"{tmp}/answers",
                "teacher": {
                    "endpoint": {
                        "baseURL": base_url,
                        "model": model,
                        "maxConcurrency": concurrency,
                        "timeoutSeconds": 600,
                    },
                    "sampling": {"temperature": 0, "maxTokens": max_tokens},
                },
                "workDir": f"{tmp}/work",
            }
        )
        start = time.perf_counter()
        result, stats = generate.run(config)
        whole = time.perf_counter() - start
    assert result.requested == len(texts) and result.failed == 0, result
    return len(texts) / stats.ask_seconds, len(texts) / whole


def measure(
    name: str, base_url: str, model: str, levels: list[int], requests_for: Any, max_tokens: int, repeat: int
) -> list[dict[str, Any]]:
    rows = []
    for index, concurrency in enumerate(levels):
        n = requests_for(concurrency)
        runs: dict[str, list[float]] = {"baseline": [], "worker_ask": [], "worker_stage": []}
        for rep in range(repeat):
            tag = f"{name}-{concurrency}-{rep}"
            order = ["baseline", "worker"] if (index + rep) % 2 == 0 else ["worker", "baseline"]
            for who in order:
                if who == "baseline":
                    texts = prompt_texts(f"b-{tag}", n)
                    runs["baseline"].append(asyncio.run(baseline(base_url, model, texts, concurrency, max_tokens)))
                else:
                    ask, stage = worker(base_url, model, prompt_texts(f"w-{tag}", n), concurrency, max_tokens)
                    runs["worker_ask"].append(ask)
                    runs["worker_stage"].append(stage)
        row = {"teacher": name, "concurrency": concurrency, "requests": n}
        row.update({key: statistics.median(values) for key, values in runs.items()})
        rows.append(row)
        print(
            f"  {name} c={concurrency:<4} n={n:<5} baseline={row['baseline']:8.1f}/s worker={row['worker_ask']:8.1f}/s",
            flush=True,
        )
    return rows


def store_bench(answers: int) -> list[dict[str, Any]]:
    """Answer store on S3: one PUT per answer vs batched PUTs; write and load times."""
    from concurrent.futures import ThreadPoolExecutor

    from kubedistill.api.worker_config import StorageSettings
    from kubedistill.storage.objectstore import S3Store
    from kubedistill.worker.teacher.store import Answer, AnswerStore
    from tests.support.s3 import S3Server

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, S3Server(tmp) as server:
        for name, value in server.env().items():
            __import__("os").environ[name] = value
        bucket = server.make_bucket()
        store = S3Store(StorageSettings(endpoint=server.endpoint_url, addressing_style="path"))
        items = [Answer(f"{i:064x}", "an answer of a typical length " * 20, "stop", 50, 120) for i in range(answers)]
        for label, per_batch, threads in [("one object per answer", 1, 1), ("one object per answer", 1, 10),
                                          ("batches of 100", 100, 1)]:  # fmt: skip
            answer_store = AnswerStore.for_partition(store, f"s3://{bucket}/{label.replace(' ', '-')}-{threads}", "p")
            answer_store.flush_every = per_batch
            start = time.perf_counter()
            if per_batch == 1:
                uris = [f"{answer_store.prefix}/{a.key}.jsonl" for a in items]
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda uri, a: store.put_bytes(uri, a.to_line()), uris, items))
                puts = answers
            else:
                for i in range(0, answers, per_batch):
                    answer_store.add(items[i : i + per_batch])
                    answer_store.flush()
                puts = answer_store.stats.batches_written
            write = time.perf_counter() - start
            reader = AnswerStore.for_partition(store, f"s3://{bucket}/{label.replace(' ', '-')}-{threads}", "p")
            start = time.perf_counter()
            loaded = reader.load()
            load = time.perf_counter() - start
            assert loaded == answers, (label, loaded)
            rows.append({"layout": label, "writer_threads": threads, "answers": answers, "puts": puts,
                         "write_seconds": write, "load_seconds": load})  # fmt: skip
            print(f"  {label} ({threads} thread(s)): {puts} PUTs, write {write:.2f}s, load {load:.2f}s", flush=True)
    return rows


def store_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| answer store layout | writer threads | answers | PUT requests | write s | answers/s written | load s |"]
    lines.append("|" + "---|" * 7)
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['writer_threads']} | {r['answers']} | {r['puts']} | {r['write_seconds']:.2f} "
            f"| {r['answers'] / r['write_seconds']:.0f} | {r['load_seconds']:.2f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], latency: float) -> str:
    head = (
        "| teacher | concurrency | requests | ideal req/s | openai+gather req/s (eff.) | worker ask req/s (eff.) "
        "| worker whole stage req/s | worker / baseline |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        stub = r["teacher"] == "stub"
        ideal = r["concurrency"] / latency if stub else None

        def eff(v: float, ideal: float | None = ideal) -> str:
            return f"{v:.1f} ({v / ideal:.0%})" if ideal else f"{v:.1f}"

        lines.append(
            f"| {r['teacher']} | {r['concurrency']} | {r['requests']} | {f'{ideal:.0f}' if ideal else '-'} "
            f"| {eff(r['baseline'])} | {eff(r['worker_ask'])} | {r['worker_stage']:.1f} "
            f"| {r['worker_ask'] / r['baseline']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16,64,256", help="concurrency levels")
    parser.add_argument("--latency", type=float, default=0.25, help="stub latency per request, seconds")
    parser.add_argument("--rounds", type=int, default=8, help="stub: requests = rounds x concurrency")
    parser.add_argument("--repeat", type=int, default=1, help="runs per level and client (median reported)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-store", action="store_true", help="skip the answer-store layout comparison")
    parser.add_argument("--store-answers", type=int, default=1000, help="answers written in the store comparison")
    parser.add_argument("--vllm-requests", type=int, default=32, help="vLLM: at least this many requests per level")
    parser.add_argument("--vllm-repeat", type=int, default=2, help="vLLM: runs per level and client (median)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    logging.basicConfig(level=logging.WARNING)

    from tests.support.fault_stub import FaultStub

    rows: list[dict[str, Any]] = []
    print(f"stub, latency {args.latency}s:", flush=True)
    with FaultStub(latency=args.latency) as stub:
        rows += measure(
            "stub", stub.base_url, "stub", levels, lambda c: max(16, args.rounds * c), max_tokens=16, repeat=args.repeat
        )

    vllm_info: dict[str, Any] = {}
    if not args.skip_vllm:
        from tests.support.tiny_model import cached_tiny_chat_model
        from tests.support.vllm_server import VLLMServer

        cache = Path(tempfile.gettempdir()) / "kubedistill-bench"
        model = cached_tiny_chat_model(cache)
        with VLLMServer(model, served_model_name="teacher", log_path=cache / "vllm.log") as server:
            vllm_info = {"startup_seconds": server.startup_seconds, "model": "tiny llama (2 layers, hidden 128)"}
            print(f"vLLM CPU server (up in {server.startup_seconds:.0f}s), max_tokens 16:", flush=True)
            # Warm-up at every level first: vLLM's first batches of a new size pay one-off costs.
            for concurrency in levels:
                asyncio.run(baseline(server.base_url, "teacher", prompt_texts("warm", concurrency), concurrency, 16))
            rows += measure(
                "vllm",
                server.base_url,
                "teacher",
                levels,
                lambda c: min(max(args.vllm_requests, 4 * c), 512),
                16,
                args.vllm_repeat,
            )

    store_rows: list[dict[str, Any]] = []
    if not args.skip_store:
        print(f"answer store on S3 (versitygw), {args.store_answers} answers:", flush=True)
        store_rows = store_bench(args.store_answers)

    text = table(rows, args.latency)
    if store_rows:
        text += "\n\n" + store_table(store_rows)
    print()
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "generate_throughput",
                "stub_latency_seconds": args.latency,
                "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
                "vllm": vllm_info,
                "rows": rows,
                "store_rows": store_rows,
                "table": text,
            },
            indent=2,
        )
    )
    print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
