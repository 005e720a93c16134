"""shear's tiny reference LLaMA: ~1M parameters trained on the committed corpus, shipped in the repo.

It has real trained weights (4 layers, hidden 128, 4 query / 2 kv heads, intermediate 384, a
2048-token byte-level BPE tokenizer, tied embeddings; see ``tiny_llama/TRAINING.json`` and
``tools/train_tiny_llama.py``), so tests and ``--quick`` benchmarks can measure perplexity changes
in milliseconds. Stored as float16, loaded as float32 (or ``dtype``).

Example:
    >>> from shear.zoo import load_tiny_llama
    >>> model, tokenizer, _, name = load_tiny_llama()
    >>> name, model.config.num_hidden_layers, len(tokenizer)
    ('tiny-llama', 4, 2048)
"""

from __future__ import annotations

from pathlib import Path

import torch

from shear.errors import ModelLoadError
from shear.zoo.loaded import LoadedModel

__all__ = ["TINY_LLAMA_DIR", "TINY_LLAMA_NAME", "load_tiny_llama"]

TINY_LLAMA_DIR = Path(__file__).resolve().parent / "tiny_llama"
TINY_LLAMA_NAME = "tiny-llama"


def load_tiny_llama(*, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The tiny trained LLaMA and its tokenizer, from the files inside the package (no network)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not (TINY_LLAMA_DIR / "model.safetensors").is_file():
        raise ModelLoadError(
            f"{TINY_LLAMA_DIR}/model.safetensors is missing; reinstall shear or rebuild it with "
            "`python tools/train_tiny_llama.py`"
        )
    model = LlamaForCausalLM.from_pretrained(TINY_LLAMA_DIR, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA_DIR)
    model.eval()
    return LoadedModel(model, tokenizer, TINY_LLAMA_DIR, TINY_LLAMA_NAME)
