"""Tiny chat models built from a config: a real model with no download.

Local mode's demo and the test suites need LLMs on machines that cannot reach a
model hub. This builds a real ``LlamaForCausalLM`` (random weights) with a real
byte-level BPE tokenizer trained on the fly, a ChatML-style chat template and a
generation config, saved with ``save_pretrained`` (safetensors). Every loader in
the project (transformers, trl, peft, vLLM's CPU build) reads it through its
normal code path.

Shape constraints that matter:
- head_dim must be 64: vLLM's CPU attention rejects e.g. head_dim 16 at the first request.
- The chat template wraps the assistant's reply *and its `<|im_end|>`* in
  `{% generation %}...{% endgeneration %}`: trl's ``assistant_only_loss`` uses these
  markers as is, and the end-of-turn token is trained so the model learns to stop.
- The template is prefix-preserving: rendering ``messages[:k]`` with
  ``add_generation_prompt=True`` is a string prefix of rendering ``messages[:k+1]``,
  which trl's prompt/completion (completion-only loss) path relies on.
- eos is `<|im_end|>` (tokenizer and generation_config), so vLLM stops at the end of a turn.

Deterministic: the same parameters give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
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
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
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
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))  # type: ignore[no-untyped-call]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
