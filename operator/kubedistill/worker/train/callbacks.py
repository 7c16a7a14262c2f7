"""Trainer callbacks of the train worker: preemption-safe checkpoints and progress lines.

Why not transformers' own ``enable_jit_checkpoint``: it saves from inside the
step (before the optimizer step, so the step's batches are lost), each rank
decides on its own when SIGTERM arrives (ranks that disagree deadlock in the
next collective), and it writes to local disk only. Here the SIGTERM handler
only sets a flag; at the end of each optimizer step the ranks agree (all-reduce
MAX) on whether any of them was signalled, and if so all of them save that
same step through the Trainer's normal path and stop; ``on_save`` then uploads.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubedistill.api.worker_config import ProgressTarget
from kubedistill.worker.common import Preempted, on_sigterm
from kubedistill.worker.report import ProgressReporter
from kubedistill.worker.train import dist as train_dist
from kubedistill.worker.train.checkpoint import CheckpointStore

log = logging.getLogger("kubedistill.worker.train")


class Preemption:
    """SIGTERM handling: a flag while the training loop runs, an immediate ``Preempted`` otherwise.

    Before training there is nothing worth saving, and after it the export is
    short and idempotent: a restart redoes either from the last checkpoint.
    """

    def __init__(self) -> None:
        self.requested = False
        self.in_training = False
        self._previous: Any = None

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            # signal handlers belong to the main thread (local mode may run a stage elsewhere)
            log.warning("not in the main thread: SIGTERM will not checkpoint")
            return
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        self.requested = True
        if first:
            on_sigterm("the train worker saves and uploads a checkpoint")
        if not self.in_training:
            raise Preempted("SIGTERM outside the training loop; a restart resumes from the last checkpoint")
        if first:
            log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")


class CheckpointCallback(TrainerCallback):
    """Uploads every checkpoint the Trainer saves; turns a SIGTERM into save + stop at a step boundary."""

    def __init__(self, checkpoints: CheckpointStore, preemption: Preemption) -> None:
        self.checkpoints = checkpoints
        self.preemption = preemption
        self.preempted_at: int | None = None
        self.last_uploaded: tuple[int, str] | None = None
        self.last_error: str | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if train_dist.any_rank(self.preemption.requested, device=args.device):
            self.preemption.requested = True
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        step = state.global_step
        local = Path(args.output_dir or ".") / f"checkpoint-{step}"
        ok, info = self.checkpoints.upload(local, step)
        if ok:
            self.last_uploaded = (step, info)
            self.last_error = None
        else:
            # training goes on: the next checkpoint tries again, the previous complete one still stands
            self.last_error = info
            log.error("checkpoint step %d was not uploaded: %s", step, info)
        return control

    def preempted_message(self) -> str:
        step = self.preempted_at
        if self.last_uploaded and self.last_uploaded[0] == step:
            return f"SIGTERM at step {step}: checkpoint saved to {self.last_uploaded[1]}; a restart resumes from it"
        previous = f"step {self.last_uploaded[0]}" if self.last_uploaded else "the previous checkpoint (if any)"
        return (
            f"SIGTERM at step {step}: checkpoint upload failed ({self.last_error}); a restart resumes from {previous}"
        )


class ProgressCallback(TrainerCallback):
    """One log line per logging step (step, loss, learning rate, tokens/s) and live progress reports.

    Rank 0 alone speaks: the reports (worker/report.py) say step / steps, epoch, the latest
    loss, tokens/s, the last uploaded checkpoint and the ETA.
    """

    def __init__(self, target: ProgressTarget | None = None, checkpoints: CheckpointCallback | None = None) -> None:
        self.started = time.monotonic()
        self._last_time = self.started
        self._last_tokens = 0.0
        self.tokens_per_second: float | None = None
        self.last_logs: dict[str, float] = {}
        self.start_step = 0
        self.reporter = ProgressReporter(target, "train", "steps")
        self.checkpoints = checkpoints

    def _report(self, state: TrainerState, force: bool = False) -> None:
        if not state.is_world_process_zero:
            return
        uploaded = self.checkpoints.last_uploaded if self.checkpoints is not None else None
        self.reporter.update(
            state.global_step,
            total=state.max_steps or None,
            force=force,
            epoch=round(state.epoch or 0.0, 3),
            loss=self.last_logs.get("loss"),
            tokensPerSecond=None if self.tokens_per_second is None else round(self.tokens_per_second, 1),
            checkpointStep=uploaded[0] if uploaded else None,
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._report(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._report(state, force=True)
        if state.is_world_process_zero:
            self.reporter.finish()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.started = self._last_time = time.monotonic()
        self.start_step = state.global_step
        if state.is_world_process_zero:
            log.info(
                "training: %d steps, %s epochs, world size %d, starting at step %d",
                state.max_steps,
                args.num_train_epochs if args.max_steps <= 0 else "-",
                args.world_size,
                state.global_step,
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        self.last_logs = dict(logs)
        now = time.monotonic()
        tokens = float(logs.get("num_tokens", 0.0))
        elapsed = max(now - self._last_time, 1e-9)
        rate = (tokens - self._last_tokens) / elapsed
        self._last_time, self._last_tokens = now, tokens
        self.tokens_per_second = rate
        if state.is_world_process_zero:
            terms = "".join(f" {key} {logs[key]:.4f}" for key in ("ce", "kl") if key in logs)  # objective kd
            log.info(
                "train step %d/%d epoch %.2f loss %.4f%s lr %.3g grad_norm %.3g tokens/s %.0f token_accuracy %.3f",
                state.global_step,
                state.max_steps,
                state.epoch or 0.0,
                logs["loss"],
                terms,
                logs.get("learning_rate", 0.0),
                logs.get("grad_norm", float("nan")),
                rate,
                logs.get("mean_token_accuracy", float("nan")),
            )
