"""Where a model's decoder blocks are: the one answer every layer asks (EBFT, calibration, saliency,
verification, layer-streamed planning, FSDP).

A decoder LLM is a stack of blocks in an ``nn.ModuleList`` at a path that depends on the
architecture; :data:`BLOCK_PATHS` lists the paths tried, in order, under a peft wrapper's base model.

Example:
    >>> from torch import nn
    >>> lm = nn.Module(); lm.model = nn.Module(); lm.model.layers = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    >>> block_path(lm), len(decoder_blocks(lm))
    ('model.layers', 2)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shear.errors import ModelError

__all__ = ["BLOCK_PATHS", "unwrap_model", "block_path", "decoder_blocks"]

BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # LLaMA, Qwen2, Mistral, Gemma, Phi-3 (…ForCausalLM)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.language_model.layers",  # multimodal wrappers
    "transformer.blocks",  # MPT
    "layers",  # a bare LlamaModel and friends
    "decoder.layers",  # a bare OPTModel
    "h",  # a bare GPT2Model
)
"""Attribute paths (from the unwrapped model) where decoder blocks live, tried in order."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (``PeftModel.get_base_model()``), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def _get_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def block_path(model: nn.Module) -> str | None:
    """The first of :data:`BLOCK_PATHS` that holds a non-empty ``nn.ModuleList`` under the unwrapped
    ``model``, or None for a model that is not a decoder stack."""
    base = unwrap_model(model)
    for path in BLOCK_PATHS:
        blocks = _get_path(base, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path
    return None


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a (possibly peft-wrapped) HF-style decoder LLM, in order.

    Raises :class:`ModelError` naming the model class when none of :data:`BLOCK_PATHS` holds a
    non-empty ``nn.ModuleList``.

    Example:
        >>> decoder_blocks(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        shear.errors.ModelError: Linear has no decoder blocks: ...
    """
    path = block_path(model)
    if path is None:
        raise ModelError(
            f"{type(unwrap_model(model)).__name__} has no decoder blocks: this step needs a decoder LLM whose "
            f"blocks are an nn.ModuleList at one of {', '.join(BLOCK_PATHS)} (a transformers causal LM such as "
            "LlamaForCausalLM). Add the path to shear.model.blocks.BLOCK_PATHS for a new architecture."
        )
    blocks = _get_path(unwrap_model(model), path)
    assert isinstance(blocks, nn.ModuleList)
    return blocks
