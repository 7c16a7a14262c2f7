"""The train worker's final product: a model directory vLLM serves as is, and its upload.

Merged export (the default): LoRA weights merged into the base
(``merge_and_unload``), saved as safetensors with config, generation config,
tokenizer and chat template (``chat_template.jinja``, which vLLM's
OpenAI server uses for chat completions). Adapter export: peft's
``adapter_config.json`` + ``adapter_model.safetensors`` with the base model
recorded as the spec names it, plus the tokenizer.

``kubedistill.json`` describes the export (base model, dataset digest, trainer
settings, metrics, every file's sha256, the digest) and is uploaded last: its
presence under the output URI means the export is complete. It is also how a
re-run recognises that its work is already done.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kubedistill.api.worker_config import TrainConfig, TrainResult
from kubedistill.storage.objectstore import ObjectStore, StorageError, join
from kubedistill.worker.common import WorkerError
from kubedistill.worker.fetch import METADATA_NAME, hash_tree, model_digest

log = logging.getLogger("kubedistill.worker.train")
EXPORT_FORMAT_VERSION = 1


def save_export(
    model: Any,
    tokenizer: Any,
    config: TrainConfig,
    export_dtype: str,
    dest: Path,
) -> bool:
    """Write the model (merged or adapter) and tokenizer into ``dest``; returns True for an adapter."""
    import torch
    from accelerate.utils import is_peft_model

    dest.mkdir(parents=True, exist_ok=True)
    adapter = config.student.export == "adapter"
    if is_peft_model(model):
        if adapter:
            model.save_pretrained(dest)
            _point_adapter_at_base(dest, config.student.model)
        else:
            model = model.merge_and_unload()
    if not adapter:
        model = model.to(getattr(torch, export_dtype))
        model.config.use_cache = True
        model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if not (dest / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
        (dest / "tokenizer_config.json").read_text()
    ):
        raise WorkerError("export has no chat template: vLLM could not serve chat completions with it")
    return adapter


def _point_adapter_at_base(dest: Path, base_model: str) -> None:
    """peft records the local scratch path of the base; record the model as the spec names it."""
    path = dest / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def write_metadata(dest: Path, **fields: Any) -> tuple[dict[str, Any], str]:
    """Hash the export, write kubedistill.json next to it; returns (metadata, digest)."""
    files = hash_tree(dest)
    files.pop(METADATA_NAME, None)
    digest = model_digest(files)
    metadata = {
        "format": EXPORT_FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": files,
        "digest": digest,
    }
    (dest / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return metadata, digest


def publish(store: ObjectStore, src: Path, output_uri: str) -> None:
    """Upload an export: old marker removed first, files, stale objects removed, marker last."""
    marker_uri = join(output_uri, METADATA_NAME)
    try:
        if store.exists(marker_uri):
            store.delete(marker_uri)
        names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        for name in names:
            if name != METADATA_NAME:
                store.upload_file(src / name, join(output_uri, name))
        for obj in list(store.list(output_uri)):
            if obj.key not in names:
                store.delete(obj.uri)
        store.upload_file(src / METADATA_NAME, marker_uri)
    except StorageError as err:
        raise WorkerError(f"cannot upload the model to {output_uri}: {err}") from err
    log.info("model uploaded to %s (%d files)", output_uri, len(names))


def existing_export(store: ObjectStore, output_uri: str, fingerprint: str, export: str) -> TrainResult | None:
    """The result of an earlier run that already exported this very training, or None."""
    uri = join(output_uri, METADATA_NAME)
    try:
        if not store.exists(uri):
            return None
        metadata = json.loads(store.get_bytes(uri))
    except (StorageError, ValueError) as err:
        log.warning("ignoring existing export at %s: %s", output_uri, err)
        return None
    if metadata.get("fingerprint") != fingerprint or metadata.get("export") != export:
        return None
    metrics = metadata.get("metrics") or {}
    log.info("model already exported to %s by an earlier run (digest %s)", output_uri, str(metadata.get("digest"))[:12])
    trainer_config = metadata.get("trainer_config") or {}
    return TrainResult(
        model_uri=output_uri,
        digest=metadata["digest"],
        global_step=int(metadata.get("global_step", 0)),
        train_loss=metrics.get("train_loss"),
        tokens_per_second=metrics.get("tokens_per_second"),
        adapter=export == "adapter",
        objective=trainer_config.get("objective", "sft"),
        losses=metrics.get("losses") or {},
        teacher_tokens_scored=metrics.get("teacher_tokens_scored"),
    )
