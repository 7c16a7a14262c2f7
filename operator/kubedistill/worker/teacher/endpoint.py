"""Asking an OpenAI-compatible chat completions API: one prompt, n samples, retried politely.

Built on aiohttp (an HTTP/1.1 keep-alive pool sized to the concurrency, so no
request waits for a connection and none is opened per request) and tenacity
(exponential backoff with full jitter, raised to the server's Retry-After when
it sends one). Why aiohttp and not httpx (which the openai SDK uses): httpcore's
pool does work proportional to connections x waiting requests on every state
change, so at 256 requests in flight it spends its time there: measured
against the fault stub with 0.25 s latency, 256 concurrent requests reach
~800 req/s with aiohttp and ~30 req/s with httpx (bench/generate_throughput.py
has the full comparison). And not the openai SDK itself, because we need the
raw status and headers of every attempt (Retry-After, retry-after-ms), our own
retry policy instead of the SDK's, and no pydantic parsing of every response.

Which failures are retried: timeouts, connection errors, truncated or
malformed bodies, 408/409/425/429 and 5xx. A 400-class answer about the
request itself (400, 413, 422, ...) fails that prompt at once; 401, 403 and
404 (bad key, no access, wrong model or URL) would fail every prompt the same
way, so they stop the stage with a clear reason instead of spending the
whole prompt set on them.

The API key is sent in the Authorization header and appears nowhere else: not
in logs, not in error messages (server error bodies are scrubbed of it).

Every attempt is metered (spend.py): its worst case is held against the budget before it is
sent (``BudgetGate``), and what its response bills is counted whether the answer is kept or not.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from kubedistill.api.savings import TokenSpend
from kubedistill.api.v1alpha1 import EndpointTeacher, TeacherSpec
from kubedistill.worker.speed import Timing
from kubedistill.worker.teacher.limits import RateLimits, token_charge
from kubedistill.worker.teacher.spend import (
    BudgetExhausted,
    Charge,
    Ledger,
    prompt_upper_bound,
    usage_from_body,
    usage_from_response,
    worst_case,
)
from kubedistill.worker.teacher.store import Answer
from kubedistill.worker.topk import encode, from_strings

log = logging.getLogger("kubedistill.worker.generate")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = {
    401: "the teacher refused the API key",
    403: "the API key may not use this model",
    404: "no such model or URL",
}
RETRY_AFTER_CAP = 600.0  # seconds; a server asking for more is treated as asking for this
_SECRETISH = re.compile(r"(sk|key|tok)-[A-Za-z0-9_\-]{6,}")


class TeacherCallError(Exception):
    """One attempt failed. ``reason`` is one short line, safe to log and report."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class FatalTeacherError(Exception):
    """The teacher will refuse every prompt (bad key, unknown model): stop the stage."""


@dataclass
class CallStats:
    """What the requests did; logged and returned to callers (the bench reads it)."""

    attempts: int = 0
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    headers = {key.lower(): value for key, value in headers.items()}
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class wait_retry_after(wait_base):
    """Exponential backoff with jitter, but never shorter than the server's Retry-After."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            wait = max(wait, min(retry_after, RETRY_AFTER_CAP))
        return wait


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, TeacherCallError) and error.retryable


class BudgetGate:
    """The ledger's budget for concurrent requests: a request waits while others' holds keep it out.

    ``reserve`` returns once the request's worst case fits; while it does not, it waits for a
    request in flight to settle (their actual bills are usually far below their holds). With
    nothing in flight and still no room, the budget is exhausted: this and every later
    ``reserve`` raise BudgetExhausted.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._changed = asyncio.Event()

    async def reserve(self, charge: Charge) -> None:
        while True:
            if self.ledger.exhausted:
                raise BudgetExhausted
            if self.ledger.reserve(charge):
                return
            if self.ledger.in_flight == 0:
                self.ledger.exhausted = True
                self._changed.set()
                raise BudgetExhausted
            self._changed.clear()
            await self._changed.wait()  # set() wakes every waiter; each checks again

    def settle(self, charge: Charge, billed: TokenSpend | None, *, confirmed: bool) -> None:
        self.ledger.settle(charge, billed, confirmed=confirmed)
        self._changed.set()


@dataclass
class _Outcome:
    """What one attempt billed: known usage, nothing (an error status), or unknown (no response)."""

    billed: TokenSpend | None = None
    confirmed: bool = True  # nothing sent yet; _attempt says otherwise once it sends


