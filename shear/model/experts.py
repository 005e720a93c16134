"""Absent experts: what a zeroed MoE router row means when the model runs.

shear masks a structure by zeroing its primary slices. For an expert those are its router row (and
router bias): but a zero row gives logit 0, not "absent", and the expert would still take a top-k
slot. So a router shear knows (:mod:`shear.graph.modules.experts`) gets a forward hook that gives
every expert whose router row (weight and bias) is exactly zero the logit ``-inf`` and routes
again with the router's own rule. Then the masked model *is* the model without those experts,
whatever the normalisation:

- Mixtral (softmax, top-k, renormalised over the k) and Qwen3-MoE with ``norm_topk_prob``: the
  softmax denominator cancels, and ``-inf`` is never among the top k;
- Qwen3-MoE without ``norm_topk_prob``: the softmax over all experts is the softmax over the
  remaining ones, since ``exp(-inf) = 0``;
- gpt-oss (top-k of the logits, softmax over the k): ``-inf`` is never picked.

So erasing the experts (router rows and expert slices removed, ``num_experts`` rewritten) is
exact. The hook changes nothing while no row is zero (the model's own outputs are returned), it is
skipped while ``torch.export`` traces, and it is a module-level function, so ``deepcopy`` and
``pickle`` keep it. :func:`route_around_absent_experts` installs it (idempotent); shear calls it
where it zeroes an expert and before it records a masked model for verification.

Example:
    >>> import torch, transformers as tf
    >>> cfg = tf.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
    ...                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> model = tf.MixtralForCausalLM(cfg).eval()
    >>> route_around_absent_experts(model)
    1
    >>> gate = model.model.layers[0].mlp.gate
    >>> with torch.no_grad():
    ...     _ = gate.weight[1].zero_()
    >>> bool((gate(torch.randn(5, 16))[2] == 1).any())   # expert 1 is never picked
    False
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from shear.errors import GraphError
from shear.graph.expert_groups import moe_blocks
from shear.graph.groups import PruningGroup
from shear.graph.modules.experts import RouterSpec, find_router

__all__ = ["absent_experts", "route_around_absent_experts", "has_routing_hook", "live_experts", "check_min_keep"]


def absent_experts(router: nn.Module, spec: RouterSpec) -> torch.Tensor:
    """Bool ``[E]``: experts whose router row (and bias) is exactly zero."""
    w = getattr(router, spec.weight).detach()
    absent = ~w.ne(0).any(dim=1)
    bias = getattr(router, spec.bias, None) if spec.bias is not None else None
    if isinstance(bias, torch.Tensor):
        absent &= bias.detach().eq(0)
    return absent


def live_experts(router: nn.Module) -> int | None:
    """Experts a known router can pick (router row not zero), or None for a router shear does not know."""
    spec = find_router(router)
    return None if spec is None else int((~absent_experts(router, spec)).sum())


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling())


def _skip_absent(router: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: route again with ``-inf`` logits for the absent experts (None: output unchanged)."""
    spec = find_router(router)
    if spec is None or _exporting() or not isinstance(output, tuple) or len(output) < 3:
        return None
    absent = absent_experts(router, spec)
    if not bool(absent.any()):
        return None
    logits = output[0].masked_fill(absent.to(output[0].device), float("-inf"))
    scores, indices = spec.route(router, logits)
    return (logits, scores, indices, *output[3:])


def has_routing_hook(router: nn.Module) -> bool:
    """Whether ``router`` already routes around absent experts."""
    return any(h is _skip_absent for h in router._forward_hooks.values())


def route_around_absent_experts(model: nn.Module) -> int:
    """Give every known router of ``model`` the absent-expert hook (once); return how many routers
    have it."""
    n = 0
    for b in moe_blocks(model):
        if b.router_spec is None:
            continue
        router = model.get_submodule(b.router)
        if not has_routing_hook(router):
            router.register_forward_hook(_skip_absent)
        n += 1
    return n


def check_min_keep(groups: Iterable[PruningGroup], removed: Mapping[int, torch.Tensor]) -> None:
    """Refuse to erase where a group keeps fewer than ``min_keep`` structures that are not zero
    (``removed[g.id]``: a bool mask of the zero ones). An MoE router cannot pick its top-k from
    fewer experts, and a zero expert that stays is still absent, so ``expert`` groups count only
    live experts, at least one.

    Example:
        >>> g = PruningGroup(0, "mlp/expert", (), 4, kind="expert", prunable=False, min_keep=2)
        >>> check_min_keep([g], {0: torch.tensor([True, True, True, False])})
        Traceback (most recent call last):
        shear.errors.GraphError: mlp/expert: erasing would keep 1 of 4 experts, but its router picks 2 per token (num_experts_per_tok); keep at least 2 (a lower ratio, or expert-prune, which keeps them)
    """
    for g in groups:
        mask = removed.get(g.id)
        if mask is None or (g.min_keep <= 1 and g.kind != "expert"):
            continue
        left = g.size - int(mask.sum())
        if left < max(g.min_keep, 1):
            raise GraphError(
                f"{g.name}: erasing would keep {left} of {g.size} {g.kind}s, but its router picks {g.min_keep} per "
                f"token (num_experts_per_tok); keep at least {g.min_keep} (a lower ratio, or expert-prune, which keeps them)"
            )
