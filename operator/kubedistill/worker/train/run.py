"""train: fine-tune the student on the teacher dataset with trl; export what vLLM serves.

    kubedistill-worker train --config /etc/kubedistill/train.yaml

    # several GPUs / nodes: what the operator runs (it sets the rendezvous env)
    torchrun --nnodes $NODES --nproc_per_node 8 --node_rank $JOB_COMPLETION_INDEX \\
        --rdzv_endpoint $MASTER_ADDR:29500 -m kubedistill.worker train --config /etc/kubedistill/train.yaml

    # two CPU processes (gloo), as the tests do
    python -m torch.distributed.run --nproc_per_node 2 -m kubedistill.worker train --config train.yaml

    # train.yaml
    student:
      model: s3://models/qwen2.5-0.5b-instruct     # or a local path, or a hub id
      method: lora                                 # or full
      training: {epochs: 2, maxSeqLength: 1024, packing: true, checkpointEverySteps: 200}
    datasetUri: s3://bucket/runs/abc/datasets/k1  # written by the generate worker
    outputUri: s3://bucket/runs/abc/model
    checkpointUri: s3://bucket/runs/abc/checkpoints
    storage: {endpoint: http://minio:9000, addressingStyle: path}

What happens, in order:

1. Pre-flight, before any weight is loaded: the dataset is complete and not
   empty, output and checkpoint URIs are writable, the tokenizer has a chat
   template (or one is configured), tokenizer and model vocabularies agree,
   maxSeqLength fits the model; objectives kd and onPolicy: teacher and student
   tokenizers agree (kd, onpolicy). Each failure is one clear line.
2. If the output URI already holds this exact training (same fingerprint),
   its result is returned: a re-run after a lost termination message is free.
3. The student (``s3://`` prefixes are fetched once per node and verified) and
   the dataset shards (verified against the manifest) come into ``workDir``.
4. trl's ``SFTTrainer``: LoRA (peft) or full fine-tuning on the conversational
   prompt-completion records, completion-only loss, optional packing, bf16 on
   GPUs and fp32 on CPUs, resumed from the newest complete checkpoint in
   ``checkpointUri`` when there is one. Objective kd: the same trainer with the
   top-k + tail KL on the teacher's stored distributions (kd.py);
   onPolicy: trl's ServerDistillationTrainer, the student sampling and a vLLM
   teacher scoring (onpolicy.py).
5. Checkpoints go to ``checkpointUri`` every ``checkpointEverySteps`` steps and
   on SIGTERM, after which the worker exits 143 ("Preempted: ...").
6. Export (rank 0): merged safetensors (or the adapter) + tokenizer + chat
   template + ``kubedistill.json``, uploaded to ``outputUri``, marker last.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import TrainConfig, TrainResult
from kubedistill.storage.objectstore import ObjectStore, StorageError, join, open_store
from kubedistill.worker.common import Preempted, WorkerError
from kubedistill.worker.train import dist as train_dist
from kubedistill.worker.train.data import check_not_empty, load_train_records, read_manifest, to_trl_record
from kubedistill.worker.train.decisions import (
    ModelSource,
    Strategy,
    TrainSpecError,
    check_context,
    check_export,
    check_uris,
    check_vocabulary,
    choose_precision,
    choose_strategy,
    export_dtype_name,
    final_losses,
    fsdp_arguments,
    load_dtype_name,
    lora_arguments,
    model_source,
    on_policy_arguments,
    sft_arguments,
    training_fingerprint,
)

CONFIG = TrainConfig
log = logging.getLogger("kubedistill.worker.train")


def count_parameters(model_config: Any) -> tuple[int, set[str]]:
    """Parameters of a model built from ``model_config`` on the meta device (no memory), and its layer classes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]
    return sum(p.numel() for p in model.parameters()), set(model._no_split_modules or [])


def main(config: TrainConfig) -> dict[str, Any]:
    from kubedistill.worker.train.callbacks import Preemption

    preemption = Preemption()
    preemption.install()
    run = TrainRun(config, preemption)
    try:
        return run.run()
    except TrainSpecError as err:
        raise WorkerError(str(err)) from err
    finally:
        run.stop_teacher()  # objective onPolicy with teacher.vllm: the server started for the run
        preemption.restore()


