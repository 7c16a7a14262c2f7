"""The train worker as a pod runs it: a config file, a ``python -m kubedistill.worker train`` subprocess,
its log and termination message. Shared by the train and objectives worker tests.

    worker = Worker(s3, bucket, tmp_path, "name", training={"maxSteps": 20}, student={"method": "lora"})
    assert worker.run() == 0, worker.describe()
    worker.result()["globalStep"]

Each process runs one OpenMP thread: on two shared cores, two spinning threads per process are
several times slower than one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


class Worker:
    """One train job: its config file, its subprocess, what it left behind."""

    def __init__(self, s3, bucket, tmp_path, name, training=None, **overrides):
        self.s3, self.bucket, self.tmp = s3, bucket, tmp_path
        self.name = name
        self.termination_log = tmp_path / f"{name}.termination-log"
        self.log_path = tmp_path / f"{name}.log"
        student = {
            "model": f"s3://{bucket}/models/student",
            "method": "full",
            "training": {
                "maxSteps": 20,
                "learningRate": 1e-3,
                "batchSize": 16,
                "maxSeqLength": 64,
                "warmupRatio": 0.05,
                "checkpointEverySteps": 10,
                **(training or {}),
            },
        }
        student.update(overrides.pop("student", {}))
        self.doc = {
            "student": student,
            "datasetUri": f"s3://{bucket}/datasets/copy",
            "outputUri": f"s3://{bucket}/runs/{name}/model",
            "checkpointUri": f"s3://{bucket}/runs/{name}/checkpoints",
            "workDir": str(tmp_path / f"{name}-work"),
            "logEverySteps": 1,
            "storage": {"endpoint": s3.endpoint_url, "addressingStyle": "path"},
            **overrides,
        }
        self.config_path = tmp_path / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.doc))

    def env(self):
        return {
            **os.environ,
            **self.s3.env(),
            **SUBPROCESS_ENV,
            "KUBEDISTILL_TERMINATION_LOG": str(self.termination_log),
        }

    def argv(self):
        return [sys.executable, "-m", "kubedistill.worker", "train", "--config", str(self.config_path)]

    def start(self, argv=None):
        self.log_file = self.log_path.open("ab")
        return subprocess.Popen(
            argv or self.argv(), cwd=REPO_ROOT, env=self.env(), stdout=self.log_file, stderr=subprocess.STDOUT
        )

    def run(self, argv=None, timeout=600):
        proc = self.start(argv)
        try:
            rc = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            self.log_file.close()
        return rc

    def log(self):
        return self.log_path.read_text(errors="replace")

    def message(self):
        return self.termination_log.read_text()

    def result(self):
        return json.loads(self.message())

    def describe(self):
        return f"log {self.log_path}:\n" + "\n".join(self.log().splitlines()[-40:])


def accuracy(model_dir, examples):
    """Greedy exact match on the examples, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        correct = 0
        for prompt, answer in examples:
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += text.strip() == answer
        return correct / len(examples)
    finally:
        torch.set_num_threads(threads)


def s3_keys(store, uri):
    return sorted(o.key for o in store.list(uri))


def wait_for_step(worker, proc, step, timeout=300):
    pattern = re.compile(r"train step (\d+)/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(m) for m in pattern.findall(worker.log())]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} before step {step}; {worker.describe()}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout}s; {worker.describe()}")
