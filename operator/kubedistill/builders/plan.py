"""What one run of a DistillationJob is: stage keys, Job names and artifact locations.

reconcile/keys.py decides the keys (hashes of each stage's inputs); this module turns a
DistillationJob and its keys into the facts every builder needs. Artifacts live under
``spec.output.uri`` keyed by the stage that made them, so two runs with the same inputs
share them::

    <output.uri>/teacher-answers/            generate's answer store, shared by every run
    <output.uri>/datasets/<datasetKey>/      the teacher dataset (manifest.json last)
    <output.uri>/models/<trainKey>/          the exported student
    <output.uri>/checkpoints/<trainKey>/     training checkpoints (resume after preemption)
    <output.uri>/reports/<evaluateKey>/      the evaluation report
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kubedistill.api.v1alpha1 import DistillationJob
from kubedistill.api.worker_config import STAGES as STAGES
from kubedistill.api.worker_config import RunStage
from kubedistill.builders import names

Stage = RunStage  # the run's stages are named once, in api/worker_config.py


def join_uri(base: str, *parts: str) -> str:
    """Join URI segments with exactly one '/' between them (no trailing '/')."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class StageKeys:
    """Content hashes: a stage's key changes exactly when its inputs (or an upstream key) change."""

    dataset: str  # what the teacher is asked: the dataset's location, and what train reads
    generate: str  # the dataset key plus how the teacher is paid (budget, prices, mode): the generate Job
    train: str
    evaluate: str
    run: str  # the whole run, publication included: a new value is a new run
    spec: str  # the whole spec, operational knobs included (status.specHash)

    def of(self, stage: Stage) -> str:
        key: str = getattr(self, stage)
        return key


@dataclass(frozen=True)
class RunPlan:
    """One DistillationJob run: identity, keys and where each stage reads and writes."""

    job: DistillationJob
    keys: StageKeys
    attempts: Mapping[Stage, int] = field(default_factory=dict)  # whole-group restarts so far, by stage

    @property
    def name(self) -> str:
        return self.job.metadata.name or ""

    @property
    def namespace(self) -> str:
        return self.job.metadata.namespace or "default"

    @property
    def uid(self) -> str:
        return self.job.metadata.uid or ""

    @property
    def run_id(self) -> str:
        return self.keys.run

    def job_name(self, stage: Stage, attempt: int | None = None) -> str:
        """The stage's Job (of its current attempt, unless ``attempt`` says which)."""
        return names.stage_job_name(
            self.name, stage, self.keys.of(stage), self.attempts.get(stage, 0) if attempt is None else attempt
        )

    def with_attempt(self, stage: Stage, attempt: int) -> RunPlan:
        return replace(self, attempts={**self.attempts, stage: attempt})

    def labels(self, stage: Stage) -> dict[str, str]:
        return names.job_labels(self.name, stage, self.run_id, self.keys.of(stage), self.attempts.get(stage, 0))

    # artifacts ------------------------------------------------------------------------------

    @property
    def answer_store_uri(self) -> str:
        return join_uri(self.job.spec.output.uri, "teacher-answers")

    @property
    def dataset_uri(self) -> str:
        return join_uri(self.job.spec.output.uri, "datasets", self.keys.dataset)

    @property
    def model_uri(self) -> str:
        return join_uri(self.job.spec.output.uri, "models", self.keys.train)

    @property
    def checkpoint_uri(self) -> str:
        return join_uri(self.job.spec.output.uri, "checkpoints", self.keys.train)

    @property
    def report_uri(self) -> str:
        return join_uri(self.job.spec.output.uri, "reports", self.keys.evaluate)

    def owner_reference(self) -> dict[str, object]:
        """Children are garbage-collected with their DistillationJob."""
        return {
            "apiVersion": self.job.api_version,
            "kind": self.job.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
