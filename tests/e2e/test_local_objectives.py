"""Local mode runs every objective: `kubedistill local run` of one job as kd, then as onPolicy.

Tiny models (a teacher and a student of the same tokenizer, random weights: what is measured is
that the stages run and report, not quality; bench/objectives.py measures quality), vLLM CPU for
the teacher, transformers for the evaluation. The kd run captures the teacher's top-8 logprobs;
the onPolicy run reuses that dataset (same generate key: nobody pays twice) and has the train
stage serve the teacher with vLLM to score the student's samples.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.datasets import copy_task, task_corpus
from tests.support.tiny_model import cached_tiny_chat_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def manifest(objective: str) -> dict:
    student: dict = {
        "model": "s3://objectives/models/student",
        "method": "full",
        "objective": objective,
        "training": {"maxSteps": 6, "batchSize": 8, "maxSeqLength": 64, "checkpointEverySteps": 3},
    }
    if objective == "onPolicy":
        student["onPolicy"] = {"maxNewTokens": 8}
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "objectives"},
        "spec": {
            "teacher": {
                "vllm": {"model": "s3://objectives/models/teacher", "gpus": 0, "maxModelLen": 256, "dtype": "float32"},
                "sampling": {"temperature": 0, "maxTokens": 8},
                "logprobs": 8,
            },
            "dataset": {"prompts": {"uri": "s3://objectives/prompts.jsonl"}, "format": "prompt"},
            "student": student,
            "resources": {"gpusPerNode": 0},
            "evaluation": {"minTeacherAgreement": 0.0, "maxExamples": 8},
            "output": {"uri": "s3://objectives/runs", "model": {"name": "objectives-student", "serve": False}},
        },
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("local-objectives")
    models = home / "s3" / "objectives" / "models"
    base = tmp_path_factory.getbasetemp()
    for name, seed in (("teacher", 5), ("student", 0)):
        shutil.copytree(cached_tiny_chat_model(base, corpus=task_corpus(), vocab_size=512, seed=seed), models / name)
    prompts = [json.dumps({"prompt": prompt}) for prompt, _ in copy_task(120, seed=2)]
    (home / "s3" / "objectives" / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    return home


def local_run(home: Path, objective: str) -> str:
    path = home / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(manifest(objective)))
    done = subprocess.run(
        [
            sys.executable, "-m", "kubedistill", "local", "run", str(path), "--evaluate-engine", "transformers",
            "--serve-seconds", "0", "--workdir", str(home / "runs"), "--storage-root", str(home / "s3"),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def report(home: Path) -> dict:
    reports = sorted(
        (home / "s3" / "objectives" / "runs" / "reports").glob("*/report.json"), key=lambda p: p.stat().st_mtime
    )
    return json.loads(reports[-1].read_text())


def test_kd_then_on_policy_run_locally_and_report_objective_and_losses(home):
    kd = local_run(home, "kd")
    assert "generate  done" in kd
    assert "train     done" in kd and "objective kd, step 6, final loss" in kd and " ce " in kd and " kl " in kd
    training = report(home)["training"]
    assert training["objective"] == "kd" and set(training["losses"]) == {"loss", "ce", "kl"}

    on_policy = local_run(home, "onPolicy")
    assert "generate  reused" in on_policy  # the same teacher and prompts: the teacher is not asked again
    assert "objective onPolicy, step 6, final loss" in on_policy and "tokens scored by the teacher" in on_policy
    training = report(home)["training"]
    assert training["objective"] == "onPolicy" and training["teacherTokensScored"] > 0
