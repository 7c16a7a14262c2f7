"""Objective kd: train on the teacher's top-k probabilities of every answer token, not only its text.

Per answer token the teacher named its k most likely tokens with their logprobs; the mass it
did not name is the *tail*. The student's probabilities of the same k tokens, plus its own
tail, give a distribution over the same k + 1 buckets, and the loss is

    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(teacher's answer)

where ``_T`` means both bucket distributions softened alike by the temperature T (log-probs
divided by T, renormalised). At T = 1 the KL is exact on the buckets: the top-k + tail
sparse KD that matches full-distribution KD at about a dozen tokens per position
(Anshumann et al., ACL 2025). Both terms are sums over answer tokens divided by the number of
answer tokens in the global batch, as trl's SFT loss is, so gradient accumulation and data
parallelism weigh every token alike. A position the teacher did not score (the chat
template's end-of-turn tokens) contributes cross-entropy only.

Why our own loss: trl's GKDTrainer and DistillationTrainer need the teacher model (or a
server) at training time; the point of kd is that the teacher's distributions were bought once,
during generation, and are replayed from storage. trl's server-distillation loss has the same
top-k + tail form (``_add_tail_bucket``) but is private to its on-policy trainer.

The trainer is trl's ``SFTTrainer`` (same data preparation, chat templates, LoRA, checkpoints,
resume) with ``compute_loss`` replaced and a collator that lays the teacher's distributions
beside the labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubedistill.api.dataset import DatasetRecord
from kubedistill.worker.common import WorkerError
from kubedistill.worker.tokens import (
    Difference,
    answer_difference,
    decoded_pieces,
    piece_index,
    vocabulary_difference,
)
from kubedistill.worker.topk import TopK, decode, from_verbose

log = logging.getLogger("kubedistill.worker.train")

KD_IDS = "kd_top_ids"
KD_LOGPROBS = "kd_top_logprobs"
# More answers than this fraction tokenized differently by the student means another tokenizer,
# not the odd teacher sample that is not its tokenizer's canonical split of its own text.
MAX_MISALIGNED_FRACTION = 0.5


# --------------------------------------------------------------------------- the loss


def kd_loss(
    logits: Any,
    labels: Any,
    top_ids: Any,
    top_logprobs: Any,
    alpha: float,
    temperature: float,
    num_items: Any = None,
) -> tuple[Any, Any, Any]:
    """(loss, ce, kl) of one batch; ce and kl are this batch's means per answer token (for logs).

    ``logits`` [B, L, V] predict the token after each position; ``labels`` [B, L] (-100: no
    loss); ``top_ids``/``top_logprobs`` [B, L, K] are the teacher's top k *for the token at*
    each position (-inf: not named). The loss's sums are divided by ``num_items``, the labelled
    tokens of the global batch under gradient accumulation, or by this batch's when None.
    """
    import torch
    import torch.nn.functional as F

    logits, labels = logits[:, :-1, :], labels[:, 1:]
    top_ids, top_lps = top_ids[:, 1:, :], top_logprobs[:, 1:, :].float()
    student = F.log_softmax(logits.float(), dim=-1)
    labelled = labels != -100
    local = labelled.sum().clamp(min=1)
    count = local if num_items is None else torch.as_tensor(num_items, device=logits.device).clamp(min=1)

    safe_labels = torch.where(labelled, labels, torch.zeros_like(labels))
    ce_sum = -(student.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) * labelled).sum()

    named = torch.isfinite(top_lps)
    scored = labelled & named.any(-1)
    student_top = torch.where(named, student.gather(-1, top_ids), torch.full_like(top_lps, float("-inf")))
    teacher_t = F.log_softmax(_with_tail(top_lps) / temperature, dim=-1)
    student_t = F.log_softmax(_with_tail(student_top) / temperature, dim=-1)
    present = torch.isfinite(teacher_t)  # buckets the teacher gives no mass add nothing (0 log 0 = 0)
    terms = torch.where(present, teacher_t.exp() * (teacher_t - student_t), torch.zeros_like(teacher_t))
    kl_sum = (terms.sum(-1) * scored).sum()
    loss = (alpha * temperature**2 * kl_sum + (1 - alpha) * ce_sum) / count
    return loss, (ce_sum / local).detach(), (kl_sum / local).detach()


def _with_tail(logprobs: Any) -> Any:
    """[..., K] log-probs -> [..., K + 1] with log(1 - sum p) last (kept just above 0 when sum p ~ 1)."""
    import torch

    total = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-6)
    tail = torch.log(-torch.expm1(total))
    return torch.cat([logprobs, tail], dim=-1)


# --------------------------------------------------------------------------- records -> aligned targets


@dataclass
class Alignment:
    """How the teacher's answers line up with the student's tokens, over a dataset."""

    scored: int = 0  # answers whose distributions train
    without: int = 0  # answers stored without logprobs
    misaligned: int = 0  # answers the student tokenizes differently (cross-entropy only)
    first: str | None = None  # the first misalignment, as a one-line refusal
    first_seen: str | None = None  # the same, as the warning of an answer trained on cross-entropy only
    folded: int = 0  # alternatives no single student token names: their mass is in the tail
    k: int = 0  # alternatives per position


class StudentTokens:
    """The student's view of an answer: its completion token ids, as trl's SFT tokenization makes them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pieces: list[str] | None = None
        self._index: dict[str, int] | None = None

    def completion_ids(self, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> list[int]:
        """Token ids after the prompt: trl's ``common_prefix_length`` split of prompt vs prompt + completion."""
        template = self.tokenizer.apply_chat_template
        prompt_ids = _ids(template(prompt, add_generation_prompt=True, tokenize=True))
        full_ids = _ids(template(prompt + completion, tokenize=True))
        start = 0
        while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
            start += 1
        return full_ids[start:]

    def pieces(self) -> list[str]:
        if self._pieces is None:
            self._pieces = decoded_pieces(self.tokenizer)
        return self._pieces

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = piece_index(self.pieces())
        return self._index


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def distribution_of(record: DatasetRecord) -> TopK | None:
    if record.topk:
        return decode(record.topk)
    if record.logprobs:
        return from_verbose([entry.model_dump() for entry in record.logprobs])
    return None


def targets_for(
    record: DatasetRecord, row: dict[str, Any], student: StudentTokens, alignment: Alignment, names: tuple[str, str]
) -> tuple[list[list[int]], list[list[float]]]:
    """The teacher's distributions in student token ids, one row per answer token (empty: cross-entropy only)."""
    dist = distribution_of(record)
    if dist is None:
        alignment.without += 1
        return [], []
    completion_ids = student.completion_ids(row["prompt"], row["completion"])
    if dist.table is None:  # token ids of the teacher's vocabulary, checked equal to the student's
        teacher_tokens: list[Any] = [int(i) for i in dist.ids]
        student_tokens: list[Any] = completion_ids
        top_ids = dist.top_ids
        top_lps = dist.top_logprobs
        show = _show_id(student.tokenizer)
    else:  # token strings: mapped through the student's decoded pieces
        pieces = student.pieces()
        teacher_tokens = list(dist.tokens())
        student_tokens = [pieces[i] if i < len(pieces) else "<none>" for i in completion_ids]
        top_ids, top_lps, folded = _map_strings(dist, student.index())
        alignment.folded += folded

        def show(token: str) -> str:
            return token

    n = dist.positions
    ends_apart = n > len(student_tokens) or (n and teacher_tokens[n - 1] != student_tokens[n - 1])
    if record.finish_reason == "stop" and n and ends_apart:
        n -= 1  # the teacher's own end token, where the chat template writes its end-of-turn (or nothing)
    difference = answer_difference(teacher_tokens[:n], student_tokens)
    if difference is None and n > len(student_tokens):
        difference = Difference(len(student_tokens), str(teacher_tokens[len(student_tokens)]), "<end of answer>")
    if difference is not None:
        alignment.misaligned += 1
        if alignment.first is None:
            shown = Difference(difference.position, show(difference.teacher), show(difference.student))
            where = f"in the answer of record {record.id or record.key}"
            alignment.first = shown.message(names[0], names[1], where)
            alignment.first_seen = (
                f"{where}, token {shown.position} is {shown.teacher!r} for the teacher and {shown.student!r} for the "
                "student (with one tokenizer: a teacher sample that is not its tokenizer's own split of the text)"
            )
        return [], []
    alignment.scored += 1
    alignment.k = max(alignment.k, dist.k)
    return top_ids[:n].tolist(), top_lps[:n].tolist()


def _show_id(tokenizer: Any) -> Any:
    def show(token: str) -> str:
        if not token.isdigit():
            return token
        return f"{tokenizer.convert_ids_to_tokens(int(token))} (id {token})"

    return show


def _map_strings(dist: TopK, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Alternatives named by text -> student ids; an alternative no single student token is stays unnamed (tail)."""
    assert dist.table is not None
    mapped = np.array([index.get(token, -1) for token in dist.table], dtype=np.int64)
    ids = mapped[dist.top_ids]
    named = np.isfinite(dist.top_logprobs)
    unknown = named & (ids < 0)
    lps = np.where(unknown, -np.inf, dist.top_logprobs).astype(np.float32)
    return np.where(ids < 0, 0, ids), lps, int(unknown.sum())


def add_kd_targets(
    records: Iterable[DatasetRecord],
    rows: list[dict[str, Any]],
    tokenizer: Any,
    names: tuple[str, str],
) -> Alignment:
    """Pre-flight and data: every row gets its aligned teacher distributions (``kd_top_ids``, ``kd_top_logprobs``).

    Refuses (WorkerError, one line) a dataset without any distribution, and one whose answers the
    student mostly tokenizes otherwise than the teacher did.
    """
    student = StudentTokens(tokenizer)
    alignment = Alignment()
    for record, row in zip(records, rows, strict=True):
        row[KD_IDS], row[KD_LOGPROBS] = targets_for(record, row, student, alignment, names)
    checked = alignment.scored + alignment.misaligned
    if checked == 0:
        raise WorkerError(
            "objective kd: no training answer carries the teacher's top-k logprobs; generate the dataset with "
            "spec.teacher.logprobs set (a changed logprobs setting asks the teacher again)"
        )
    if alignment.first is not None and alignment.misaligned > MAX_MISALIGNED_FRACTION * checked:
        raise WorkerError(alignment.first)
    if alignment.misaligned:
        log.warning(
            "kd: %d of %d answers are tokenized differently by the student (trained on cross-entropy only); first %s",
            alignment.misaligned,
            checked,
            alignment.first_seen,
        )
    log.info(
        "kd: %d answers with teacher distributions, %d without, %d alternatives folded into the tail",
        alignment.scored,
        alignment.without,
        alignment.folded,
    )
    return alignment


def check_teacher_tokenizer(
    store: Any, dataset_uri: str, manifest: Any, tokenizer: Any, run_dir: Any, names: tuple[str, str]
) -> None:
    """Token ids are interchangeable only between equal vocabularies: the teacher's (saved by generate) vs ours."""
    if not manifest.teacher_tokenizer:
        log.info("kd: the dataset has no teacher tokenizer (an API teacher names tokens by text): answers are checked")
        return
    from transformers import AutoTokenizer

    from kubedistill.storage.objectstore import StorageError, download_prefix, join

    dest = run_dir / "teacher-tokenizer"
    try:
        download_prefix(store, join(dataset_uri, manifest.teacher_tokenizer), dest)
        teacher = AutoTokenizer.from_pretrained(dest)
    except (StorageError, OSError, ValueError) as err:
        raise WorkerError(f"cannot read the teacher's tokenizer saved with dataset {dataset_uri}: {err}") from err
    difference = vocabulary_difference(teacher.get_vocab(), tokenizer.get_vocab())
    if difference is not None:
        raise WorkerError(difference.message(names[0], names[1], "in their vocabularies"))


# --------------------------------------------------------------------------- collator and trainer


class KDCollator:
    """trl's collator, plus [B, L, K] teacher ids and logprobs at the positions of the answer tokens."""

    def __init__(self, base: Any, k: int) -> None:
        self.base = base
        self.k = k

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.base([{key: v for key, v in e.items() if key not in (KD_IDS, KD_LOGPROBS)} for e in examples])
        labels = batch["labels"]
        ids = torch.zeros((*labels.shape, self.k), dtype=torch.long)
        lps = torch.full((*labels.shape, self.k), float("-inf"), dtype=torch.float32)
        for row, example in enumerate(examples):
            targets = example.get(KD_IDS) or []
            if not targets:
                continue
            labelled = (labels[row] != -100).nonzero()
            if len(labelled) == 0:
                continue
            start = int(labelled[0])  # the first answer token (trl masks the prompt)
            n = min(len(targets), labels.shape[1] - start)  # truncation keeps the start
            ids[row, start : start + n] = torch.tensor(targets[:n], dtype=torch.long)
            lps[row, start : start + n] = torch.tensor(example[KD_LOGPROBS][:n], dtype=torch.float32)
        batch[KD_IDS], batch[KD_LOGPROBS] = ids, lps
        return dict(batch)


def kd_trainer_class() -> type:
    """``SFTTrainer`` with the kd loss (built lazily: trl is imported inside the worker only)."""
    from trl.trainer.sft_trainer import SFTTrainer

    class KDTrainer(SFTTrainer):
        # the loss is divided by the global token count itself: Trainer must not divide it again
        loss_is_scaled_for_ga = True  # type: ignore[assignment]

        def __init__(self, *args: Any, alpha: float, temperature: float, k: int, **kwargs: Any) -> None:
            self.kd_alpha, self.kd_temperature = alpha, temperature
            super().__init__(*args, **kwargs)
            self.data_collator = KDCollator(self.data_collator, k)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()  # type: ignore[no-untyped-call]
            columns: list[str] = list(self._signature_columns or [])
            self._signature_columns = [*columns, KD_IDS, KD_LOGPROBS]  # type: ignore[assignment]

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            import torch

            mode = "train" if model.training else "eval"
            top_ids, top_lps = inputs.pop(KD_IDS), inputs.pop(KD_LOGPROBS)
            labels = inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            loss, ce, kl = kd_loss(
                outputs.logits, labels, top_ids, top_lps, self.kd_alpha, self.kd_temperature, num_items_in_batch
            )
            if num_items_in_batch is None:
                loss = loss / self.current_gradient_accumulation_steps if mode == "train" else loss
            elif self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
            with torch.no_grad():
                labelled = labels[:, 1:] != -100
                correct = (outputs.logits[:, :-1].argmax(-1) == labels[:, 1:]) & labelled
                gathered = self.accelerator.gather_for_metrics(torch.stack([correct.sum(), labelled.sum()]))
                gathered = gathered.reshape(-1, 2).sum(0)
                metrics = self._metrics[mode]
                metrics["mean_token_accuracy"].append((gathered[0] / gathered[1].clamp(min=1)).item())
                metrics["ce"].append(self.accelerator.gather_for_metrics(ce).mean().item())
                metrics["kl"].append(self.accelerator.gather_for_metrics(kl).mean().item())
                if mode == "train":
                    tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                    self._total_train_tokens += tokens
                metrics["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return KDTrainer
