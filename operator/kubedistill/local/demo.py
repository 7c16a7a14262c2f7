"""``kubedistill local demo``: a complete distillation on a laptop, no GPU, no model hub, no cluster.

    kubedistill local demo                     # prepare (once), distil, gate, serve until Ctrl-C
    kubedistill local demo --serve-seconds 30  # ...and stop serving after 30 s
    kubedistill local demo --objective kd      # train on the teacher's top-20 logprobs too (or onPolicy)

A real distillation needs a teacher worth imitating. With no hub to download
one from, the demo makes its own: a small transformer (4 layers) trained by the
train worker on a word-reversal task until it answers correctly, playing the
"large model you pay for". The student is a smaller model (2 layers, half
of the width). Then ``local run`` takes ``demo.yaml`` (next to this file, a
DistillationJob like any other) through generate -> train -> evaluate -> gate
-> vLLM serving, with the teacher answering *unlabelled* prompts it has never
seen, exactly as a production teacher would.

Everything lives under the storage root as ``s3://kubedistill-demo/...``; the
prepared models and prompts are reused by later runs.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from kubedistill.api.dataset import DatasetCounts, DatasetRecord, Message, Split
from kubedistill.api.v1alpha1 import StudentSpec
from kubedistill.api.worker_config import ProgressTarget, TrainConfig
from kubedistill.local.runner import LocalOptions, LocalRun, localise, run_local, run_worker
from kubedistill.local.tiny_model import build_tiny_chat_model
from kubedistill.storage.objectstore import LocalStore
from kubedistill.worker.teacher.writer import DatasetWriter

DEMO_MANIFEST = Path(__file__).with_name("demo.yaml")
BUCKET = "s3://kubedistill-demo"
WORDS = [
    *("red", "blue", "green", "black", "white", "pink", "gray", "gold"),
    *("cat", "dog", "fox", "owl", "bee", "cow", "pig", "rat"),
    *("sun", "moon", "star", "sky", "sea", "rain", "snow", "wind"),
]


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int


TEACHER_SHAPE = Shape(hidden_size=256, num_heads=4, num_layers=4, intermediate_size=512)
STUDENT_SHAPE = Shape(hidden_size=128, num_heads=2, num_layers=2, intermediate_size=256)


def reversal_prompt(rng: random.Random) -> tuple[str, str]:
    """'reverse: fox sea red' -> 'red sea fox'."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
    return f"reverse: {' '.join(words)}", " ".join(reversed(words))


def corpus() -> list[str]:
    """Tokenizer text that makes every task word, and the task verb, a single token."""
    pairs = [f"{a} {b}" for a in WORDS for b in WORDS]  # each word also starts an answer
    return ["reverse: answer"] * 50 + pairs + [f"reverse: {pair}" for pair in pairs]


def build_base_models(root: Path) -> tuple[Path, Path]:
    """Untrained teacher and student bases with the same tokenizer (built once)."""
    teacher, student = root / "models" / "teacher-base", root / "models" / "student-base"
    for path, shape, seed in ((teacher, TEACHER_SHAPE, 1), (student, STUDENT_SHAPE, 2)):
        if not (path / "config.json").exists():
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_chat_model(tmp, corpus=corpus(), vocab_size=400, seed=seed, **asdict(shape))
            tmp.rename(path)
    return teacher, student


