"""The train worker's pure decisions: trainer arguments, precision, fingerprint, sources, pre-flight numbers."""

from __future__ import annotations

import pytest

from kubedistill.api.v1alpha1 import LoraSpec, StudentSpec
from kubedistill.api.worker_config import TrainConfig
from kubedistill.worker.train import decisions
from kubedistill.worker.train.checkpoint import files_for_rank


def config(**training) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "student": {"model": "s3://models/student", "training": training},
            "datasetUri": "s3://b/ds",
            "outputUri": "s3://b/model",
            "checkpointUri": "s3://b/checkpoints",
        }
    )


def test_sft_arguments_carry_every_training_knob():
    cfg = config(
        epochs=2,
        learningRate=1e-4,
        lrScheduler="linear",
        warmupRatio=0.1,
        batchSize=4,
        gradientAccumulationSteps=2,
        maxSeqLength=512,
        packing=True,
        completionOnlyLoss=False,
        gradientCheckpointing=True,
        seed=7,
        checkpointEverySteps=25,
    )
    args = decisions.sft_arguments(cfg, "bf16", "/tmp/out", cuda=True, varlen_attention=True)
    assert args["num_train_epochs"] == 2
    assert args["max_steps"] == -1
    assert args["learning_rate"] == 1e-4
    assert args["lr_scheduler_type"] == "linear"
    assert args["warmup_steps"] == 0.1  # transformers 5: a float < 1 is a ratio
    assert args["per_device_train_batch_size"] == 4
    assert args["gradient_accumulation_steps"] == 2
    assert args["max_length"] == 512
    assert args["packing"] is True
    assert args["completion_only_loss"] is False
    assert args["gradient_checkpointing"] is True
    assert args["seed"] == args["data_seed"] == 7
    assert args["save_steps"] == 25
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (True, False, False)
    assert args["report_to"] == "none"


def test_sft_arguments_on_cpu_are_fp32_and_max_steps_wins():
    args = decisions.sft_arguments(config(maxSteps=10), "fp32", "/tmp/out", cuda=False)
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (False, False, True)
    assert args["max_steps"] == 10


def test_packed_batches_become_accumulated_rows_without_varlen_attention():
    cfg = config(batchSize=8, gradientAccumulationSteps=2, packing=True)
    cpu = decisions.sft_arguments(cfg, "fp32", "/tmp/out", cuda=False)
    assert (cpu["per_device_train_batch_size"], cpu["gradient_accumulation_steps"]) == (1, 16)
    flash = decisions.sft_arguments(cfg, "bf16", "/tmp/out", cuda=True, varlen_attention=True)
    assert (flash["per_device_train_batch_size"], flash["gradient_accumulation_steps"]) == (8, 2)
    unpacked = decisions.sft_arguments(config(batchSize=8, gradientAccumulationSteps=2), "fp32", "/tmp/out", cuda=False)
    assert (unpacked["per_device_train_batch_size"], unpacked["gradient_accumulation_steps"]) == (8, 2)


def test_sft_arguments_are_accepted_by_trl():
    import trl

    args = trl.SFTConfig(
        **decisions.sft_arguments(config(maxSteps=3, packing=True), "fp32", "/tmp/kd-unit", cuda=False)
    )
    assert args.packing and args.max_steps == 3 and not args.bf16


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "fp32"),
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp16"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
    ],
)
def test_choose_precision(requested, cuda, bf16, expected):
    assert decisions.choose_precision(requested, cuda, bf16) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(decisions.TrainSpecError, match="fp16 needs a CUDA GPU"):
        decisions.choose_precision("fp16", False, False)


def test_dtypes():
    assert decisions.load_dtype_name("bf16", "lora") == "bfloat16"
    assert decisions.load_dtype_name("bf16", "full") == "float32"  # fp32 master weights under autocast
    assert decisions.load_dtype_name("fp32", "lora") == "float32"
    assert decisions.export_dtype_name("bf16") == "bfloat16"


