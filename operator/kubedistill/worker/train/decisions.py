"""Pure decisions of the train worker: no torch, no I/O, so unit tests run in milliseconds.

What trl/transformers get from ``spec.student`` (``sft_arguments``,
``lora_arguments``), which precision runs, where the student comes from, the
run fingerprint that decides whether a checkpoint or an export belongs to this
run, and the pre-flight checks that only need numbers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from kubedistill.api.v1alpha1 import LoraSpec, StudentSpec
from kubedistill.api.worker_config import TrainConfig

Precision = Literal["bf16", "fp16", "fp32"]
SourceKind = Literal["s3", "local", "hub"]

# Where the operator mounts a PersistentVolumeClaim named in ``pvc://<claim>/<path>``.
PVC_MOUNT_ROOT = "/mnt/kubedistill/pvc"
CHECKPOINT_MARKER = "COMPLETE.json"
_MARKER_KEY = re.compile(r"^checkpoint-(\d+)/" + re.escape(CHECKPOINT_MARKER) + "$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class TrainSpecError(ValueError):
    """A spec that cannot run here; the message is the user-facing one-line reason."""


# --------------------------------------------------------------------------- strategy

Strategy = Literal["single", "ddp", "fsdp"]
# Training state per parameter: bf16 weights and gradients plus fp32 master weights and two Adam
# moments (2 + 2 + 4 + 8) for full fine-tuning; the frozen bf16 weights alone dominate with LoRA.
FULL_BYTES_PER_PARAMETER = 16
LORA_BYTES_PER_PARAMETER = 2
GPU_FIT = 0.8  # activations, the CUDA context and fragmentation need the rest
FSDP_NEEDS_CUDA = (
    "student.training.strategy fsdp needs GPUs: accelerate shards a model with FSDP on CUDA devices only "
    "(on CPU it would silently train every process with a full copy); use strategy ddp or auto on CPU nodes"
)


def training_bytes(parameters: int, method: str) -> int:
    return parameters * (FULL_BYTES_PER_PARAMETER if method == "full" else LORA_BYTES_PER_PARAMETER)


def choose_strategy(
    requested: str, world_size: int, cuda: bool, method: str, parameters: int, gpu_bytes: int | None
) -> tuple[Strategy, str]:
    """How the processes share the work, and why (a log line). Raises TrainSpecError for fsdp without GPUs."""
    if world_size <= 1:
        return "single", "one process"
    if requested == "ddp":
        return "ddp", "spec.student.training.strategy is ddp"
    if requested == "fsdp":
        if not cuda:
            raise TrainSpecError(FSDP_NEEDS_CUDA)
        return "fsdp", "spec.student.training.strategy is fsdp"
    if not cuda or not gpu_bytes:
        return "ddp", "auto: no GPU (FSDP runs on GPUs only)"
    need = training_bytes(parameters, method)
    if need > GPU_FIT * gpu_bytes:
        return "fsdp", (
            f"auto: {need / 2**30:.1f} GiB of training state ({parameters / 1e9:.2f}B parameters, {method}) "
            f"is more than {GPU_FIT:.0%} of one GPU's {gpu_bytes / 2**30:.0f} GiB"
        )
    return "ddp", f"auto: {need / 2**30:.1f} GiB of training state fits one GPU's {gpu_bytes / 2**30:.0f} GiB"


def fsdp_arguments(layer_classes: set[str] | list[str]) -> dict[str, Any]:
    """SFTConfig keywords for FSDP2: each decoder layer a shard unit, checkpoints sharded (torch DCP)."""
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": sorted(layer_classes),
            "reshard_after_forward": True,
            # every rank writes its own shard: no full copy of an 8B model gathered at every checkpoint
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    }


# --------------------------------------------------------------------------- precision


def choose_precision(requested: str, cuda: bool, bf16_supported: bool) -> Precision:
    """auto: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda:
        raise TrainSpecError("training.precision fp16 needs a CUDA GPU; use auto, fp32 or bf16 on CPU")
    if requested == "bf16" and cuda and not bf16_supported:
        raise TrainSpecError("training.precision bf16 is not supported by this GPU; use auto or fp16")
    return requested  # type: ignore[return-value]


def load_dtype_name(precision: Precision, method: str) -> str:
    """dtype the student is loaded in: LoRA keeps the frozen base in half precision; full keeps fp32 masters."""
    if method == "lora" and precision != "fp32":
        return "bfloat16" if precision == "bf16" else "float16"
    return "float32"


