"""A fault-injecting OpenAI-style chat completions server, for what a real server won't do on demand.

It runs as its own process (aiohttp, uvloop when present), so a test or benchmark
client never shares an event loop or the GIL with it::

    from tests.support.fault_stub import FaultStub

    with FaultStub(latency=0.05) as stub:
        stub.script({"prompt-3": ["429:1", "500", "ok"], "*": ["ok"]})
        ...  # point the worker at stub.base_url
        log = stub.requests()            # every request, in arrival order
        stub.max_per_second()            # busiest 1-second window (sliding)

    python -m tests.support.fault_stub --port 8000 --latency 0.1   # by hand

A request is identified by the content of its last user message (the
"prompt"). The script maps a prompt to the faults of its successive attempts:
attempt k gets ``faults[k]``, attempts beyond the list get "ok". The key "*"
scripts every prompt that has no entry of its own. A line of a Batch API batch is an attempt
of its prompt too. Faults:

    ok              200 with an answer ("echo: <prompt>", one choice per n) and its usage
    billednochoices 200 with usage (billed) but no choices: the client retries, paying again
    429[:S] 503[:S] that status, with ``Retry-After: S`` when S is given
    500 502 400 ... that status, a JSON error body
    hang            never answer (the client's timeout must fire)
    slow:S          answer after S extra seconds
    malformed       200 with a body that is not JSON
    nochoices       200 JSON without "choices"
    truncated       200 whose body stops short of its Content-Length
    reset           close the connection without answering
    expire          (a batch line) left unprocessed: its batch ends "expired"

The Batch API (``/v1/files``, ``/v1/batches``, ``/v1/batches/{id}``, ``/v1/files/{id}/content``):
a batch completes ``stub.script_batches(seconds)`` after its creation, at the first status
check past that time; ``stub.batches()`` lists every batch created, with its prompts.

The request log records, per request: arrival time (time.time()), prompt,
attempt number, n, the fault applied, and whether the Authorization header
matched ``--api-key`` (never the header itself).

Billing: a word is a token. Every response the stub sends with a ``usage`` block is charged as
that block says (``stub.billing()``), unless its client had already gone; a system prompt seen
before is reported as cached (``prompt_tokens_details.cached_tokens``), as prompt caching does.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- server (in its own process)


class _State:
    def __init__(self, latency: float, api_key: str | None) -> None:
        self.latency = self.initial_latency = latency
        self.api_key = api_key
        self.script: dict[str, list[str]] = {}
        self.attempts: defaultdict[str, int] = defaultdict(int)
        self.log: list[dict[str, Any]] = []
        self.billing = {"online": _Bill(), "batch": _Bill()}
        self.seen_system: set[str] = set()  # system prompts seen: their tokens are "cached" afterwards
        # The Batch API: files, batches, and every batch creation in order (what a test checks).
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_log: list[dict[str, Any]] = []
        self.batch_seconds = 0.0  # a batch completes this long after it was created
        self.fill = False  # answers use all of max_tokens (in words)

    def fault_for(self, prompt: str) -> tuple[str, int]:
        attempt = self.attempts[prompt]
        self.attempts[prompt] += 1
        faults = self.script.get(prompt, self.script.get("*", []))
        return (faults[attempt] if attempt < len(faults) else "ok"), attempt


class _Bill(dict):  # type: ignore[type-arg]
    """What the stub charged: requests and tokens, as its responses' usage said."""

    def __init__(self) -> None:
        super().__init__(requests=0, prompt_tokens=0, cached_tokens=0, completion_tokens=0)

    def charge(self, usage: dict[str, Any]) -> None:
        self["requests"] += 1
        self["prompt_tokens"] += usage["prompt_tokens"]
        self["cached_tokens"] += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self["completion_tokens"] += usage["completion_tokens"]


def _answer(body: dict[str, Any], prompt: str, state: _State | None = None) -> dict[str, Any]:
    n = int(body.get("n") or 1)
    top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    choices = []
    for i in range(n):
        content = f"echo: {prompt}" + (f" #{i}" if n > 1 else "")
        if state is not None and state.fill:  # use every token allowed, as a verbose teacher does
            words = content.split(" ")
            content = " ".join(words + ["more"] * (int(body.get("max_tokens") or 16) - len(words)))
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            tokens = content.split(" ")
            choice["logprobs"] = {
                "content": [
                    {
                        "token": tok,
                        "logprob": -0.25,
                        "top_logprobs": [
                            {"token": tok if k == 0 else f"alt{k}", "logprob": -0.25 - k} for k in range(top)
                        ],
                    }
                    for tok in tokens
                ]
            }
        choices.append(choice)
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": choices,
        "usage": _usage(body, choices, state),
    }


