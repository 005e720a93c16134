"""Small facts about a model that every layer asks: which tensors are LoRA's, a weight's name without
peft's wrapping, where the logits are in an output. One answer each, so the layers cannot disagree.

Where the model lives (device, dtype) is :mod:`shear.model.devices`. This module imports nothing of
shear but the errors, so the graph's kernels, training, evaluation, data and the passes can all use it.

Example:
    >>> is_lora_param("base_model.model.layers.0.q_proj.lora_A.default.weight")
    True
    >>> is_lora_param("model.layers.0.q_proj.weight"), is_lora_param("flora_gate.weight")
    (False, False)
    >>> strip_peft_prefix("base_model.model.layers.0.mlp.up_proj.base_layer.weight")
    'layers.0.mlp.up_proj.base_layer.weight'
    >>> base_weight_name("base_model.model.layers.0.mlp.up_proj.base_layer.weight")
    'layers.0.mlp.up_proj.weight'
    >>> import torch
    >>> logits_of((torch.zeros(2), None)).shape
    torch.Size([2])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shear.errors import ModelError

__all__ = ["LORA_PARTS", "PEFT_PREFIX", "is_lora_param", "strip_peft_prefix", "base_weight_name", "logits_of", "forward_logits"]

LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
"""Module names peft gives a LoRA (or DoRA) adapter's tensors: any name with one of these as a part is
an adapter tensor (``...q_proj.lora_A.default.weight``, ``...embed.lora_embedding_B.default``)."""

PEFT_PREFIX = "base_model.model."
"""What a ``PeftModel`` puts before the names of the wrapped model's tensors."""


def is_lora_param(name: str) -> bool:
    """Whether a tensor name (from ``named_parameters`` or ``state_dict``) is a LoRA adapter's (A, B,
    embedding A/B, DoRA magnitude): budgets do not count them, training trains them."""
    return any(part in LORA_PARTS for part in name.split("."))


def strip_peft_prefix(name: str) -> str:
    """``name`` without peft's leading ``base_model.model.`` (unchanged when it has none)."""
    return name.removeprefix(PEFT_PREFIX)


def base_weight_name(name: str) -> str:
    """The name a tensor of a peft-wrapped model has in the plain model: no ``base_model.model.``
    prefix, and ``.base_layer.`` (peft's wrapper around the frozen layer, nested for LoRA on several
    tensors of one module) folded away."""
    return re.sub(r"(?:\.base_layer)+\.", ".", strip_peft_prefix(name))


def logits_of(output: Any) -> torch.Tensor:
    """The logits (the main output tensor) of a model call: the output itself when it is a tensor, its
    ``.logits``, else the first tensor of a tuple, list or mapping. Raises :class:`ModelError`.

    Example:
        >>> logits_of({"loss": None, "scores": torch.ones(1)})
        tensor([1.])
        >>> logits_of("text")
        Traceback (most recent call last):
        ...
        shear.errors.ModelError: cannot find an output tensor in str: ...
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise ModelError(
        f"cannot find an output tensor in {type(output).__name__}: the model must return logits (a tensor, "
        "an output with .logits, or a tuple/list/dict whose first tensor is the logits)"
    )


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on example inputs and return :func:`logits_of` its output: a mapping is passed as
    keywords (with ``use_cache=False`` where the model's config has a cache), a tuple or list
    positionally, anything else as the one argument.

    Example:
        >>> forward_logits(torch.nn.Linear(2, 3), torch.ones(1, 2)).shape
        torch.Size([1, 3])
    """
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            kwargs.setdefault("use_cache", False)
        out = model(**kwargs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return logits_of(out)
