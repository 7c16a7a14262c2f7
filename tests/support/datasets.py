"""Teacher datasets written exactly as the generate worker writes them (kubedistill.api.dataset).

    from tests.support.datasets import write_dataset, copy_task

    examples = copy_task(400, seed=0)                    # [(prompt, answer)], answers set by the prompt
    manifest = write_dataset(store, "s3://bucket/ds", examples, eval_examples=examples[:20])

Used by tests that need a dataset without running a teacher, and by the train
throughput bench. Shards are JSONL of DatasetRecord, ``manifest.json`` is
written last; the digest is sha256 over the shard digests in order.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubedistill.api.dataset import (
    MANIFEST_NAME,
    SHARDS_DIR,
    TEACHER_TOKENIZER_DIR,
    DatasetCounts,
    DatasetManifest,
    DatasetRecord,
    Message,
    ShardInfo,
    Split,
    dataset_digest,
)
from kubedistill.storage.objectstore import ObjectStore, join, upload_dir

Prompt = str | Sequence[dict[str, str]]
Example = tuple[Prompt, str]


def _messages(prompt: Prompt, system: str | None) -> list[Message]:
    if isinstance(prompt, str):
        msgs = [Message(role="user", content=prompt)]
    else:
        msgs = [Message.model_validate(m) for m in prompt]
    if system:
        msgs.insert(0, Message(role="system", content=system))
    return msgs


def make_records(
    examples: Sequence[Example], split: Split, system: str | None = None, topk: Sequence[str | None] | None = None
) -> list[DatasetRecord]:
    out = []
    for i, (prompt, answer) in enumerate(examples):
        msgs = _messages(prompt, system)
        key = hashlib.sha256(f"{split}|{i}|{[m.content for m in msgs]}|{answer}".encode()).hexdigest()
        out.append(
            DatasetRecord(
                key=key,
                id=f"{split}-{i}",
                split=split,
                prompt=msgs,
                completion=[Message(role="assistant", content=answer)],
                finish_reason="stop",
                topk=topk[i] if topk is not None else None,
            )
        )
    return out


def write_dataset(
    store: ObjectStore,
    uri: str,
    examples: Sequence[Example],
    *,
    eval_examples: Sequence[Example] = (),
    system: str | None = None,
    shard_size: int = 1000,
    teacher_model: str = "test-teacher",
    write_manifest: bool = True,
    topk: Sequence[str | None] | None = None,
    teacher_tokenizer: Path | None = None,
) -> DatasetManifest:
    """Write shards + manifest under ``uri``; returns the manifest.

    ``topk``: the teacher's compact distributions of the training answers (``teacher_topk``);
    ``teacher_tokenizer``: a directory uploaded as the dataset's teacher tokenizer, as generate does.
    """
    shards: list[ShardInfo] = []
    for split, items in (("train", examples), ("eval", eval_examples)):
        records = make_records(items, split, system, topk if split == "train" else None)  # type: ignore[arg-type]
        for index, start in enumerate(range(0, len(records), shard_size)):
            chunk = records[start : start + shard_size]
            body = "".join(r.model_dump_json(by_alias=True, exclude_none=True) + "\n" for r in chunk).encode()
            path = f"{SHARDS_DIR}/{split}-{index:05d}.jsonl"
            store.put_bytes(join(uri, path), body, "application/x-ndjson")
            shards.append(
                ShardInfo(path=path, split=split, records=len(chunk), sha256=hashlib.sha256(body).hexdigest())
            )  # type: ignore[arg-type]
    digest = dataset_digest(shards)
    manifest = DatasetManifest(
        dataset_key=digest[:16],
        teacher_model=teacher_model,
        shards=shards,
        counts=DatasetCounts(prompts=len(examples) + len(eval_examples), train=len(examples), eval=len(eval_examples)),
        digest=digest,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        teacher_tokenizer=TEACHER_TOKENIZER_DIR if teacher_tokenizer is not None else None,
    )
    if teacher_tokenizer is not None:
        upload_dir(store, teacher_tokenizer, join(uri, TEACHER_TOKENIZER_DIR))
    if write_manifest:
        store.put_bytes(join(uri, MANIFEST_NAME), manifest.model_dump_json(by_alias=True).encode(), "application/json")
    return manifest


# --------------------------------------------------------------------------- synthetic tasks

TASK_WORDS = [
    *("red", "blue", "green", "black", "white", "pink", "gray", "gold"),
    *("cat", "dog", "fox", "owl", "bee", "cow", "pig", "rat"),
    *("sun", "moon", "star", "sky", "sea", "rain", "snow", "wind"),
]


def copy_task(n: int, seed: int = 0, length: int = 3, words: Sequence[str] = TASK_WORDS) -> list[Example]:
    """ "repeat: w1 w2 w3" -> "w1 w2 w3": the answer is fully determined by the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seq = " ".join(rng.choice(words) for _ in range(length))
        out.append((f"repeat: {seq}", seq))
    return out


def reverse_task(n: int, seed: int = 0, length: int = 3, words: Sequence[str] = TASK_WORDS) -> list[Example]:
    """ "reverse: a b c" -> "c b a"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seq = [rng.choice(words) for _ in range(length)]
        out.append((f"reverse: {' '.join(seq)}", " ".join(reversed(seq))))
    return out


def skewed_lengths_task(n: int, seed: int = 0, words: Sequence[str] = TASK_WORDS) -> list[Example]:
    """Length-skewed data: most answers are a few words, one in ten is ~30x longer (packing's use case)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(60, 120) if rng.random() < 0.1 else rng.randint(1, 4)
        seq = " ".join(rng.choice(words) for _ in range(length))
        out.append((f"repeat: {seq}", seq))
    return out


def task_corpus(words: Sequence[str] = TASK_WORDS) -> list[str]:
    """Tokenizer training text that makes each task word (and the task verbs) one token."""
    base = [" ".join(words), "repeat: reverse: answer question"]
    return base * 50 + [f"repeat: {w} {v}" for w in words for v in words]


def trl_rows(examples: Sequence[Example], system: str | None = None) -> list[dict[str, Any]]:
    """The same examples as plain trl prompt-completion rows (for trl's own scripts)."""
    return [
        {
            "prompt": [m.model_dump() for m in _messages(p, system)],
            "completion": [{"role": "assistant", "content": a}],
        }
        for p, a in examples
    ]


def teacher_topk(
    teacher_dir: str | Path, examples: Sequence[Example], k: int, system: str | None = None, eos: bool = True
) -> list[str]:
    """What a vLLM teacher with ``logprobs: k`` stores for these answers: per answer token (and the
    end-of-turn token when ``eos``), the teacher's top k next-token logprobs, in its token ids.

    Computed with transformers by teacher forcing on the chat-templated prompt + answer, as the
    answer's tokens would have been scored when the teacher produced them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubedistill.worker.topk import encode, from_ids

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    out = []
    for prompt, answer in examples:
        messages = [m.model_dump() for m in _messages(prompt, system)]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + ([tokenizer.eos_token_id] if eos else [])
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        chosen, tops = [], []
        for i, token in enumerate(answer_ids):
            row = logprobs[len(prompt_ids) + i - 1]
            values, indices = row.topk(k)
            chosen.append((token, float(row[token])))
            tops.append([(int(t), float(v)) for t, v in zip(indices, values, strict=True)])
        out.append(encode(from_ids(chosen, tops, k)))
    return out
