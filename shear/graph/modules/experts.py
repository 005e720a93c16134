"""Mixture-of-experts modules: the fused expert tensors and the router, as module-table entries.

A transformers 5 MoE layer is a block holding a **router** (``gate`` or ``router``: a weight
``[E, H]``, sometimes a bias ``[E]``, and a top-k rule) and an **experts** module whose parameters
are fused 3-D tensors with the expert on dim 0 (Mixtral's ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``; gpt-oss stores them transposed, interleaves gate and up, and adds biases).
The dimension analysis cannot follow the expert dimension through top-k routing and grouped
matmuls, so it pins those spaces; the table says what the modules compute instead:

- the ``experts`` facet, an :class:`ExpertSpec`: which tensors hold which expert, where each
  expert's intermediate channels lie (``halves``: channel ``i`` is rows ``i`` and ``I + i`` of a
  fused gate/up; ``pairs``: rows ``2i`` and ``2i + 1``; ``single``: row ``i``), which attribute of
  the MoE block is the router, and the config fields that count experts and channels;
- the ``router`` facet, a :class:`RouterSpec`: the router's weight and bias, and its routing rule
  written out (:attr:`RouterSpec.route`), so an expert can be made *absent* (logit ``-inf``, see
  :mod:`shear.model.experts`) with the router's own normalisation.

Both facets are keyed by module type, like every module fact; a type the table does not name stays
pinned (unknown is unprunable). :mod:`shear.graph.expert_groups` turns the entries into pruning
groups; the ``attributes`` facets registered here rewrite ``num_experts`` and the channel count
after erasure.

Example:
    >>> from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    >>> spec = MODULE_SPECS[MixtralExperts].experts
    >>> spec.router, [t.attr for t in spec.tensors], spec.count_field
    ('gate', ['gate_up_proj', 'down_proj'], 'num_local_experts')
    >>> ExpertTensor("gate_up_proj", 1, "halves", producer=True).channel_positions(3).tolist()
    [[0, 3], [1, 4], [2, 5]]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import GraphError
from shear.graph.modules.table import MODULE_SPECS, lookup_module, register_module

__all__ = [
    "CHANNEL_LAYOUTS",
    "ExpertTensor",
    "ExpertSpec",
    "RouterSpec",
    "Route",
    "find_experts",
    "register_experts",
    "register_router",
    "softmax_topk_renormalised",
    "softmax_topk_optionally_renormalised",
    "topk_softmax",
    "find_router",
    "MODULE_SPECS",
]

CHANNEL_LAYOUTS: tuple[str, ...] = ("single", "halves", "pairs")
"""How intermediate channel ``i`` of ``I`` maps to indices along a tensor's channel dim: ``single``
(``i``), ``halves`` (``i`` and ``I + i``: gate rows then up rows) or ``pairs`` (``2i`` and ``2i + 1``)."""

Route = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``route(router, logits) -> (scores, indices)``: the router's top-k rule on ``[tokens, E]`` logits."""


@dataclass(frozen=True)
class ExpertTensor:
    """One fused expert tensor: expert ``e`` owns index ``e`` of dim 0."""

    attr: str
    """Attribute of the experts module (``gate_up_proj``)."""
    channel_dim: int | None
    """Dimension holding the intermediate channels, or None (a per-expert output bias)."""
    layout: str = "single"
    """One of :data:`CHANNEL_LAYOUTS`."""
    producer: bool = False
    """True where a zero channel slice makes the channel's activation zero (gate/up rows and their
    bias); False for the consumer (``down_proj`` columns), removed along."""

    def __post_init__(self) -> None:
        if self.layout not in CHANNEL_LAYOUTS:
            raise GraphError(f"ExpertTensor {self.attr}: layout must be one of {CHANNEL_LAYOUTS}, got {self.layout!r}")
        if self.channel_dim is not None and self.channel_dim < 1:
            raise GraphError(f"ExpertTensor {self.attr}: the channel dim cannot be the expert dim 0")

    @property
    def per_channel(self) -> int:
        """Indices one channel owns along :attr:`channel_dim`."""
        return 1 if self.layout == "single" else 2

    def channel_positions(self, channels: int) -> torch.Tensor:
        """``[channels, per_channel]`` indices along :attr:`channel_dim`, one row per channel."""
        i = torch.arange(channels, dtype=torch.long)
        if self.layout == "halves":
            return torch.stack([i, i + channels], dim=1)
        if self.layout == "pairs":
            return torch.stack([2 * i, 2 * i + 1], dim=1)
        return i.view(-1, 1)


