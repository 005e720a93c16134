"""How much each MoE expert is used, and how much it contributes, on calibration text (REAP).

For every MoE layer the table knows (:func:`shear.graph.expert_groups.moe_blocks`), a forward
hook on the experts module reads what the router sent it (hidden states, top-k indices, top-k
weights) and runs each routed expert alone on its tokens (the module's own forward with top-1
routing and weight 1, so LoRA and the experts implementation are the model's). Per expert ``e``
over the tokens ``x`` routed to it (``T_e``; ``T`` tokens through the layer):

``frequency``
    ``|T_e| / T``: the share of tokens that pick ``e`` (routing frequency).
``output-norm``
    ``mean_{x in T_e} ||E_e(x)||_2``: how large its output is when it runs.
``reap``
    ``mean_{x in T_e} g_e(x) * ||E_e(x)||_2`` with ``g_e(x)`` the router weight ``e`` gets
    (Lasby et al. 2025, "REAP: router-weighted expert activation pruning"): an expert that is
    picked with small weights, or whose output is small, matters little.

An expert never routed to scores 0 on all three. Absent experts (zero router rows) are never routed
to (:mod:`shear.model.experts`), so they score 0 as well.

Example:
    >>> import torch, transformers as tf
    >>> cfg = tf.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
    ...                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> model = tf.MixtralForCausalLM(cfg).eval()
    >>> stats = expert_statistics(model, torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0)))
    >>> s = stats["model.layers.0.mlp.gate"]
    >>> s.tokens, float(s.frequency.sum())          # 16 tokens, each routed to 2 experts
    (16, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import DataError, KernelError
from shear.graph.expert_groups import moe_blocks
from shear.model.devices import model_device

__all__ = ["EXPERT_CRITERIA", "ExpertStats", "expert_statistics"]

EXPERT_CRITERIA: tuple[str, ...] = ("reap", "frequency", "output-norm")
"""Scores of an expert: see the module docstring."""


@dataclass(frozen=True)
class ExpertStats:
    """Routing statistics of one MoE layer's experts on calibration tokens."""

    tokens: int
    """Tokens that went through the layer."""
    counts: torch.Tensor
    """Float64 ``[E]``: tokens routed to each expert."""
    weighted_norm: torch.Tensor
    """Float64 ``[E]``: sum over routed tokens of router weight times output norm."""
    norm: torch.Tensor
    """Float64 ``[E]``: sum over routed tokens of output norm."""

    @property
    def frequency(self) -> torch.Tensor:
        return self.counts / max(self.tokens, 1)

    def score(self, criterion: str) -> torch.Tensor:
        """Float64 ``[E]``: one of :data:`EXPERT_CRITERIA` (higher = more important)."""
        per = self.counts.clamp(min=1)
        if criterion == "reap":
            return self.weighted_norm / per
        if criterion == "output-norm":
            return self.norm / per
        if criterion == "frequency":
            return self.frequency
        raise KernelError(f"expert criterion must be one of {EXPERT_CRITERIA}, got {criterion!r}")


class _Collector:
    """Forward hook of one experts module: accumulates :class:`ExpertStats` sums."""

    def __init__(self, experts: int) -> None:
        self.tokens = 0
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.weighted = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        values = [*args, *kwargs.values()]
        if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
            return
        hidden, index, weight = (v.detach() for v in values[:3])
        self.tokens += int(hidden.shape[0])
        for e in torch.unique(index).tolist():
            if not 0 <= e < self.counts.numel():
                continue  # a sentinel index (expert parallelism): not an expert of this module
            token, slot = torch.where(index == e)
            n = int(token.numel())
            one = torch.full((n, 1), e, dtype=index.dtype, device=index.device)
            out = module.forward(hidden[token], one, torch.ones((n, 1), dtype=weight.dtype, device=weight.device))
            norms = out.float().norm(dim=-1).double().cpu()
            self.counts[e] += n
            self.norm[e] += norms.sum()
            self.weighted[e] += (weight[token, slot].double().cpu() * norms).sum()

    def stats(self) -> ExpertStats:
        return ExpertStats(self.tokens, self.counts, self.weighted, self.norm)


@torch.no_grad()
def expert_statistics(
    model: nn.Module, calibration_ids: torch.Tensor, *, batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[str, ExpertStats]:
    """Router module name -> :class:`ExpertStats` of its layer, over ``calibration_ids`` ``[n, seq_len]``.

    Raises:
        DataError: the ids are not a ``[n, seq_len]`` long tensor.
        KernelError: the model has no MoE layer the module table knows.
    """
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2 or calibration_ids.dtype != torch.long:
        raise DataError("expert statistics: calibration ids must be a [n, seq_len] long tensor (TextData.calibration)")
    blocks = [b for b in moe_blocks(model) if b.router_spec is not None]
    if not blocks:
        raise KernelError(
            f"{type(model).__name__} has no MoE layer shear knows (fused experts and a top-k router in the module "
            "table, shear.graph.modules.experts): nothing to score"
        )
    collectors: dict[str, _Collector] = {}
    handles = []
    for b in blocks:
        outer = model.get_submodule(b.outer)
        collectors[b.router] = _Collector(b.spec.experts(model.get_submodule(b.experts)))
        handles.append(outer.register_forward_hook(collectors[b.router], with_kwargs=True))
    from shear.kernels.losses import head_bypassed, output_head

    was_training = model.training
    device = model_device(model)
    try:
        model.eval()
        with head_bypassed(model) if output_head(model) is not None else nullcontext():
            for i in range(0, calibration_ids.shape[0], max(1, batch_size)):
                model(input_ids=calibration_ids[i : i + batch_size].to(device), use_cache=False)
                if progress is not None:
                    progress(min(batch_size, calibration_ids.shape[0] - i))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: c.stats() for name, c in collectors.items()}
