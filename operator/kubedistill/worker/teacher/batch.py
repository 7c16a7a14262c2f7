"""Pass 2 through the OpenAI Batch API (``teacher.endpoint.mode: batch``): usually half the price.

    missing answers -> JSONL input files (at most batch.maxRequestsPerBatch lines and
    batch.maxBytesPerBatch bytes) -> POST /v1/files -> POST /v1/batches -> GET /v1/batches/{id}
    until it ends -> output and error files -> the answer store

What survives a kill (a batch can run for hours; pods are preempted, nodes drained): each batch
has a record next to the answers it will bring::

    <answerStoreUri>/v1/<settings digest>/batches/<record>.json

written before the input file is uploaded (``submitting``), updated with the file id, then with
the batch id once the batch exists (``submitted``, before any polling), and deleted once its
answers are stored. A restarted run reads the records first and polls those batches instead of
submitting their requests again. A record killed between creating its batch and writing the
batch id is matched to the batch on the server by the record name in the batch's metadata; one
killed before that has its batch created from the file already uploaded. No request is paid for
twice.

A line that failed (an error status, or left unprocessed by an expired or failed batch) is sent
again in a later batch, up to ``batch.maxRounds`` batches per request in this run; then its
prompt counts as failed, like an online request out of retries. Answers are parsed like online
ones and land in the same content-addressed store: switching between online and batch mode
reuses every answer. Every request is held against the budget when its batch is built (a batch
takes only what the budget holds; the rest waits for the bills of the batches in flight) and
its usage is counted at the batch prices when its result arrives.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.storage.objectstore import StorageError, join
from kubedistill.worker.common import Preempted, WorkerError
from kubedistill.worker.teacher.census import AskInputs, Failure
from kubedistill.worker.teacher.endpoint import FATAL_STATUS, chat_payload, parse_completion, scrub
from kubedistill.worker.teacher.prompts import Prompt
from kubedistill.worker.teacher.spend import Charge, prompt_upper_bound, usage_from_response, worst_case

log = logging.getLogger("kubedistill.worker.generate")
FINISHED = frozenset({"completed", "expired", "failed", "cancelled"})
RECORDS_DIR = "batches"


class BatchRequest(BaseModel):
    keys: list[str]
    prompt_tokens: int  # its prompt's upper bound: with the keys, the request's worst case


class BatchRecord(BaseModel):
    """One batch, as the object store remembers it across restarts."""

    name: str
    state: Literal["submitting", "submitted"] = "submitting"
    input_file_id: str | None = None
    batch_id: str | None = None
    created_at: str = ""
    requests: dict[str, BatchRequest]  # by custom_id (the request's first answer key)


class BatchAPIError(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class BatchAPI:
    """The few Batch API calls, retried on transient errors (connection, 408/409/429/5xx)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout)
        self._key = api_key

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retrying = Retrying(
            stop=stop_after_attempt(6),
            wait=wait_random_exponential(multiplier=1, max=30),
            retry=retry_if_exception(lambda e: isinstance(e, BatchAPIError) and e.retryable),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                try:
                    response = self._http.request(method, path, **kwargs)
                except httpx.TransportError as err:
                    raise BatchAPIError(f"{method} {path}: {type(err).__name__}", retryable=True) from err
                if response.status_code >= 400:
                    detail = scrub(" ".join(response.text[:300].split()), self._key)
                    if response.status_code in FATAL_STATUS:
                        raise WorkerError(f"HTTP {response.status_code} from the Batch API: "
                                          f"{FATAL_STATUS[response.status_code]}: {detail}")  # fmt: skip
                    retryable = response.status_code in (408, 409, 429) or response.status_code >= 500
                    raise BatchAPIError(f"{method} {path}: HTTP {response.status_code}: {detail}", retryable=retryable)
        return response

    def upload(self, name: str, data: bytes) -> str:
        files = {"file": (name, data, "application/jsonl")}
        return str(self._call("POST", "files", files=files, data={"purpose": "batch"}).json()["id"])

    def create(self, file_id: str, window: str, record: str) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": window,
                "metadata": {"kubedistill_record": record}}  # fmt: skip
        result: dict[str, Any] = self._call("POST", "batches", json=body).json()
        return result

    def get(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"batches/{batch_id}").json()
        return result

    def content(self, file_id: str) -> bytes:
        return self._call("GET", f"files/{file_id}/content").content

    def find(self, record: str) -> dict[str, Any] | None:
        """The batch created for ``record`` (by its metadata), paging through the server's list."""
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._call("GET", "batches", params=params).json()
            for batch in page.get("data") or []:
                if (batch.get("metadata") or {}).get("kubedistill_record") == record:
                    found: dict[str, Any] = batch
                    return found
            if not page.get("has_more") or not page.get("data"):
                return None
            params["after"] = page["data"][-1]["id"]


