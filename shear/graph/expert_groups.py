"""Pruning groups for mixture-of-experts layers: one ``expert`` group and one ``channel`` group per layer.

Every module the table knows as fused experts (:mod:`shear.graph.modules.experts`) gives, for its
MoE block (the experts module's parent, looking through peft's ``ParamWrapper``):

- an **expert** group of size ``E``: structure ``e`` is the router's row ``e`` (and bias ``e``),
  which are *primary*, and index ``e`` of dim 0 of every expert tensor, which is *secondary*, with
  the rows and columns of LoRA factors that adapt expert ``e``. A zero router row is an absent
  expert: the router gives it logit ``-inf`` (:mod:`shear.model.experts`), so it is never picked
  and its weights may go. ``min_keep`` is the router's top-k.
- a **channel** group of size ``I`` (an expert's intermediate width): structure ``i`` is channel
  ``i`` of *every* expert of the layer (the fused tensors stay rectangular), the gate/up rows (and
  their bias, and LoRA ``B`` rows) primary, the ``down_proj`` columns (and LoRA ``A`` columns)
  secondary: ``act(0) * 0 = 0``, so a zero channel contributes nothing whichever expert runs.

The dimension analysis pinned those spaces (top-k routing, grouped matmuls are not channel ops);
the groups it made for them are replaced when they hold nothing but what the table claims and were
pinned for a reason inside the block. A claimed space that also reaches something outside the
block (the model output, another tensor) keeps the new group pinned, with that reason.

Example:
    >>> import torch, transformers as tf, shear
    >>> cfg = tf.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
    ...                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> g = shear.trace(tf.MixtralForCausalLM(cfg).eval(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    >>> [(p.name, p.kind, p.size, p.min_keep) for p in g.prunable_groups if "mlp" in p.name]
    [('model.layers.0.mlp/expert', 'expert', 4, 2), ('model.layers.0.mlp.experts/channel', 'channel', 8, 1)]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shear.graph.groups import Member, PruningGroup, Role
from shear.graph.modules.composites import is_lora_linear
from shear.graph.modules.experts import ExpertSpec, RouterSpec, find_experts, find_router
from shear.graph.pins import pin_kinds

__all__ = ["expert_groups", "moe_blocks", "MoeBlock", "OUTSIDE_PIN_KINDS"]

OUTSIDE_PIN_KINDS = frozenset({"output", "input", "constant", "vocabulary"})
"""Pin kinds that come from outside an MoE block: a claimed space pinned so stays pinned."""

_WRAPPER = ".base_layer"


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer as the table sees it: names of the block, its router and its experts."""

    block: str
    """The MoE block (``model.layers.0.mlp``)."""
    router: str
    experts: str
    """The experts module the table names (inside any LoRA wrappers)."""
    outer: str
    """The module at the block's experts attribute (the outermost LoRA wrapper, or ``experts``)."""
    spec: ExpertSpec
    router_spec: RouterSpec | None
    wrappers: tuple[str, ...]
    """LoRA ``ParamWrapper`` modules around the experts, outermost first."""


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every MoE layer of ``model`` whose experts module the table knows (router known or not).

    Example:
        >>> moe_blocks(torch.nn.Linear(2, 2))
        []
    """
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        spec = find_experts(m)
        if spec is None:
            continue
        outer = name
        while outer.endswith(_WRAPPER) and is_lora_linear(modules.get(outer[: -len(_WRAPPER)]) or m):
            outer = outer[: -len(_WRAPPER)]
        block = outer.rpartition(".")[0]
        router = f"{block}.{spec.router}" if block else spec.router
        r = modules.get(router)
        wrappers, cur = [], outer
        while cur != name:
            wrappers.append(cur)
            cur += _WRAPPER
        out.append(MoeBlock(block, router, name, outer, spec, find_router(r) if r is not None else None, tuple(wrappers)))
    return out


def _arange(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long).view(n, 1)


def _lora_members(
    model: nn.Module, b: MoeBlock, E: int, channels: int
) -> tuple[list[Member], list[Member], list[str]]:
    """LoRA factors of the ``ParamWrapper`` s around the experts: members of the expert group and
    of the channel group, and reasons that pin them (a wrapper whose factors do not split by expert)."""
    expert, channel, reasons = [], [], []
    base = model.get_submodule(b.experts)
    transposed = bool(getattr(base, "is_transposed", False))
    for w in b.wrappers:
        wrapper: Any = model.get_submodule(w)
        attr = str(getattr(wrapper, "parameter_name", ""))
        t = next((t for t in b.spec.tensors if t.attr == attr), None)
        if t is None:
            reasons.append(f"MoE experts of {b.block}: LoRA on {attr or '?'} is not one of its expert tensors")
            continue
        shape = tuple(getattr(base, attr).shape)
        in_dim, out_dim = (1, 2) if transposed else (2, 1)
        for k in wrapper.lora_A.keys():
            a_name, b_name = f"{w}.lora_A.{k}.weight", f"{w}.lora_B.{k}.weight"
            rows = int(wrapper.lora_A[k].weight.shape[0])
            if rows % E:
                reasons.append(f"MoE experts of {b.block}: LoRA {a_name} has {rows} rows, not a rank per expert")
                continue
            r = rows // E
            e = torch.arange(E, dtype=torch.long)
            expert.append(Member(a_name, 0, Role.SECONDARY, e.view(E, 1) * r + torch.arange(r).view(1, r)))
            expert.append(Member(b_name, 1, Role.SECONDARY, torch.arange(r).view(1, r) * E + e.view(E, 1)))
            if t.channel_dim is None or len(shape) != 3:
                continue
            pos = t.channel_positions(channels)
            if t.channel_dim == out_dim:  # lora_B rows make the channel, as a producer's rows do
                channel.append(Member(b_name, 0, Role.PRIMARY if t.producer else Role.SECONDARY, pos))
            elif t.channel_dim == in_dim:
                channel.append(Member(a_name, 1, Role.SECONDARY, pos))
    return expert, channel, reasons


def _claims(model: nn.Module, b: MoeBlock, shapes: dict[str, tuple[int, ...]]) -> tuple[
    list[Member], list[Member], int, int, list[str]
]:
    """Members of the expert and channel groups of ``b``, its sizes, and reasons that pin it."""
    experts = model.get_submodule(b.experts)
    E, channels = b.spec.experts(experts), b.spec.channels(experts)
    reasons: list[str] = []
    expert: list[Member] = []
    channel: list[Member] = []
    if b.router_spec is None:
        kind = type(model.get_submodule(b.router)).__name__ if _has(model, b.router) else "missing"
        reasons.append(
            f"router {b.router} ({kind}) is not a known top-k router: its routing cannot be told to skip an expert; "
            "declare it with shear.graph.modules.experts.register_router"
        )
    else:
        router = model.get_submodule(b.router)
        for attr in (b.router_spec.weight, b.router_spec.bias):
            if attr is not None and isinstance(getattr(router, attr, None), torch.Tensor):
                expert.append(Member(f"{b.router}.{attr}", 0, Role.PRIMARY, _arange(E)))
    for t in b.spec.tensors:
        name = f"{b.experts}.{t.attr}"
        expert.append(Member(name, 0, Role.SECONDARY, _arange(E)))
        if t.channel_dim is not None:
            role = Role.PRIMARY if t.producer else Role.SECONDARY
            channel.append(Member(name, t.channel_dim, role, t.channel_positions(channels)))
    lora_e, lora_c, lora_reasons = _lora_members(model, b, E, channels)
    expert += lora_e
    channel += lora_c
    reasons += lora_reasons
    for m in expert + channel:
        shape = shapes.get(m.param)
        if shape is None or m.dim >= len(shape) or int(m.positions.max()) >= shape[m.dim]:
            reasons.append(f"MoE experts of {b.block}: {m.param}[{m.dim}] is not in the traced graph with the expected shape")
            break
    return expert, channel, E, channels, reasons


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _same_space(m: Member, claim: Member) -> bool:
    """``m`` indexes the same tensor dim as ``claim`` over the same indices, as the claim's
    structures (``size``) or a refinement of them (each index on its own)."""
    flat = claim.positions.flatten()
    return (
        m.param == claim.param and m.dim == claim.dim and m.positions.shape[0] in (claim.positions.shape[0], flat.numel())
        and torch.equal(torch.sort(m.positions.flatten()).values, torch.sort(flat).values)
    )


def _resolve(
    groups: list[PruningGroup], claims: list[Member]
) -> tuple[set[int], list[str], int | None]:
    """Groups the claims replace, reasons that pin the claims instead, and the leaf group of the first claim."""
    by_pair = {(c.param, c.dim): c for c in claims}
    replaced: set[int] = set()
    reasons: list[str] = []
    first: int | None = None
    for g in groups:
        if g.kind == "block" or not any((m.param, m.dim) in by_pair for m in g.members):
            continue
        foreign = [m for m in g.members if (m.param, m.dim) not in by_pair]
        if foreign:
            reasons.append(
                f"MoE expert dimension {g.members[0].param}[{g.members[0].dim}] also runs through "
                f"{foreign[0].param}[{foreign[0].dim}] outside the block"
            )
            continue
        if not all(_same_space(m, by_pair[(m.param, m.dim)]) for m in g.members):
            continue  # another factor of the same tensor dims (a LoRA rank): stays as it is
        outside = [r for r in g.reasons if set(pin_kinds((r,))) & OUTSIDE_PIN_KINDS]
        reasons.extend(outside)
        if g.prunable and not outside:
            reasons.append(f"MoE expert dimension {g.members[0].param}[{g.members[0].dim}] is also group {g.name}")
            continue
        replaced.add(g.id)
        if first is None and any((m.param, m.dim) == (claims[0].param, claims[0].dim) for m in g.members):
            first = g.id
    return replaced, reasons, first


def _group(name: str, kind: str, members: list[Member], size: int, reasons: list[str], modules: tuple[str, ...],
           min_keep: int = 1) -> PruningGroup:
    reasons = list(dict.fromkeys(reasons))
    return PruningGroup(
        id=-1, name=name, members=tuple(sorted(members, key=lambda m: (m.param, m.dim))), size=size, kind=kind,
        prunable=not reasons, reasons=tuple(reasons), modules=modules, min_keep=min_keep,
    )


def expert_groups(
    model: nn.Module, groups: list[PruningGroup], leaf_of_group: list[int], shapes: dict[str, tuple[int, ...]]
) -> tuple[list[PruningGroup], list[int]]:
    """``groups`` (with their leaves) with the expert and channel groups of every known MoE layer
    added and the pinned groups they replace removed; ids renumbered in order."""
    blocks = moe_blocks(model)
    if not blocks:
        return groups, leaf_of_group
    leaf = dict(zip((g.id for g in groups), leaf_of_group, strict=True))
    removed: set[int] = set()
    added: list[tuple[PruningGroup, int]] = []
    for b in blocks:
        expert, channel, E, channels, reasons = _claims(model, b, shapes)
        top_k = 1
        if b.router_spec is not None:
            top_k = int(getattr(model.get_submodule(b.router), b.router_spec.top_k, 1))
            if E <= top_k:
                reasons.append(f"router picks {top_k} of {E} experts per token (num_experts_per_tok): none can go")
        gone_e, why_e, leaf_e = _resolve(groups, expert)
        gone_c, why_c, leaf_c = _resolve(groups, channel)
        removed |= gone_e | gone_c
        prefix = b.block or type(model).__name__
        added.append((_group(f"{prefix}/expert", "expert", expert, E, reasons + why_e, (b.router, b.outer), top_k),
                      leaf.get(leaf_e, -1) if leaf_e is not None else -1))
        if channel:
            added.append((_group(f"{b.outer}/channel", "channel", channel, channels,
                                 [r for r in reasons if not r.startswith("router picks")] + why_c, (b.outer,)),
                          leaf.get(leaf_c, -1) if leaf_c is not None else -1))
    kept = [(g, leaf[g.id]) for g in groups if g.id not in removed]
    used = {g.name for g, _ in kept}
    out_groups: list[PruningGroup] = []
    out_leaves: list[int] = []
    for g, lf in kept + added:
        name, n = g.name, 0
        if g.id == -1:
            while name in used:
                n += 1
                name = f"{g.name}#{n}"
            used.add(name)
        out_groups.append(dataclasses.replace(g, id=len(out_groups), name=name))
        out_leaves.append(lf)
    return out_groups, out_leaves

