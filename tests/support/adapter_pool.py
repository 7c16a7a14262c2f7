"""An adapter pool's replicas as real processes, run the way a Deployment runs its pods.

    from tests.support.adapter_pool import PoolRendering, Replica, Sampler, make_adapter

    make_adapter(base_dir, out_dir, seed=0)     # a peft LoRA adapter of the base, to upload
    rendering = PoolRendering.of(pool_manifest, adapter_manifests)   # the operator's own decision
    rendering = PoolRendering.from_objects(config_map, deployment)   # or what a cluster holds
    replica = Replica("r1", rendering, base_dir, s3_env, tmp_path).start()   # vLLM + adapter-sync
    replica.write_set(rendering.adapter_set)     # the kubelet refreshing the pod's ConfigMap volume
    replica.ready(), replica.held()              # GET /ready on the sidecar; what vLLM holds
    replica.restart_vllm()                       # the vLLM container restarted, the sidecar kept
    replica.delete()                             # the pod deleted

kwok runs no container, so a pool's per-pod mechanism is tested with these processes: each
replica is one vLLM CPU server started with the pool container's rendered arguments and
environment, and one ``kubedistill-worker adapter-sync`` process with the sidecar's rendered
arguments (paths and ports mapped to this machine), reading its own copy of the adapter set.
``Sampler`` polls every replica a few times a second and keeps what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistilledModel
from kubedistill.api.worker_config import CONFIG_DIR
from kubedistill.builders import names
from kubedistill.builders.adapters import ADAPTERS_DIR
from kubedistill.reconcile.serving import ModelObservations, PoolMember, compute_model_decision
from tests.support.procs import ManagedProcess, free_port
from tests.support.vllm_server import VLLMServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings()
NOW = "2026-01-01T00:00:00Z"  # the decision's status timestamps; only its objects are used
# Set by VLLMServer for a CPU test server (its host, port, local model directory, float32, context).
OWNED_BY_THE_TEST_SERVER = {"--host", "--port", "--model", "--served-model-name", "--dtype", "--max-model-len"}


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A rank-8 peft LoRA adapter of ``base`` (random B as well as A, so that it changes answers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@dataclass(frozen=True)
class PoolRendering:
    """What the operator renders for a pool and its adapters: the adapter set, the two containers."""

    adapter_set: str
    vllm: Mapping[str, Any]
    sidecar: Mapping[str, Any]

    @staticmethod
    def from_objects(config_map: Mapping[str, Any], deployment: Mapping[str, Any]) -> PoolRendering:
        """From the pool's ``<pool>-adapters`` ConfigMap and Deployment (as applied, or read from a cluster)."""
        containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
        return PoolRendering(
            adapter_set=config_map["data"][names.ADAPTERS_KEY],
            vllm=containers[names.VLLM_CONTAINER],
            sidecar=containers[names.ADAPTER_SYNC_CONTAINER],
        )

    @staticmethod
    def of(pool: Mapping[str, Any], adapters: Sequence[Mapping[str, Any]]) -> PoolRendering:
        observations = ModelObservations(deployment=None, members=tuple(PoolMember(model=a) for a in adapters))
        decision = compute_model_decision(DistilledModel.model_validate(pool), SETTINGS, observations, NOW)
        by_kind = {(o["kind"], o["metadata"]["name"]): o for o in decision.apply}
        pool_name = pool["metadata"]["name"]
        config = by_kind[("ConfigMap", names.pool_adapters_config_name(pool_name))]
        deployment = by_kind[("Deployment", names.model_deployment_name(pool_name))]
        return PoolRendering.from_objects(config, deployment)

    def revisions(self) -> dict[str, str]:
        return {a["name"]: a["revision"] for a in yaml.safe_load(self.adapter_set)["adapters"]}

    def vllm_args(self) -> list[str]:
        """The pool's vLLM arguments, less those the test server sets for a CPU (host, port, model, dtype)."""
        args, out = list(self.vllm["args"]), []
        while args:
            flag = args.pop(0)
            value = args.pop(0) if args and not args[0].startswith("--") else None
            if flag not in OWNED_BY_THE_TEST_SERVER:
                out += [flag] if value is None else [flag, value]
        return out

    def served_model_name(self) -> str:
        args = list(self.vllm["args"])
        return str(args[args.index("--served-model-name") + 1])

    def vllm_env(self) -> dict[str, str]:
        """The pool container's own variables (runtime LoRA loading), less HOME: the test process's stays."""
        skip = {"HOME", "HF_HOME"}
        return {e["name"]: e["value"] for e in self.vllm["env"] if "value" in e and e["name"] not in skip}


