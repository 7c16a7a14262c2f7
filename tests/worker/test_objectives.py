"""Objectives kd and onPolicy: the loss by hand, the teacher's distributions through storage, the
tokenizer pre-flight, and the train worker for real (S3 server, vLLM CPU teacher).

The loss tests work on a 3-token vocabulary {a, b, c} where every number is written out.
"""

from __future__ import annotations

import math
import re
import signal

import pytest
import torch

from kubedistill.api.worker_config import StorageSettings
from kubedistill.storage.objectstore import S3Store, upload_dir
from kubedistill.worker import common
from kubedistill.worker.__main__ import run_stage
from kubedistill.worker.common import WorkerError
from kubedistill.worker.fetch import fetch_model
from kubedistill.worker.train.data import to_trl_record
from kubedistill.worker.train.kd import KD_IDS, KD_LOGPROBS, add_kd_targets, kd_loss
from tests.support.datasets import copy_task, make_records, task_corpus, teacher_topk, write_dataset
from tests.support.tiny_model import build_tiny_chat_model, cached_tiny_chat_model
from tests.support.train_worker import SUBPROCESS_ENV, Worker, s3_keys, wait_for_step

pytestmark = pytest.mark.worker

NEG_INF = float("-inf")


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# --------------------------------------------------------------------------- the loss on a 3-token toy