@dataclass(frozen=True)
class ExpertSpec:
    """What an experts module computes: expert ``e`` is ``down[e] @ act(gate_up[e] @ x)`` over the
    tensors named here, and its intermediate channels are removable together across experts."""

    tensors: tuple[ExpertTensor, ...]
    router: str
    """Attribute of the MoE block (the experts module's parent) that holds the router."""
    count_field: str
    """Config field counting experts per layer, as ``config.to_dict()`` writes it (``num_local_experts``;
    transformers 5.24 maps ``num_experts`` to it)."""
    channel_field: str
    """Config field for an expert's intermediate width (``intermediate_size``, ``moe_intermediate_size``)."""
    count_attr: str = "num_experts"
    """Module attribute counting experts."""
    channel_attr: str = "intermediate_dim"
    """Module attribute holding an expert's intermediate width."""

    def experts(self, module: nn.Module) -> int:
        """Experts the module holds now (dim 0 of its first tensor)."""
        return int(getattr(module, self.tensors[0].attr).shape[0])

    def channels(self, module: nn.Module) -> int:
        """An expert's intermediate width now."""
        t = next(t for t in self.tensors if t.channel_dim is not None)
        return int(getattr(module, t.attr).shape[t.channel_dim]) // t.per_channel

    def update_attributes(self, module: nn.Module) -> None:
        """The ``attributes`` rule: expert count and channel count read off the sliced tensors."""
        setattr(module, self.count_attr, self.experts(module))
        setattr(module, self.channel_attr, self.channels(module))


@dataclass(frozen=True)
class RouterSpec:
    """A top-k router: logits ``x @ weight.T (+ bias)``, then :attr:`route`."""

    route: Route
    """The router's own top-k rule, written out (tested against its forward)."""
    weight: str = "weight"
    bias: str | None = None
    top_k: str = "top_k"
    """Attribute holding the experts each token is routed to."""
    count_attr: str = "num_experts"

    def update_attributes(self, module: nn.Module) -> None:
        """The ``attributes`` rule: expert count read off the weight."""
        setattr(module, self.count_attr, int(getattr(module, self.weight).shape[0]))


def find_experts(module: nn.Module) -> ExpertSpec | None:
    """The :class:`ExpertSpec` of ``module``'s type, or None."""
    spec: ExpertSpec | None = lookup_module(module, "experts")
    return spec


def find_router(module: nn.Module) -> RouterSpec | None:
    """The :class:`RouterSpec` of ``module``'s type, or None."""
    spec: RouterSpec | None = lookup_module(module, "router")
    return spec


# --- routing rules, as transformers 5.24 writes them -----------------------------------------------


def softmax_topk_renormalised(router: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral: softmax in fp32 over all experts, top-k, renormalised over the k chosen."""
    top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), int(router.top_k), dim=-1)
    return top / top.sum(dim=-1, keepdim=True), idx


def softmax_topk_optionally_renormalised(router: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE: softmax in fp32, top-k, renormalised when ``norm_topk_prob``, cast back."""
    top, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), int(router.top_k), dim=-1)
    if router.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


def topk_softmax(router: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the logits, softmax over the k chosen."""
    top, idx = torch.topk(logits, int(router.top_k), dim=-1)
    return torch.softmax(top, dim=1, dtype=top.dtype), idx


# --- the table entries --------------------------------------------------------------------------------


def _optional(module: str, name: str) -> Any:
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) else None


def register_experts(cls: type, spec: ExpertSpec) -> None:
    """Declare ``cls`` an experts module computed as ``spec`` says (with its attribute rule)."""
    register_module(cls, experts=spec, attributes=spec.update_attributes)


def register_router(cls: type, spec: RouterSpec) -> None:
    """Declare ``cls`` a top-k router routing as ``spec`` says (with its attribute rule)."""
    register_module(cls, router=spec, attributes=spec.update_attributes)


_FUSED = (ExpertTensor("gate_up_proj", 1, "halves", producer=True), ExpertTensor("down_proj", 2))
"""Mixtral / Qwen3-MoE: ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows), ``down_proj [E, H, I]``."""

_GPT_OSS = (
    ExpertTensor("gate_up_proj", 2, "pairs", producer=True),  # [E, H, 2I], gate and up interleaved
    ExpertTensor("gate_up_proj_bias", 1, "pairs", producer=True),  # [E, 2I]
    ExpertTensor("down_proj", 1),  # [E, I, H]
    ExpertTensor("down_proj_bias", None),  # [E, H]
)

_ENTRIES: tuple[tuple[str, str, str, ExpertSpec, RouterSpec], ...] = (
    ("mixtral", "MixtralExperts", "MixtralTopKRouter",
     ExpertSpec(_FUSED, "gate", "num_local_experts", "intermediate_size"),
     RouterSpec(softmax_topk_renormalised)),
    ("qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeTopKRouter",
     ExpertSpec(_FUSED, "gate", "num_local_experts", "moe_intermediate_size"),  # "num_experts" is its alias
     RouterSpec(softmax_topk_optionally_renormalised)),
    ("gpt_oss", "GptOssExperts", "GptOssTopKRouter",
     ExpertSpec(_GPT_OSS, "router", "num_local_experts", "intermediate_size", channel_attr="intermediate_size"),
     RouterSpec(topk_softmax, bias="bias")),
)  # fmt: skip

for _family, _experts, _router, _espec, _rspec in _ENTRIES:
    _module = f"transformers.models.{_family}.modeling_{_family}"
    _ecls, _rcls = _optional(_module, _experts), _optional(_module, _router)
    if _ecls is not None and _rcls is not None:
        register_experts(_ecls, _espec)
        register_router(_rcls, _rspec)