def check_writable(store: ObjectStore, uri: str, what: str) -> None:
    """Pre-flight: write and delete a small object under ``uri``."""
    probe = join(uri, f".kubedistill-probe-{train_dist.rank()}-{os.getpid()}")
    try:
        store.put_bytes(probe, b"probe")
        store.delete(probe)
    except (StorageError, OSError) as err:
        raise WorkerError(f"{what} {uri} is not writable: {err}") from err
    except Exception as err:  # botocore errors from delete are not wrapped
        raise WorkerError(f"{what} {uri} is not writable: {type(err).__name__}: {err}") from err


def flash_attention_available(cuda: bool, precision: str) -> bool:
    """flash-attn's varlen kernels: what packed (padding-free) batches want on GPUs, in half precision."""
    import importlib.util

    return cuda and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None


def finished_state(checkpoint_dir: Path | None) -> dict[str, Any] | None:
    """The trainer state of a checkpoint taken at the last step, or None (no checkpoint, or mid-training)."""
    if checkpoint_dir is None:
        return None
    try:
        state: dict[str, Any] = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("max_steps") and state.get("global_step", 0) >= state["max_steps"]:
        return state
    return None


class TrainRun:
    """One attempt at training; a preempted attempt's successor picks up its checkpoint."""

    def __init__(self, config: TrainConfig, preemption: Any) -> None:
        self.config = config
        self.student = config.student
        self.training = config.student.training
        self.preemption = preemption
        self.work_dir = Path(config.work_dir)
        self.flash_attention = False
        self.strategy: Strategy = "single"
        self.fsdp_layers: set[str] = set()
        self.teacher_server: Any = None
        self.scoring: Any = None  # objective onPolicy: the client that asks the teacher to score
        self.kd_k = 0  # objective kd: alternatives per position in the teacher's distributions
        self.dataset_store = open_store(config.dataset_uri, config.storage)
        self.output_store = open_store(config.output_uri, config.storage)
        self.checkpoint_store = open_store(config.checkpoint_uri, config.storage)

    # ------------------------------------------------------------------ steps

    def run(self) -> dict[str, Any]:
        config = self.config
        check_export(self.student)
        check_uris(config.output_uri, config.checkpoint_uri, config.dataset_uri)
        source = model_source(self.student.model)
        manifest = read_manifest(self.dataset_store, config.dataset_uri)
        check_not_empty(manifest, config.dataset_uri)
        teacher_name = config.teacher.model_name if config.teacher is not None else None
        fingerprint = training_fingerprint(self.student, manifest.digest, teacher_name)

        from kubedistill.worker.train.export import existing_export

        done = existing_export(self.output_store, config.output_uri, fingerprint, self.student.export)
        if done is not None:
            return done.to_wire()
        check_writable(self.output_store, config.output_uri, "output URI")
        check_writable(self.checkpoint_store, config.checkpoint_uri, "checkpoint URI")

        import datasets
        import torch
        import transformers
        from accelerate import PartialState

        # progress bars are noise in pod logs: the ProgressCallback logs lines
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        datasets.disable_progress_bars()

        cuda = torch.cuda.is_available()
        precision = choose_precision(self.training.precision, cuda, cuda and torch.cuda.is_bf16_supported())
        self.flash_attention = flash_attention_available(cuda, precision)
        run_dir = self.work_dir / f"run-{fingerprint[:16]}"
        self.choose_strategy(source, cuda, run_dir)
        # Building the arguments initialises the process group under torchrun (gloo on CPU, NCCL on GPU).
        args = self.trainer_arguments(precision, str(run_dir / "checkpoints"), cuda)
        state = PartialState()
        log.info(
            "train: rank %d/%d, device %s, precision %s, strategy %s, objective %s, method %s, attention %s, "
            "micro-batch %d x %d, fingerprint %s",
            state.process_index,
            state.num_processes,
            state.device,
            precision,
            self.strategy,
            self.student.objective,
            self.student.method,
            "flash_attention_2" if self.flash_attention else "sdpa",
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            fingerprint[:12],
        )

        with state.local_main_process_first():
            model_path, base_digest = self.student_files(source)
        tokenizer = self.load_tokenizer(model_path)
        self.check_model_config(model_path, tokenizer)

        from datasets import Dataset

        with state.local_main_process_first():
            records = load_train_records(self.dataset_store, config.dataset_uri, manifest, run_dir / "dataset")
        rows = [to_trl_record(record) for record in records]
        if self.student.objective == "kd":
            self.prepare_kd(manifest, records, rows, tokenizer, run_dir)
        elif self.student.objective == "onPolicy":
            rows = self.prepare_on_policy(rows, tokenizer, run_dir, state)
        dataset = Dataset.from_list(rows)

        from kubedistill.worker.train.checkpoint import CheckpointStore

        checkpoints = CheckpointStore(
            self.checkpoint_store, config.checkpoint_uri, fingerprint, config.keep_checkpoints
        )
        resume_dir = self.resume_checkpoint(checkpoints, run_dir, state)

        model = self.load_model(model_path, tokenizer, precision)
        trainer, checkpoint_cb, progress_cb = self.build_trainer(model, tokenizer, args, dataset, checkpoints)

        metrics = self.train(trainer, resume_dir, checkpoint_cb, progress_cb)
        self.stop_teacher()
        metrics["resumed_from_step"] = int(resume_dir.name.split("-")[-1]) if resume_dir else None
        result: dict[str, Any] | None = None
        error: str | None = None
        model = self.model_for_export(trainer, model_path, precision, run_dir)  # collective under FSDP
        if state.is_main_process:
            try:
                result = self.export(model, tokenizer, precision, run_dir, fingerprint, manifest, base_digest, metrics)
            except WorkerError as err:
                error = str(err)
        result, error = train_dist.broadcast((result, error))
        if error:
            raise WorkerError(error)
        assert result is not None
        return result

    def train(self, trainer: Any, resume_dir: Path | None, checkpoint_cb: Any, progress_cb: Any) -> dict[str, Any]:
        """Run (or finish) the training loop; the metrics of this run."""
        finished = finished_state(resume_dir)
        if finished is not None:
            # The Trainer would run one more step past max_steps when resumed at the very end:
            # a checkpoint of the last step (saved when training ended) is exported as it is.
            assert resume_dir is not None
            log.info("checkpoint step %d is the end of training: exporting it", finished["global_step"])
            trainer._load_from_checkpoint(str(resume_dir))
            trainer.state.global_step = finished["global_step"]
            logged = [e for e in finished.get("log_history", []) if "loss" in e]
            return {
                "train_loss": logged[-1]["loss"] if logged else None,
                "losses": final_losses(self.student.objective, logged[-1] if logged else {}),
                "train_seconds": 0.0,
                "tokens": 0,
                "tokens_per_second": None,
                "mean_token_accuracy": None,
                "global_step": finished["global_step"],
                "teacher_tokens_scored": None,
            }

        self.preemption.in_training = True
        output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        self.preemption.in_training = False
        if checkpoint_cb.preempted_at is not None:
            train_dist.barrier()
            raise Preempted(checkpoint_cb.preempted_message())

        tokens = int(getattr(trainer, "_total_train_tokens", 0) or progress_cb.last_logs.get("num_tokens", 0))
        seconds = float(output.metrics.get("train_runtime", 0.0))
        metrics = {
            "train_loss": float(output.training_loss),
            "train_seconds": seconds,
            "tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "mean_token_accuracy": progress_cb.last_logs.get("mean_token_accuracy"),
            "global_step": trainer.state.global_step,
            "losses": final_losses(self.student.objective, progress_cb.last_logs),
            "teacher_tokens_scored": self.scoring.tokens_scored if self.scoring is not None else None,
        }
        log.info(
            "training done (%s): step %d, loss %.4f, final %s, %d tokens in %.1fs (%.0f tokens/s)",
            self.student.objective,
            trainer.state.global_step,
            metrics["train_loss"],
            " ".join(f"{k} {v:.4f}" for k, v in metrics["losses"].items()),
            tokens,
            seconds,
            metrics["tokens_per_second"] or 0.0,
        )
        return metrics

    # ------------------------------------------------------------------ objectives

    def trainer_arguments(self, precision: Any, output_dir: str, cuda: bool) -> Any:
        """SFTConfig (sft, kd), or trl's ServerDistillationConfig (onPolicy)."""
        if self.student.objective != "onPolicy":
            from trl.trainer.sft_config import SFTConfig

            arguments = sft_arguments(self.config, precision, output_dir, cuda, self.flash_attention)
            return SFTConfig(**arguments, **(fsdp_arguments(self.fsdp_layers) if self.strategy == "fsdp" else {}))
        from kubedistill.worker.train import onpolicy as train_onpolicy

        assert self.config.teacher is not None
        teacher = self.config.teacher
        if teacher.vllm is not None:
            self.teacher_server = train_onpolicy.TeacherServer(self.config, self.work_dir)
        url = train_onpolicy.scoring_url(teacher, self.teacher_server.port if self.teacher_server else None)
        config_class = train_onpolicy.config_class()
        arguments = on_policy_arguments(self.config, precision, output_dir, cuda, url)
        return config_class(**arguments, **(fsdp_arguments(self.fsdp_layers) if self.strategy == "fsdp" else {}))

    def prepare_kd(
        self, manifest: Any, records: list[Any], rows: list[dict[str, Any]], tokenizer: Any, run_dir: Path
    ) -> None:
        """Pre-flight (the teacher's vocabulary, each answer's tokens) and the teacher's distributions per row."""
        from kubedistill.worker.train.kd import add_kd_targets, check_teacher_tokenizer

        names = (f"{manifest.teacher_model} (teacher)", f"{self.student.model} (student)")
        check_teacher_tokenizer(self.dataset_store, self.config.dataset_uri, manifest, tokenizer, run_dir, names)
        self.kd_k = add_kd_targets(records, rows, tokenizer, names).k

    def prepare_on_policy(
        self, rows: list[dict[str, Any]], tokenizer: Any, run_dir: Path, state: Any
    ) -> list[dict[str, Any]]:
        """Start (or reach) the teacher, check it tokenizes as the student and scores; the prompts to answer."""
        from kubedistill.worker.train import onpolicy as train_onpolicy

        teacher = self.config.teacher
        assert teacher is not None
        student_name = f"{self.student.model} (student)"
        key = train_onpolicy.api_key(self.config)
        server = self.teacher_server
        if server is not None:
            if state.is_local_main_process:
                server.start()
            server.wait()
            assert server.model_path is not None
            train_onpolicy.check_teacher_vocabulary(
                server.model_path, f"{teacher.model_name} (teacher)", tokenizer, student_name
            )
        url = train_onpolicy.scoring_url(teacher, server.port if server else None)
        probe = train_onpolicy.probe_text(tokenizer, rows[0])
        train_onpolicy.check_teacher_tokens(teacher, url, key, tokenizer, probe, student_name)
        self.scoring = train_onpolicy.scoring_client_class()(url, train_onpolicy.scoring_model(teacher), key)
        tokenizer.padding_side = "left"  # the student generates: prompts are left-padded
        return [{"prompt": row["prompt"]} for row in rows]

    def stop_teacher(self) -> None:
        if self.teacher_server is not None:
            self.teacher_server.stop()

    # ------------------------------------------------------------------ pieces

    def student_files(self, source: ModelSource) -> tuple[str, str | None]:
        """A local directory (or hub id) holding the student, and its digest when fetched from S3."""
        if source.kind == "s3":
            import hashlib

            from kubedistill.worker.fetch import fetch_model

            key = hashlib.sha256(source.location.encode()).hexdigest()[:16]
            store = open_store(source.location, self.config.storage)
            fetched = fetch_model(store, source.location, self.work_dir / "models" / key)
            return str(fetched.path), fetched.digest
        if source.kind == "local":
            path = Path(source.location).expanduser()
            if not (path / "config.json").is_file():
                raise WorkerError(f"student model {self.student.model}: no config.json in {path}")
            return str(path), None
        return source.location, None

    def load_tokenizer(self, model_path: str) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as err:
            raise WorkerError(f"cannot load the student's tokenizer from {self.student.model}: {err}") from err
        if self.student.chat_template:
            tokenizer.chat_template = self.student.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise WorkerError(
                f"the student's tokenizer ({self.student.model}) has no chat template: "
                "set spec.student.chatTemplate or use an instruct/chat model"
            )
        return tokenizer

    def check_model_config(self, model_path: str, tokenizer: Any) -> None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(model_path)
        except Exception as err:
            raise WorkerError(f"cannot load the student's config from {self.student.model}: {err}") from err
        text_config = model_config.get_text_config()
        check_context(self.training.max_seq_length, getattr(text_config, "max_position_embeddings", None))
        check_vocabulary(
            len(tokenizer),
            int(text_config.vocab_size),
            {
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
        )

    def resume_checkpoint(self, checkpoints: Any, run_dir: Path, state: Any) -> Path | None:
        latest = checkpoints.latest()
        if latest is None:
            log.info("no checkpoint of this run in %s: starting at step 0", self.config.checkpoint_uri)
            return None
        if latest.marker.get("world_size") not in (None, state.num_processes):
            log.warning(
                "checkpoint step %d was written by %d processes, this run has %d: "
                "the data order from here on differs from an uninterrupted run",
                latest.step,
                latest.marker["world_size"],
                state.num_processes,
            )
        dest = run_dir / "resume" / f"checkpoint-{latest.step}"
        with state.local_main_process_first():
            if state.is_local_main_process:
                checkpoints.download(latest, dest)
        log.info("resuming from checkpoint step %d (%s)", latest.step, latest.uri)
        return dest

    def load_model(self, model_path: str, tokenizer: Any, precision: Any) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, load_dtype_name(precision, self.student.method))
        extra = {"attn_implementation": "flash_attention_2"} if self.flash_attention else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **extra)
        except Exception as err:
            raise WorkerError(f"cannot load the student model {self.student.model}: {err}") from err
        # the config's vocab_size was checked already; the weights are what counts
        rows = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
        check_vocabulary(len(tokenizer), rows, {})
        return model

    def build_trainer(
        self, model: Any, tokenizer: Any, args: Any, dataset: Any, checkpoints: Any
    ) -> tuple[Any, Any, Any]:
        from trl.trainer.sft_trainer import SFTTrainer

        from kubedistill.worker.train.callbacks import CheckpointCallback, ProgressCallback

        peft_config = None
        if self.student.method == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(**lora_arguments(self.student.lora))
        checkpoint_cb = CheckpointCallback(checkpoints, self.preemption)
        progress_cb = ProgressCallback(self.config.progress, checkpoint_cb)
        common = {
            "model": model,
            "args": args,
            "train_dataset": dataset,
            "processing_class": tokenizer,
            "peft_config": peft_config,
            "callbacks": [checkpoint_cb, progress_cb],
        }
        try:
            if self.student.objective == "kd":
                from kubedistill.worker.train.kd import kd_trainer_class

                kd = self.student.kd_settings
                trainer = kd_trainer_class()(**common, alpha=kd.alpha, temperature=kd.temperature, k=self.kd_k)
            elif self.student.objective == "onPolicy":
                from kubedistill.worker.train.onpolicy import on_policy_trainer_class

                trainer = on_policy_trainer_class()(**common, client=self.scoring)
            else:
                trainer = SFTTrainer(**common)
        except ValueError as err:
            if "Target modules" in str(err) or "target_modules" in str(err):
                raise WorkerError(
                    f"lora.targetModules {self.student.lora.target_modules} match no module of the student: {err}"
                ) from err
            raise
        # our ProgressCallback logs one line per logging step; the Trainer's printer would repeat it as a dict
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        if self.student.objective != "onPolicy" and len(trainer.train_dataset) == 0:
            raise WorkerError(
                f"no training example fits training.maxSeqLength {self.training.max_seq_length}: "
                "every prompt fills it, leaving no completion token to learn"
            )
        return trainer, checkpoint_cb, progress_cb

    def choose_strategy(self, source: ModelSource, cuda: bool, run_dir: Path) -> None:
        """ddp or fsdp (or a single process), from the spec and, for auto, the student's size vs the GPU."""
        parameters, self.fsdp_layers = 0, set()
        if train_dist.env_world_size() > 1 and self.training.strategy != "ddp":
            parameters, self.fsdp_layers = count_parameters(self.student_config(source, run_dir))
        gpu_bytes = None
        if cuda:
            import torch

            gpu_bytes = int(torch.cuda.get_device_properties(0).total_memory)
        try:
            self.strategy, why = choose_strategy(
                self.training.strategy, train_dist.env_world_size(), cuda, self.student.method, parameters, gpu_bytes
            )
        except TrainSpecError as err:
            raise WorkerError(str(err)) from err
        log.info("strategy %s: %s", self.strategy, why)

    def student_config(self, source: ModelSource, run_dir: Path) -> Any:
        """The student's model config alone (no weights): enough to count its parameters."""
        from transformers import AutoConfig

        location = source.location
        if source.kind == "s3":
            probe = run_dir / "config-probe"
            open_store(location, self.config.storage).download_file(
                join(location, "config.json"), probe / "config.json"
            )
            location = str(probe)
        try:
            return AutoConfig.from_pretrained(location)
        except Exception as err:
            raise WorkerError(f"cannot load the student's config from {self.student.model}: {err}") from err

    def model_for_export(self, trainer: Any, model_path: str, precision: Any, run_dir: Path) -> Any:
        """The trained model, whole, on rank 0 (None elsewhere). Every rank must call it.

        Under FSDP the weights are spread over every rank: the Trainer gathers them (full state
        dict, collective) into a directory, and rank 0 loads that (the adapter onto its base for LoRA).
        """
        if self.strategy != "fsdp":
            return trainer.accelerator.unwrap_model(trainer.model) if train_dist.is_main() else None
        import torch
        from transformers import AutoModelForCausalLM

        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        gathered = run_dir / "gathered"
        trainer.save_model(str(gathered))
        train_dist.barrier()
        if not train_dist.is_main():
            return None
        dtype = getattr(torch, load_dtype_name(precision, self.student.method))
        if self.student.method == "lora":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
            return PeftModel.from_pretrained(base, str(gathered))
        return AutoModelForCausalLM.from_pretrained(str(gathered), dtype=dtype)

    def export(
        self,
        model: Any,
        tokenizer: Any,
        precision: Any,
        run_dir: Path,
        fingerprint: str,
        manifest: Any,
        base_digest: str | None,
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        import shutil

        import peft
        import torch
        import transformers
        import trl

        from kubedistill.worker.train.export import publish, save_export, write_metadata

        dest = run_dir / "export"
        if dest.exists():
            shutil.rmtree(dest)
        adapter = save_export(model, tokenizer, self.config, export_dtype_name(precision), dest)
        _, digest = write_metadata(
            dest,
            base_model=self.student.model,
            base_model_digest=base_digest,
            method=self.student.method,
            export="adapter" if adapter else "merged",
            dtype=export_dtype_name(precision),
            dataset_uri=self.config.dataset_uri,
            dataset_digest=manifest.digest,
            teacher_model=manifest.teacher_model,
            fingerprint=fingerprint,
            global_step=metrics["global_step"],
            trainer_config=self.student.to_wire(),
            metrics=metrics,
            versions={
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "peft": peft.__version__,
            },
        )
        publish(self.output_store, dest, self.config.output_uri)
        return TrainResult(
            model_uri=self.config.output_uri,
            digest=digest,
            global_step=metrics["global_step"],
            train_loss=metrics["train_loss"],
            tokens_per_second=metrics["tokens_per_second"],
            adapter=adapter,
            tokens=metrics["tokens"],
            train_seconds=round(metrics["train_seconds"], 3),
            resumed_from_step=metrics["resumed_from_step"],
            objective=self.student.objective,
            strategy=self.strategy,
            losses=metrics["losses"],
            teacher_tokens_scored=metrics["teacher_tokens_scored"],
        ).to_wire()
