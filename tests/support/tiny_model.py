"""A tiny chat LLM built on the fly: no weights can be downloaded on the test machines.

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
import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BOS = "<|endoftext|>"
EOS = "<|im_end|>"
IM_START = "<|im_start|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD]

# ChatML with generation markers (see module docstring). Kept free of `tools` handling: the
# project does not train tool calls. A missing system message is simply not rendered, so a
# conversation's token count depends only on its own messages.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_WORD_TEXT = (
    "the a an model student teacher answer question data train small large fast slow good "
    "bad cluster node pod job run stage test value result number sum total add plus minus "
    "times equals is are was be what how why when which who please give tell me you we they "
    "it this that one two three four five six seven eight nine ten zero yes no true false "
    "hello world cat dog red blue green tree house river city day night word letter reverse "
    "upper lower first last list sort count json key name color of in on to for with and or "
    "not from by at as if then else because so very more less than"
)
_WORDS = _WORD_TEXT.split()


def default_corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """English-ish sentences, arithmetic and small JSON: enough for a BPE vocab of ~1-2k."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            words = rng.choices(_WORDS, k=rng.randint(4, 14))
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
            out.append(f"What is {a} {op} {b}? {a} {op} {b} = {val}")
        elif kind == 2:
            w = rng.choice(_WORDS)
            out.append(f"Reverse the word {w}: {w[::-1]}. Upper case: {w.upper()}.")
        else:
            obj = {rng.choice(_WORDS): rng.randint(0, 100), "name": rng.choice(_WORDS)}
            out.append(json.dumps(obj))
    return out


def _train_tokenizer(corpus: Sequence[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer, length=len(corpus))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 30,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START]})
    return fast


def build_tiny_chat_model(
    path: str | os.PathLike[str],
    *,
    vocab_size: int = 1024,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    with_chat_template: bool = True,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    dtype: str = "float32",
) -> Path:
    """Build and save a tiny Llama chat model into `path` (created; must not hold a model).

    `corpus` trains the tokenizer (default: `default_corpus(seed)`); pass your task's text so
    its words become single tokens. `vocab_size` is the BPE target: a small corpus yields fewer
    tokens, and the model's vocabulary is exactly the tokenizer's size. `with_chat_template=False`
    leaves the template out (for pre-flight checks that must refuse such a model).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size // num_heads != 64:
        raise ValueError("head_dim (hidden_size // num_heads) must be 64 for vLLM's CPU attention")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    texts = list(corpus) if corpus is not None else default_corpus(seed)
    tokenizer = _train_tokenizer(texts, vocab_size)
    if with_chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
