"""Pass 2 with an open-weight teacher in this process (vLLM offline), and the engine's lifetime.

``OfflineTeacher`` holds the model directory (downloaded once), the tokenizer (counted prompt
tokens for the projection and the budget) and the ``vllm.LLM`` (loaded on first use, kept for
the speed probe after the dataset is written, freed at ``close``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.storage.objectstore import ObjectStore, is_s3, open_store
from kubedistill.worker.common import Preempted
from kubedistill.worker.teacher.census import AskInputs, Failure
from kubedistill.worker.teacher.progress import Progress
from kubedistill.worker.teacher.prompts import Prompt
from kubedistill.worker.teacher.spend import PromptCounter, worst_case
from kubedistill.worker.teacher.store import Answer


class OfflineTeacher:
    """The in-pod teacher's files and engine, fetched only when needed.

    Counting prompt tokens needs the tokenizer files only; the weights (possibly hundreds of GB)
    are downloaded when the engine is first needed: a run with every answer stored and its
    speed measured before never downloads them.
    """

    def __init__(self, config: GenerateConfig, work: Path) -> None:
        spec = config.teacher.vllm
        assert spec is not None
        self.config = config
        self.work = work
        self.model = spec.model
        self.store: ObjectStore | None = open_store(spec.model, config.storage) if is_s3(spec.model) else None
        self._llm: Any = None

    def tokenizer(self) -> Any | None:
        from kubedistill.worker.teacher.offline import load_tokenizer, resolve_tokenizer

        return load_tokenizer(resolve_tokenizer(self.model, self.store, self.work))

    def llm(self) -> Any:
        from kubedistill.worker.teacher.offline import load_llm, resolve_model

        if self._llm is None:
            self._llm = load_llm(self.config.teacher, resolve_model(self.model, self.store, self.work))
        return self._llm

    def close(self) -> None:
        self._llm = None


def ask_offline(
    teacher: OfflineTeacher,
    inputs: AskInputs,
    counter: PromptCounter,
) -> list[Failure]:
    """Batches of prompts through vLLM, answers stored after each batch, each request held against the budget."""
    from kubedistill.worker.teacher.offline import OfflineItem, StopFlag, run_offline

    answers, census, stats, ledger = inputs.answers, inputs.census, inputs.stats, inputs.ledger
    config = teacher.config
    spec = config.teacher.vllm
    assert spec is not None
    max_tokens = config.teacher.sampling.max_tokens
    failures: list[Failure] = []
    prompts_by_item: dict[int, Prompt] = {}
    progress = Progress(census.to_ask, config.progress, label=spec.model, reused=census.stored)

    def items() -> Iterator[OfflineItem]:
        for prompt, keys in inputs.missing():
            item = OfflineItem(prompt.messages, keys, worst_case(counter(prompt.messages), len(keys), max_tokens))
            prompts_by_item[id(item)] = prompt
            yield item

    def on_answers(got: list[Answer]) -> None:
        answers.add(got)
        answers.flush()
        stats.requested += len(got)
        stats.answered += len(got)
        progress.update(done=len(got))

    def on_failure(item: OfflineItem, reason: str) -> None:
        failures.append(Failure(prompts_by_item[id(item)], item.keys, reason))
        stats.requested += len(item.keys)
        progress.update(failed=len(item.keys))

    with StopFlag() as stop:
        llm = teacher.llm()
        try:
            run_offline(llm, config.teacher, items(), config.offline_batch_size, on_answers, on_failure, stop, ledger)
        finally:
            answers.flush()
            progress.close()
    if stop.stopped:
        raise Preempted(f"SIGTERM after {stats.answered} answers this run; all are stored, a restart resumes")
    return failures
