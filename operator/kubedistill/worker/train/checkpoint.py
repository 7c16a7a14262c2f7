"""Trainer checkpoints in the object store, safe against preemption at any moment.

Layout under ``checkpoint_uri``::

    checkpoint-<step>/...             what transformers' Trainer saved (weights or adapter, optimizer,
                                      scheduler, RNG state of every rank, trainer_state.json)
    checkpoint-<step>/COMPLETE.json   written last: step, fingerprint, every file with size and sha256

A checkpoint without its marker is a half-finished upload (the pod was killed
mid-way) and is never resumed from. On start, the newest complete checkpoint
whose fingerprint is this run's is downloaded and handed to
``trainer.train(resume_from_checkpoint=...)``: the Trainer restores weights,
optimizer, scheduler, RNG state and skips the batches already seen, so the
global step continues and the data order is the one an uninterrupted run sees.

Under torchrun, rank 0 uploads the shared files and every rank uploads its own
``rng_state_<rank>.pth`` and, with FSDP, its own shards of the model and optimizer
(``__<rank>_0.distcp``: on multi-node runs they exist only on that rank's node);
rank 0 writes the marker once every rank reported success. A resumed run downloads
every file on every node, so torch's distributed checkpoint can reshard.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubedistill.storage.objectstore import ObjectStore, StorageError, join, sha256_file
from kubedistill.worker.common import WorkerError
from kubedistill.worker.train import dist as train_dist
from kubedistill.worker.train.decisions import CHECKPOINT_MARKER, checkpoints_to_delete, complete_checkpoint_steps

log = logging.getLogger("kubedistill.worker.train")
_RNG_FILE = re.compile(r"^rng_state_(\d+)\.pth$")
# torch distributed checkpoint shards of FSDP (model and optimizer): __<rank>_<n>.distcp
_DCP_SHARD = re.compile(r"(^|/)__(\d+)_\d+\.distcp$")


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    uri: str
    marker: dict[str, Any]


def files_for_rank(local_dir: Path, rank: int) -> list[str]:
    """The files of a local checkpoint that ``rank`` uploads (relative paths)."""
    out = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        rng, shard = _RNG_FILE.match(rel), _DCP_SHARD.search(rel)
        owner = int(rng.group(1)) if rng else int(shard.group(2)) if shard else 0
        if owner == rank:
            out.append(rel)
    return out


class CheckpointStore:
    """Complete checkpoints of one run under ``uri``."""

    def __init__(self, store: ObjectStore, uri: str, fingerprint: str, keep: int) -> None:
        self.store = store
        self.uri = uri.rstrip("/")
        self.fingerprint = fingerprint
        self.keep = keep

    def _keys(self) -> list[str]:
        return [o.key for o in self.store.list(self.uri)]

    def latest(self) -> RemoteCheckpoint | None:
        """The newest complete checkpoint of this run, or None."""
        try:
            steps = complete_checkpoint_steps(self._keys())
        except StorageError as err:
            raise WorkerError(f"cannot list checkpoints in {self.uri}: {err}") from err
        for step in steps:
            uri = join(self.uri, f"checkpoint-{step}")
            try:
                marker = json.loads(self.store.get_bytes(join(uri, CHECKPOINT_MARKER)))
            except (StorageError, ValueError) as err:
                log.warning("ignoring checkpoint %s: unreadable marker (%s)", uri, err)
                continue
            if marker.get("fingerprint") != self.fingerprint:
                log.warning(
                    "ignoring checkpoint %s: it belongs to another run (different model, data or settings)", uri
                )
                continue
            return RemoteCheckpoint(step, uri, marker)
        return None

    def download(self, checkpoint: RemoteCheckpoint, dest: Path) -> Path:
        """Copy a checkpoint into ``dest`` (replaced), verifying every file against the marker."""
        if dest.exists():
            shutil.rmtree(dest)
        files: dict[str, dict[str, Any]] = checkpoint.marker["files"]
        try:
            for rel, info in sorted(files.items()):
                local = dest / rel
                self.store.download_file(join(checkpoint.uri, rel), local)
                if local.stat().st_size != info["size"] or sha256_file(local) != info["sha256"]:
                    raise WorkerError(f"checkpoint {checkpoint.uri} is corrupt: {rel} differs from its marker")
        except StorageError as err:
            raise WorkerError(f"cannot download checkpoint {checkpoint.uri}: {err}") from err
        log.info("downloaded checkpoint %s (step %d, %d files)", checkpoint.uri, checkpoint.step, len(files))
        return dest

    def upload(self, local_dir: Path, step: int) -> tuple[bool, str]:
        """Upload a local checkpoint from every rank, marker last. Collective: every rank must call it.

        Returns (ok, uri or reason) on every rank. A failed upload leaves no marker,
        so the previous complete checkpoint stays the one a restart resumes from.
        """
        started = time.monotonic()
        rank = train_dist.rank()
        uri = join(self.uri, f"checkpoint-{step}")
        mine: dict[str, dict[str, Any]] = {}
        error = None
        try:
            for rel in files_for_rank(local_dir, rank):
                path = local_dir / rel
                self.store.upload_file(path, join(uri, rel))
                mine[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        except (StorageError, OSError) as err:
            error = f"rank {rank}: {err}"
        reports = train_dist.all_gather((mine, error))
        outcome: tuple[bool, str]
        if train_dist.is_main():
            errors = [e for _, e in reports if e]
            if errors:
                outcome = (False, "; ".join(errors))
            else:
                files = {rel: info for files_of_rank, _ in reports for rel, info in files_of_rank.items()}
                marker = {
                    "step": step,
                    "fingerprint": self.fingerprint,
                    "world_size": len(reports),
                    "files": files,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                try:
                    self.store.put_bytes(
                        join(uri, CHECKPOINT_MARKER), json.dumps(marker, sort_keys=True).encode(), "application/json"
                    )
                    outcome = (True, uri)
                except StorageError as err:
                    outcome = (False, str(err))
            if outcome[0]:
                log.info("checkpoint step %d uploaded to %s in %.1fs", step, uri, time.monotonic() - started)
                self.prune(step)
        else:
            outcome = (False, "")
        return train_dist.broadcast(outcome)

    def prune(self, newest: int) -> None:
        """Delete checkpoints beyond the ``keep`` newest complete ones (markers first)."""
        try:
            objects = list(self.store.list(self.uri))
            doomed = set(checkpoints_to_delete([o.key for o in objects], newest, self.keep))
            by_step: dict[int, list[str]] = {}
            for obj in objects:
                match = re.match(r"^checkpoint-(\d+)/", obj.key)
                if match and int(match.group(1)) in doomed:
                    by_step.setdefault(int(match.group(1)), []).append(obj.key)
            for step, keys in sorted(by_step.items()):
                # the marker goes first: an interrupted prune leaves a partial checkpoint, never a broken "complete" one
                for key in sorted(keys, key=lambda k: not k.endswith(CHECKPOINT_MARKER)):
                    self.store.delete(join(self.uri, key))
                log.info("deleted old checkpoint step %d", step)
        except Exception as err:  # pruning is housekeeping: never fail training for it
            log.warning("could not prune old checkpoints in %s: %s", self.uri, err)
