"""Pass 2 with an OpenAI-compatible teacher: a producer, a fixed pool of workers, one flusher.

The producer streams the prompts with missing answers into a bounded queue;
``maxConcurrency`` workers pull from it and ask the teacher; the flusher writes
buffered answers to the answer store every ``flushSeconds`` (or when
``flushEvery`` are waiting) and logs progress.

Shutdown is cooperative and bounded, never left to a cancellation that could be
lost. On Python 3.11, ``asyncio.wait_for`` returns the inner result and drops a
cancellation that arrives in the same loop turn as that result: a flusher that
was cancelled just as the last answer woke it kept looping forever, and the
finished worker never exited (seen on a loaded CI machine). So the flusher ends
when ``closing`` is set, its waits use ``asyncio.timeout`` (which keeps a
cancellation), and every wait on a task during shutdown has a deadline: a task
that outlives it is named in the log and left behind, never waited on forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker.common import EXIT_INTERNAL, Preempted, WorkerError, exit_deadline, on_sigterm
from kubedistill.worker.teacher.census import AskInputs, Failure
from kubedistill.worker.teacher.endpoint import CallStats, EndpointClient, FatalTeacherError, TeacherCallError
from kubedistill.worker.teacher.limits import RateLimits
from kubedistill.worker.teacher.progress import Progress
from kubedistill.worker.teacher.prompts import Prompt
from kubedistill.worker.teacher.spend import BudgetExhausted

log = logging.getLogger("kubedistill.worker.generate")

# Seconds a cancelled task or the final store write may take before shutdown gives up on it.
SHUTDOWN_GRACE_SECONDS = 10.0
# The final flush is a PUT of answers already paid for: it gets longer than the tasks.
FINAL_FLUSH_SECONDS = 120.0
# If the event loop itself stops turning, the process exit deadline (worker/common.py) ends it.
SHUTDOWN_DEADLINE_SECONDS = 4 * SHUTDOWN_GRACE_SECONDS + FINAL_FLUSH_SECONDS
Entry = tuple[Prompt, list[str]]


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """``event.wait()`` for at most ``timeout`` seconds; True when it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it can swallow a cancellation (see the module docstring).
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def settle(tasks: Iterable[asyncio.Future[Any]], timeout: float, what: str) -> None:
    """Wait up to ``timeout`` for ``tasks`` to finish (they were cancelled or told to stop); never longer.

    A task still running afterwards is logged by name and abandoned: the process exits without it.
    """
    pending = {task for task in tasks if not task.done()}
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    if stuck:
        labels = sorted(task.get_name() if isinstance(task, asyncio.Task) else repr(task) for task in stuck)
        log.error("%s: %d task(s) did not stop within %.0fs and are abandoned: %s", what, len(stuck), timeout, labels)