def toy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence [a, b, c]: the prompt is 'a', the answer 'b c'.

    logits[0] (after 'a') predicts 'b', logits[1] (after 'b') predicts 'c'. The teacher named, for
    answer token 'b', the top 2: b 0.7, a 0.2 (tail: c 0.1); for 'c': c 0.5 only (tail 0.5).
    """
    logits = torch.tensor([[[0.0, 2.0, 1.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    top_ids = torch.tensor([[[0, 0], [1, 0], [2, 0]]])
    top_lps = torch.tensor([[[NEG_INF, NEG_INF], [math.log(0.7), math.log(0.2)], [math.log(0.5), NEG_INF]]])
    return logits, labels, top_ids, top_lps


def test_kd_loss_equals_the_hand_computed_value() -> None:
    logits, labels, top_ids, top_lps = toy_batch()
    loss, ce, kl = kd_loss(logits, labels, top_ids, top_lps, alpha=0.5, temperature=1.0)

    p1 = _softmax([0.0, 2.0, 1.0])  # student after 'a': a, b, c
    p2 = _softmax([1.0, 0.0, 3.0])  # student after 'b'
    expected_ce = (-math.log(p1[1]) - math.log(p2[2])) / 2
    # buckets: [b, a, tail] and [c, tail]
    kl1 = _kl([0.7, 0.2, 0.1], [p1[1], p1[0], 1 - p1[1] - p1[0]])
    kl2 = _kl([0.5, 0.5], [p2[2], 1 - p2[2]])
    expected_kl = (kl1 + kl2) / 2
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected_kl + 0.5 * expected_ce, rel=1e-5)
    # the numbers themselves, so a change of definition shows here too
    assert expected_ce == pytest.approx(0.28873, abs=1e-5) and expected_kl == pytest.approx(0.21293, abs=1e-5)


def test_kd_loss_with_temperature_softens_both_bucket_distributions() -> None:
    logits, labels, top_ids, top_lps = toy_batch()
    loss, _, kl = kd_loss(logits, labels, top_ids, top_lps, alpha=0.8, temperature=2.0)

    p1 = _softmax([0.0, 2.0, 1.0])
    p2 = _softmax([1.0, 0.0, 3.0])

    def soften(probs: list[float]) -> list[float]:
        return _softmax([math.log(x) / 2.0 for x in probs])

    kl1 = _kl(soften([0.7, 0.2, 0.1]), soften([p1[1], p1[0], 1 - p1[1] - p1[0]]))
    kl2 = _kl(soften([0.5, 0.5]), soften([p2[2], 1 - p2[2]]))
    expected_ce = (-math.log(p1[1]) - math.log(p2[2])) / 2
    expected = 0.8 * 4.0 * (kl1 + kl2) / 2 + 0.2 * expected_ce
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert kl.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)


def test_kd_loss_alpha_zero_is_cross_entropy_and_exact_student_gives_zero_kl() -> None:
    logits, labels, top_ids, top_lps = toy_batch()
    loss, ce, _ = kd_loss(logits, labels, top_ids, top_lps, alpha=0.0, temperature=1.0)
    reference = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6) and ce.item() == pytest.approx(reference.item())

    # a teacher whose top-k are exactly the student's probabilities: KL 0, whatever the temperature
    student = torch.log_softmax(logits, -1)
    unnamed = torch.tensor([NEG_INF, NEG_INF])
    exact = torch.stack([unnamed, student[0, 0, [1, 0]], student[0, 1, [2, 0]]]).unsqueeze(0)
    ids = torch.tensor([[[0, 0], [1, 0], [2, 0]]])
    _, _, kl = kd_loss(logits, labels, ids, exact, alpha=1.0, temperature=3.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_normalises_by_the_global_token_count_under_accumulation() -> None:
    logits, labels, top_ids, top_lps = toy_batch()
    mean, _, _ = kd_loss(logits, labels, top_ids, top_lps, alpha=0.5, temperature=1.0)
    share, _, _ = kd_loss(logits, labels, top_ids, top_lps, alpha=0.5, temperature=1.0, num_items=8)
    assert share.item() == pytest.approx(mean.item() * 2 / 8, rel=1e-6)  # 2 answer tokens of 8 in the step


def test_kd_loss_gradient_pulls_the_student_toward_the_teacher() -> None:
    logits, labels, top_ids, top_lps = toy_batch()
    logits = logits.clone().requires_grad_(True)
    loss, _, _ = kd_loss(logits, labels, top_ids, top_lps, alpha=1.0, temperature=1.0)
    loss.backward()
    assert logits.grad is not None
    # after 'b' the student gives c 0.84 where the teacher gives 0.5: its logit must go down
    assert logits.grad[0, 1, 2] > 0
    assert torch.all(logits.grad[0, 2] == 0)  # the last position predicts nothing


def test_trl_accepts_the_on_policy_arguments() -> None:
    from kubedistill.api.worker_config import TrainConfig
    from kubedistill.worker.train.decisions import on_policy_arguments
    from kubedistill.worker.train.onpolicy import config_class

    for settings in ({}, {"divergence": "forwardKL", "topK": 5}):
        config = TrainConfig.model_validate(
            {
                "student": {"model": "m", "objective": "onPolicy", "onPolicy": settings, "training": {"maxSteps": 4}},
                "teacher": {"endpoint": {"baseURL": "http://t:8000/v1", "model": "big", "promptLogprobs": True}},
                "datasetUri": "/d",
                "outputUri": "/o",
                "checkpointUri": "/c",
            }
        )
        args = config_class()(**on_policy_arguments(config, "fp32", "/tmp/kd-worker", False, "http://t:8000"))
        assert args.max_steps == 4 and not args.bf16 and not args.gradient_checkpointing and not args.use_vllm


# --------------------------------------------------------------------------- the train worker, for real

EXAMPLES = list({prompt: (prompt, answer) for prompt, answer in copy_task(400, seed=11)}.values())
TRAIN, HELD_OUT = EXAMPLES[:300], EXAMPLES[300:340]
K = 8


@pytest.fixture(scope="module")
def store(s3):
    return S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return cached_tiny_chat_model(tmp_path_factory.getbasetemp(), corpus=task_corpus(), vocab_size=512)


@pytest.fixture(scope="module")
def bucket(s3, store, student_dir):
    name = s3.make_bucket()
    upload_dir(store, student_dir, f"s3://{name}/models/student")
    return name


@pytest.fixture(scope="module")
def teacher_dir(s3, store, bucket, tmp_path_factory):
    """A teacher worth imitating: another initialisation of the same shape and tokenizer, taught the
    copy task by the train worker (sft), fetched back as its export."""
    tmp = tmp_path_factory.mktemp("teacher")
    base = cached_tiny_chat_model(tmp_path_factory.getbasetemp(), corpus=task_corpus(), vocab_size=512, seed=5)
    upload_dir(store, base, f"s3://{bucket}/models/teacher-base")
    write_dataset(store, f"s3://{bucket}/datasets/truth", TRAIN, eval_examples=HELD_OUT)
    worker = Worker(
        s3,
        bucket,
        tmp,
        "teacher",
        {"maxSteps": 150, "learningRate": 2e-3, "batchSize": 16, "checkpointEverySteps": 150, "seed": 0},
        student={"model": f"s3://{bucket}/models/teacher-base"},
        datasetUri=f"s3://{bucket}/datasets/truth",
    )
    assert worker.run() == 0, worker.describe()
    path = fetch_model(store, worker.doc["outputUri"], tmp / "teacher").path
    upload_dir(store, path, f"s3://{bucket}/models/teacher")
    return path


@pytest.fixture(scope="module")
def kd_dataset(store, bucket, teacher_dir):
    """The teacher's top-8 distributions of its answers, in its token ids, with its tokenizer (as generate writes)."""
    uri = f"s3://{bucket}/datasets/kd"
    write_dataset(
        store,
        uri,
        TRAIN,
        eval_examples=HELD_OUT,
        topk=teacher_topk(teacher_dir, TRAIN, K),
        teacher_tokenizer=teacher_dir,
    )
    return uri