class EndpointClient:
    """Chat completions against one OpenAI-compatible endpoint."""

    def __init__(
        self,
        teacher: TeacherSpec,
        api_key: str | None,
        limits: RateLimits,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        ledger: Ledger | None = None,
    ) -> None:
        if teacher.endpoint is None:
            raise ValueError("EndpointClient needs teacher.endpoint")
        self.spec: EndpointTeacher = teacher.endpoint
        self.teacher = teacher
        self.limits = limits
        self.stats = CallStats()
        self.gate = BudgetGate(ledger if ledger is not None else Ledger())
        self._api_key = api_key or None
        self._backoff = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self._url = self.spec.base_url.rstrip("/") + "/chat/completions"
        self._http: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    async def __aenter__(self) -> EndpointClient:
        size = self.spec.max_concurrency
        headers = {"content-type": "application/json", "user-agent": "kubedistill-generate"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=size, limit_per_host=size, keepalive_timeout=60),
            headers=headers,
            # asyncio.timeout() in _attempt is the real deadline; this one only backs it up.
            timeout=aiohttp.ClientTimeout(total=self.spec.timeout_seconds + 5),
        )
        # HTTPS_PROXY / NO_PROXY are honoured, as in-cluster egress often needs, but looked up
        # once: aiohttp's trust_env does it (and a .netrc lookup) in a thread per request.
        self._proxy = env_proxy_for(self._url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ requests

    def payload(self, messages: tuple[tuple[str, str], ...], samples: int) -> dict[str, Any]:
        return chat_payload(self.teacher, messages, samples)

    async def ask(self, messages: tuple[tuple[str, str], ...], keys: list[str]) -> list[Answer]:
        """One answer per key (the samples still missing), asked in one request with n=len(keys).

        Raises TeacherCallError once retries are spent (or at once when retrying cannot help),
        FatalTeacherError when no prompt can succeed.
        """
        body = json.dumps(self.payload(messages, len(keys)), ensure_ascii=False).encode()
        charge = token_charge(messages, len(keys), self.teacher.sampling.max_tokens)
        most = worst_case(prompt_upper_bound(messages), len(keys), self.teacher.sampling.max_tokens)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.spec.max_retries + 1),
            wait=wait_retry_after(self._backoff),
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.gate.reserve(most)  # BudgetExhausted is not retried: it ends the run
                    outcome = _Outcome()
                    try:
                        await self.limits.acquire(charge)
                        answers = await self._attempt(body, keys, outcome)
                    finally:
                        self.gate.settle(most, outcome.billed, confirmed=outcome.confirmed)
        except TeacherCallError as err:
            self.stats.failed += 1
            attempts = retrying.statistics.get("attempt_number", 1)
            err.reason = f"{err.reason} (after {attempts} attempt{'s' if attempts != 1 else ''})"
            raise
        self.stats.succeeded += 1
        return answers

    async def stream(self, messages: tuple[tuple[str, str], ...]) -> Timing | None:
        """One streamed request, timed as the speed probe needs it (worker/speed.py); None if not answered.

        Not retried: a probe measures what the teacher does, and a failed request is left out of it.
        Billed and held against the budget like any other request.
        """
        assert self._http is not None, "use EndpointClient as an async context manager"
        payload = self.payload(messages, 1)
        payload.pop("logprobs", None)
        payload.pop("top_logprobs", None)
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
        most = worst_case(prompt_upper_bound(messages), 1, self.teacher.sampling.max_tokens)
        await self.gate.reserve(most)
        outcome = _Outcome(confirmed=False)
        first = last = None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.spec.timeout_seconds):
                async with self._http.post(
                    self._url, json=payload, allow_redirects=False, proxy=self._proxy
                ) as response:
                    if response.status != 200:
                        outcome.confirmed = True
                        return None
                    async for raw in response.content:
                        line = raw.strip()
                        if not line.startswith(b"data:") or line == b"data: [DONE]":
                            continue
                        doc = json.loads(line[5:])
                        outcome.billed = usage_from_response(doc) or outcome.billed
                        if any((c.get("delta") or {}).get("content") for c in doc.get("choices") or []):
                            last = time.perf_counter()
                            first = first or last
            outcome.confirmed = outcome.billed is not None
        except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as err:
            log.debug("speed probe request failed: %s", self._scrub(str(err)))
            return None
        finally:
            self.gate.settle(most, outcome.billed, confirmed=outcome.confirmed)
        if first is None or last is None or outcome.billed is None:
            return None
        return Timing(ttft=first - start, tokens=outcome.billed.completion_tokens, decode_seconds=last - first)

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        self.stats.retries += 1
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, TeacherCallError):
            label = str(error.status) if error.status else error.reason.split(":")[0]
            self.stats.retry_reasons[label] += 1
            if error.retry_after is not None and error.status in (429, 503):
                self.limits.cool_down(min(error.retry_after, RETRY_AFTER_CAP))

    async def _attempt(self, body: bytes, keys: list[str], outcome: _Outcome) -> list[Answer]:
        assert self._http is not None, "use EndpointClient as an async context manager"
        outcome.confirmed = False  # until a whole response says otherwise
        self.stats.attempts += 1
        try:
            async with asyncio.timeout(self.spec.timeout_seconds):
                async with self._http.post(self._url, data=body, allow_redirects=False, proxy=self._proxy) as response:
                    status, headers = response.status, response.headers
                    payload = await response.read()
        except TimeoutError as err:
            raise TeacherCallError(f"timeout: no answer within {self.spec.timeout_seconds:g}s", retryable=True) from err
        except aiohttp.ClientError as err:  # connection refused/reset, truncated body, bad HTTP
            # Never connected: nothing was sent, nothing billed. Anything later may have been.
            outcome.confirmed = isinstance(err, aiohttp.ClientConnectorError)
            raise TeacherCallError(
                f"connection: {type(err).__name__}: {self._scrub(str(err))}", retryable=True
            ) from err
        # A whole response: an error status bills nothing, a 200 bills its usage; a 200 without one
        # may have billed anything, so it stays unconfirmed (counted at its maximum).
        outcome.billed = usage_from_body(payload) if status == 200 else None
        outcome.confirmed = status != 200 or outcome.billed is not None
        if status == 200:
            return self._parse(payload, keys)
        detail = self._scrub(" ".join(payload[:300].decode("utf-8", "replace").split()))
        if status in FATAL_STATUS:
            raise FatalTeacherError(f"HTTP {status} from the teacher: {FATAL_STATUS[status]}: {detail}")
        retryable = status in RETRYABLE_STATUS or status >= 500
        raise TeacherCallError(
            f"HTTP {status}: {detail}" if detail else f"HTTP {status}",
            retryable=retryable,
            retry_after=parse_retry_after(headers),
            status=status,
        )

    def _parse(self, payload: bytes, keys: list[str]) -> list[Answer]:
        try:
            answers = parse_completion(json.loads(payload), keys, self.teacher.logprobs or 0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            raise TeacherCallError(f"malformed response: {type(err).__name__}: {err}"[:200], retryable=True) from err
        self.stats.prompt_tokens += answers[0].prompt_tokens
        self.stats.completion_tokens += answers[0].completion_tokens
        return answers

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)