def _usage(body: dict[str, Any], choices: list[dict[str, Any]], state: _State | None) -> dict[str, Any]:
    """A word is a token. A system prompt seen before is "cached", as with OpenAI's prompt caching."""
    messages = body.get("messages", [])
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion_tokens = sum(len(c["message"]["content"].split()) for c in choices)
    cached = 0
    if state is not None:
        for message in messages:
            if message.get("role") == "system":
                text = str(message.get("content", ""))
                if text in state.seen_system:
                    cached += len(text.split())
                state.seen_system.add(text)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _stream(request: Any, doc: dict[str, Any], state: _State) -> Any:
    """A streamed answer (server-sent events): a chunk per word, then the usage chunk, then [DONE]."""
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    words = doc["choices"][0]["message"]["content"].split(" ")
    for i, word in enumerate(words):
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word + " "}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if i + 1 < len(words):
            await asyncio.sleep(0.002)
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": doc["usage"]}
    await response.write(f"data: {json.dumps(_billed(state, request, usage))}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


def _billed(state: _State, request: Any, doc: dict[str, Any], mode: str = "online") -> dict[str, Any]:
    """Charge a response about to be sent, unless its client has already gone (it would never see it)."""
    transport = getattr(request, "transport", None)
    if transport is None or not transport.is_closing():
        state.billing[mode].charge(doc["usage"])
    return doc


def _last_user(body: dict[str, Any]) -> str:
    return next(str(m.get("content")) for m in reversed(body.get("messages", [])) if m.get("role") == "user")


def _file_object(file_id: str, data: bytes, name: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": name,
            "purpose": "batch"}  # fmt: skip


def _run_batch(state: _State, batch: dict[str, Any]) -> None:
    """Answer every line of a batch at once, as the script says; write its output and error files.

    Per line (the prompt's next attempt, as online): ok -> an answer (billed at batch rates);
    a status code -> an error line; "expire" -> left unprocessed and the batch ends expired
    (OpenAI's expiry: the processed lines in the output file, the others as batch_expired errors).
    """
    output, errors = [], []
    expired = False
    for raw in state.files[batch["input_file_id"]].splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        body, custom_id = line["body"], line["custom_id"]
        prompt = _last_user(body)
        fault, attempt = state.fault_for(prompt)
        state.log.append({"t": time.time(), "prompt": prompt, "attempt": attempt, "n": body.get("n", 1),
                          "fault": fault, "auth": True, "batch": batch["id"]})  # fmt: skip
        kind = fault.partition(":")[0]
        line_id = f"batch_req_{len(output) + len(errors)}"
        if kind == "expire":
            expired = True
            errors.append({"id": line_id, "custom_id": custom_id, "response": None,
                           "error": {"code": "batch_expired", "message": "This request could not be executed before "
                                     "the completion window expired."}})  # fmt: skip
        elif kind in ("ok", "slow"):
            doc = _answer(body, prompt, state)
            state.billing["batch"].charge(doc["usage"])
            output.append({"id": line_id, "custom_id": custom_id, "error": None,
                           "response": {"status_code": 200, "request_id": line_id, "body": doc}})  # fmt: skip
        else:
            status = int(kind) if kind.isdigit() else 500
            errors.append({"id": line_id, "custom_id": custom_id, "error": None,
                           "response": {"status_code": status, "request_id": line_id,
                                        "body": {"error": {"message": f"stub fault {fault}"}}}})  # fmt: skip
    for name, lines in (("output_file_id", output), ("error_file_id", errors)):
        if lines:
            file_id = f"file-{len(state.files) + 1:06d}"
            state.files[file_id] = "".join(json.dumps(entry) + "\n" for entry in lines).encode()
            batch[name] = file_id
    batch["status"] = "expired" if expired else "completed"
    batch["request_counts"] |= {"completed": len(output), "failed": len(errors)}


def make_app(state: _State) -> Any:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        raw = await request.read()
        try:
            body = json.loads(raw)
            prompt = next(m["content"] for m in reversed(body["messages"]) if m.get("role") == "user")
        except (ValueError, KeyError, StopIteration, TypeError):
            return web.json_response({"error": {"message": "bad request body"}}, status=400)
        fault, attempt = state.fault_for(prompt)
        auth_ok = state.api_key is None or request.headers.get("Authorization") == f"Bearer {state.api_key}"
        state.log.append(
            {
                "t": arrived,
                "prompt": prompt,
                "attempt": attempt,
                "n": body.get("n", 1),
                "fault": fault,
                "auth": auth_ok,
                "stream": bool(body.get("stream")),
            }
        )
        if not auth_ok:
            return web.json_response({"error": {"message": "invalid api key", "code": "invalid_api_key"}}, status=401)
        if state.latency:
            await asyncio.sleep(state.latency)
        kind, _, arg = fault.partition(":")
        if body.get("stream") and kind == "ok":
            return await _stream(request, _answer(body, prompt, state), state)
        if kind == "ok":
            return web.json_response(_billed(state, request, _answer(body, prompt, state)))
        if kind == "slow":
            await asyncio.sleep(float(arg or 1))
            return web.json_response(_billed(state, request, _answer(body, prompt, state)))
        if kind == "billednochoices":
            # Billed (usage and all), but no answer in it: the client retries and pays again.
            doc = _answer(body, prompt, state)
            del doc["choices"]
            return web.json_response(_billed(state, request, doc))
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "malformed":
            return web.Response(status=200, body=b'{"choices": [ this is not json', content_type="application/json")
        if kind == "nochoices":
            return web.json_response({"id": "chatcmpl-stub", "object": "chat.completion"})
        if kind in ("truncated", "reset"):
            response = web.StreamResponse(
                status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}
            )
            if kind == "truncated":
                await response.prepare(request)
                await response.write(b'{"id": "chatcmpl-stub", "choices": [{"index": 0, "mess')
            transport = request.transport
            if transport is not None:
                transport.close()
            raise ConnectionResetError("stub closed the connection on purpose")
        status = int(kind)
        headers = {"Retry-After": arg} if arg else {}
        error = {"error": {"message": f"stub fault {fault}", "type": "stub", "code": status}}
        return web.json_response(error, status=status, headers=headers)

    async def upload_file(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or upload is None or not hasattr(upload, "file"):
            return web.json_response({"error": {"message": "want purpose=batch and a file"}}, status=400)
        file_id = f"file-{len(state.files) + 1:06d}"
        state.files[file_id] = upload.file.read()
        return web.json_response(_file_object(file_id, state.files[file_id], str(upload.filename)))

    async def file_content(request: web.Request) -> web.Response:
        data = state.files.get(request.match_info["file_id"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="application/jsonl")

    async def create_batch(request: web.Request) -> web.Response:
        doc = await request.json()
        data = state.files.get(doc.get("input_file_id", ""))
        if data is None or doc.get("endpoint") != "/v1/chat/completions" or doc.get("completion_window") != "24h":
            return web.json_response({"error": {"message": "bad batch request"}}, status=400)
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        batch_id = f"batch_{len(state.batches) + 1:06d}"
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": doc["endpoint"],
            "input_file_id": doc["input_file_id"],
            "completion_window": "24h",
            "status": "in_progress",
            "created_at": time.time(),
            "metadata": doc.get("metadata") or {},
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        state.batches[batch_id] = batch
        state.batch_log.append(
            {"t": time.time(), "id": batch_id, "prompts": [_last_user(line["body"]) for line in lines]}
        )
        return web.json_response(batch)

    async def get_batch(request: web.Request) -> web.Response:
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        if batch["status"] == "in_progress" and time.time() >= batch["created_at"] + state.batch_seconds:
            _run_batch(state, batch)
        return web.json_response(batch)

    async def list_batches(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(state.batches.values()), "has_more": False})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def get_log(request: web.Request) -> web.Response:
        return web.json_response(state.log)

    async def set_script(request: web.Request) -> web.Response:
        doc = await request.json()
        if "faults" in doc:
            state.script = {k: [str(f) for f in v] for k, v in doc["faults"].items()}
        if "latency" in doc:
            state.latency = float(doc["latency"])
        if "batchSeconds" in doc:
            state.batch_seconds = float(doc["batchSeconds"])
        if "fill" in doc:
            state.fill = bool(doc["fill"])
        return web.json_response({"ok": True})

    async def reset(request: web.Request) -> web.Response:
        state.log.clear()
        state.attempts.clear()
        state.script = {}
        state.latency = state.initial_latency
        state.billing = {"online": _Bill(), "batch": _Bill()}
        state.seen_system.clear()
        state.files.clear()
        state.batches.clear()
        state.batch_log.clear()
        state.batch_seconds = 0.0
        state.fill = False
        return web.json_response({"ok": True})

    async def get_billing(request: web.Request) -> web.Response:
        return web.json_response(state.billing)

    async def get_batch_log(request: web.Request) -> web.Response:
        return web.json_response(state.batch_log)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_get("/_stub/batches", get_batch_log)
    app.router.add_get("/_stub/log", get_log)
    app.router.add_post("/_stub/script", set_script)
    app.router.add_post("/_stub/reset", reset)
    app.router.add_get("/_stub/billing", get_billing)
    return app


def serve(port: int, latency: float, api_key: str | None, host: str = "127.0.0.1") -> None:
    import logging
    import socket

    from aiohttp import web

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - plain asyncio works, just slower
        pass
    # "truncated" and "reset" end handlers with an exception on purpose: not worth a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    print(f"READY port={sock.getsockname()[1]}", flush=True)
    web.run_app(make_app(_State(latency, api_key)), sock=sock, access_log=None, print=None, backlog=4096)


# --------------------------------------------------------------------------- client side (tests, bench)


class FaultStub:
    """Start the stub in a subprocess; script faults and read its request log over HTTP."""

    def __init__(
        self, *, latency: float = 0.0, api_key: str | None = None, port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        # host: another address than loopback for clients in other network namespaces (real pods).
        self.host = host
        self.latency = latency
        self.api_key = api_key
        self.port = port
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FaultStub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tests.support.fault_stub",
            "--port",
            str(self.port),
            "--latency",
            str(self.latency),
            "--host",
            self.host,
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        if self.api_key:
            env["FAULT_STUB_API_KEY"] = self.api_key
        from kubedistill.local.processes import die_with_parent

        self._proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("READY port="):
            self.stop()
            raise RuntimeError(f"fault stub did not start: {line!r}")
        self.port = int(line.strip().split("=", 1)[1])

    def stop(self) -> None:
        if self._proc is not None:
            # Nothing to save, and a graceful shutdown would wait for the "hang" handlers.
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import httpx

        response = httpx.request(method, f"{self.url}{path}", json=payload, timeout=30)
        response.raise_for_status()
        return response.json()

    def script(self, faults: dict[str, list[str]], *, latency: float | None = None, fill: bool | None = None) -> None:
        """Faults by prompt; ``latency`` before every answer; ``fill``: answers use all of max_tokens."""
        payload: dict[str, Any] = {"faults": faults}
        if latency is not None:
            payload["latency"] = latency
        if fill is not None:
            payload["fill"] = fill
        self._call("POST", "/_stub/script", payload)

    def reset(self) -> None:
        """Forget the log, attempts and script; latency goes back to the start value."""
        self._call("POST", "/_stub/reset")

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/_stub/log"))

    def batches(self) -> list[dict[str, Any]]:
        """Every batch created since the last reset, in order: {t, id, prompts}."""
        return list(self._call("GET", "/_stub/batches"))

    def script_batches(self, seconds: float) -> None:
        """Batches complete ``seconds`` after their creation (0: at the first status check)."""
        self._call("POST", "/_stub/script", {"batchSeconds": seconds})

    def billing(self, mode: str = "online") -> dict[str, int]:
        """What the stub charged since the last reset: requests, prompt_tokens, cached_tokens, completion_tokens."""
        return dict(self._call("GET", "/_stub/billing")[mode])

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most requests that arrived within any sliding window of ``seconds``."""
        times = sorted(entry["t"] for entry in self.requests())
        best = 0
        for i, start in enumerate(times):
            best = max(best, bisect.bisect_left(times, start + seconds) - i)
        return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args(argv)
    serve(args.port, args.latency, os.environ.get("FAULT_STUB_API_KEY") or None, args.host)


if __name__ == "__main__":
    main()