def kd_worker(s3, bucket, tmp_path, name, dataset, training=None, **student):
    return Worker(
        s3,
        bucket,
        tmp_path,
        name,
        {"learningRate": 1e-3, "batchSize": 8, "seed": 3, **(training or {})},
        student={"objective": "kd", "kd": {"alpha": 0.5, "temperature": 1.0}, **student},
        datasetUri=dataset,
    )


def logged(worker, key):
    return [float(m) for m in re.findall(rf"train step \d+/\d+ .* {key} ([\d.]+) ", worker.log())]


@pytest.mark.slow
def test_kd_learns_the_teachers_distributions(s3, bucket, store, kd_dataset, tmp_path):
    worker = kd_worker(s3, bucket, tmp_path, "kd", kd_dataset, {"maxSteps": 40, "checkpointEverySteps": 40})
    assert worker.run() == 0, worker.describe()
    result = worker.result()
    assert result["objective"] == "kd" and result["globalStep"] == 40
    assert set(result["losses"]) == {"loss", "ce", "kl"}
    assert "kd: 300 answers with teacher distributions, 0 without" in worker.log()
    kl = logged(worker, "kl")
    assert len(kl) == 40 and kl[-1] < 0.5 * kl[0], kl  # the student moved toward the teacher's distributions
    metadata = fetch_model(store, worker.doc["outputUri"], tmp_path / "kd-model").metadata
    assert metadata["trainer_config"]["objective"] == "kd"
    assert metadata["metrics"]["losses"]["kl"] == pytest.approx(kl[-1], abs=1e-4)


