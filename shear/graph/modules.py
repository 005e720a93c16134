"""Module-level rules: composed operators (peft LoRA) and RMS-style norms that erasure can rescale.

Both tables are keyed by a predicate on the module, so they recognise structure rather than one
library's class names: a LoRA linear is any module with ``base_layer``, ``lora_A`` and ``lora_B``
(peft 0.21's ``lora.Linear`` and its quantised siblings), whatever the ``requires_grad`` flags are.

Example:
    >>> from torch import nn
    >>> class MyRMSNorm(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.weight = nn.Parameter(torch.ones(4)); self.eps = 1e-6
    >>> register_norm_rescale(lambda m: isinstance(m, MyRMSNorm), eps_attr="eps")
    >>> norm_rescale_rule(MyRMSNorm()) is not None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shear.graph.ir import LoraComposite

__all__ = [
    "ZERO_PRESERVING_MODULES",
    "register_zero_preserving_module",
    "is_zero_preserving_module",
    "NormRule",
    "register_norm_rescale",
    "norm_rescale_rule",
    "is_lora_linear",
    "find_lora_composites",
]


@dataclass(frozen=True)
class NormRule:
    """How to rescale an RMS-style norm whose mean runs over a pruned width."""

    predicate: Callable[[nn.Module], bool]
    eps_attr: str
    """Attribute holding epsilon on the module (``variance_epsilon``, ``eps``)."""


NORM_RULES: list[NormRule] = []


def register_norm_rescale(predicate: Callable[[nn.Module], bool], eps_attr: str) -> None:
    """Declare modules matching ``predicate`` as RMS norms ``x * rsqrt(mean(x^2) + eps) * w``."""
    NORM_RULES.insert(0, NormRule(predicate, eps_attr))


def norm_rescale_rule(module: nn.Module) -> NormRule | None:
    for rule in NORM_RULES:
        if rule.predicate(module) and hasattr(module, rule.eps_attr):
            return rule
    return None


def _is_rms_like(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1


register_norm_rescale(_is_rms_like, "variance_epsilon")
register_norm_rescale(lambda m: isinstance(m, nn.RMSNorm), "eps")


ZERO_PRESERVING_MODULES: list[Callable[[nn.Module], bool]] = []
"""Predicates for elementwise modules with f(0) = 0 whose inner ops do not (tanh-GELU, QuickGELU)."""

_ACTIVATION_NAMES = {
    "NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
    "PytorchGELUTanh", "SiLUActivation", "AccurateGELUActivation", "MishActivation", "GELU", "SiLU",
    "ReLU", "Tanh", "Hardswish", "Mish", "ClippedGELUActivation",
}  # fmt: skip


def register_zero_preserving_module(predicate: Callable[[nn.Module], bool]) -> None:
    """Declare modules matching ``predicate`` as elementwise with f(0) = 0 as a whole."""
    ZERO_PRESERVING_MODULES.insert(0, predicate)


register_zero_preserving_module(lambda m: type(m).__name__ in _ACTIVATION_NAMES)


def is_zero_preserving_module(m: nn.Module) -> bool:
    return any(p(m) for p in ZERO_PRESERVING_MODULES)


def is_lora_linear(m: nn.Module) -> bool:
    """A LoRA linear by structure: a base layer plus ``lora_A``/``lora_B`` module dicts."""
    a, b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
    return (
        isinstance(getattr(m, "base_layer", None), nn.Module)
        and isinstance(a, nn.ModuleDict)
        and isinstance(b, nn.ModuleDict)
        and len(a) > 0
    )


def find_lora_composites(model: nn.Module) -> list[LoraComposite]:
    """Every LoRA linear of ``model`` as a :class:`LoraComposite` (names as in named_parameters)."""
    out: list[LoraComposite] = []
    for name, m in model.named_modules():
        if not is_lora_linear(m):
            continue
        adapters = tuple(k for k in m.lora_A.keys())  # type: ignore[union-attr]
        scaling = getattr(m, "scaling", {}) or {}
        out.append(
            LoraComposite(
                module=name,
                base=f"{name}.base_layer",
                adapters=adapters,
                lora_a=tuple(f"{name}.lora_A.{k}.weight" for k in adapters),
                lora_b=tuple(f"{name}.lora_B.{k}.weight" for k in adapters),
                scaling=tuple(float(scaling.get(k, 1.0)) for k in adapters),
                rank=tuple(int(m.lora_A[k].weight.shape[0]) for k in adapters),  # type: ignore[index]
            )
        )
    return out
