"""The ``expert-prune`` pass: remove the least important experts of every MoE layer, one shot.

Each MoE layer the module table knows has an ``expert`` pruning group (one structure per expert:
its router row, primary, and its slices of the fused expert tensors). On calibration windows the
pass measures every expert (:func:`shear.kernels.experts.expert_statistics`) by ``criterion``:

- ``reap`` (default): mean over the tokens routed to the expert of router weight times the L2 norm
  of its output (REAP, Lasby et al. 2025);
- ``frequency``: the share of tokens routed to it;
- ``output-norm``: the mean norm of its output when it runs.

and zeroes the router rows of the lowest ``round(ratio * E)`` experts in every layer (the same
count in each, so a uniform model keeps a config that says it). A zero router row is an absent
expert (logit ``-inf``, :mod:`shear.model.experts`), so the masked model is the model without
them, and ``erase`` removes their slices and rewrites ``num_local_experts``. Every layer keeps at
least its router's top-k (``num_experts_per_tok``); a ratio that would go below is clamped, and
the pass says so. Expert channels (the ``channel`` groups of the fused tensors) are pruned by the
other passes (``random``, ``magnitude``, ``taylor``, ``lhspg`` with ``kinds=[channel]``).

Example:
    >>> ExpertPrune(ratio=0.25, criterion="frequency").criterion     # "expert-prune{ratio=0.25,criterion=frequency}"
    'frequency'
    >>> small = shear.compile(moe, "expert-prune{ratio=0.25},erase", data=text)      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from shear.data.text import calibration_ids
from shear.errors import PipelineError
from shear.graph.ir import Graph
from shear.kernels.allocation import structure_count
from shear.kernels.experts import EXPERT_CRITERIA, expert_statistics
from shear.model.tensors import TensorTable, zero_structures
from shear.passes.base import Context, Pass, PassResult, register_pass
from shear.passes.options import require_number

__all__ = ["ExpertPrune"]


@register_pass
@dataclass(frozen=True)
class ExpertPrune(Pass):
    """Zero the router rows of the least important ``ratio`` of each MoE layer's experts."""

    name: ClassVar[str] = "expert-prune"
    prunes: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("expert",)
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[str, ...]] = ("expert-prune", "expert-saliency")

    ratio: float = 0.25
    """Fraction of each MoE layer's experts to remove, in [0, 1); each layer keeps at least its top-k."""
    criterion: str = "reap"
    """``reap`` (router weight x output norm), ``frequency`` (routing share) or ``output-norm``."""
    samples: int = 16
    """Calibration windows."""
    seq_len: int = 128
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration window draw."""
    batch_size: int = 4
    """Windows per forward pass."""

    def __post_init__(self) -> None:
        require_number(self.name, "ratio", self.ratio, low=0.0, high=1.0, open_high=True)
        for option in ("samples", "seq_len", "batch_size"):
            require_number(self.name, option, getattr(self, option), integer=True, low=1)
        if self.criterion not in EXPERT_CRITERIA:
            raise PipelineError(
                f"expert-prune: criterion {self.criterion!r} is not one of {', '.join(EXPERT_CRITERIA)} "
                "(e.g. expert-prune{criterion=reap})"
            )

    def run(self, ctx: Context) -> PassResult:
        groups = [g for g in ctx.get(Graph).prunable_groups if g.kind == "expert"]
        if not groups:
            ctx.warn(f"expert-prune: {type(ctx.model).__name__} has no prunable MoE expert group; nothing pruned")
            return PassResult(changed=False, message="no MoE layer with prunable experts", stats={"experts": 0})
        ids = calibration_ids(ctx, self.name, self.samples, self.seq_len, self.seed)
        with ctx.progress(int(ids.shape[0]), f"expert-prune: {self.criterion} on calibration windows") as bar:
            stats = expert_statistics(ctx.model, ids, batch_size=self.batch_size, progress=bar.advance)
        table = TensorTable(ctx.model)
        chosen: dict[int, torch.Tensor] = {}
        scores: dict[int, torch.Tensor] = {}
        clamped: list[str] = []
        for g in groups:
            score = stats[g.modules[0]].score(self.criterion).float()
            want = structure_count(g.size, self.ratio)
            n = min(want, g.size - g.min_keep)
            if n < want:
                clamped.append(f"{g.name} keeps {g.size - n} (top-{g.min_keep})")
            idx = torch.sort(torch.argsort(score, stable=True)[:n]).values
            zero_structures(table, g, idx)
            chosen[g.id], scores[g.id] = idx, score
        if clamped:
            ctx.warn(f"expert-prune: ratio {self.ratio} would drop below the router's top-k; " + "; ".join(clamped))
        ctx.put(chosen, "expert-prune")
        ctx.put(scores, "expert-saliency")
        n = sum(int(v.numel()) for v in chosen.values())
        return PassResult(
            changed=n > 0,
            message=(
                f"zeroed {n} experts in {len(groups)} MoE layers by {self.criterion} on "
                f"{ids.shape[0]}x{ids.shape[1]} calibration tokens"
            ),
            stats={"experts": n, "layers": len(groups)},
        )
