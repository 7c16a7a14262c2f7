"""The train stage: trl's trainers on the teacher's dataset, checkpoints that survive preemption,
and an export vLLM serves.

    kubedistill-worker train --config /etc/kubedistill/train.yaml     # run.main

- ``run``: the stage, start to finish (``main``), and the trainer it builds;
- ``decisions``: pure decisions (arguments for trl, precision, strategy, fingerprints, checks);
- ``data``: the dataset from the object store as trl's records; ``kd``: the top-k KD loss;
  ``onpolicy``: trl's server distillation against a vLLM teacher;
- ``checkpoint``, ``callbacks``, ``dist``, ``export``: checkpoints in the object store, the
  trainer's callbacks (progress, SIGTERM), torch.distributed helpers, the export.

Importing this package loads nothing heavy: torch and transformers are imported by the
modules that need them, when they run.
"""
