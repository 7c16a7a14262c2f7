"""An open-weight teacher run inside the pod: vLLM offline batch inference (``vllm.LLM``).

Prompts go to ``LLM.chat`` in batches of ``offline_batch_size``; vLLM's own
scheduler keeps the accelerator busy within a batch. Answers are stored after
every batch, and SIGTERM is honoured between batches, so a preempted pod loses
at most one batch of work. The records are the same as an endpoint teacher's.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubedistill.api.savings import TokenSpend
from kubedistill.api.v1alpha1 import TeacherSpec
from kubedistill.storage.objectstore import ObjectStore, download_prefix, is_s3
from kubedistill.worker.common import WorkerError, on_sigterm
from kubedistill.worker.teacher.spend import Charge, Ledger
from kubedistill.worker.teacher.store import Answer
from kubedistill.worker.topk import encode, from_ids

log = logging.getLogger("kubedistill.worker.generate")
MIN_LOGPROB = -9999.0


# What a tokenizer needs of a model directory (the estimate stage downloads only these).
TOKENIZER_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


@dataclass(frozen=True)
class OfflineItem:
    messages: tuple[tuple[str, str], ...]
    keys: list[str]
    charge: Charge = field(default_factory=lambda: Charge(0, 0))  # the most it bills: prompt + n x maxTokens


def resolve_model(model: str, store: ObjectStore | None, work_dir: Path) -> str:
    """A local directory vLLM can load: an s3:// prefix is downloaded first."""
    if not is_s3(model):
        return model
    if store is None:
        raise WorkerError(f"no object store for teacher model {model}")
    target = work_dir / "teacher-model"
    if not (target / "config.json").exists():
        log.info("downloading teacher model %s", model)
        if not download_prefix(store, model, target):
            raise WorkerError(f"teacher model {model} is empty or missing")
    return str(target)


def resolve_tokenizer(model: str, store: ObjectStore | None, work_dir: Path) -> str:
    """A local directory with the teacher's tokenizer only (no weights): enough to count prompt tokens."""
    if not is_s3(model):
        return model
    if store is None:
        raise WorkerError(f"no object store for teacher model {model}")
    target = work_dir / "teacher-tokenizer"
    found = [obj for obj in store.list(model) if obj.key in TOKENIZER_FILES]
    if not found:
        raise WorkerError(f"teacher model {model} has no tokenizer files ({', '.join(sorted(TOKENIZER_FILES))})")
    for obj in found:
        store.download_file(obj.uri, target / obj.key)
    return str(target)


def load_tokenizer(path: str) -> Any | None:
    """The teacher's tokenizer, or None where transformers is not installed (the estimate then applies)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a model without a loadable tokenizer: estimate instead
        log.warning("teacher tokenizer not loadable from %s (%s): prompt tokens are estimated", path, err)
        return None


def save_tokenizer(model: str, store: ObjectStore | None, work_dir: Path) -> Path:
    """The teacher's tokenizer, saved into a directory (an s3:// model: its tokenizer files only)."""
    from transformers import AutoTokenizer

    source = resolve_tokenizer(model, store, work_dir)
    dest = work_dir / "teacher-tokenizer-saved"
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    except Exception as err:
        raise WorkerError(f"cannot load the tokenizer of teacher model {model}: {type(err).__name__}: {err}") from err
    return dest


def load_llm(teacher: TeacherSpec, model_path: str) -> Any:
    from vllm import LLM

    spec = teacher.vllm
    assert spec is not None
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "dtype": spec.dtype,
        # Per-request metrics (RequestOutput.metrics): the teacher's speed is measured from them.
        "disable_log_stats": False,
    }
    if spec.max_model_len:
        kwargs["max_model_len"] = spec.max_model_len
    if teacher.sampling.seed is not None:
        kwargs["seed"] = teacher.sampling.seed
    try:
        return LLM(**kwargs)
    except Exception as err:
        raise WorkerError(f"vLLM could not load teacher model {spec.model}: {type(err).__name__}: {err}") from err


def sampling_params(teacher: TeacherSpec, samples: int, *, ignore_eos: bool = False) -> Any:
    from vllm import SamplingParams

    sampling = teacher.sampling
    return SamplingParams(
        n=samples,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        logprobs=teacher.logprobs or None,
        ignore_eos=ignore_eos,
    )


def answers_from_output(output: Any, keys: list[str], top_k: int | None) -> list[Answer]:
    """One vLLM RequestOutput -> one Answer per key; usage goes to the first, as with endpoints."""
    completions = sorted(output.outputs, key=lambda c: c.index)
    answers = [
        Answer(
            key=key,
            content=completion.text,
            finish_reason=completion.finish_reason,
            completion_tokens=len(completion.token_ids),
            topk=_topk(completion, top_k) if top_k else None,
        )
        for key, completion in zip(keys, completions, strict=False)
    ]
    if answers:
        answers[0].prompt_tokens = len(output.prompt_token_ids or [])
    return answers


