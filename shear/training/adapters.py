"""LoRA adapters for training: add them once, list them, fold them into the base weights.

:func:`ensure_lora` wraps a model with peft LoRA on every ``nn.Linear`` of its blocks (not the LM
head, classifier or embeddings) unless it already has LoRA adapters. :func:`merge_and_reset_lora`
folds ``B @ A * scaling`` into each base weight and restarts the adapters (A Kaiming-uniform as peft
initialises it, B zero), which LHSPG does at the end of every pruning period.

Example:
    >>> import transformers                                        # doctest: +SKIP
    >>> model = transformers.LlamaForCausalLM(cfg)                 # doctest: +SKIP
    >>> model, msg = ensure_lora(model, r=8)                       # doctest: +SKIP
    >>> msg                                                        # doctest: +SKIP
    'added LoRA adapters (r=8) to 14 linear layers'
    >>> ensure_lora(model)[1] is None                              # doctest: +SKIP
    True
    >>> merge_and_reset_lora(model)                                # doctest: +SKIP
    14
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shear.errors import TrainingError
from shear.model.devices import seeded_draw
from shear.model.dtensor import gather, writable
from shear.model.facts import is_lora_param

__all__ = ["ensure_lora", "lora_layers", "merge_and_reset_lora", "is_lora_param", "lora_target_names"]

_HEAD_NAMES = ("lm_head", "classifier", "score", "embed_out", "output_projection", "qa_outputs")


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(module name, peft LoraLayer)`` for every LoRA-adapted layer of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adaptable(m: nn.Module) -> bool:
    """A linear peft can wrap: ``nn.Linear`` and its subclasses (Falcon's ``FalconLinear``), and
    transformers' ``Conv1D`` (GPT-2), which peft adapts with ``fan_in_fan_out``."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def lora_target_names(model: nn.Module) -> list[str]:
    """Full names of the linear modules :func:`ensure_lora` adapts.

    Every ``nn.Linear`` (subclasses included) and transformers ``Conv1D``, except output heads
    (``lm_head``, ``classifier``, ``score``, ... and whatever ``get_output_embeddings()`` returns),
    anything inside an embedding module, and ``nn.MultiheadAttention``'s output projection.
    """
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.add(id(out))
    embed_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.Embedding) and n]
    # nn.MultiheadAttention reads its out_proj's weight directly: an adapter there would never run
    mha_parts = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    names = []
    for name, m in model.named_modules():
        if not _adaptable(m) or id(m) in heads or id(m) in mha_parts:
            continue
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES or any(name.startswith(p) for p in embed_prefixes):
            continue
        names.append(name)
    return names


def ensure_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, str | None]:
    """``model`` with LoRA adapters, and a message saying what was added (``None``: it had them).

    Without ``target_modules`` every Linear of the transformer blocks is adapted (see
    :func:`lora_target_names`); the base weights come back frozen, the adapters trainable. The result
    is a peft ``PeftModel`` around ``model`` (which is modified: peft injects layers in place).
    The adapters are initialised from ``seed`` (the global RNG is left as it was), so the same call
    gives the same adapters whatever ran before it.
    """
    if lora_layers(model):
        return model, None
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules) if target_modules is not None else lora_target_names(model)
    if not targets:
        raise TrainingError(
            f"{type(model).__name__} has no linear layers outside its head and embeddings to adapt; "
            "pass target_modules=[...] naming the layers to train"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.train(was_training)  # peft's new modules start in train mode: GPT-2's dropout would switch on
    n = len(lora_layers(peft_model))
    return peft_model, f"added LoRA adapters (r={r}) to {n} linear layers"


MERGE_BLOCK_ELEMENTS = 1 << 23
"""Elements of a base weight :func:`merge_and_reset_lora` works on in fp32 at once (32 MB): the merge
of a 16-bit weight never holds whole fp32 copies of it and of ``B @ A``."""


@torch.no_grad()
def merge_and_reset_lora(model: nn.Module, *, generator: torch.Generator | None = None) -> int:
    """Fold every active LoRA adapter into its base weight, then re-initialise the adapter.

    ``W += B @ A * scaling`` is computed in fp32 and cast back to the base weight's dtype; A is reset
    Kaiming-uniform (a=sqrt(5), as peft does, drawing from ``generator`` or the global RNG) and B to
    zero; ``generator`` is a seeded CPU generator whatever the device of the adapters (the draw is
    made on the CPU and copied, so a CUDA run re-draws the same A as a CPU run), in place, so optimizer references stay valid (reset their state yourself if wanted, see
    :func:`~shear.training.optim.reset_optimizer_state`). The model's function is unchanged up
    to rounding. FSDP2-sharded (``DTensor``) weights and adapters are gathered whole per layer and
    written back shard by shard (every rank must call it). Returns the number of adapters merged.
    """
    layers = lora_layers(model)
    if not layers:
        raise TrainingError(
            f"{type(model).__name__} has no LoRA adapters to merge; add them with ensure_lora(model) first"
        )
    merged = 0
    for name, layer in layers:
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None or not hasattr(layer, "lora_A"):
            raise TrainingError(f"LoRA layer {name!r} wraps {type(base).__name__} without a weight; cannot merge it")
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise TrainingError(f"LoRA layer {name!r} uses DoRA, which merge_and_reset_lora does not fold; use plain LoRA")
            a_param = layer.lora_A[adapter].weight
            b = layer.lora_B[adapter].weight
            left, right = gather(b).float(), gather(a_param).float()
            if getattr(layer, "fan_in_fan_out", False):
                left, right = right.T, left.T
            scaling = float(layer.scaling[adapter])
            with writable(weight) as w:  # in blocks of rows: no whole fp32 copies of W and B @ A
                rows = max(1, MERGE_BLOCK_ELEMENTS // max(1, w[:1].numel()))
                for i in range(0, w.shape[0], rows):
                    delta = (left[i : i + rows] @ right) * scaling
                    w[i : i + rows] = (w[i : i + rows].float() + delta.to(w.device)).to(w.dtype)
            bias = getattr(layer.lora_B[adapter], "bias", None)
            if bias is not None and getattr(base, "bias", None) is not None:
                with writable(base.bias) as base_bias:
                    lora_bias = gather(bias).float() * float(layer.scaling[adapter])
                    base_bias.copy_((base_bias.float() + lora_bias).to(base_bias.dtype))
                bias.zero_()
            with writable(a_param) as a:  # drawn whole, so a sharded run re-draws the same A
                if generator is None or generator.device == a.device:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                else:  # a CPU generator: draw on the CPU and copy, the same numbers on any device
                    seeded_draw(a, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
            b.zero_()
            merged += 1
    return merged
