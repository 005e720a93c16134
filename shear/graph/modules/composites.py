"""Module-level rules: composed operators (peft LoRA) and modules that are zero-preserving as a whole.

Both are keyed by a predicate on the module, so they recognise structure rather than one
library's class names: a LoRA linear is any module with ``base_layer``, ``lora_A`` and ``lora_B``
(peft 0.21's ``lora.Linear`` and its quantised siblings), whatever the ``requires_grad`` flags are.
A zero-preserving module maps a zeroed channel to zero although ops inside it do not (a tanh-GELU's
``1 + tanh(...)``, an RMS norm's ``rsqrt(... + eps)``): the ``zero_preserving`` facet of the one
module table (:mod:`shear.graph.modules.table`). RMS norms are in :mod:`shear.graph.modules.norms`.

Example:
    >>> from torch import nn
    >>> class Swish(nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(x)
    >>> register_zero_preserving_module(lambda m: type(m).__name__ == "Swish")  # a global table: no local names
    >>> is_zero_preserving_module(Swish()), is_zero_preserving_module(nn.Sigmoid())
    (True, False)
    >>> is_zero_preserving_module(nn.RMSNorm(4))
    True
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from shear.graph.ir import LoraComposite
from shear.graph.modules.norms import find_rms_norm
from shear.graph.modules.table import PredicateView, lookup_module, register_module

__all__ = [
    "ZERO_PRESERVING_MODULES",
    "register_zero_preserving_module",
    "is_zero_preserving_module",
    "is_lora_linear",
    "find_lora_composites",
]


ZERO_PRESERVING_MODULES = PredicateView("zero_preserving")
"""Read-only view, newest first: predicates for elementwise modules with f(0) = 0 whose inner ops do
not (tanh-GELU, QuickGELU), derived from the module table."""

_ACTIVATION_NAMES = {
    "NewGELUActivation", "GELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
    "PytorchGELUTanh", "SiLUActivation", "AccurateGELUActivation", "MishActivation", "GELU", "SiLU", "BloomGelu",
    "ReLU", "Tanh", "Hardswish", "Mish", "ClippedGELUActivation",
}  # fmt: skip


def register_zero_preserving_module(predicate: Callable[[nn.Module], bool]) -> None:
    """Declare modules matching ``predicate`` as elementwise with f(0) = 0 as a whole: a thin
    wrapper over ``register_module(predicate, zero_preserving=True)``."""
    register_module(predicate, zero_preserving=True)


register_zero_preserving_module(lambda m: type(m).__name__ in _ACTIVATION_NAMES)


def is_zero_preserving_module(m: nn.Module) -> bool:
    """Registered as zero-preserving, or a known RMS norm (``x * rsqrt(...) * w`` is 0 where x is)."""
    return bool(lookup_module(m, "zero_preserving")) or find_rms_norm(m) is not None


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