def usage_of(output: Any) -> TokenSpend:
    """What an in-pod teacher's request "bills": its tokens, counted by its own tokenizer."""
    return TokenSpend(
        requests=1,
        prompt_tokens=len(output.prompt_token_ids or []),
        cached_prompt_tokens=int(getattr(output, "num_cached_tokens", 0) or 0),
        completion_tokens=sum(len(c.token_ids) for c in output.outputs),
    )


def _topk(completion: Any, top_k: int) -> str | None:
    """vLLM's per-position {token id: Logprob} -> a compact distribution in the teacher's token ids.

    vLLM returns the top k plus the sampled token when it ranks below k; the alternatives kept
    are those ranked 1..k, most likely first.
    """
    if completion.logprobs is None:
        return None
    chosen, tops = [], []
    for position, token_id in enumerate(completion.token_ids):
        entries = completion.logprobs[position]
        picked = entries.get(token_id)
        chosen.append((int(token_id), _finite(picked.logprob) if picked else MIN_LOGPROB))
        ranked = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is None or lp.rank <= top_k),
            key=lambda item: -item[1].logprob,
        )
        tops.append([(int(tid), _finite(lp.logprob)) for tid, lp in ranked[:top_k]])
    return encode(from_ids(chosen, tops, top_k))


def _finite(value: float) -> float:
    """A finite floor for -inf, as vLLM's OpenAI server clamps it: no loss term becomes infinite."""
    return max(float(value), MIN_LOGPROB)


def _batches(items: Iterable[OfflineItem], size: int, ledger: Ledger) -> Iterator[list[OfflineItem]]:
    """Batches of items whose worst case the budget holds.

    An item that does not fit waits for the batch before it to be answered (and settled); if it
    still does not fit with nothing in flight, the budget is exhausted and no more batches come.
    """
    batch: list[OfflineItem] = []
    for item in items:
        while not ledger.reserve(item.charge):
            if not batch:
                ledger.exhausted = True
                return
            yield batch  # the caller answers and settles it before this generator resumes
            batch = []
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_offline(
    llm: Any,
    teacher: TeacherSpec,
    items: Iterable[OfflineItem],
    batch_size: int,
    on_answers: Callable[[list[Answer]], None],
    on_failure: Callable[[OfflineItem, str], None],
    stop: Callable[[], bool],
    ledger: Ledger | None = None,
) -> int:
    """Answer every item; ``on_answers`` stores each batch's answers. Returns the number of answers.

    vLLM refuses a whole batch when one prompt is bad (longer than the context,
    say): that batch is then retried one prompt at a time, so only the bad
    prompts fail.
    """
    total = 0
    ledger = ledger if ledger is not None else Ledger()
    for batch in _batches(items, batch_size, ledger):
        if stop():
            for item in batch:
                ledger.settle(item.charge, None)
            break
        try:
            outputs = _chat(llm, teacher, batch)
        except Exception as err:  # vLLM raises ValueError, RuntimeError, ... for bad inputs
            log.warning("vLLM refused a batch (%s: %s); retrying its prompts one by one", type(err).__name__, err)
            outputs = []
            for item in batch:
                try:
                    outputs.extend(_chat(llm, teacher, [item]))
                except Exception as one:
                    on_failure(item, f"vLLM: {type(one).__name__}: {one}"[:300])
                    outputs.append(None)
        answers: list[Answer] = []
        for item, output in zip(batch, outputs, strict=True):
            ledger.settle(item.charge, usage_of(output) if output is not None else None)
            if output is not None:
                answers.extend(answers_from_output(output, item.keys, teacher.logprobs))
        on_answers(answers)
        total += len(answers)
    return total


def _chat(llm: Any, teacher: TeacherSpec, batch: list[OfflineItem]) -> list[Any]:
    return list(
        llm.chat(
            [[{"role": r, "content": c} for r, c in item.messages] for item in batch],
            [sampling_params(teacher, len(item.keys)) for item in batch],
            use_tqdm=False,
        )
    )


class StopFlag:
    """SIGTERM -> a flag checked between batches (a vLLM batch is not interruptible)."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: nobody can signal us anyway
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing the current batch, then storing answers and exiting")
        self.stopped = True
        on_sigterm("the current vLLM batch finishes and its answers are stored")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __call__(self) -> bool:
        return self.stopped