class Replica:
    """One pod of the pool: a vLLM CPU server and its adapter-sync sidecar."""

    def __init__(
        self,
        name: str,
        rendering: PoolRendering,
        base: Path,
        s3_env: Mapping[str, str],
        root: Path,
        report_env: Mapping[str, str] | None = None,
    ) -> None:
        """``report_env`` (POD_NAME, POD_NAMESPACE, KUBECONFIG): the sidecar reports to an API server."""
        self.name, self.rendering, self.base, self.s3_env = name, rendering, base, dict(s3_env)
        self.report_env = dict(report_env) if report_env is not None else None
        self.root = root / name
        self.config_dir, self.adapters_dir = self.root / "config", self.root / "adapters"
        self.vllm_port, self.sync_port = free_port(), free_port()
        self.server: VLLMServer | None = None
        self.sidecar: ManagedProcess | None = None
        self.start_error: BaseException | None = None
        self.deleted = False
        self._starting: threading.Thread | None = None
        self._vllm_starts = 0

    def write_set(self, adapter_set: str) -> None:
        """Replace the mounted adapter set atomically, as the kubelet swaps a ConfigMap volume's files."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_dir / f".{names.ADAPTERS_KEY}.tmp"
        tmp.write_text(adapter_set)
        tmp.replace(self.config_dir / names.ADAPTERS_KEY)

    def sidecar_argv(self) -> list[str]:
        args = dict(zip(self.rendering.sidecar["args"][::2], self.rendering.sidecar["args"][1::2], strict=True))
        assert set(args) == {"--adapters", "--dir", "--vllm-url", "--port"}, args  # the builder changed: map it
        assert args["--dir"] == ADAPTERS_DIR and args["--adapters"].startswith(CONFIG_DIR)
        args["--adapters"] = str(self.config_dir / names.ADAPTERS_KEY)
        args["--dir"] = str(self.adapters_dir)
        args["--vllm-url"] = f"http://127.0.0.1:{self.vllm_port}"
        args["--port"] = str(self.sync_port)
        command = self.rendering.sidecar["command"]
        assert command == ["kubedistill-worker", "adapter-sync"], command
        flat = [item for pair in args.items() for item in pair]
        report = [] if self.report_env is not None else ["--no-report"]
        return [sys.executable, "-m", "kubedistill.worker", "adapter-sync", *flat, *report]

    def start(self, adapter_set: str | None = None) -> Replica:
        """Both containers start at once (the pod's); vLLM takes its time in a thread."""
        self.write_set(adapter_set if adapter_set is not None else self.rendering.adapter_set)
        env = {**os.environ, **self.s3_env, **(self.report_env or {}), "KUBEDISTILL_LOG_LEVEL": "INFO"}
        self.sidecar = ManagedProcess(
            self.sidecar_argv(), log_path=self.root / "sidecar.log", env=env, cwd=REPO_ROOT, name=f"{self.name}-sync"
        ).start()
        self._start_vllm()
        return self

    def _start_vllm(self) -> None:
        self._vllm_starts += 1
        self.server = VLLMServer(
            self.base,
            served_model_name=self.rendering.served_model_name(),
            port=self.vllm_port,
            extra_args=self.rendering.vllm_args(),
            env=self.rendering.vllm_env(),
            log_path=self.root / f"vllm-{self._vllm_starts}.log",
            startup_timeout=420,
        )
        server = self.server.launch()  # spawned here: a process spawned by a thread dies with the thread

        def run() -> None:
            try:
                server.wait_started()
            except BaseException as err:  # reported by wait_started()
                self.start_error = err

        self._starting = threading.Thread(target=run, name=f"{self.name}-vllm", daemon=True)
        self._starting.start()

    def wait_started(self, timeout: float = 480) -> None:
        assert self._starting is not None
        self._starting.join(timeout)
        if self.start_error is not None:
            raise self.start_error
        assert not self._starting.is_alive(), f"{self.name}: vLLM did not start in {timeout:.0f}s"

    def restart_vllm(self) -> None:
        """The vLLM container restarted (liveness probe, OOM): the sidecar and the adapter files stay."""
        assert self.server is not None
        self.wait_started()
        self.server.stop()
        self._start_vllm()

    def delete(self) -> None:
        """The pod deleted: both containers get SIGTERM."""
        self.deleted = True
        if self.server is not None:
            self.server.stop()
        if self.sidecar is not None:
            self.sidecar.stop()
        if self._starting is not None:
            self._starting.join(60)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.sync_port}/ready", timeout=5) as response:
                return response.status == 200
        except (urllib.error.HTTPError, OSError):
            return False

    def held(self) -> dict[str, str] | None:
        """What vLLM holds (name -> revision, from /v1/models), None when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.vllm_port}/v1/models", timeout=5) as response:
                cards = json.load(response)["data"]
        except (OSError, ValueError):
            return None
        # Read here, not with the sidecar's own code: the measurement must not share what it measures.
        roots = {card["id"]: Path(card["root"]) for card in cards if card.get("parent")}
        return {name: root.name for name, root in roots.items() if root.parent == self.adapters_dir / name}

    def ask(self, model: str) -> int:
        """HTTP status of a 4-token chat completion for ``model`` on this replica."""
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.vllm_port}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code


@dataclass(frozen=True)
class Sample:
    t: float
    replica: str
    ready: bool
    held: dict[str, str] | None  # None: its vLLM did not answer


@dataclass
class Sampler:
    """Polls each live replica's readiness, then what its vLLM holds, every ``interval`` seconds."""

    replicas: list[Replica]
    interval: float = 0.3
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for replica in list(self.replicas):
                if replica.deleted:
                    continue
                t = time.monotonic()
                ready = replica.ready()
                held = replica.held()  # read after readiness: a Ready answer is checked against what follows
                self.samples.append(Sample(t, replica.name, ready, held))
            self._stop.wait(self.interval)
