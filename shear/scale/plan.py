"""``shear.plan``: what pruning a model at a ratio gives and needs, from its config alone.

No weight is read or allocated: the model is built on the meta device and its groups are stamped
from a two-block trace (:mod:`shear.scale.source`). For a ``ratio`` (the share of the parameters, as
``shear prune --ratio`` removes it) or a ``group_ratio`` (``round(ratio * size)`` structures of every
prunable group, as ``magnitude{ratio=...}`` prunes; :mod:`shear.scale.counts`), with widths in the
target's steps (:mod:`shear.model.target`), the plan reports

* the pruning groups, folded over blocks (``model.layers.*.mlp/channel`` x 126), and structure counts;
* the parameter count after erasure, **computed exactly** from the shapes (which structures go does
  not change it) and the config the pruned model will have;
* the **predicted** memory of each stage (formulas of :mod:`shear.scale.memory`: LHSPG per GPU under
  FSDP, the streamed saliency and erase, a GGUF export).

Example:
    >>> p = shear.plan("llama-405b/config.json", ratio=0.2, world_size=64)       # doctest: +SKIP
    >>> round(1 - p.params_after / p.params_before, 2)                           # doctest: +SKIP
    0.2
    >>> print(p.format())                                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.io.targets import target_for
from shear.model.target import Target, parse_target, round_steps
from shear.passes.options import require_number
from shear.scale.counts import DEFAULT_KINDS, check_ratios, structure_counts
from shear.scale.memory import MemoryLine, ModelShape, Training, format_bytes, lhspg_memory, streamed_memory
from shear.scale.source import ModelSource, blocks_of, open_source

__all__ = ["GroupFamily", "PrunePlan", "plan", "plan_source", "weight_bytes_of"]


@dataclass(frozen=True)
class GroupFamily:
    """Pruning groups that are the same group in every block (or one global group)."""

    name: str
    """Group name with the block index replaced by ``*``."""
    kind: str
    count: int
    size: int
    removed: int
    """Structures the ratio removes from each group (0 for pinned groups and kinds not pruned)."""
    status: str
    """``prunable``, or ``pinned: <reason>``."""


@dataclass(frozen=True)
class PrunePlan:
    """The result of :func:`plan`: sizes (exact), memory (predicted), and how long planning took."""

    model_class: str
    source: str
    ratio: float | None
    """The share of the parameters asked for (``--ratio``); ``None`` with :attr:`group_ratio`."""
    num_blocks: int
    stamped: bool
    families: tuple[GroupFamily, ...]
    structures: int
    structures_removed: int
    params_before: int
    params_after: int
    config_after: dict[str, Any]
    from_pretrained_compatible: bool
    training: Training
    lhspg: tuple[MemoryLine, ...]
    streamed: tuple[MemoryLine, ...]
    weight_dtype: str
    seconds: float
    notes: tuple[str, ...] = field(default=())
    group_ratio: float | None = None
    """The share of every group's structures (``--group-ratio``) when the plan was made for one;
    ``ratio`` is then ``None``."""
    kinds: tuple[str, ...] = ()
    """Group kinds pruned."""
    target: str = ""
    """The resolved target, as :meth:`shear.model.target.Target.describe` says it."""

    @property
    def lhspg_bytes(self) -> int:
        """Predicted per-GPU bytes of an LHSPG step (sum of :attr:`lhspg`)."""
        return sum(x.bytes for x in self.lhspg)

    def format(self) -> str:
        """The plan as plain text: groups, counts, parameters, then the predicted memory per stage."""
        out = [
            f"{self.model_class} from {self.source}: {self.num_blocks} blocks, weights {self.weight_dtype}; groups "
            + ("stamped from a 2-block meta trace" if self.stamped else "traced on the meta device")
            + f" ({self.seconds:.1f} s, no weights read)",
            "",
            *([self.target] if self.target else []),
            (f"pruning groups at group ratio {self.group_ratio:g} (share of every {'/'.join(self.kinds)} group, as "
             f"magnitude{{ratio={self.group_ratio:g}}}):") if self.group_ratio is not None else
            (f"pruning groups for ratio {self.ratio:g} (share of the parameters, from the {'/'.join(self.kinds)} groups, "
             f"as shear prune --ratio {self.ratio:g}):"),
            f"  {'group':<44} {'kind':<9} {'count':>6} {'size':>7} {'remove':>7}  status",
        ]
        for f in self.families:
            out.append(f"  {f.name:<44} {f.kind:<9} {f.count:>6} {f.size:>7} {f.removed:>7}  {f.status[:70]}")
        red = 1 - self.params_after / max(self.params_before, 1)
        pruned = sum(f.count * f.size for f in self.families if f.kind in self.kinds and f.status == "prunable")
        out += [
            f"structures: {self.structures:,} prunable, {self.structures_removed:,} removed "
            f"({self.structures_removed / max(pruned, 1):.1%} of the {'/'.join(self.kinds)} structures: the group ratio)",
            f"parameters: {self.params_before:,} -> {self.params_after:,} (-{red:.1%} of the parameters: the ratio; "
            "exact count from the shapes)",
            "config after: " + ", ".join(f"{k}={v}" for k, v in self.config_after.items())
            + ("" if self.from_pretrained_compatible else "  (shear.load only: transformers cannot express these sizes)"),
            "",
            f"predicted memory (formulas, see shear.scale.memory), LHSPG per GPU: FSDP world {self.training.world_size}, "
            f"batch {self.training.batch} x {self.training.seq_len} tokens, bf16, LoRA r={self.training.lora_r}:",
        ]
        for x in self.lhspg:
            out.append(f"  {x.name:<34} {format_bytes(x.bytes):>11}   {x.formula}")
        out.append(f"  {'total (no CUDA context/fragmentation)':<34} {format_bytes(self.lhspg_bytes):>11}")
        out.append("predicted host memory of the streamed stages (shear stream-prune) and an export:")
        for x in self.streamed:
            out.append(f"  {x.name:<34} {format_bytes(x.bytes):>11}   {x.formula}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def weight_bytes_of(config: Any) -> tuple[str, int]:
    """The checkpoint dtype a config declares (``dtype``/``torch_dtype``) and its bytes; bf16 when unsaid."""
    raw = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype")
    name = str(raw).removeprefix("torch.") if raw is not None else "bfloat16"
    return (name, _DTYPE_BYTES[name]) if name in _DTYPE_BYTES else ("bfloat16", 2)


def _families(src: ModelSource, counts: dict[int, int]) -> tuple[GroupFamily, ...]:
    pattern = re.compile(rf"^{re.escape(src.prefix)}\.\d+(?=[./]|$)")
    rows: dict[tuple[str, int, str], list[int]] = {}
    order: list[tuple[str, int, str]] = []
    for g in src.graph.pruning_groups:
        status = "prunable" if g.prunable else "pinned: " + "; ".join(
            pattern.sub(f"{src.prefix}.*", r) for r in g.reasons
        )
        key = (pattern.sub(f"{src.prefix}.*", g.name), g.size, status)
        if key not in rows:
            rows[key] = []
            order.append(key)
        rows[key].append(g.id)
    kinds = {g.id: g.kind for g in src.graph.pruning_groups}
    return tuple(
        GroupFamily(name, kinds[ids[0]], len(ids), size, counts.get(ids[0], 0), status)
        for (name, size, status) in order for ids in [rows[(name, size, status)]]
    )


def _model_shape(src: ModelSource, e: int) -> ModelShape:
    cfg = src.config
    blocks = blocks_of(src.model, src.prefix)
    block0 = blocks[0]
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    lora = sum(
        (mod.in_features + mod.out_features)
        for mod in blocks.modules() if isinstance(mod, nn.Linear)
    )
    biggest = max(math.prod(p.shape) for p in src.model.parameters())
    return ModelShape(
        params=0, block_params=sum(p.numel() for p in block0.parameters()), blocks=len(blocks),
        hidden=int(cfg.hidden_size), q=heads * head_dim, kv=kv * head_dim,
        ffn=int(getattr(cfg, "intermediate_size", 0) or 4 * cfg.hidden_size), vocab=int(cfg.vocab_size),
        lora_params=lora, max_tensor_bytes=biggest * e, weight_bytes=e,
    )


def plan_source(
    src: ModelSource, ratio: float | None, training: Training, *, round_to: int = 0, started: float | None = None,
    group_ratio: float | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS, target: Target | None = None,
) -> tuple[PrunePlan, dict[int, int]]:
    """:func:`plan` on an opened source; also returns the per-group counts. Mutates ``src.model``
    (the meta skeleton becomes the pruned shapes). The options are as :func:`plan` checked them;
    ``target`` is resolved (``None``: any width)."""
    from dataclasses import replace

    from shear.codegen.hf_config import candidate_config_updates, refresh_config
    from shear.codegen.module_tree import apply_plan, plan_removal
    from shear.kernels.allocation import ParamBudget

    t0 = started if started is not None else time.perf_counter()
    groups = src.graph.pruning_groups
    counts = structure_counts(src.model, groups, ratio=ratio, group_ratio=group_ratio, kinds=kinds, target=target,
                              round_to=round_to)  # fmt: skip
    budget = ParamBudget(src.model, groups)
    dtype, e = weight_bytes_of(src.config)
    shape = replace(_model_shape(src, e), params=budget.total, lora_params=0)
    shape = replace(shape, lora_params=training.lora_r * _model_shape(src, e).lora_params)
    after = budget.params_after(counts)
    erasure = plan_removal(src.model, groups, {gid: torch.arange(n) for gid, n in counts.items()})
    apply_plan(src.model, erasure)
    compatible = refresh_config(src.model)
    updates = candidate_config_updates(src.model) or {}
    biggest_after = max(math.prod(p.shape) for p in src.model.parameters()) * e
    notes = []
    steps = round_steps(target, groups, round_to)
    if not isinstance(steps, int) and budget.off_grid(counts, steps):
        notes.append(f"{len(budget.off_grid(counts, steps))} groups keep widths off the target's steps: whole steps "
                     "cannot reach the ratio on this model")
    if not src.stamped:
        notes.append("groups come from a trace of every block (layers='all' or fewer than 3 blocks)")
    result = PrunePlan(
        model_class=type(src.model).__name__,
        source=str(src.path),
        ratio=ratio,
        num_blocks=src.num_blocks,
        stamped=src.stamped,
        families=_families(src, counts),
        structures=sum(g.size for g in groups if g.prunable),
        structures_removed=sum(counts.values()),
        params_before=budget.total,
        params_after=after,
        config_after=dict(updates),
        from_pretrained_compatible=compatible,
        training=training,
        lhspg=tuple(lhspg_memory(shape, training)),
        streamed=tuple(streamed_memory(shape, after, biggest_after)),
        weight_dtype=dtype,
        seconds=time.perf_counter() - t0,
        notes=tuple(notes),
        group_ratio=group_ratio,
        kinds=kinds,
        target=target.describe() if target is not None else "",
    )
    return result, counts


def plan(
    model: str | os.PathLike[str],
    ratio: float | None = None,
    *,
    world_size: int = 8,
    batch: int = 1,
    seq_len: int = 2048,
    lora_r: int = 8,
    round_to: int = 0,
    layers: str = "stamp",
    group_ratio: float | None = None,
    kinds: tuple[str, ...] | None = None,
    target: str | Target | None = "auto",
) -> PrunePlan:
    """Plan pruning ``model`` (a directory with config.json, or a config JSON path) by ``ratio``, the
    share of the parameters removed (0.2 when neither ratio is given), or by ``group_ratio``, the
    share of every group (:mod:`shear.scale.counts`; ``kinds``: the group kinds pruned).

    Widths follow ``target`` (``"auto"``: this machine's device, ``nas`` when the model fits it;
    ``None``: any width); ``round_to`` > 0 overrides it. Nothing is loaded but the config; see the
    module doc for what is exact and what is predicted.

    Example:
        >>> p = shear.plan("./llama-405b", 0.2, world_size=64, seq_len=4096)   # doctest: +SKIP
        >>> p.params_after < p.params_before                                    # doctest: +SKIP
        True
    """
    ratio, group_ratio, chosen = check_ratios("plan", ratio, group_ratio, kinds)
    require_number("plan", "round_to", round_to, integer=True, low=0, high=1 << 20)
    wanted = parse_target(target) if target is not None else None
    for name, value, high in (
        ("world_size", world_size, 1 << 20), ("batch", batch, 1 << 20), ("seq_len", seq_len, 1 << 24), ("lora_r", lora_r, 1 << 16)
    ):
        require_number("plan", name, value, integer=True, low=1, high=high)
    t0 = time.perf_counter()
    src = open_source(model, layers=layers)
    training = Training(world_size=world_size, batch=batch, seq_len=seq_len, lora_r=lora_r)
    resolved = target_for(wanted, src.model) if wanted is not None else None
    return plan_source(src, ratio, training, round_to=round_to, started=t0, group_ratio=group_ratio, kinds=chosen,
                       target=resolved)[0]  # fmt: skip