def export_dtype_name(precision: Precision) -> str:
    """dtype of the exported weights: what vLLM would run anyway, half the bytes of fp32 on GPUs."""
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


# --------------------------------------------------------------------------- trainer arguments


def batch_layout(batch_size: int, accumulation: int, packing: bool, varlen_attention: bool) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) that make ``batch_size`` x ``accumulation`` rows per step.

    trl packs with padding-free batches: the rows of a micro-batch are concatenated into
    one sequence and documents are told apart by their position ids. Varlen attention
    kernels (flash-attention) then cost what the rows cost; any other attention (SDPA on
    CPU, or on a GPU without flash-attn) computes one masked square over the whole
    concatenation, rows x max length wide. Micro-batches of one packed row, accumulated,
    are the same optimisation (same rows per step, same token-weighted loss) without it.
    """
    if packing and not varlen_attention and batch_size > 1:
        return 1, batch_size * accumulation
    return batch_size, accumulation


def sft_arguments(
    config: TrainConfig, precision: Precision, output_dir: str, cuda: bool, varlen_attention: bool = False
) -> dict[str, Any]:
    """Keyword arguments of trl's ``SFTConfig`` for this run; everything unset keeps trl's default."""
    t = config.student.training
    micro_batch, accumulation = batch_layout(t.batch_size, t.gradient_accumulation_steps, t.packing, varlen_attention)
    return {
        "output_dir": output_dir,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        # transformers 5 takes the warm-up ratio as a float in [0, 1) of warmup_steps
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "max_length": t.max_seq_length,
        "packing": t.packing,
        "completion_only_loss": t.completion_only_loss,
        "gradient_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "data_seed": t.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not cuda,
        "logging_steps": config.log_every_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": t.checkpoint_every_steps,
        # one local copy is enough: the durable ones are in the checkpoint store
        "save_total_limit": 1,
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        # checkpoint uploads happen while the other ranks wait in a barrier
        "ddp_timeout": 3 * 3600,
    }


# SFTConfig keys that mean nothing to trl's distillation trainers (they tokenize prompts and generate).
_SFT_ONLY = ("max_length", "packing", "completion_only_loss")


def on_policy_arguments(
    config: TrainConfig, precision: Precision, output_dir: str, cuda: bool, teacher_url: str
) -> dict[str, Any]:
    """Keyword arguments of trl's ``ServerDistillationConfig`` for objective onPolicy.

    reverseKL is trl's beta 1 on the sampled token's support (+ tail); forwardKL is beta 0 on the
    teacher's top k (+ tail): the two sparse losses trl implements against a server teacher.
    """
    policy = config.student.on_policy_settings
    args = {k: v for k, v in sft_arguments(config, precision, output_dir, cuda).items() if k not in _SFT_ONLY}
    forward = policy.divergence == "forwardKL"
    return {
        **args,
        "teacher_model_server_url": teacher_url,
        "beta": 0.0 if forward else 1.0,
        "loss_top_k": (policy.top_k or 20) if forward else 1,
        "loss_add_tail": True,
        "max_completion_length": policy.max_new_tokens,
        "temperature": policy.temperature,
        # the trainer generates with the student as trained; vLLM generation needs CUDA and weight syncing
        "use_vllm": False,
    }


# The loss terms each objective logs (trl's "loss" is the objective's total).
_LOSS_TERMS = {"sft": ("loss",), "kd": ("loss", "ce", "kl"), "onPolicy": ("loss",)}


def final_losses(objective: str, logs: dict[str, Any]) -> dict[str, float]:
    """The objective's loss terms at the last logged step (sft's loss is its cross-entropy, onPolicy's its
    divergence)."""
    out = {key: float(logs[key]) for key in _LOSS_TERMS[objective] if key in logs}
    if "loss" in out and objective == "sft":
        out["ce"] = out["loss"]
    if "loss" in out and objective == "onPolicy":
        out["divergence"] = out["loss"]
    return out


def lora_arguments(lora: LoraSpec) -> dict[str, Any]:
    """Keyword arguments of peft's ``LoraConfig``."""
    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return {
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


# --------------------------------------------------------------------------- fingerprint


def training_fingerprint(student: StudentSpec, dataset_digest: str, teacher: str | None = None) -> str:
    """Identifies what a checkpoint was trained on and how.

    A checkpoint is resumed only by a run with the same fingerprint. Knobs that
    do not change the weights (checkpoint frequency, export format) are left out.
    ``teacher`` names the model that scores an onPolicy student.
    """
    training = student.training.model_dump(exclude={"checkpoint_every_steps"})
    material = {
        "model": student.model,
        "method": student.method,
        "lora": student.lora.model_dump() if student.method == "lora" else None,
        "training": training,
        "chat_template": student.chat_template,
        "dataset": dataset_digest,
    }
    # sft keeps the fingerprint it always had: a finished sft export is still recognised after an upgrade
    if student.objective == "kd":
        material["objective"] = {"kd": student.kd_settings.model_dump()}
    elif student.objective == "onPolicy":
        material["objective"] = {"onPolicy": student.on_policy_settings.model_dump(), "teacher": teacher}
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- the student's source


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str  # s3 URI, local path, or hub id


def model_source(model: str) -> ModelSource:
    """``s3://`` prefix, local path (``/``, ``./``, ``file://``, ``pvc://<claim>/<path>``), or a hub id."""
    if model.startswith("s3://"):
        return ModelSource("s3", model.rstrip("/"))
    if model.startswith("file://"):
        return ModelSource("local", model[len("file://") :])
    if model.startswith("pvc://"):
        rest = model[len("pvc://") :].strip("/")
        if not rest:
            raise TrainSpecError(f"student model {model!r}: expected pvc://<claim>/<path>")
        return ModelSource("local", f"{PVC_MOUNT_ROOT}/{rest}")
    if model.startswith(("/", "./", "../", "~")):
        return ModelSource("local", model)
    if _HUB_ID.match(model):
        return ModelSource("hub", model)
    raise TrainSpecError(f"student model {model!r} is neither an s3:// prefix, a path, nor a hub id (org/name)")


# --------------------------------------------------------------------------- pre-flight checks on numbers


def check_export(student: StudentSpec) -> None:
    if student.export == "adapter" and student.method != "lora":
        raise TrainSpecError("student.export adapter needs student.method lora (full fine-tuning has no adapter)")


def check_vocabulary(tokenizer_size: int, embedding_rows: int, special_ids: dict[str, int | None]) -> None:
    """The tokenizer must not produce ids the model has no embedding for."""
    if tokenizer_size > embedding_rows:
        raise TrainSpecError(
            f"tokenizer and model disagree: the tokenizer has {tokenizer_size} tokens but the model's embeddings "
            f"have {embedding_rows} rows (is the tokenizer from another model?)"
        )
    for name, token_id in sorted(special_ids.items()):
        if token_id is not None and not 0 <= token_id < embedding_rows:
            raise TrainSpecError(
                f"tokenizer and model disagree: {name} id {token_id} is outside the model's {embedding_rows} embeddings"
            )


def check_context(max_seq_length: int, model_context: int | None) -> None:
    """training.maxSeqLength must fit the student's position embeddings."""
    if model_context is not None and max_seq_length > model_context:
        raise TrainSpecError(
            f"training.maxSeqLength {max_seq_length} exceeds the student's context length {model_context} "
            "(max_position_embeddings); lower maxSeqLength"
        )


# --------------------------------------------------------------------------- checkpoints


def complete_checkpoint_steps(keys: list[str]) -> list[int]:
    """Steps of the checkpoints under a prefix whose completion marker exists, newest first."""
    steps = {int(m.group(1)) for key in keys if (m := _MARKER_KEY.match(key))}
    return sorted(steps, reverse=True)


def checkpoints_to_delete(keys: list[str], newest_complete: int, keep: int) -> list[int]:
    """Steps whose objects can go: complete ones beyond the ``keep`` newest, and stale partial uploads."""
    complete = complete_checkpoint_steps(keys)
    kept = set(complete[:keep]) | {newest_complete}
    present = {int(m.group(1)) for key in keys if (m := re.match(r"^checkpoint-(\d+)/", key))}
    # a partial checkpoint newer than the newest complete one may be an upload in progress: leave it
    return sorted(s for s in present if s not in kept and s < newest_complete)


def check_uris(output_uri: str, checkpoint_uri: str, dataset_uri: str) -> None:
    """The export replaces everything under output_uri: nothing else may live there."""

    def inside(child: str, parent: str) -> bool:
        child, parent = child.rstrip("/") + "/", parent.rstrip("/") + "/"
        return child.startswith(parent)

    for name, uri in (("checkpointUri", checkpoint_uri), ("datasetUri", dataset_uri)):
        if inside(uri, output_uri) or inside(output_uri, uri):
            raise TrainSpecError(
                f"outputUri {output_uri} and {name} {uri} overlap: the export replaces what is under outputUri"
            )
