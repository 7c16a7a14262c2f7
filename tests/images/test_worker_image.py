"""The CPU worker image for real: the stage pods and the serving pod the operator renders, run in
containers (tests/support/pods.py) as UID 65532 with a read-only root filesystem.

One DistillationJob, every stage in a container of localhost/kubedistill/worker:<version>-cpu:
the teacher is the fault stub (429s, 500s, malformed bodies: what a real teacher won't do on
demand), storage the real S3 server, the student a tiny Llama built here, and every pod exactly
as builders/ renders it (command, env, Secret references, ConfigMap, volumes, security context).

- generate: SIGTERM mid-run exits 143 (preempted) with every answer received stored; the rerun
  asks only for the rest; each prompt answered once overall, the faulted ones retried; the API
  key reached the teacher and no log; the pod's projected token of the job's worker
  ServiceAccount lets it report progress into the job's ConfigMap on the local cluster, and
  nothing else;
- train: full fine-tuning from S3 to S3; the termination message is the result the operator
  parses; the export is a model transformers loads;
- evaluate: the student against the teacher's held-out answers: learning is real;
- serving: the DistilledModel's Deployment: the fetch init container verifies the digest, then
  vLLM's CPU build serves the model and /v1/chat/completions answers as the teacher would.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubedistill.api.dataset import MANIFEST_NAME, DatasetManifest, DatasetRecord
from kubedistill.api.settings import OperatorSettings
from kubedistill.api.v1alpha1 import DistillationJob, DistilledModel, ModelArtifact
from kubedistill.api.worker_config import EvaluateResult, GenerateResult, StorageSettings, TrainResult
from kubedistill.builders import names
from kubedistill.builders.plan import RunPlan, Stage
from kubedistill.builders.progress import build_progress_children, worker_service_account
from kubedistill.builders.publish import build_distilled_model
from kubedistill.builders.serving import ServingPlan, build_deployment, build_fetch_config_map
from kubedistill.builders.stages import EXIT_PREEMPTED, build_stage_config_map, build_stage_job
from kubedistill.local.serve import VLLM_CPU_ENV
from kubedistill.reconcile.keys import compute_stage_keys
from kubedistill.reconcile.observe import parse_result
from kubedistill.storage.objectstore import S3Store, upload_dir
from tests.images.conftest import Images
from tests.support.cluster import Cluster
from tests.support.datasets import TASK_WORDS, copy_task, task_corpus
from tests.support.fault_stub import FaultStub
from tests.support.pods import Container, Engine, Pod, ServiceAccount, wait_http
from tests.support.procs import free_port
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = [pytest.mark.images, pytest.mark.cluster, pytest.mark.slow]

API_KEY = "sk-images-0123456789abcdef"
# Distinct copy-task prompts; the teacher (the stub) answers "echo: <prompt>".
PROMPTS = list(dict.fromkeys(prompt for prompt, _ in copy_task(900, seed=3)))[:400]
FAULTS = {PROMPTS[1]: ["429:1", "ok"], PROMPTS[2]: ["500", "502", "ok"], PROMPTS[3]: ["malformed", "ok"]}
SERVED_NAME = "images-bot"
TRAIN_STEPS = 200


@dataclass
class Run:
    """The DistillationJob, the operator's settings, and the services its pods talk to."""

    engine: Engine
    images: Images
    s3: Any
    stub: FaultStub
    bucket: str
    tmp: Path
    cluster: Cluster
    namespace: str
    plan: RunPlan = field(init=False)
    account: ServiceAccount = field(init=False)
    settings: OperatorSettings = field(init=False)
    pods: int = 0

    def __post_init__(self) -> None:
        credentials = self.s3.env()
        self.secrets = {
            "teacher-key": {"api-key": API_KEY},
            "s3-creds": {k: credentials[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        }
        manifest = {
            "apiVersion": "kubedistill.io/v1alpha1",
            "kind": "DistillationJob",
            "metadata": {"name": "images", "namespace": self.namespace, "uid": "uid-images", "generation": 1},
            "spec": {
                "teacher": {
                    "endpoint": {
                        "baseURL": self.stub.base_url,
                        "model": "stub-teacher",
                        "apiKeySecretRef": {"name": "teacher-key", "key": "api-key"},
                        "timeoutSeconds": 5,
                        "maxConcurrency": 4,
                    },
                    "sampling": {"temperature": 0, "maxTokens": 32},
                },
                "dataset": {"prompts": {"uri": f"s3://{self.bucket}/prompts.jsonl"}, "evalFraction": 0.1},
                "student": {
                    "model": f"s3://{self.bucket}/base/student",
                    "method": "full",
                    "training": {
                        "maxSteps": TRAIN_STEPS,
                        "learningRate": 1e-3,
                        "batchSize": 16,
                        "maxSeqLength": 64,
                        "warmupRatio": 0.05,
                        "seed": 0,
                    },
                },
                "evaluation": {"minTeacherAgreement": 0.5},
                # CPU pods: no GPU anywhere (train and evaluate run their CPU paths).
                "resources": {"gpusPerNode": 0},
                "output": {
                    "uri": f"s3://{self.bucket}/runs/images",
                    "model": {
                        "name": SERVED_NAME,
                        "serving": {
                            "gpus": 0,
                            "vllm": {
                                "dtype": "float32",
                                "maxModelLen": 512,
                                "extraArgs": ["--distributed-executor-backend", "uni", "--seed", "0"],
                                "env": [{"name": k, "value": v} for k, v in VLLM_CPU_ENV.items()],
                            },
                        },
                    },
                },
                "storage": {
                    "endpoint": self.s3.endpoint_url,
                    "addressingStyle": "path",
                    "credentialsSecretRef": {"name": "s3-creds"},
                },
            },
        }
        job = DistillationJob.model_validate(manifest)
        self.plan = RunPlan(job=job, keys=compute_stage_keys(job.spec))
        # The chart's values that hack/images printed, plus a free port: every pod shares the
        # host's network here, where 8000 may be taken.
        settings = {**self.images.values["settings"], "serving": {"port": free_port()}}
        self.settings = OperatorSettings.model_validate(settings)
        self.account = self._worker_account()

    def _worker_account(self) -> ServiceAccount:
        """The job's progress ConfigMap, worker ServiceAccount and Role, as the operator creates
        them (without the owner: no DistillationJob exists here), and a token of that account."""
        for child in build_progress_children(self.plan, self.settings):
            child["metadata"].pop("ownerReferences")
            self.cluster.apply(child, namespace=self.namespace)
        name = worker_service_account(self.plan, self.settings)
        token = self.cluster.kubectl("-n", self.namespace, "create", "token", name, "--duration=60m").stdout.strip()
        return ServiceAccount(
            token=token,
            ca_crt=(self.cluster.dir / "pki" / "ca.crt").read_text(),
            namespace=self.namespace,
            api_host="127.0.0.1",
            api_port=self.cluster.ports()["apiserver"],
        )

    def progress(self) -> dict[str, Any]:
        """The progress ConfigMap's reports, by stage."""
        name = names.progress_config_name(self.plan.name)
        data = self.cluster.core().read_namespaced_config_map(name, self.namespace).data or {}
        return {stage: json.loads(report) for stage, report in data.items()}

    def stage_pod(self, stage: Stage) -> Pod:
        job = build_stage_job(self.plan, stage, self.settings)
        config_map = build_stage_config_map(self.plan, stage, self.settings)
        self.pods += 1
        return Pod(
            self.engine,
            job["spec"]["template"]["spec"],
            workdir=self.tmp / f"{stage}-{self.pods}",
            config_maps={config_map["metadata"]["name"]: config_map["data"]},
            secrets=self.secrets,
            service_account=self.account,
        )

    def store(self) -> S3Store:
        return S3Store(StorageSettings(endpoint=self.s3.endpoint_url, addressing_style="path"), client=self.s3.client())

    def held_out_prompts(self) -> list[str]:
        """The prompts of the dataset's eval split: the student never trained on them."""
        store = self.store()
        manifest = DatasetManifest.model_validate_json(store.get_bytes(f"{self.plan.dataset_uri}/{MANIFEST_NAME}"))
        prompts = []
        for shard in (s for s in manifest.shards if s.split == "eval"):
            for line in store.get_bytes(f"{self.plan.dataset_uri}/{shard.path}").splitlines():
                prompts.append(DatasetRecord.model_validate_json(line).prompt[-1].content)
        return prompts


def asked_ok(stub: FaultStub) -> Counter[str]:
    """Answers asked for (the teacher's speed probe, streamed, is counted apart)."""
    return Counter(e["prompt"] for e in stub.requests() if e["fault"] == "ok" and not e["stream"])


def result_of(stage: str, container: Container) -> Any:
    """The stage's result as the operator reads it from the pod's termination message."""
    message = container.termination_message()
    result = parse_result(stage, message)
    assert result is not None, f"{stage}: no parsable result in {message!r}\n{container.logs(40)}"
    return result


def assert_hardened(container: Container) -> None:
    """What the runtime actually applied: UID 65532, a read-only root, no capabilities."""
    config = container.inspect()
    assert config["Config"]["User"] == "65532:65532"
    host = config["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]


@pytest.fixture(scope="module")
def run(
    engine: Engine, images: Images, s3: Any, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("worker-image")
    with FaultStub(api_key=API_KEY) as stub, cluster.new_namespace("worker-image") as namespace:
        bucket = s3.make_bucket()
        found = Run(engine, images, s3, stub, bucket, tmp, cluster, namespace)
        lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
        s3.client().put_object(Bucket=bucket, Key="prompts.jsonl", Body=("\n".join(lines) + "\n").encode())
        # The task's words, the verb and the teacher's prefix are single tokens of the student.
        corpus = task_corpus() + [f"echo: repeat: {w}" for w in TASK_WORDS] * 20
        student = cached_tiny_chat_model(tmp_path_factory.getbasetemp(), corpus=corpus, vocab_size=512)
        upload_dir(found.store(), student, f"s3://{bucket}/base/student")
        yield found


@pytest.fixture(scope="module")
def generated(run: Run) -> GenerateResult:
    """SIGTERM in the middle of the run, then a second pod that finishes it."""
    run.stub.script(FAULTS, latency=0.05)
    with run.stage_pod("generate") as pod:
        worker = pod.start(names.WORKER_CONTAINER)
        assert_hardened(worker)
        deadline = time.monotonic() + 120
        while len(run.stub.requests()) < 60:
            assert worker.running(), worker.logs(40)
            assert time.monotonic() < deadline, f"only {len(run.stub.requests())} requests\n{worker.logs(40)}"
            time.sleep(0.2)
        worker.kill("TERM")
        assert worker.wait(60) == EXIT_PREEMPTED, worker.logs(40)
        assert worker.termination_message().startswith("Preempted: SIGTERM")
        interrupted = sum(asked_ok(run.stub).values())
        assert 0 < interrupted < len(PROMPTS)
        logs = worker.logs()

    run.stub.script({}, latency=0.0)
    with run.stage_pod("generate") as pod:
        worker = pod.run(names.WORKER_CONTAINER, timeout=300)
        result = result_of("generate", worker)
        logs += worker.logs()
    assert API_KEY not in logs
    assert isinstance(result, GenerateResult)
    assert result.reused == interrupted and result.requested == len(PROMPTS) - interrupted
    return result


def test_generate_pod_resumes_after_sigterm_and_never_pays_twice(run: Run, generated: GenerateResult) -> None:
    assert generated.examples == len(PROMPTS) and generated.failed == 0
    assert generated.eval > 0 and generated.train + generated.eval == len(PROMPTS)
    # Each prompt answered exactly once across both pods; the faulted ones retried first.
    assert asked_ok(run.stub) == Counter(PROMPTS)
    seen = Counter(e["prompt"] for e in run.stub.requests() if not e["stream"])
    # The teacher's speed was probed on held-out prompts only (evaluation.speed), streamed.
    probed = {e["prompt"] for e in run.stub.requests() if e["stream"]}
    assert probed and probed <= set(run.held_out_prompts())
    assert {p: seen[p] for p in FAULTS} == {p: len(f) for p, f in FAULTS.items()}
    # The key came from the Secret, through the pod's env, to the teacher.
    assert all(e["auth"] for e in run.stub.requests())
    manifest = DatasetManifest.model_validate_json(run.store().get_bytes(f"{run.plan.dataset_uri}/{MANIFEST_NAME}"))
    assert manifest.digest == generated.digest and manifest.counts.prompts == len(PROMPTS)
    # The pod's last report reached the job's progress ConfigMap through the API server.
    report = run.progress()["generate"]
    # The second pod asked for the rest: its total is what it had to ask, the answers stored are reused.
    assert (report["done"], report["total"], report["unit"]) == (generated.requested,) * 2 + ("answers",), report
    assert report["details"]["reused"] == generated.reused, report


@pytest.fixture(scope="module")
def trained(run: Run, generated: GenerateResult) -> TrainResult:
    with run.stage_pod("train") as pod:
        worker = pod.run(names.WORKER_CONTAINER, timeout=900)
        assert_hardened(worker)
        result = result_of("train", worker)
    assert isinstance(result, TrainResult)
    return result


def test_train_pod_exports_the_student(run: Run, trained: TrainResult, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubedistill.worker.fetch import fetch_model

    assert trained.model_uri == run.plan.model_uri and trained.global_step == TRAIN_STEPS and not trained.adapter
    assert trained.train_loss is not None and trained.train_loss > 0
    fetched = fetch_model(run.store(), trained.model_uri, tmp_path / "model")
    assert fetched.digest == trained.digest
    tokenizer = AutoTokenizer.from_pretrained(fetched.path)
    model = AutoModelForCausalLM.from_pretrained(fetched.path)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)


def test_evaluate_pod_finds_the_student_learned_from_the_teacher(run: Run, trained: TrainResult) -> None:
    with run.stage_pod("evaluate") as pod:
        worker = pod.run(names.WORKER_CONTAINER, timeout=600)
        result = result_of("evaluate", worker)
    assert isinstance(result, EvaluateResult)
    print(f"evaluate in the worker image: {result.model_dump_json()}")
    # An untrained student echoes nothing; this one was trained on the teacher's answers.
    assert result.examples > 0 and result.teacher_agreement >= 0.7, result


def test_serving_pod_fetches_and_vllm_answers_as_65532_read_only(run: Run, trained: TrainResult) -> None:
    artifact = ModelArtifact(uri=trained.model_uri, digest=trained.digest)
    # The DistilledModel the operator publishes for this run, as the API server would store it.
    manifest = build_distilled_model(run.plan, artifact, adapter=False)
    manifest["metadata"]["uid"] = "uid-model"
    model = DistilledModel.model_validate(manifest)
    plan = ServingPlan(model=model, source=artifact, base_model=None, storage=model.spec.storage)
    deployment = build_deployment(plan, run.settings)
    config_map = build_fetch_config_map(plan, run.settings)
    pod_spec = deployment["spec"]["template"]["spec"]
    with Pod(
        run.engine,
        pod_spec,
        workdir=run.tmp / "serving",
        config_maps={config_map["metadata"]["name"]: config_map["data"]},
        secrets=run.secrets,
    ) as pod:
        [fetch] = pod.run_init_containers()
        assert_hardened(fetch)
        fetched = json.loads(fetch.termination_message())
        assert fetched["digest"] == trained.digest
        vllm = pod.start(names.VLLM_CONTAINER)
        assert_hardened(vllm)
        port = run.settings.serving.port
        seconds = wait_http(f"http://127.0.0.1:{port}/health", vllm, timeout=600, what="vLLM in the worker image")
        answers = []
        held_out = run.held_out_prompts()
        assert len(held_out) >= 5
        for prompt in held_out[:5]:
            body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                    "temperature": 0}  # fmt: skip
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
            choice = reply["choices"][0]
            answers.append((choice["message"]["content"].strip(), f"echo: {prompt}", choice["finish_reason"]))
        print(f"vLLM in the worker image: healthy after {seconds:.0f}s; answers {answers}")
    # Held-out prompts: answered as the teacher would have, and the turn ended.
    assert sum(got == want for got, want, _ in answers) >= 3, answers
    assert all(finish == "stop" for _, _, finish in answers), answers


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        data: dict[str, Any] = json.load(resp)
    return data