class EndpointPass:
    """Asks an endpoint teacher for every missing answer; ``await run()`` returns the prompts that failed."""

    def __init__(
        self,
        config: GenerateConfig,
        inputs: AskInputs,
    ) -> None:
        spec = config.teacher.endpoint
        assert spec is not None
        census = inputs.census
        self.config = config
        self.spec = spec
        self.inputs = inputs
        self.answers, self.census, self.ledger, self.stats = inputs.answers, inputs.census, inputs.ledger, inputs.stats
        self.concurrency = max(1, min(spec.max_concurrency, census.prompts_to_ask))
        self.failures: list[Failure] = []
        self.in_flight = 0
        self.progress = Progress(census.to_ask, config.progress, label=spec.model, reused=census.stored)
        # Created in run(): asyncio primitives belong to the running loop.
        self.queue: asyncio.Queue[Entry | None]
        self.stop: asyncio.Event  # SIGTERM: ask nothing new
        self.budget_spent: asyncio.Event  # the budget holds no further request: ask nothing new
        self.closing: asyncio.Event  # shutdown: the flusher's cue to end
        self.flush_wanted: asyncio.Event
        self.client: EndpointClient

    # ------------------------------------------------------------------ the run

    async def run(self) -> list[Failure]:
        self.queue = asyncio.Queue(maxsize=2 * self.concurrency)
        self.stop, self.closing, self.flush_wanted = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.budget_spent = asyncio.Event()
        api_key = os.environ.get(self.config.api_key_env)
        if not api_key:
            log.warning("no teacher API key in $%s: sending requests without one", self.config.api_key_env)
        limits = RateLimits(self.spec.requests_per_minute, self.spec.tokens_per_minute, self.census.largest_charge)
        loop = asyncio.get_running_loop()
        installed = _install_sigterm(loop, self.stop)
        try:
            async with EndpointClient(
                self.config.teacher,
                api_key,
                limits,
                backoff_initial=self.config.backoff_initial_seconds,
                backoff_max=self.config.backoff_max_seconds,
                ledger=self.ledger,
            ) as client:
                self.client = client
                self.stats.calls = client.stats
                await self._supervise()
        finally:
            _remove_sigterm(loop, installed)
        _log_calls(self.stats.calls or CallStats())
        if self.stop.is_set():
            raise Preempted(
                f"SIGTERM after {self.stats.answered} answers this run; all are stored, "
                "a restart asks only for the rest"
            )
        return self.failures

    async def _supervise(self) -> None:
        """Run the tasks until the work is done, the store fails or SIGTERM (plus the drain); then shut down."""
        producer = asyncio.create_task(self.produce(), name="generate-producer")
        workers = [asyncio.create_task(self.work(), name=f"generate-worker-{i}") for i in range(self.concurrency)]
        flusher = asyncio.create_task(self.flush_loop(), name="generate-flusher")
        everything: asyncio.Future[Any] = asyncio.gather(producer, *workers)
        stopped = asyncio.create_task(self.stop.wait(), name="generate-sigterm")
        watched: set[asyncio.Future[Any]] = {everything, flusher, stopped}
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if flusher in done:
                flusher.result()  # raises the store error
            if stopped in done and not everything.done():
                log.warning(
                    "SIGTERM: no new requests; up to %.0fs for %d in flight", self.config.drain_seconds, self.in_flight
                )
                watched.discard(stopped)
                await asyncio.wait(watched, timeout=self.config.drain_seconds, return_when=asyncio.FIRST_COMPLETED)
                if flusher.done():
                    flusher.result()
            if everything.done():
                everything.result()  # raises FatalTeacherError or a bug
        except FatalTeacherError as err:
            raise WorkerError(str(err)) from err
        finally:
            await self._shut_down([producer, *workers, stopped], flusher)

    async def _shut_down(self, tasks: list[asyncio.Task[Any]], flusher: asyncio.Task[None]) -> None:
        """Stop every task within a deadline, then store whatever arrived (a store failure raises here)."""
        exit_deadline.arm(
            SHUTDOWN_DEADLINE_SECONDS,
            EXIT_INTERNAL,
            "generate's teacher pass is shutting down",
            f"generate did not shut down within {SHUTDOWN_DEADLINE_SECONDS:.0f}s after asking the teacher; "
            "the answers flushed so far are stored and a restart asks only for the rest",
        )
        try:
            await self._stop_tasks(tasks, flusher)
        finally:
            exit_deadline.disarm()

    async def _stop_tasks(self, tasks: list[asyncio.Task[Any]], flusher: asyncio.Task[None]) -> None:
        for task in tasks:
            task.cancel()
        await settle(tasks, SHUTDOWN_GRACE_SECONDS, "generate shutdown")
        self.closing.set()
        self.flush_wanted.set()
        await settle([flusher], SHUTDOWN_GRACE_SECONDS, "generate flusher")
        if not flusher.done():
            flusher.cancel()
            await settle([flusher], SHUTDOWN_GRACE_SECONDS, "generate flusher (cancelled)")
        self.progress.close()
        # Whatever arrived is kept, whatever ended the run.
        final = asyncio.ensure_future(self.answers.aflush())
        await settle([final], FINAL_FLUSH_SECONDS, "final answer store write")
        if not final.done():
            raise WorkerError(
                f"the answer store did not take the last {self.answers.pending} answers within "
                f"{FINAL_FLUSH_SECONDS:.0f}s; a restart asks for them again"
            )
        final.result()

    # ------------------------------------------------------------------ the tasks

    async def produce(self) -> None:
        work = self.inputs.missing(with_heartbeats=True)
        for scanned, entry in enumerate(work):
            if self.asking_stopped:
                break
            if entry is not None:
                await self.queue.put(entry)
            elif scanned % 512 == 0:
                # A resumed run skips stretches of stored prompts without ever blocking
                # on the queue: let the requests in flight and the flusher run meanwhile.
                await asyncio.sleep(0)
        for _ in range(self.concurrency):
            await self.queue.put(None)

    async def work(self) -> None:
        while (entry := await self.queue.get()) is not None:
            if self.asking_stopped:
                continue  # drain the queue: nothing new is asked after SIGTERM or once the budget is spent
            await self.ask(*entry)

    @property
    def asking_stopped(self) -> bool:
        return self.stop.is_set() or self.budget_spent.is_set()

    async def ask(self, prompt: Prompt, keys: list[str]) -> None:
        self.stats.requested += len(keys)
        self.in_flight += 1
        try:
            got = await self.client.ask(prompt.messages, keys)
        except BudgetExhausted:
            self.stats.requested -= len(keys)  # not asked after all
            self.budget_spent.set()
            return
        except TeacherCallError as err:
            self.failures.append(Failure(prompt, keys, err.reason))
            log.debug("prompt at %s:%d failed: %s", prompt.uri, prompt.line, err.reason)
            self.progress.update(failed=len(keys))
            return
        finally:
            self.in_flight -= 1
        self.stats.answered += len(got)
        if self.answers.add(got):
            self.flush_wanted.set()
        self.progress.update(done=len(got))

    async def flush_loop(self) -> None:
        """Flush when asked or every tick, until ``closing``; the final flush is the shutdown's."""
        tick = min(1.0, self.config.flush_seconds / 2)
        while not self.closing.is_set():
            await wait_event(self.flush_wanted, tick)
            self.flush_wanted.clear()
            if self.closing.is_set():
                return
            if self.answers.flush_due():
                await self.answers.aflush()
            calls = self.client.stats
            self.progress.maybe_log(
                retries=calls.retries,
                stored=self.answers.stats.answers_written,
                teacher_tokens=calls.prompt_tokens + calls.completion_tokens,
            )


def _install_sigterm(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> bool:
    def handle() -> None:
        stop.set()
        on_sigterm("the requests in flight drain and the answers are stored")

    try:
        loop.add_signal_handler(signal.SIGTERM, handle)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        return False
    return True


def _remove_sigterm(loop: asyncio.AbstractEventLoop, installed: bool) -> None:
    if installed:
        loop.remove_signal_handler(signal.SIGTERM)


def _log_calls(calls: CallStats) -> None:
    reasons = ",".join(f"{k}:{v}" for k, v in sorted(calls.retry_reasons.items())) or "-"
    log.info(
        "teacher calls: attempts=%d retries=%d succeeded=%d failed=%d retry_reasons=%s "
        "prompt_tokens=%d completion_tokens=%d",
        calls.attempts, calls.retries, calls.succeeded, calls.failed, reasons,
        calls.prompt_tokens, calls.completion_tokens,
    )  # fmt: skip
