"""Where a model's decoder blocks are: the one answer every layer asks (EBFT, calibration, saliency,
verification, layer-streamed planning, FSDP); and the residual branches inside a block (attention,
MLP), which depth pruning erases whole (:class:`RemovedBranch`, :func:`removed_blocks`).

A decoder LLM is a stack of blocks in an ``nn.ModuleList`` at a path that depends on the
architecture; :data:`BLOCK_PATHS` lists the paths tried, in order, under a peft wrapper's base model.

Example:
    >>> from torch import nn
    >>> lm = nn.Module(); lm.model = nn.Module(); lm.model.layers = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    >>> block_path(lm), len(decoder_blocks(lm))
    ('model.layers', 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import ModelError

__all__ = [
    "BLOCK_PATHS", "unwrap_model", "block_path", "decoder_blocks", "BranchSlot", "BRANCH_LAYOUTS", "BRANCH_KINDS",
    "REMOVED_BLOCKS_FIELD", "branch_layout", "RemovedBranch", "removed_blocks", "remove_branch", "restore_removed_blocks",
]

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


# -- the branches of a decoder layer, and branches removed whole -------------------------------------


@dataclass(frozen=True)
class BranchSlot:
    """Where one residual branch sits in a decoder layer: ``layer.<attr>`` reads ``layer.<norm>(x)``
    and its output is added to the residual stream ``x``."""

    kind: str
    """``attention`` or ``mlp``."""
    attr: str
    """Attribute of the decoder layer holding the branch module."""
    norm: str
    """Attribute of the norm that feeds this branch and nothing else."""


_PRE_NORM = (BranchSlot("attention", "self_attn", "input_layernorm"), BranchSlot("mlp", "mlp", "post_attention_layernorm"))

BRANCH_LAYOUTS: dict[str, tuple[BranchSlot, ...]] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
}
"""``config.model_type`` -> the residual branches of its decoder layer, for architectures whose layer is
``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` and whose attention keeps its cache under
``layer_idx``. A new architecture with that layout is one entry here."""

REMOVED_BLOCKS_FIELD = "shear_removed_blocks"
"""Config field listing, per layer, the branch kinds a partly erased layer lost (``[[], ["attention"]]``);
:func:`restore_removed_blocks` rebuilds those layers from it. Absent when no layer lost only one branch."""

BRANCH_KINDS: tuple[str, ...] = ("attention", "mlp")


def branch_layout(model: nn.Module) -> tuple[BranchSlot, ...]:
    """The branches of ``model``'s decoder layers; :class:`ModelError` saying why when it has none.

    Example:
        >>> branch_layout(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        shear.errors.ModelError: Linear (model_type None): whole attention/MLP blocks ...
    """
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    layout = BRANCH_LAYOUTS.get(str(model_type))
    if layout is None or block_path(model) is None:
        raise ModelError(
            f"{type(base).__name__} (model_type {model_type!r}): whole attention/MLP blocks are removable only in "
            "decoder layers that add self_attn(input_layernorm(x)) and mlp(post_attention_layernorm(x)) to the "
            f"residual stream, with the attention's cache slot under layer_idx: the LLaMA family "
            f"({', '.join(BRANCH_LAYOUTS)}). Add the layout to shear.model.blocks.BRANCH_LAYOUTS, or prune widths "
            "instead (kinds=[channel,head])"
        )
    return layout


class RemovedBranch(nn.Module):
    """Stands in for an erased attention or MLP branch: it adds exactly zero to the residual stream.

    An erased attention still advances its layer's slot of the generation cache by a ``[b, 1, n, 1]``
    placeholder, so ``cache.get_seq_length()`` (read from layer 0) and the causal masks stay right.

    Example:
        >>> import torch
        >>> RemovedBranch("mlp")(torch.ones(1, 2, 4)).abs().sum().item()
        0.0
    """

    def __init__(self, kind: str, layer_idx: int | None = None) -> None:
        super().__init__()
        if kind not in BRANCH_KINDS:
            raise ModelError(f"RemovedBranch kind must be one of {BRANCH_KINDS}, got {kind!r}")
        self.kind = kind
        self.layer_idx = layer_idx

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer_idx={self.layer_idx}"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zero = torch.zeros_like(hidden_states)
        if self.kind == "mlp":
            return zero
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None:
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(mark, mark, self.layer_idx)
        return zero, None


def removed_blocks(model: nn.Module) -> list[tuple[str, ...]]:
    """Per decoder layer, the branch kinds erased whole (``()`` for a complete layer).

    What a per-layer writer (Nemotron-NAS ``no_op`` blocks, GGUF) needs; whole layers erased are not
    listed, they are gone.

    Example:
        >>> lm = nn.Module(); lm.model = nn.Module(); lm.model.layers = nn.ModuleList([nn.Module(), nn.Module()])
        >>> lm.model.layers[1].mlp = RemovedBranch("mlp")
        >>> removed_blocks(lm)
        [(), ('mlp',)]
    """
    return [
        tuple(m.kind for m in layer.children() if isinstance(m, RemovedBranch)) for layer in decoder_blocks(model)
    ]


def remove_branch(layer: nn.Module, slot: BranchSlot, layer_idx: int) -> None:
    """Put a :class:`RemovedBranch` in ``slot`` of decoder ``layer`` and an identity for its norm."""
    setattr(layer, slot.attr, RemovedBranch(slot.kind, layer_idx if slot.kind == "attention" else None))
    setattr(layer, slot.norm, nn.Identity())


def restore_removed_blocks(model: nn.Module) -> nn.Module:
    """Erase again the branches the config's :data:`REMOVED_BLOCKS_FIELD` lists (a model just built
    from a saved config); returns ``model``. A model without the field is returned as it is."""
    config = getattr(unwrap_model(model), "config", None)
    listed = getattr(config, REMOVED_BLOCKS_FIELD, None)
    if not listed:
        return model
    layers = decoder_blocks(model)
    if len(listed) != len(layers):
        raise ModelError(
            f"config.{REMOVED_BLOCKS_FIELD} lists {len(listed)} layers, the model has {len(layers)}: the config was "
            "edited or belongs to another model"
        )
    slots = {s.kind: s for s in branch_layout(model)}
    for i, kinds in enumerate(listed):
        for kind in kinds:
            if kind not in slots:
                raise ModelError(f"config.{REMOVED_BLOCKS_FIELD}[{i}] names {kind!r}; expected some of {BRANCH_KINDS}")
            remove_branch(layers[i], slots[kind], i)
    return model
