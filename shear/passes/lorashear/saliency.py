"""The ``saliency`` pass: score every structure of every prunable group (LoRAShear §3.3).

A weighted sum of L2-normalised criteria (``magnitude``, ``cosine``, ``taylor1``, ``taylor2``,
``activation``; see :mod:`shear.kernels.saliency` for the definitions and choices) is stored as a
:class:`~shear.kernels.saliency.SaliencyScores` in the context (``ctx.get(SaliencyScores)``). Nothing in the
model changes. Criteria that need data (``activation``; the Taylor ones with ``gradient=loss``)
draw ``samples`` calibration windows of ``seq_len`` tokens from ``ctx.data`` (a
:class:`shear.data.TextData`).

``weights`` is a list of ``criterion=weight`` items; in a pipeline string write it as a list,
``saliency{weights=[magnitude=1,cosine=1,taylor2=0.5]}``, or as one quoted string,
``saliency{weights="magnitude=1,cosine=1"}``. The LoRAShear-style mix on a LoRA model is
``[magnitude=1,cosine=1,taylor1=1,taylor2=1]`` with ``gradient=lora``.

Example:
    >>> Saliency(weights=("magnitude=1", "activation=1")).name
    'saliency'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from shear.data.text import calibration_ids
from shear.graph.ir import Graph
from shear.kernels.saliency import SaliencyScores, compute_saliency, parse_weights
from shear.passes.base import Context, Pass, PassResult, register_analysis, register_pass

__all__ = ["Saliency"]

register_analysis("saliency", SaliencyScores)



@register_pass
@dataclass(frozen=True)
class Saliency(Pass):
    """Score every structure of the prunable groups by a weighted sum of normalised criteria."""

    name: ClassVar[str] = "saliency"
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[type, ...]] = (SaliencyScores,)

    weights: tuple[str, ...] = ("magnitude=1",)
    """``criterion=weight`` items over magnitude, cosine, taylor1, taylor2, activation (missing = 0)."""
    gradient: Literal["auto", "loss", "lora"] = "auto"
    """Taylor gradient: loss on calibration data, LoRA's BA as proxy, or auto (loss when data is given)."""
    samples: int = 16
    """Calibration windows for the data-driven criteria."""
    seq_len: int = 128
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration window choice."""
    batch_size: int = 4
    """Windows per forward pass."""

    def __post_init__(self) -> None:
        parse_weights(self.weights)

    def run(self, ctx: Context) -> PassResult:
        graph = ctx.get(Graph)
        w = parse_weights(self.weights)
        taylor = w["taylor1"] > 0 or w["taylor2"] > 0
        wants_data = w["activation"] > 0 or (taylor and self.gradient == "loss")
        has_data = ctx.data is not None
        ids = None
        if wants_data or (taylor and self.gradient == "auto" and has_data):
            ids = calibration_ids(ctx, self.name, self.samples, self.seq_len, self.seed)
        scores = compute_saliency(
            ctx.model,
            graph.pruning_groups,
            weights=w,
            calibration_ids=ids,
            composites=graph.composites,
            gradient=self.gradient,
            batch_size=self.batch_size,
        )
        ctx.put(scores)
        for note in scores.notes:
            ctx.warn(f"saliency: {note}")
        n = sum(int(v.numel()) for v in scores.by_group.values())
        used = ", ".join(f"{c}={v:g}" for c, v in w.items() if v > 0)
        return PassResult(
            changed=False,
            message=f"scored {n} structures in {len(scores.by_group)} groups ({used}; gradient {scores.gradient})",
            stats={"structures": n, "groups": len(scores.by_group), "gradient": scores.gradient},
        )