@pytest.mark.slow
def test_kd_sigterm_and_resume_end_with_the_weights_of_an_uninterrupted_run(s3, bucket, store, kd_dataset, tmp_path):
    training = {"maxSteps": 30, "checkpointEverySteps": 1000}
    worker = kd_worker(s3, bucket, tmp_path, "kd-preempt", kd_dataset, training)
    proc = worker.start()
    try:
        wait_for_step(worker, proc, 3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.log_file.close()
    assert rc == common.EXIT_PREEMPTED, worker.describe()
    step = int(re.match(r"Preempted: SIGTERM at step (\d+): checkpoint saved", worker.message()).group(1))  # type: ignore[union-attr]
    assert 3 <= step < 30
    assert worker.run() == 0, worker.describe()
    assert worker.result()["resumedFromStep"] == step and worker.result()["objective"] == "kd"

    reference = kd_worker(s3, bucket, tmp_path, "kd-straight", kd_dataset, training)
    assert reference.run() == 0, reference.describe()
    from safetensors.torch import load_file

    resumed = load_file(fetch_model(store, worker.doc["outputUri"], tmp_path / "resumed").path / "model.safetensors")
    straight = load_file(
        fetch_model(store, reference.doc["outputUri"], tmp_path / "straight").path / "model.safetensors"
    )
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_kd_preflight_refuses_a_student_with_another_tokenizer(s3, store, bucket, kd_dataset, tmp_path, monkeypatch):
    other = build_tiny_chat_model(tmp_path / "other", vocab_size=600)  # the default corpus: another vocabulary
    for name, value in {**s3.env(), **SUBPROCESS_ENV}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    worker = kd_worker(s3, bucket, tmp_path, "kd-other", kd_dataset, {"maxSteps": 1}, model=str(other))
    assert run_stage("train", str(worker.config_path)) == common.EXIT_FAILED
    message = (tmp_path / "termination-log").read_text()
    assert "\n" not in message.strip()
    assert message.startswith(
        f"teacher and student tokenizers disagree (test-teacher (teacher) vs {other} (student)): "
        "in their vocabularies, token "
    ), message
    assert "for the teacher and" in message and "or use objective sft" in message
    assert not s3_keys(store, worker.doc["checkpointUri"])  # refused before training


def test_kd_maps_an_api_teachers_token_strings_to_the_students_ids(teacher_dir, student_dir) -> None:
    """An OpenAI-style teacher names tokens by text. With the same (byte-level BPE) tokenizer, mapping
    the text through the student's decoded pieces gives exactly the ids a vLLM teacher stores."""
    from transformers import AutoTokenizer

    from kubedistill.worker.tokens import decoded_pieces
    from kubedistill.worker.topk import decode, encode, from_strings

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pieces = decoded_pieces(tokenizer)
    by_id = teacher_topk(teacher_dir, TRAIN[:20], K)
    as_text = []
    for blob in by_id:
        dist = decode(blob)
        chosen = [(pieces[i], float(lp)) for i, lp in zip(dist.ids, dist.logprobs, strict=True)]
        tops = [
            [(pieces[i], float(lp)) for i, lp in zip(ids, lps, strict=True)]
            for ids, lps in zip(dist.top_ids, dist.top_logprobs, strict=True)
        ]
        as_text.append(encode(from_strings(chosen[:-1], tops[:-1], K)))  # an API names no stop token
    records_id = make_records(TRAIN[:20], "train", topk=by_id)
    records_text = make_records(TRAIN[:20], "train", topk=as_text)
    rows_id = [to_trl_record(r) for r in records_id]
    rows_text = [to_trl_record(r) for r in records_text]
    names = ("teacher", "student")
    aligned_id = add_kd_targets(records_id, rows_id, tokenizer, names)
    aligned_text = add_kd_targets(records_text, rows_text, tokenizer, names)
    assert aligned_id.scored == aligned_text.scored == 20 and aligned_text.misaligned == 0
    for a, b in zip(rows_id, rows_text, strict=True):
        # the same ids and logprobs, position by position (the id path also scores the end-of-turn token)
        assert b[KD_IDS] == a[KD_IDS][: len(b[KD_IDS])] and b[KD_LOGPROBS] == a[KD_LOGPROBS][: len(b[KD_LOGPROBS])]
        assert len(b[KD_IDS]) == len(a[KD_IDS]) - 1

    # text the student splits otherwise: trained on cross-entropy only, reported; most answers so: refused
    broken = encode(from_strings([("re", -0.1), ("d", -0.2)], [[("re", -0.1)], [("d", -0.2)]], 1))
    records = make_records(TRAIN[:4], "train", topk=[broken, *as_text[1:4]])
    rows = [to_trl_record(r) for r in records]
    aligned = add_kd_targets(records, rows, tokenizer, names)
    assert (aligned.scored, aligned.misaligned) == (3, 1) and rows[0][KD_IDS] == []
    assert aligned.first is not None and "token 0 is 're' for the teacher" in aligned.first
    records = make_records(TRAIN[:4], "train", topk=[broken] * 3 + as_text[3:4])
    with pytest.raises(
        WorkerError, match=r"^teacher and student tokenizers disagree \(teacher vs student\): in the answer"
    ):
        add_kd_targets(records, [to_trl_record(r) for r in records], tokenizer, names)


@pytest.mark.slow
def test_on_policy_with_a_vllm_cpu_teacher_end_to_end(s3, bucket, store, teacher_dir, tmp_path):
    """The worker serves teacher.vllm (from S3) with vLLM, the student samples and the teacher scores
    every sampled token; the export is what vLLM serves."""
    write_dataset(store, f"s3://{bucket}/datasets/prompts", TRAIN[:64], eval_examples=HELD_OUT[:8])
    worker = Worker(
        s3,
        bucket,
        tmp_path,
        "on-policy",
        {"maxSteps": 6, "learningRate": 1e-3, "batchSize": 4, "checkpointEverySteps": 3, "seed": 1},
        student={"objective": "onPolicy", "onPolicy": {"maxNewTokens": 8, "temperature": 1.0}},
        datasetUri=f"s3://{bucket}/datasets/prompts",
        teacher={"vllm": {"model": f"s3://{bucket}/models/teacher", "gpus": 0, "maxModelLen": 256, "dtype": "float32"}},
    )
    assert worker.run(timeout=900) == 0, worker.describe()
    result = worker.result()
    assert result["objective"] == "onPolicy" and result["globalStep"] == 6
    assert set(result["losses"]) == {"loss", "divergence"} and result["losses"]["divergence"] >= 0
    # 6 steps x 4 prompts, each answer at most 8 sampled tokens, every one scored by the teacher
    assert 6 * 4 <= result["teacherTokensScored"] <= 6 * 4 * 8
    log = worker.log()
    assert "onPolicy: teacher healthy after" in log and "objective onPolicy" in log
    assert re.search(r"checkpoint step 3 uploaded", log)

    from tests.support.vllm_server import VLLMServer

    fetched = fetch_model(store, worker.doc["outputUri"], tmp_path / "on-policy-model")
    with VLLMServer(fetched.path, served_model_name="student", log_path=tmp_path / "vllm.log") as server:
        reply = server.chat([{"role": "user", "content": HELD_OUT[0][0]}], max_tokens=8, temperature=0)
    assert reply["choices"][0]["message"]["content"] is not None and reply["usage"]["completion_tokens"] >= 1


def test_on_policy_refuses_a_teacher_that_cannot_score(s3, bucket, store, tmp_path, monkeypatch):
    """An OpenAI-style API (the fault stub: no /tokenize, no prompt_logprobs) declared able to score."""
    from tests.support.fault_stub import FaultStub

    write_dataset(store, f"s3://{bucket}/datasets/prompts-stub", TRAIN[:8])
    for name, value in {**s3.env(), **SUBPROCESS_ENV}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    with FaultStub() as stub:
        worker = Worker(
            s3,
            bucket,
            tmp_path,
            "on-policy-stub",
            {"maxSteps": 1},
            student={"objective": "onPolicy"},
            datasetUri=f"s3://{bucket}/datasets/prompts-stub",
            teacher={"endpoint": {"baseURL": stub.base_url, "model": "gpt-x", "promptLogprobs": True}},
        )
        assert run_stage("train", str(worker.config_path)) == common.EXIT_FAILED
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(f"objective onPolicy: the teacher at {stub.base_url.removesuffix('/v1')} ")
    assert "onPolicy needs a vLLM teacher" in message


def test_on_policy_refuses_a_vllm_teacher_with_another_tokenizer(
    s3, bucket, store, vllm_teacher, tmp_path, monkeypatch
):
    """The session's vLLM teacher was built on another corpus: its tokenizer splits the probe otherwise."""
    write_dataset(store, f"s3://{bucket}/datasets/prompts-other", TRAIN[:8])
    for name, value in {**s3.env(), **SUBPROCESS_ENV}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))
    worker = Worker(
        s3,
        bucket,
        tmp_path,
        "on-policy-other",
        {"maxSteps": 1},
        student={"objective": "onPolicy"},
        datasetUri=f"s3://{bucket}/datasets/prompts-other",
        teacher={"endpoint": {"baseURL": vllm_teacher.base_url, "model": "teacher", "promptLogprobs": True}},
    )
    assert run_stage("train", str(worker.config_path)) == common.EXIT_FAILED
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(
        f"teacher and student tokenizers disagree (teacher vs s3://{bucket}/models/student (student)): "
        "tokenizing the first training example, token "
    ), message


