"""Local mode's pure parts: reading manifests, mapping the cluster's URIs onto this machine."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from kubedistill.api.worker_config import EvaluateConfig, GenerateConfig, TrainConfig
from kubedistill.builders.plan import RunPlan
from kubedistill.local import runner
from kubedistill.local.demo import DEMO_MANIFEST
from kubedistill.reconcile.keys import compute_stage_keys

MANIFEST = textwrap.dedent(
    """
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: prompts}
    data:
      prompts.jsonl: |
        {"prompt": "hello"}
    ---
    apiVersion: kubedistill.io/v1alpha1
    kind: DistillationJob
    metadata: {name: tiny}
    spec:
      teacher:
        endpoint: {baseURL: "http://127.0.0.1:9/v1", model: big, apiKeySecretRef: {name: key, key: token}}
      dataset:
        prompts: {configMapRef: {name: prompts, key: prompts.jsonl}}
      student: {model: "s3://models/student"}
      output:
        uri: s3://artifacts/tiny
        model: {name: tiny-student}
    """
)


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(MANIFEST)
    return runner.load_documents(path)


def test_finds_the_job_and_validates_it(docs):
    job = runner.find_job(docs)
    assert job.metadata.name == "tiny"
    assert job.metadata.namespace == "local"


def test_invalid_job_names_the_field(docs):
    docs[1]["spec"]["student"]["lora"] = {"rank": 0}
    with pytest.raises(runner.LocalRunError, match=r"spec\.student\.lora\.rank"):
        runner.find_job(docs)


def test_ambiguous_file_asks_for_a_name(docs):
    twin = yaml.safe_load(yaml.safe_dump(docs[1]))
    twin["metadata"]["name"] = "other"
    with pytest.raises(runner.LocalRunError, match="found: tiny, other"):
        runner.find_job([*docs, twin])
    assert runner.find_job([*docs, twin], name="other").metadata.name == "other"


def test_missing_config_map_is_a_clear_error(docs):
    with pytest.raises(runner.LocalRunError, match="ConfigMap absent with key k"):
        runner.config_map_value(docs, "absent", "k")


def test_localise_maps_every_s3_uri_and_nothing_else(tmp_path):
    config = {"a": "s3://bucket/x/y", "b": ["s3://b2/k", "http://s3://not"], "c": {"d": "plain"}, "n": 3}
    assert runner.localise(config, tmp_path) == {
        "a": str(tmp_path / "bucket/x/y"),
        "b": [str(tmp_path / "b2/k"), "http://s3://not"],
        "c": {"d": "plain"},
        "n": 3,
    }
    assert runner.localise(config, None) is config


def test_stage_configs_are_the_operators_rewritten_for_this_machine(docs, tmp_path):
    job = runner.find_job(docs)
    plan = RunPlan(job=job, keys=compute_stage_keys(job.spec))
    options = runner.LocalOptions(workdir=tmp_path / "runs", storage_root=tmp_path / "s3")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    configs = runner.stage_configs(plan, docs, options, run_dir)

    generate = GenerateConfig.model_validate(configs["generate"])
    assert Path(generate.prompts).read_text() == '{"prompt": "hello"}\n'  # the ConfigMap's content
    assert generate.output_uri == str(tmp_path / "s3" / "artifacts/tiny/datasets" / plan.keys.generate)
    train = TrainConfig.model_validate(configs["train"])
    assert train.student.model == str(tmp_path / "s3/models/student")
    assert train.dataset_uri == generate.output_uri
    evaluate = EvaluateConfig.model_validate(configs["evaluate"])
    assert evaluate.engine == "vllm"
    assert evaluate.model_uri == train.output_uri
    assert all(config["workDir"].startswith(str(run_dir)) for config in configs.values())
    assert "s3://" not in yaml.safe_dump(configs)


def test_gate(docs):
    job = runner.find_job(docs)
    lines: list[str] = []
    runner.check_gate(job, {"teacherAgreement": 0.96, "reportUri": "r"}, lines.append)
    assert "passed" in lines[-1]
    with pytest.raises(runner.QualityGateFailed, match=r"0\.940 is below evaluation\.minTeacherAgreement 0\.950"):
        runner.check_gate(job, {"teacherAgreement": 0.94, "reportUri": "r"}, lines.append)


def test_the_demo_manifest_is_a_valid_distillation_job():
    job = runner.find_job(runner.load_documents(DEMO_MANIFEST))
    assert job.spec.teacher.vllm is not None and job.spec.teacher.vllm.gpus == 0
    assert job.spec.evaluation.min_teacher_agreement >= 0.95


@pytest.mark.parametrize("objective", ["sft", "kd", "onPolicy"])
def test_the_demo_runs_every_objective_with_a_valid_manifest(objective, tmp_path):
    from kubedistill.local.demo import demo_manifest

    job = runner.find_job(runner.load_documents(demo_manifest(objective, tmp_path)))
    assert job.spec.student.objective == objective
    assert job.metadata.name == "demo-reversal"  # one job; its runs are keyed by the spec
    if objective == "kd":
        assert job.spec.teacher.logprobs == 20
    plan = RunPlan(job=job, keys=compute_stage_keys(job.spec))
    configs = runner.stage_configs(plan, [job.to_wire()], runner.LocalOptions(storage_root=tmp_path / "s3"), tmp_path)
    train = TrainConfig.model_validate(configs["train"])
    assert train.student.objective == objective
    # onPolicy: the train stage serves the demo teacher itself, from the local storage root
    assert (train.teacher is not None) == (objective == "onPolicy")
    if train.teacher is not None:
        assert train.teacher.vllm is not None and train.teacher.vllm.model.startswith(str(tmp_path / "s3"))


def test_describe_says_which_objective_trained_and_its_final_losses():
    line = runner.describe(
        "train", {"objective": "kd", "globalStep": 9, "losses": {"ce": 0.75, "kl": 0.25, "loss": 0.5}}
    )
    assert line == "objective kd, step 9, final loss 0.5000 ce 0.7500 kl 0.2500"
    on_policy = runner.describe(
        "train", {"objective": "onPolicy", "globalStep": 3, "losses": {"loss": 0.1}, "teacherTokensScored": 96}
    )
    assert on_policy.endswith(", 96 tokens scored by the teacher")


def test_the_summary_says_what_the_run_cost_and_saves(docs):
    from tests.support.djobs import budget_exceeded, projection, speed_comparison, spend

    job = runner.find_job(docs)
    generate = {"examples": 10, "train": 9, "eval": 1, "requested": 10, "spend": spend(requests=10, cost=0.25)}
    assert runner.describe("generate", generate).endswith("spent $0.25, 1,200 tokens on 10 requests")
    lines = runner.describe_savings(job, {"teacherAgreement": 0.97, "speed": speed_comparison(11.2, 14.3)})
    assert (
        lines[0] == "  savings   keeps 97% of the teacher's tokenF1, 11\u00d7 faster, 14\u00d7 cheaper per 1M answers"
    )
    assert "student  c=1: TTFT p50 50 ms, 120 tok/s p50, 1.5 answers/s" in lines[1]
    assert lines[-1] == "            per 1M answers: teacher $1,430.00, student $100.00"
    estimate = runner.TeacherSpend.model_validate(
        {"currency": "USD", "projected": projection(100, cost=0.21), "budget": {"maxCost": 0.1}}
    )
    text = "\n".join(runner.describe_projection(estimate, 256))
    assert "100 to ask" in text and "at most $0.21 at teacher.pricing" in text
    assert "budget    may stop at maxCost (BudgetExceeded)" in text
    [line] = runner.describe_spend_line({"spend": spend(requests=10, cost=0.25, budget={"maxCost": 1.0})})
    assert line == (
        "  spend     $0.25 of $1.00, budget Within (projected before the first request: at most 27k tokens, $0.21 "
        "for 100 answers; 0 reused from the answer store)"
    )
    stopped = runner.failure_message(budget_exceeded())
    assert stopped.startswith("BudgetExceeded: the teacher budget (maxTokens 5,000) is spent")
    assert runner.failure_message("plain") == "plain"


def test_estimate_is_an_option_of_local_run():
    from kubedistill.cli import build_parser

    args = build_parser().parse_args(["local", "run", "job.yaml", "--estimate"])
    assert args.estimate is True