def write_labelled_dataset(uri: Path, examples: int, seed: int) -> None:
    """Ground truth for training the teacher, in the dataset format the train worker reads."""
    rng = random.Random(seed)
    writer = DatasetWriter(store=LocalStore(), output_uri=str(uri), work_dir=uri.parent / ".work")
    writer.begin()
    for index in range(examples):
        prompt, answer = reversal_prompt(rng)
        split: Split = "eval" if index % 20 == 0 else "train"
        writer.add(
            DatasetRecord(
                key=f"{seed}-{index}",
                split=split,
                prompt=[Message(role="user", content=prompt)],
                completion=[Message(role="assistant", content=answer)],
            )
        )
    counts = DatasetCounts(prompts=examples, train=examples - examples // 20, eval=examples // 20)
    writer.finish(teacher_model="ground-truth", counts=counts, settings_digest="demo")


def train_teacher(root: Path, options: LocalOptions, echo: Callable[[str], None]) -> Path:
    """The 'large model': the train worker fine-tunes the teacher base on ground truth."""
    teacher = root / "models" / "teacher"
    if (teacher / "kubedistill.json").exists():
        return teacher
    base, _ = build_base_models(root)
    dataset = root / "datasets" / "reversal-ground-truth"
    write_labelled_dataset(dataset, examples=2000, seed=7)
    work = options.workdir / "demo-teacher"
    work.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        student=StudentSpec.model_validate(
            {
                "model": str(base),
                "method": "full",
                "training": {
                    "maxSteps": 300,
                    "learningRate": 2e-3,
                    "batchSize": 32,
                    "maxSeqLength": 64,
                    "warmupRatio": 0.05,
                    "checkpointEverySteps": 200,
                    "seed": 0,
                },
            }
        ),
        dataset_uri=str(dataset),
        output_uri=str(teacher),
        checkpoint_uri=str(root / "checkpoints" / "teacher"),
        work_dir=str(work / "scratch"),
        progress=ProgressTarget(file=str(work / "train.progress.json"), interval_seconds=options.progress_seconds),
    )
    echo(f"  teacher   training the demo teacher on ground truth (once; log: {work / 'train.log'})")
    result = run_worker("train", config.to_wire(), work, options)
    echo(f"  teacher   ready: step {result['globalStep']}, loss {result.get('trainLoss', 0):.3f}")
    return teacher


def write_prompts(root: Path, count: int = 1500, seed: int = 2026) -> Path:
    """Unlabelled prompts, as a team would export them from production traffic."""
    path = root / "prompts" / "reversal.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"id": f"p{i}", "prompt": reversal_prompt(rng)[0]}) for i in range(count)]
        path.write_text("\n".join(lines) + "\n")
    return path


def prepare(options: LocalOptions) -> None:
    """Teacher, student base and prompts under the storage root, where demo.yaml expects them."""
    if options.storage_root is None:
        raise ValueError("the demo keeps its models in a local storage root; drop --s3")
    root = Path(localise(BUCKET, options.storage_root))
    build_base_models(root)
    train_teacher(root, options, options.echo)
    write_prompts(root)


# What each objective changes in demo.yaml (the rest, teacher and prompts above all, stays).
OBJECTIVE_EDITS: dict[str, dict[str, Any]] = {
    "sft": {},
    # the teacher's top-20 logprobs of every answer token, captured when it answers
    "kd": {"teacher": {"logprobs": 20}, "student": {"objective": "kd", "kd": {"alpha": 0.5, "temperature": 1.0}}},
    # the student answers the prompts itself and the teacher, served by vLLM during training, scores each token;
    # a student that starts from random weights samples noise for a long while, so fewer, larger steps
    "onPolicy": {
        "student": {
            "objective": "onPolicy",
            "onPolicy": {"maxNewTokens": 16, "temperature": 1.0},
            "training": {"maxSteps": 300, "learningRate": 0.003},
        }
    },
}


def demo_manifest(objective: str, workdir: Path) -> Path:
    """demo.yaml, or a copy with the objective's edits (same job name: its runs are keyed by spec)."""
    if objective == "sft":
        return DEMO_MANIFEST
    doc = yaml.safe_load(DEMO_MANIFEST.read_text())
    _merge(doc["spec"], OBJECTIVE_EDITS[objective])
    path = workdir / f"demo-{objective}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _merge(into: dict[str, Any], edits: dict[str, Any]) -> None:
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def run_demo(options: LocalOptions, objective: str = "sft") -> LocalRun:
    options.echo(f"kubedistill local demo (objective {objective}): preparing a teacher, a student base and prompts")
    prepare(options)
    return run_local(demo_manifest(objective, options.workdir), options)