def scrub(text: str, api_key: str | None) -> str:
    """``text`` without the API key, or anything that looks like a key."""
    if api_key:
        text = text.replace(api_key, "***")
    return _SECRETISH.sub("***", text)


def chat_payload(teacher: TeacherSpec, messages: tuple[tuple[str, str], ...], samples: int) -> dict[str, Any]:
    """The chat completions request body (online, and each line of a batch: same request, same answer)."""
    assert teacher.endpoint is not None
    sampling = teacher.sampling
    body: dict[str, Any] = {
        "model": teacher.endpoint.model,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "n": samples,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if teacher.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = teacher.logprobs
    return body


def parse_completion(doc: Any, keys: list[str], top_k: int) -> list[Answer]:
    """A chat completion body -> one Answer per key (the response's usage on the first, as the store keeps it),
    with each answer's compact top-k distribution when ``top_k`` > 0.

    Raises ValueError, KeyError, TypeError... on a body that is not a usable completion.
    """
    choices = sorted(doc["choices"], key=lambda c: c.get("index", 0))
    if len(choices) < len(keys):
        raise ValueError(f"{len(choices)} choices for n={len(keys)}")
    answers = []
    for key, choice in zip(keys, choices, strict=False):
        content = choice["message"]["content"]
        if not isinstance(content, str):
            raise ValueError("choice without text content")
        answers.append(
            Answer(
                key=key,
                content=content,
                finish_reason=choice.get("finish_reason"),
                topk=_topk(choice.get("logprobs"), top_k) if top_k else None,
            )
        )
    usage = usage_from_response(doc) or TokenSpend()
    answers[0].prompt_tokens = usage.prompt_tokens
    answers[0].completion_tokens = usage.completion_tokens
    return answers


def env_proxy_for(url: str) -> str | None:
    """The proxy the standard environment variables choose for ``url`` (None: connect directly)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _topk(block: Any, k: int) -> str | None:
    """OpenAI's ``choice.logprobs.content`` (tokens named by their text) -> a compact distribution."""
    if not block or not block.get("content"):
        return None
    content = block["content"]
    return encode(
        from_strings(
            [(item["token"], float(item["logprob"])) for item in content],
            [[(alt["token"], float(alt["logprob"])) for alt in item.get("top_logprobs") or []] for item in content],
            k,
        )
    )
