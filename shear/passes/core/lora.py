"""The ``lora`` and ``merge-lora`` passes: add peft LoRA adapters before pruning, fold them away after.

LoRAShear prunes and recovers through LoRA. ``lora`` wraps a model that has no adapters with peft
LoRA on every Linear of its blocks (a no-op, with a note, when it has them already), so that
``discover-groups`` sees the composed LoRA operators; it stores a :class:`LoraState` (passes that
train through LoRA, ``lhspg``, require it, so the pass manager adds ``lora`` where it is missing),
and, when it wrapped the model, reports that the graph is stale so discovery runs again.
``merge-lora`` folds ``B @ A`` into the base
weights and unwraps the peft model, giving back a plain model of the original class; with
``only_added=true`` it only unwraps adapters that ``lora`` added (a user's own adapters stay).

Example:
    >>> AddLora(r=8).name, MergeLora().name          # "lora{r=8}", "merge-lora"
    ('lora', 'merge-lora')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shear.errors import PipelineError
from shear.passes.base import Context, Pass, PassResult, register_analysis, register_pass

__all__ = ["AddLora", "MergeLora", "LoraState"]


@dataclass(frozen=True)
class LoraState:
    """What the ``lora`` pass found: whether it added the adapters (``False``: the model had its own)."""

    added: bool
    """True when ``lora`` wrapped the model; ``merge-lora{only_added=true}`` unwraps only then."""
    r: int
    """The rank ``lora`` was asked for."""


register_analysis("lora", LoraState)


@register_pass
@dataclass(frozen=True)
class AddLora(Pass):
    """Wrap the model with peft LoRA adapters on every block Linear, unless it has adapters."""

    name: ClassVar[str] = "lora"
    ensures: ClassVar[tuple[type, ...]] = (LoraState,)
    restructures: ClassVar[bool] = True

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (scaling = alpha / r)."""
    seed: int = 0
    """Seeds the adapters' initialisation (the global RNG is left as it was)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise PipelineError(f"lora: r must be >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if self.seed < 0:
            raise PipelineError(f"lora: seed must be >= 0, got {self.seed}")

    def run(self, ctx: Context) -> PassResult:
        from shear.training import ensure_lora, lora_layers

        ctx.model, message = ensure_lora(ctx.model, r=self.r, alpha=self.alpha, seed=self.seed)
        ctx.put(LoraState(added=message is not None, r=self.r))
        if message is None:
            return PassResult(False, f"the model has {len(lora_layers(ctx.model))} LoRA layers already; kept them")
        ctx.warn(f"lora: the model had no LoRA adapters, so shear added them: {message}")
        return PassResult(True, message, {"layers": len(lora_layers(ctx.model))}, preserves_graph=False)


@register_pass
@dataclass(frozen=True)
class MergeLora(Pass):
    """Fold every LoRA adapter into its base weight and unwrap the peft model."""

    name: ClassVar[str] = "merge-lora"
    restructures: ClassVar[bool] = True

    only_added: bool = False
    """Only unwrap adapters the ``lora`` pass added; leave a user's own adapters in place."""

    def run(self, ctx: Context) -> PassResult:
        from shear.training import lora_layers

        state = ctx.find(LoraState)
        added = state is not None and state.added
        if self.only_added and not added:
            return PassResult(False, "the adapters are the user's own; kept them (only_added=true)")
        n = len(lora_layers(ctx.model))
        if n == 0:
            return PassResult(False, "no LoRA adapters to merge")
        merge = getattr(ctx.model, "merge_and_unload", None)
        if merge is None:
            raise PipelineError(
                f"merge-lora: {type(ctx.model).__name__} has LoRA layers but is not a peft model; "
                "merge them with peft's merge_and_unload on the PeftModel that made them"
            )
        ctx.model = merge()
        message = f"merged {n} LoRA layers into their base weights; {type(ctx.model).__name__} again"
        return PassResult(True, message, preserves_graph=False)