def test_lora_arguments():
    assert decisions.lora_arguments(LoraSpec())["target_modules"] == "all-linear"
    args = decisions.lora_arguments(LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert args == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def test_fingerprint_ignores_checkpoint_frequency_and_export_but_not_data_or_settings():
    base = StudentSpec(model="m")
    fp = decisions.training_fingerprint(base, "d1")
    assert fp == decisions.training_fingerprint(
        base.model_copy(update={"training": base.training.model_copy(update={"checkpoint_every_steps": 5})}), "d1"
    )
    assert fp == decisions.training_fingerprint(base.model_copy(update={"export": "adapter"}), "d1")
    assert fp != decisions.training_fingerprint(base, "d2")
    assert fp != decisions.training_fingerprint(
        base.model_copy(update={"training": base.training.model_copy(update={"learning_rate": 1e-5})}), "d1"
    )
    assert fp != decisions.training_fingerprint(base.model_copy(update={"method": "full"}), "d1")


@pytest.mark.parametrize(
    ("model", "kind", "location"),
    [
        ("s3://models/qwen/", "s3", "s3://models/qwen"),
        ("/models/qwen", "local", "/models/qwen"),
        ("file:///models/qwen", "local", "/models/qwen"),
        ("pvc://weights/qwen", "local", f"{decisions.PVC_MOUNT_ROOT}/weights/qwen"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "hub", "Qwen/Qwen2.5-0.5B-Instruct"),
    ],
)
def test_model_source(model, kind, location):
    assert decisions.model_source(model) == decisions.ModelSource(kind, location)


def test_model_source_rejects_nonsense():
    with pytest.raises(decisions.TrainSpecError, match="neither an s3:// prefix"):
        decisions.model_source("http://example.com/model")


def test_vocabulary_check():
    decisions.check_vocabulary(1000, 1024, {"eos_token_id": 3})  # padded embeddings are normal
    with pytest.raises(
        decisions.TrainSpecError, match="tokenizer has 2000 tokens but the model's embeddings have 1024 rows"
    ):
        decisions.check_vocabulary(2000, 1024, {})
    with pytest.raises(decisions.TrainSpecError, match="pad_token_id id 5000 is outside"):
        decisions.check_vocabulary(1000, 1024, {"pad_token_id": 5000})


def test_context_check():
    decisions.check_context(2048, 2048)
    decisions.check_context(2048, None)
    with pytest.raises(decisions.TrainSpecError, match="maxSeqLength 4096 exceeds the student's context length 2048"):
        decisions.check_context(4096, 2048)


def test_adapter_export_needs_lora():
    decisions.check_export(StudentSpec(model="m", method="lora", export="adapter"))
    # the API refuses it too; the worker checks again for configs built without validation
    with pytest.raises(decisions.TrainSpecError, match=r"export adapter needs student\.method lora"):
        decisions.check_export(StudentSpec.model_construct(model="m", method="full", export="adapter"))


def test_overlapping_uris_are_refused():
    decisions.check_uris("s3://b/run/model", "s3://b/run/checkpoints", "s3://b/run/datasets/k")
    with pytest.raises(decisions.TrainSpecError, match="overlap"):
        decisions.check_uris("s3://b/run", "s3://b/run/checkpoints", "s3://b/ds")
    with pytest.raises(decisions.TrainSpecError, match="overlap"):
        decisions.check_uris("s3://b/run/model", "s3://b/ck", "s3://b/run/model/ds")


def test_complete_checkpoints_need_their_marker():
    keys = [
        "checkpoint-10/model.safetensors",
        "checkpoint-10/COMPLETE.json",
        "checkpoint-20/model.safetensors",  # upload interrupted: no marker
        "checkpoint-5/COMPLETE.json",
        "checkpoint-100/COMPLETE.json",
        "other/COMPLETE.json",
    ]
    assert decisions.complete_checkpoint_steps(keys) == [100, 10, 5]


def test_checkpoints_to_delete_keeps_the_newest_and_partial_newer_ones():
    keys = [f"checkpoint-{s}/COMPLETE.json" for s in (10, 20, 30)] + [
        "checkpoint-15/x",  # stale partial, older than the newest complete: goes
        "checkpoint-40/x",  # newer partial: left alone
    ]
    assert decisions.checkpoints_to_delete(keys, newest_complete=30, keep=2) == [10, 15]
    assert decisions.checkpoints_to_delete(keys, newest_complete=30, keep=5) == [15]


def test_each_rank_uploads_its_own_rng_state(tmp_path):
    for name in ("model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"):
        (tmp_path / name).write_text("x")
    assert files_for_rank(tmp_path, 0) == ["model.safetensors", "optimizer.pt", "rng_state_0.pth", "trainer_state.json"]
    assert files_for_rank(tmp_path, 1) == ["rng_state_1.pth"]
    assert files_for_rank(tmp_path, 2) == []


# --------------------------------------------------------------------------- objectives


def on_policy_config(**on_policy) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "student": {
                "model": "s3://models/student",
                "objective": "onPolicy",
                "onPolicy": on_policy,
                "training": {"maxSteps": 4, "batchSize": 2, "learningRate": 1e-4},
            },
            "teacher": {"endpoint": {"baseURL": "http://teacher:8000/v1", "model": "big", "promptLogprobs": True}},
            "datasetUri": "s3://b/ds",
            "outputUri": "s3://b/model",
            "checkpointUri": "s3://b/checkpoints",
        }
    )