@pytest.mark.slow
def test_on_policy_sigterm_checkpoints_and_a_rerun_resumes(s3, bucket, store, teacher_dir, tmp_path):
    """Preempted mid-run, onPolicy saves its step like sft does; the restart serves the teacher again and
    finishes from that step (the student's samples after it come from the restored RNG state)."""
    write_dataset(store, f"s3://{bucket}/datasets/prompts-preempt", TRAIN[:64])
    worker = Worker(
        s3,
        bucket,
        tmp_path,
        "on-policy-preempt",
        {"maxSteps": 12, "learningRate": 1e-3, "batchSize": 4, "checkpointEverySteps": 1000, "seed": 2},
        student={"objective": "onPolicy", "onPolicy": {"maxNewTokens": 8}},
        datasetUri=f"s3://{bucket}/datasets/prompts-preempt",
        teacher={"vllm": {"model": f"s3://{bucket}/models/teacher", "gpus": 0, "maxModelLen": 256, "dtype": "float32"}},
    )
    proc = worker.start()
    try:
        wait_for_step(worker, proc, 2, timeout=600)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.log_file.close()
    assert rc == common.EXIT_PREEMPTED, worker.describe()
    match = re.match(
        r"Preempted: SIGTERM at step (\d+): checkpoint saved to \S+; a restart resumes from it$", worker.message()
    )
    assert match, worker.message()
    step = int(match.group(1))
    assert f"checkpoint-{step}/COMPLETE.json" in s3_keys(store, worker.doc["checkpointUri"])
    assert not s3_keys(store, worker.doc["outputUri"])

    assert worker.run(timeout=900) == 0, worker.describe()
    result = worker.result()
    assert result["globalStep"] == 12 and result["resumedFromStep"] == step and result["objective"] == "onPolicy"
    assert re.search(rf"training: 12 steps, .* starting at step {step}\n", worker.log())
    assert worker.log().count("onPolicy: teacher healthy after") == 2  # served again for the second attempt
