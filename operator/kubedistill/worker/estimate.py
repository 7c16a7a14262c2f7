"""estimate: what the generate stage will cost, without asking the teacher anything.

    kubedistill-worker estimate --config /etc/kubedistill/generate.yaml
    kubedistill local run job.yaml --estimate

Reads the generate stage's own config, loads the answer store and plans exactly as generate
does (teacher/census.py): the answers still missing, their prompt tokens (counted with an in-pod
teacher's tokenizer, downloaded without its weights; estimated for an API teacher) plus
``maxTokens`` per answer, priced with ``teacher.pricing``. The result (a TeacherSpend with
``projected`` set) is the termination message of the generate pod's init container, so the
DistillationJob's status shows the projection as soon as generation starts.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import GenerateConfig
from kubedistill.worker.generate import census_run, fetch_sources, load_answers, log_projection
from kubedistill.worker.teacher.census import RunStats
from kubedistill.worker.teacher.offline_pass import OfflineTeacher
from kubedistill.worker.teacher.spend import prices_for, prompt_counter, spend_report

CONFIG = GenerateConfig
log = logging.getLogger("kubedistill.worker.estimate")


def main(config: GenerateConfig) -> dict[str, Any]:
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="estimate-", dir=config.work_dir))
    try:
        sources = fetch_sources(config, work)
        answers = load_answers(config, RunStats())
        tokenizer = None
        if config.teacher.vllm is not None:
            tokenizer = OfflineTeacher(config, work).tokenizer()  # the tokenizer files only, never the weights
        counter, counted_with = prompt_counter(tokenizer)
        census, _ = census_run(config, sources, answers, RunStats(), counter, counted_with)
        assert census.projection is not None
        projected = census.projection.result(prices_for(config.teacher))
        log_projection(config, projected)
        return spend_report(config.teacher, None, projected, census.stored).to_wire()
    finally:
        shutil.rmtree(work, ignore_errors=True)
