"""Local mode end to end: the README's main command, for real (tiny models, vLLM CPU, no mocks).

`kubedistill local demo` trains a teacher, has it answer unlabelled prompts (offline
vLLM), trains the student on the answers (trl), evaluates it against the teacher
(vLLM), passes the gate and serves the student with vLLM's OpenAI-compatible server;
the test talks to that server while it runs. Then a spec edit shows the paid-for
stages are reused and the gate refuses a student that learned too little.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kubedistill.local.demo import DEMO_MANIFEST
from tests.support.procs import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("local-mode")


def kubedistill(home: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "kubedistill", "local", *args,
        "--workdir", str(home / "runs"), "--storage-root", str(home / "s3"),
    ]  # fmt: skip


def chat(base_url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.load(response)["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def demo(home):
    """Run the demo, and while it serves, ask the distilled model questions it never saw.

    Its output is read from a pipe, as a CI log or `| tee` reads it: plain lines, no terminal.
    """
    port = free_port()
    log_path = home / "demo.out"
    lines: list[str] = []
    proc = subprocess.Popen(
        [*kubedistill(home, "demo", "--serve-seconds", "60", "--port", str(port))],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    def read() -> None:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                lines.append(line)
                log.write(line)
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    answers: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 1500
        while not any("serve     ready" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(1)
        endpoint = re.search(r"ready in \d+s at (\S+)", "".join(lines))
        assert endpoint, "".join(lines)
        for prompt in ("reverse: cat dog sun", "reverse: gold sea", "reverse: owl rain snow wind"):
            answers[prompt] = chat(endpoint.group(1), "reversal-student", prompt)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    return code, "".join(lines), answers


def test_demo_distils_gates_and_serves(demo):
    code, output, answers = demo
    assert code == 0, output
    # Live progress while the long stages run: plain lines in a pipe, each a new report.
    for stage, unit in (("generate", "answers"), ("train", "steps")):
        reports = [int(p) for p in re.findall(rf"^  {stage} +(\d+)%  [\d,]+/[\d,]+ {unit}", output, flags=re.MULTILINE)]
        assert len(reports) >= 2, f"{stage}: {reports}\n{output}"
        # One run per stage (the demo trains its teacher, then the student): each climbs to 100%.
        runs: list[list[int]] = [[]]
        for percent in reports:
            if runs[-1] and runs[-1][-1] == 100 and percent < 100:
                runs.append([])
            runs[-1].append(percent)
        for climb in runs:
            assert climb == sorted(climb) and climb[-1] == 100, f"{stage}: {reports}\n{output}"
    assert re.search(r"generate  done .* 0 failed", output), output
    agreement = float(re.search(r"gate      passed   rougeL agreement (\S+)", output).group(1))
    assert agreement >= 0.95
    # The served student answers prompts it never saw the way the teacher would: correctly.
    expected = {prompt: " ".join(reversed(prompt.removeprefix("reverse: ").split())) for prompt in answers}
    correct = sum(answers[p].strip() == expected[p] for p in answers)
    assert correct >= 2, answers


def test_spec_edit_reuses_paid_stages_and_the_gate_refuses_a_weak_student(demo, home):
    """Fewer training steps: a new run that asks the teacher nothing and fails the quality gate."""
    manifest = yaml.safe_load(DEMO_MANIFEST.read_text())
    manifest["spec"]["student"]["training"]["maxSteps"] = 5
    edited = home / "undertrained.yaml"
    edited.write_text(yaml.safe_dump(manifest))

    result = subprocess.run(
        kubedistill(home, "run", str(edited), "--serve-seconds", "0"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "generate  reused" in output  # same teacher, prompts, sampling: nobody pays twice
    assert "train     done" in output and "step 5" in output
    assert "gate      FAILED" in output
    assert "QualityGateFailed: teacher agreement" in output
    assert "serve" not in output.split("gate")[-1]  # a student below the gate is never served


def _serving_pids(port: int) -> list[int]:
    """Processes whose command line serves on ``port`` (the vLLM server local mode started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"vllm.entrypoints.openai.api_server" in b" ".join(argv) and str(port).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_while_serving_leaves_no_process_behind(demo, home):
    """A process manager, `timeout` or a CI runner signals local mode alone, not its process group."""
    port = free_port()
    log_path = home / "sigterm.out"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            kubedistill(home, "run", str(DEMO_MANIFEST), "--port", str(port)),
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own group: the signal below reaches the parent only
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while "serve     ready" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(1)
            servers = _serving_pids(port)
            assert servers and _port_open(port)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    assert "generate  reused" in output and "train     reused" in output  # nothing was paid for twice
    deadline = time.monotonic() + 30
    while (_serving_pids(port) or _port_open(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _serving_pids(port), "the vLLM server outlived local mode"
    assert not _port_open(port), f"something still answers on port {port}"