def test_on_policy_arguments_are_trls_server_distillation_settings():
    """trl accepting them is checked in tests/worker/test_objectives.py (trl.experimental imports vLLM)."""
    reverse = decisions.on_policy_arguments(
        on_policy_config(maxNewTokens=32), "fp32", "/tmp/kd-unit", False, "http://t:1"
    )
    assert (reverse["beta"], reverse["loss_top_k"], reverse["loss_add_tail"]) == (1.0, 1, True)
    assert reverse["max_completion_length"] == 32 and reverse["teacher_model_server_url"] == "http://t:1"
    assert "max_length" not in reverse and "packing" not in reverse and "completion_only_loss" not in reverse
    assert reverse["max_steps"] == 4 and reverse["learning_rate"] == 1e-4 and not reverse["bf16"]

    forward = decisions.on_policy_arguments(
        on_policy_config(divergence="forwardKL", topK=5, temperature=0.7), "fp32", "/tmp/kd-unit", False, "http://t:1"
    )
    assert (forward["beta"], forward["loss_top_k"], forward["temperature"]) == (0.0, 5, 0.7)


def test_fingerprint_of_sft_is_unchanged_and_other_objectives_differ():
    sft = StudentSpec(model="m")
    # the value before objectives existed: an exported sft run is still recognised after the upgrade
    assert decisions.training_fingerprint(sft, "d1") == decisions.training_fingerprint(
        StudentSpec(model="m", objective="sft"), "d1"
    )
    kd = StudentSpec(model="m", objective="kd")
    assert decisions.training_fingerprint(kd, "d1") != decisions.training_fingerprint(sft, "d1")
    hot = StudentSpec.model_validate({"model": "m", "objective": "kd", "kd": {"temperature": 2.0}})
    assert decisions.training_fingerprint(hot, "d1") != decisions.training_fingerprint(kd, "d1")
    policy = StudentSpec(model="m", objective="onPolicy")
    assert decisions.training_fingerprint(policy, "d1", "t1") != decisions.training_fingerprint(policy, "d1", "t2")


def test_final_losses_name_each_objectives_terms():
    assert decisions.final_losses("sft", {"loss": 0.5, "learning_rate": 1e-4}) == {"loss": 0.5, "ce": 0.5}
    assert decisions.final_losses("kd", {"loss": 0.5, "ce": 0.7, "kl": 0.3}) == {"loss": 0.5, "ce": 0.7, "kl": 0.3}
    assert decisions.final_losses("onPolicy", {"loss": 0.02}) == {"loss": 0.02, "divergence": 0.02}
    assert decisions.final_losses("kd", {}) == {}


# --------------------------------------------------------------------------- strategy (ddp / fsdp)

GIB = 2**30


@pytest.mark.parametrize(
    ("requested", "world", "cuda", "method", "params", "gpu", "expected"),
    [
        ("auto", 1, True, "full", 8e9, 80 * GIB, "single"),  # one process: nothing to share
        ("auto", 8, True, "full", 8e9, 80 * GIB, "fsdp"),  # 8B full: 128 GB of state > 64 GB
        ("auto", 8, True, "full", 3e9, 80 * GIB, "ddp"),  # 3B full: 48 GB fits
        ("auto", 8, True, "lora", 8e9, 80 * GIB, "ddp"),  # 8B LoRA: 16 GB of frozen weights
        ("auto", 8, True, "lora", 70e9, 80 * GIB, "fsdp"),  # 70B LoRA: 140 GB
        ("auto", 2, False, "full", 8e9, None, "ddp"),  # CPU: accelerate has no FSDP there
        ("ddp", 8, True, "full", 8e9, 80 * GIB, "ddp"),  # as asked, even if it will not fit
        ("fsdp", 2, True, "lora", 1e8, 80 * GIB, "fsdp"),
    ],
)
def test_choose_strategy(requested, world, cuda, method, params, gpu, expected):
    strategy, why = decisions.choose_strategy(requested, world, cuda, method, int(params), gpu)
    assert strategy == expected and why


def test_fsdp_on_cpu_is_refused_with_the_reason():
    with pytest.raises(decisions.TrainSpecError, match="accelerate shards a model with FSDP on CUDA devices only"):
        decisions.choose_strategy("fsdp", 2, False, "full", 10**6, None)


def test_fsdp_arguments_shard_each_decoder_layer_and_save_sharded_checkpoints():
    from trl.trainer.sft_config import SFTConfig

    arguments = decisions.fsdp_arguments({"LlamaDecoderLayer"})
    assert arguments["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert arguments["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    config = SFTConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **arguments)  # trl accepts them
    assert config.fsdp and config.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]


def test_each_rank_uploads_its_own_fsdp_shards(tmp_path):
    for rel in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "pytorch_model_fsdp_0/.metadata",
                "pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp",
                "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert files_for_rank(tmp_path, 1) == [
        "optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp", "rng_state_1.pth",
    ]  # fmt: skip
    assert "pytorch_model_fsdp_0/.metadata" in files_for_rank(tmp_path, 0)
