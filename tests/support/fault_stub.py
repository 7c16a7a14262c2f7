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
scripts every prompt that has no entry of its own. Faults:

    ok              200 with an answer ("echo: <prompt>", one choice per n)
    429[:S] 503[:S] that status, with ``Retry-After: S`` when S is given
    500 502 400 ... that status, a JSON error body
    hang            never answer (the client's timeout must fire)
    slow:S          answer after S extra seconds
    malformed       200 with a body that is not JSON
    nochoices       200 JSON without "choices"
    truncated       200 whose body stops short of its Content-Length
    reset           close the connection without answering

The request log records, per request: arrival time (time.time()), prompt,
attempt number, n, the fault applied, and whether the Authorization header
matched ``--api-key`` (never the header itself).
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

    def fault_for(self, prompt: str) -> tuple[str, int]:
        attempt = self.attempts[prompt]
        self.attempts[prompt] += 1
        faults = self.script.get(prompt, self.script.get("*", []))
        return (faults[attempt] if attempt < len(faults) else "ok"), attempt


def _answer(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    n = int(body.get("n") or 1)
    top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    choices = []
    for i in range(n):
        content = f"echo: {prompt}" + (f" #{i}" if n > 1 else "")
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
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = sum(len(c["message"]["content"].split()) for c in choices)
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


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
            {"t": arrived, "prompt": prompt, "attempt": attempt, "n": body.get("n", 1), "fault": fault, "auth": auth_ok}
        )
        if not auth_ok:
            return web.json_response({"error": {"message": "invalid api key", "code": "invalid_api_key"}}, status=401)
        if state.latency:
            await asyncio.sleep(state.latency)
        kind, _, arg = fault.partition(":")
        if kind == "ok":
            return web.json_response(_answer(body, prompt))
        if kind == "slow":
            await asyncio.sleep(float(arg or 1))
            return web.json_response(_answer(body, prompt))
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

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def get_log(request: web.Request) -> web.Response:
        return web.json_response(state.log)

    async def set_script(request: web.Request) -> web.Response:
        doc = await request.json()
        state.script = {k: [str(f) for f in v] for k, v in doc.get("faults", {}).items()}
        if "latency" in doc:
            state.latency = float(doc["latency"])
        return web.json_response({"ok": True})

    async def reset(request: web.Request) -> web.Response:
        state.log.clear()
        state.attempts.clear()
        state.script = {}
        state.latency = state.initial_latency
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_stub/log", get_log)
    app.router.add_post("/_stub/script", set_script)
    app.router.add_post("/_stub/reset", reset)
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

    def script(self, faults: dict[str, list[str]], *, latency: float | None = None) -> None:
        payload: dict[str, Any] = {"faults": faults}
        if latency is not None:
            payload["latency"] = latency
        self._call("POST", "/_stub/script", payload)

    def reset(self) -> None:
        """Forget the log, attempts and script; latency goes back to the start value."""
        self._call("POST", "/_stub/reset")

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/_stub/log"))

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