@dataclass
class _Live:
    record: BatchRecord
    charges: dict[str, Charge] = field(default_factory=dict)  # held against the budget, by custom_id


class BatchPass:
    """Asks an endpoint teacher for every missing answer through batches; ``run()`` returns the failed prompts."""

    def __init__(
        self,
        config: GenerateConfig,
        inputs: AskInputs,
        work: Path,
    ) -> None:
        spec = config.teacher.endpoint
        assert spec is not None
        self.config, self.spec, self.settings = config, spec, spec.batch
        self.inputs = inputs
        self.answers, self.ledger, self.stats = inputs.answers, inputs.ledger, inputs.stats
        self.work = work
        self.max_tokens = config.teacher.sampling.max_tokens
        self.records_uri = join(self.answers.prefix, RECORDS_DIR)
        self.failures: list[Failure] = []
        self.failed: dict[str, str] = {}  # custom_id -> reason, once out of rounds
        self.rounds: dict[str, int] = {}  # custom_id -> batches it went through in this run
        self.live: list[_Live] = []
        self._reported: set[str] = set()  # custom_ids whose failure is in self.failures
        self._key = os.environ.get(config.api_key_env)
        self.api = BatchAPI(spec.base_url, self._key, spec.timeout_seconds)

    def run(self) -> list[Failure]:
        from kubedistill.worker.teacher.offline import StopFlag

        if not self._key:
            log.warning("no teacher API key in $%s: sending requests without one", self.config.api_key_env)
        try:
            with StopFlag() as stop:
                self.resume()
                while True:
                    left = self.submit()
                    if not self.live:
                        # Nothing in flight, and what is left does not fit: the budget is spent.
                        self.ledger.exhausted = left > 0
                        break
                    if not self.wait_for_one(stop):
                        raise Preempted(
                            f"SIGTERM while {len(self.live)} batch(es) run; their ids are stored and a restart "
                            "polls them instead of submitting again"
                        )
        finally:
            self.api.close()
        return self.failures

    # ------------------------------------------------------------------ records

    def _record_uri(self, record: BatchRecord) -> str:
        return join(self.records_uri, f"{record.name}.json")

    def _save(self, record: BatchRecord) -> None:
        try:
            self.answers.store.put_bytes(
                self._record_uri(record), record.model_dump_json().encode(), "application/json"
            )
        except StorageError as err:
            raise WorkerError(f"cannot record a teacher batch in the answer store: {err}") from err

    def _drop(self, record: BatchRecord) -> None:
        self.answers.store.delete(self._record_uri(record))

    def resume(self) -> None:
        """Batches of earlier runs: poll them (adopting a batch whose id was never written), hold their cost."""
        try:
            found = [obj for obj in self.answers.store.list(self.records_uri) if obj.key.endswith(".json")]
            records = [BatchRecord.model_validate_json(self.answers.store.get_bytes(obj.uri)) for obj in found]
        except StorageError as err:
            raise WorkerError(f"cannot read the teacher batch records: {err}") from err
        for record in records:
            if record.batch_id is None:
                if record.input_file_id is None:
                    self._drop(record)  # killed before its file was uploaded: nothing to pay for
                    continue
                batch = self.api.find(record.name) or self.api.create(
                    record.input_file_id, self.settings.completion_window, record.name
                )
                record.batch_id, record.state = str(batch["id"]), "submitted"
                self._save(record)
            live = _Live(record)
            for custom_id, request in record.requests.items():
                charge = worst_case(request.prompt_tokens, len(request.keys), self.max_tokens)
                self.ledger.reserved_tokens += charge.tokens  # already sent: held whatever the budget says
                self.ledger.reserved_cost += self.ledger.charge_cost(charge)
                self.ledger.in_flight += 1
                live.charges[custom_id] = charge
            self.live.append(live)
            log.info("resuming batch %s (%d requests) of an earlier run", record.batch_id, len(record.requests))

    # ------------------------------------------------------------------ submitting

    def _pending(self) -> Iterator[tuple[Prompt, list[str]]]:
        in_flight = {cid for live in self.live for cid in live.record.requests}
        for prompt, keys in self.inputs.missing():
            custom_id = keys[0]
            if custom_id in in_flight:
                continue
            if custom_id in self.failed:
                if custom_id not in self._reported:
                    self._reported.add(custom_id)
                    self.failures.append(Failure(prompt, keys, self.failed[custom_id]))
                continue
            yield prompt, keys

    def submit(self) -> int:
        """New batches for the missing answers the budget holds; returns how many requests it left behind."""
        left = 0
        lines: list[bytes] = []
        requests: dict[str, BatchRequest] = {}
        charges: dict[str, Charge] = {}
        size = 0
        for prompt, keys in self._pending():
            bound = prompt_upper_bound(prompt.messages)
            charge = worst_case(bound, len(keys), self.max_tokens)
            line = self._line(keys[0], prompt, keys)
            full = len(requests) >= self.settings.max_requests_per_batch
            if requests and (full or size + len(line) > self.settings.max_bytes_per_batch):
                self._start(lines, requests, charges)
                lines, requests, charges, size = [], {}, {}, 0
            if not self.ledger.reserve(charge):
                left += 1
                continue
            lines.append(line)
            requests[keys[0]] = BatchRequest(keys=keys, prompt_tokens=bound)
            charges[keys[0]] = charge
            size += len(line)
        if requests:
            self._start(lines, requests, charges)
        return left

    def _line(self, custom_id: str, prompt: Prompt, keys: list[str]) -> bytes:
        body = chat_payload(self.config.teacher, prompt.messages, len(keys))
        doc = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def _start(self, lines: list[bytes], requests: dict[str, BatchRequest], charges: dict[str, Charge]) -> None:
        record = BatchRecord(
            name=uuid.uuid4().hex[:16], created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), requests=requests
        )
        self._save(record)  # first: a kill from here on leaves a trace to resume from
        record.input_file_id = self.api.upload(f"kubedistill-{record.name}.jsonl", b"".join(lines))
        self._save(record)
        batch = self.api.create(record.input_file_id, self.settings.completion_window, record.name)
        record.batch_id, record.state = str(batch["id"]), "submitted"
        self._save(record)  # before polling starts
        for custom_id in requests:
            self.rounds[custom_id] = self.rounds.get(custom_id, 0) + 1
        self.stats.requested += sum(len(r.keys) for r in requests.values())
        self.live.append(_Live(record, charges))
        log.info("submitted batch %s: %d requests, %d bytes", record.batch_id, len(requests), sum(map(len, lines)))

    # ------------------------------------------------------------------ polling and collecting

    def wait_for_one(self, stop: Any) -> bool:
        """Poll until at least one batch has ended and is collected; False on SIGTERM."""
        while True:
            for live in list(self.live):
                assert live.record.batch_id is not None
                batch = self.api.get(live.record.batch_id)
                if batch.get("status") in FINISHED:
                    self.collect(live, batch)
                    return True
            deadline = time.monotonic() + self.settings.poll_seconds
            while time.monotonic() < deadline:
                if stop():
                    return False
                time.sleep(min(0.2, self.settings.poll_seconds))

    def collect(self, live: _Live, batch: dict[str, Any]) -> None:
        record = live.record
        results: dict[str, tuple[dict[str, Any] | None, str]] = {}  # custom_id -> (completion, failure reason)
        for file_key in ("output_file_id", "error_file_id"):
            if batch.get(file_key):
                for raw in self.api.content(str(batch[file_key])).splitlines():
                    if raw.strip():
                        line = json.loads(raw)
                        results[str(line.get("custom_id"))] = _outcome(line)
        status = batch.get("status")
        stored = failed = 0
        for custom_id, request in record.requests.items():
            body, reason = results.get(custom_id, (None, f"not processed: the batch ended {status}"))
            billed = usage_from_response(body) if body is not None else None
            fresh = not all(key in self.answers for key in request.keys)
            self.ledger.settle(live.charges[custom_id], billed if fresh else None)
            if body is not None and fresh:
                try:
                    got = parse_completion(body, request.keys, self.config.teacher.logprobs or 0)
                except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
                    reason = f"malformed response: {type(err).__name__}: {err}"[:200]
                else:
                    self.answers.add(got)
                    stored += len(got)
                    continue
            if fresh:
                failed += 1
                self._retry_or_fail(custom_id, reason)
        self.answers.flush()  # the answers are stored before the record goes
        self._drop(record)
        self.live.remove(live)
        self.stats.answered += stored
        log.info("batch %s ended %s: %d answers stored, %d line(s) failed", record.batch_id, status, stored, failed)

    def _retry_or_fail(self, custom_id: str, reason: str) -> None:
        rounds = self.rounds.get(custom_id, 1)
        if rounds >= self.settings.max_rounds:
            self.failed[custom_id] = f"{reason} (after {rounds} batch{'es' if rounds != 1 else ''})"


def _outcome(line: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(the completion body, "") for an answered line; (None, why) for a failed one."""
    response = line.get("response") or {}
    if response.get("status_code") == 200 and isinstance(response.get("body"), dict):
        return response["body"], ""
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    code = response.get("status_code")
    detail = error.get("message") or error.get("code") or "failed"
    return None, (f"HTTP {code}: {detail}" if code else str(detail))[:300]
