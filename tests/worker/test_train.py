"""The train worker for real on CPU: a tiny model, a real S3-compatible server, real vLLM.

Each training run is a ``python -m kubedistill.worker train`` subprocess (as in a pod),
with one OpenMP thread per process: on two shared cores, two spinning threads per
process are several times slower than one.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time

import pytest
import yaml

from kubedistill.api.worker_config import StorageSettings
from kubedistill.storage.objectstore import S3Store, upload_dir
from kubedistill.worker import common
from kubedistill.worker.__main__ import run_stage
from kubedistill.worker.fetch import METADATA_NAME, fetch_model
from tests.support.datasets import copy_task, task_corpus, write_dataset
from tests.support.progress import ProgressSampler
from tests.support.tiny_model import build_tiny_chat_model, cached_tiny_chat_model
from tests.support.train_worker import SUBPROCESS_ENV, Worker, accuracy, s3_keys, wait_for_step

pytestmark = pytest.mark.worker

# distinct prompts: the held-out ones are never seen in training
EXAMPLES = list({prompt: (prompt, answer) for prompt, answer in copy_task(600, seed=1)}.values())
TRAIN, HELD_OUT = EXAMPLES[:500], EXAMPLES[500:560]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    # the task's words are single tokens, so a 2-layer model can learn to copy them quickly
    return cached_tiny_chat_model(tmp_path_factory.getbasetemp(), corpus=task_corpus(), vocab_size=512)


@pytest.fixture(scope="module")
def store(s3):
    return S3Store(StorageSettings(endpoint=s3.endpoint_url, addressing_style="path"), client=s3.client())


@pytest.fixture(scope="module")
def bucket(s3, store, student_dir):
    """A bucket holding the student (as save_pretrained wrote it) and the copy-task dataset."""
    name = s3.make_bucket()
    upload_dir(store, student_dir, f"s3://{name}/models/student")
    write_dataset(store, f"s3://{name}/datasets/copy", TRAIN, eval_examples=HELD_OUT)
    return name


# --------------------------------------------------------------------------- 1 + 2: learning, export, serving


@pytest.fixture(scope="module")
def copy_run(s3, bucket, store, tmp_path_factory):
    """Full fine-tuning on the copy task from S3 to S3; the export fetched back into a local directory."""
    tmp = tmp_path_factory.mktemp("copy")
    worker = Worker(
        s3,
        bucket,
        tmp,
        "copy",
        training={"maxSteps": 200, "learningRate": 1e-3, "checkpointEverySteps": 100, "seed": 0},
    )
    started = time.monotonic()
    rc = worker.run()
    seconds = time.monotonic() - started
    assert rc == 0, worker.describe()
    fetched = fetch_model(store, worker.doc["outputUri"], tmp / "fetched")
    return worker, fetched, seconds


@pytest.mark.slow
def test_trained_student_is_exported_for_transformers_and_vllm(copy_run, store, student_dir):
    worker, fetched, _ = copy_run
    result = worker.result()
    assert result["modelUri"] == worker.doc["outputUri"]
    assert result["globalStep"] == 200 and result["adapter"] is False
    assert result["tokensPerSecond"] > 0 and result["tokens"] > 0 and result["trainLoss"] > 0
    assert result["digest"] == fetched.digest  # what fetch verified is what train reported

    names = set(fetched.files)
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    metadata = fetched.metadata
    assert metadata["base_model"] == worker.doc["student"]["model"]
    assert metadata["export"] == "merged" and metadata["dtype"] == "float32"
    assert metadata["dataset_uri"] == worker.doc["datasetUri"] and len(metadata["dataset_digest"]) == 64
    assert metadata["trainer_config"]["training"]["maxSteps"] == 200
    assert metadata["metrics"]["global_step"] == 200
    assert re.search(r"train step 100/200 .*loss [\d.]+ .*tokens/s \d+", worker.log())

    # transformers loads it as a chat model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fetched.path)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(fetched.path)
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_learning_is_real(copy_run, student_dir):
    """Held-out prompts (never trained on): the untrained student copies none, the trained one nearly all."""
    _, fetched, _ = copy_run
    held_out = HELD_OUT[:40]
    assert not {p for p, _ in held_out} & {p for p, _ in TRAIN}
    before = accuracy(student_dir, held_out)
    after = accuracy(fetched.path, held_out)
    assert before <= 0.1, before
    assert after >= 0.8, after
    assert after - before >= 0.7


@pytest.mark.slow
def test_vllm_serves_the_export(copy_run, tmp_path):
    from tests.support.vllm_server import VLLMServer

    _, fetched, _ = copy_run
    with VLLMServer(fetched.path, served_model_name="student", log_path=tmp_path / "vllm.log") as server:
        answers = []
        for prompt, expected in HELD_OUT[:5]:
            reply = server.chat([{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
            choice = reply["choices"][0]
            answers.append((choice["message"]["content"].strip(), expected, choice["finish_reason"]))
    assert all(finish == "stop" for _, _, finish in answers), answers  # it learned to end its turn
    assert sum(got == expected for got, expected, _ in answers) >= 4, answers


# --------------------------------------------------------------------------- LoRA: merged and adapter exports


@pytest.mark.slow
def test_lora_merged_export_equals_base_plus_adapter(s3, bucket, store, student_dir, tmp_path):
    """Two exports of one LoRA training: merged weights compute what base + adapter computes.

    The adapter run has the same fingerprint, finds the first run's final checkpoint and
    trains no further step: export format is not part of what a checkpoint means.
    """
    # packed: without flash-attention each micro-batch is one packed row, accumulated to the batch size
    training = {"maxSteps": 12, "learningRate": 5e-3, "checkpointEverySteps": 6, "packing": True}
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0}
    merged = Worker(s3, bucket, tmp_path, "lora", training, student={"method": "lora", "lora": lora})
    assert merged.run() == 0, merged.describe()
    assert "attention sdpa, micro-batch 1 x 16" in merged.log()
    adapter = Worker(
        s3,
        bucket,
        tmp_path,
        "lora-adapter",
        training,
        student={"method": "lora", "lora": lora, "export": "adapter"},
        checkpointUri=merged.doc["checkpointUri"],
    )
    assert adapter.run() == 0, adapter.describe()
    assert "resuming from checkpoint step 12" in adapter.log()
    assert adapter.result()["adapter"] is True and adapter.result()["globalStep"] == 12

    merged_dir = fetch_model(store, merged.doc["outputUri"], tmp_path / "merged").path
    adapter_dir = fetch_model(store, adapter.doc["outputUri"], tmp_path / "adapter").path
    assert not (merged_dir / "adapter_config.json").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"s3://{bucket}/models/student"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": TRAIN[0][0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
        adapter_logits = with_adapter(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3)  # training changed the model
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)

    # a re-run of a finished job (e.g. its termination message was lost) does not train again
    assert merged.run() == 0, merged.describe()
    assert "already exported" in merged.log()
    assert (
        merged.result()["digest"]
        == json.loads(store.get_bytes(merged.doc["outputUri"] + "/" + METADATA_NAME))["digest"]
    )


# --------------------------------------------------------------------------- 3: preemption


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_rerun_resumes(s3, bucket, store, tmp_path):
    training = {"maxSteps": 60, "batchSize": 8, "checkpointEverySteps": 1000, "seed": 3}
    worker = Worker(s3, bucket, tmp_path, "preempt", training)
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
    message = worker.message()
    match = re.match(
        r"Preempted: SIGTERM at step (\d+): checkpoint saved to (\S+); a restart resumes from it$", message
    )
    assert match, message
    step = int(match.group(1))
    assert 3 <= step < 60
    assert match.group(2) == f"{worker.doc['checkpointUri']}/checkpoint-{step}"
    keys = s3_keys(store, worker.doc["checkpointUri"])
    assert f"checkpoint-{step}/COMPLETE.json" in keys
    assert {
        f"checkpoint-{step}/{n}"
        for n in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
    } <= set(keys)
    assert not s3_keys(store, worker.doc["outputUri"])  # nothing exported

    # started again, it continues from that step to the end
    assert worker.run() == 0, worker.describe()
    result = worker.result()
    assert result["globalStep"] == 60 and result["resumedFromStep"] == step
    assert f"resuming from checkpoint step {step}" in worker.log()
    assert re.search(rf"training: 60 steps, .* starting at step {step}\n", worker.log())

    # and ends with the weights of a run that was never interrupted: same data order, same RNG
    reference = Worker(s3, bucket, tmp_path, "reference", training)
    assert reference.run() == 0, reference.describe()
    import torch
    from safetensors.torch import load_file

    resumed = load_file(fetch_model(store, worker.doc["outputUri"], tmp_path / "resumed").path / "model.safetensors")
    straight = load_file(
        fetch_model(store, reference.doc["outputUri"], tmp_path / "straight").path / "model.safetensors"
    )
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- 4: torchrun


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes(s3, bucket, store, no_template_dir, tmp_path):
    """Data-parallel on two gloo processes; also: a student without a chat template, given one in the spec."""
    from tests.support.tiny_model import CHAT_TEMPLATE

    upload_dir(store, no_template_dir, f"s3://{bucket}/models/no-template")
    worker = Worker(
        s3,
        bucket,
        tmp_path,
        "ddp",
        {"maxSteps": 8, "checkpointEverySteps": 4, "batchSize": 8},
        student={"model": f"s3://{bucket}/models/no-template", "chatTemplate": CHAT_TEMPLATE},
    )
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "kubedistill.worker", "train", "--config", str(worker.config_path),
    ]  # fmt: skip
    assert worker.run(argv) == 0, worker.describe()
    result = worker.result()
    assert result["globalStep"] == 8
    assert result["strategy"] == "ddp"  # auto on CPU: FSDP runs on GPUs only
    log = worker.log()
    assert "train: rank 0/2" in log and "train: rank 1/2" in log
    assert "strategy ddp: auto: no GPU" in log
    # each rank reads its own half: 8 steps of 2 x 8 examples are a quarter of the 500-example epoch
    assert re.search(r"train step 8/8 epoch 0\.25 ", log), worker.describe()
    marker = json.loads(store.get_bytes(f"{worker.doc['checkpointUri']}/checkpoint-8/COMPLETE.json"))
    assert marker["world_size"] == 2
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= set(marker["files"])
    fetched = fetch_model(store, worker.doc["outputUri"], tmp_path / "ddp-model")
    assert fetched.digest == result["digest"]
    assert (fetched.path / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_fsdp_on_cpu_processes_is_refused_before_any_training(s3, bucket, tmp_path):
    """accelerate enables FSDP on CUDA devices only: on CPU the run would silently train full copies."""
    worker = Worker(s3, bucket, tmp_path, "fsdp-cpu", {"maxSteps": 2, "strategy": "fsdp"})
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "kubedistill.worker", "train", "--config", str(worker.config_path),
    ]  # fmt: skip
    assert worker.run(argv) != 0
    assert worker.message().startswith("student.training.strategy fsdp needs GPUs"), worker.describe()
    assert "train step" not in worker.log()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 5: pre-flight


@pytest.fixture
def preflight(tmp_path, s3, monkeypatch):
    """Run the train stage in-process on local paths and return (exit code, termination message)."""
    for name, value in {**s3.env(), **SUBPROCESS_ENV}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "termination-log"))

    def run(model_dir, examples=TRAIN[:20], manifest=True, training=None, **overrides):
        from kubedistill.storage.objectstore import LocalStore

        write_dataset(LocalStore(), str(tmp_path / "ds"), examples, write_manifest=manifest)
        doc = {
            "student": {
                "model": str(model_dir),
                "method": "full",
                "training": {"maxSteps": 1, "maxSeqLength": 64, **(training or {})},
            },
            "datasetUri": str(tmp_path / "ds"),
            "outputUri": str(tmp_path / "out"),
            "checkpointUri": str(tmp_path / "ckpt"),
            "workDir": str(tmp_path / "work"),
            "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
            **overrides,
        }
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(doc))
        rc = run_stage("train", str(path))
        return rc, (tmp_path / "termination-log").read_text()

    return run


@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory):
    return cached_tiny_chat_model(
        tmp_path_factory.getbasetemp(), corpus=task_corpus(), vocab_size=512, with_chat_template=False
    )


@pytest.fixture(scope="module")
def mismatched_dir(tmp_path_factory, student_dir):
    """The student's weights with another model's (larger) tokenizer."""
    import shutil

    root = tmp_path_factory.mktemp("mismatch")
    other = build_tiny_chat_model(root / "other", vocab_size=1024)
    target = root / "student"
    shutil.copytree(student_dir, target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (other / name).exists():
            shutil.copy(other / name, target / name)
    return target


def test_preflight_no_chat_template(preflight, no_template_dir):
    rc, message = preflight(no_template_dir)
    assert rc == common.EXIT_FAILED
    assert "has no chat template: set spec.student.chatTemplate" in message


def test_preflight_vocabulary_mismatch(preflight, mismatched_dir):
    rc, message = preflight(mismatched_dir)
    assert rc == common.EXIT_FAILED
    assert re.search(
        r"tokenizer and model disagree: the tokenizer has \d+ tokens but the model's embeddings have \d+ rows", message
    )


def test_preflight_sequence_longer_than_the_model(preflight, student_dir):
    rc, message = preflight(student_dir, training={"maxSeqLength": 4096})
    assert rc == common.EXIT_FAILED
    assert message == (
        "training.maxSeqLength 4096 exceeds the student's context length 1024 (max_position_embeddings); "
        "lower maxSeqLength"
    )


def test_preflight_empty_dataset(preflight, student_dir):
    rc, message = preflight(student_dir, examples=[])
    assert rc == common.EXIT_FAILED
    assert "has no training examples" in message


def test_preflight_incomplete_dataset(preflight, student_dir):
    rc, message = preflight(student_dir, manifest=False)
    assert rc == common.EXIT_FAILED
    assert "is incomplete: no manifest.json (has the generate stage finished?)" in message


def test_preflight_output_not_writable(preflight, student_dir):
    rc, message = preflight(student_dir, outputUri="s3://no-such-bucket-kd/model")
    assert rc == common.EXIT_FAILED
    assert message.startswith("output URI s3://no-such-bucket-kd/model is not writable: ")
    assert "NoSuchBucket" in message


def test_preflight_no_example_fits(preflight, student_dir):
    long_prompt = [("repeat: " + " ".join(["red"] * 40), "red")] * 4
    rc, message = preflight(student_dir, examples=long_prompt, training={"maxSeqLength": 16})
    assert rc == common.EXIT_FAILED
    assert "no training example fits training.maxSeqLength 16" in message


def test_preflight_missing_local_model(preflight, tmp_path):
    rc, message = preflight(tmp_path / "nowhere")
    assert rc == common.EXIT_FAILED
    assert f"no config.json in {tmp_path / 'nowhere'}" in message


def test_training_reports_progress_at_the_interval(s3, bucket, tmp_path):
    path = tmp_path / "train.progress.json"
    worker = Worker(
        s3, bucket, tmp_path, "progress", training={"maxSteps": 40, "checkpointEverySteps": 20},
        progress={"file": str(path), "intervalSeconds": 1},
    )  # fmt: skip
    sampler = ProgressSampler(path)
    proc = worker.start()
    try:
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.log_file.close()
    finished = time.monotonic()
    reports = sampler.stop()
    assert rc == 0, worker.describe()
    assert len(reports) >= 3, worker.describe()
    steps = [r.done for r in reports]
    assert steps == sorted(steps) and steps[-1] == 40 and all(r.total == 40 and r.unit == "steps" for r in reports)
    assert any(isinstance(r.details.get("loss"), float) for r in reports)
    assert reports[-1].details.get("checkpointStep") == 40
    assert any((r.details.get("tokensPerSecond") or 0) > 0 for r in reports)
    epochs = [r.details["epoch"] for r in reports]
    assert epochs == sorted(epochs)
    sampler.check_eta(finished, tolerance=1.0, slack=10.0)  # the first steps compile and warm up
