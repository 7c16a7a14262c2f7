"""Cached tiny chat models for tests (the builder lives in kubedistill.local.tiny_model).

The model is a real `LlamaForCausalLM` (random weights) with a real byte-level BPE tokenizer
trained with `tokenizers` on a small corpus, a ChatML-style chat template and a generation
config, saved with `save_pretrained` (safetensors). Every loader in the project (transformers,
trl, peft, vLLM's CPU build) reads it through its normal code path.

    from tests.support.tiny_model import build_tiny_chat_model, cached_tiny_chat_model

    model_dir = build_tiny_chat_model(tmp_path / "student")               # builds now
    model_dir = cached_tiny_chat_model(tmp_path_factory.getbasetemp())    # once per params
    model_dir = tiny_chat_model()             # once per params per process (temp dir, removed at exit)

Shape constraints that matter:
- head_dim must be 64: vLLM's CPU attention rejects e.g. head_dim 16 at the first request.
  hidden_size / num_attention_heads = 128 / 2 = 64.
- The chat template wraps the assistant's reply *and its `<|im_end|>`* in
  `{% generation %}...{% endgeneration %}`. trl 1.16 `SFTConfig(assistant_only_loss=True)` uses
  these markers as is (`has_generation_markers`), and warns unless the last masked token is an
  added token (`is_chat_template_stop_token_trained`): so the end-of-turn token is inside the
  block and the student learns to stop.
- The template is prefix-preserving: rendering `messages[:k]` with `add_generation_prompt=True`
  is a string prefix of rendering `messages[:k+1]`, which trl's prompt/completion
  (completion-only loss) path relies on.
- eos is `<|im_end|>` (tokenizer and generation_config), so vLLM stops at the end of a turn.

Deterministic for a given set of parameters: the same seed and corpus give byte-identical files.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubedistill.local.tiny_model import (  # noqa: F401  (re-exported for tests)
    BOS,
    CHAT_TEMPLATE,
    EOS,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    build_tiny_chat_model,
    default_corpus,
)


def _params_key(params: dict[str, Any]) -> str:
    # Defaults filled in, so `seed=0` and no seed share one build.
    signature = inspect.signature(build_tiny_chat_model)
    material = {name: p.default for name, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(params) - set(material)
    if unknown:
        raise TypeError(f"unknown tiny model parameters: {sorted(unknown)}")
    material.update(params)
    corpus = material.get("corpus")
    if corpus is not None:
        material["corpus"] = hashlib.sha256("\n".join(corpus).encode()).hexdigest()
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_tiny_chat_model(cache_root: str | os.PathLike[str], **params: Any) -> Path:
    """`build_tiny_chat_model(**params)` once per distinct params under `cache_root`.

    Pass a session-scoped dir (e.g. `tmp_path_factory.getbasetemp()`); the result is shared, so
    treat it as read-only (copy it before modifying). Built into a temp dir and renamed, so a
    concurrent or interrupted build never leaves a half-written model behind.
    """
    if params.get("corpus") is not None:
        params["corpus"] = list(params["corpus"])
    root = Path(cache_root) / "tiny-models"
    target = root / _params_key(params)
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_chat_model(tmp, **params)
        try:
            tmp.rename(target)
        except OSError:  # someone else won the race: theirs is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_PROCESS_CACHE: Path | None = None


def tiny_chat_model(**params: Any) -> Path:
    """`cached_tiny_chat_model` in a per-process temp dir that is removed at interpreter exit.

    Shared by every caller in the process (treat it as read-only). `params` as for
    `build_tiny_chat_model`, without `path`.
    """
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = Path(tempfile.mkdtemp(prefix="kubedistill-tiny-models-"))
        atexit.register(shutil.rmtree, _PROCESS_CACHE, ignore_errors=True)
    return cached_tiny_chat_model(_PROCESS_CACHE, **params)
