"""The ``sparsegpt`` pass: one-shot pruning with optimal weight updates (Frantar & Alistarh 2023).

Each linear layer of every decoder block is pruned by :func:`shear.kernels.sparsegpt.sparsegpt_prune`
(the Optimal Brain Surgeon update, one shared Hessian per layer) on its calibration inputs, block by
block (:func:`shear.kernels.calibration.sequential_prune`), like the reference code.

Example:
    >>> SparseGPT(ratio=0.5).blocksize                      # "sparsegpt{ratio=0.5}"
    128
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from shear.data.text import calibration_ids
from shear.errors import PipelineError
from shear.kernels.calibration import LayerStats, sequential_prune, target_linears
from shear.kernels.sparsegpt import sparsegpt_prune
from shear.kernels.sparsity import WeightMasks, check_mode, check_nm, check_ratio, store_masks
from shear.passes.base import Context, Pass, PassResult, register_pass

__all__ = ["SparseGPT"]


@register_pass
@dataclass(frozen=True)
class SparseGPT(Pass):
    """Prune the decoder linears with SparseGPT's OBS weight updates (unstructured or N:M), block by block."""

    name: ClassVar[str] = "sparsegpt"
    ensures: ClassVar[tuple[type, ...]] = (WeightMasks,)

    ratio: float = 0.5
    """Fraction of each layer's weights to zero, in (0, 1) (ignored for N:M, which zeroes n/m)."""
    mode: Literal["unstructured", "nm"] = "unstructured"
    """``unstructured`` or ``nm`` (n of every m consecutive input weights of each row)."""
    n: int = 2
    """N:M: weights zeroed per group of ``m``."""
    m: int = 4
    """N:M: the group length (``blocksize`` must be a multiple of it)."""
    per_row: bool = False
    """Unstructured: the same count in every row (the paper prunes per layer, adaptively)."""
    nsamples: int = 32
    """Calibration windows drawn from ``ctx.data`` (the reference uses 128 of 2048 tokens)."""
    seq_len: int = 256
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration window draw."""
    blocksize: int = 128
    """Columns per lazy-update block (and per adaptive mask selection)."""
    percdamp: float = 0.01
    """Hessian damping as a fraction of its mean diagonal."""
    batch_size: int = 4
    """Windows per forward chunk."""

    def __post_init__(self) -> None:
        check_mode(self.name, self.mode)
        if self.mode == "nm":
            check_nm(self.name, self.n, self.m)
            if self.blocksize % self.m:
                raise PipelineError(f"{self.name}: blocksize ({self.blocksize}) must be a multiple of m ({self.m})")
        else:
            check_ratio(self.name, self.ratio)
        if self.blocksize < 1:
            raise PipelineError(f"{self.name}: blocksize must be >= 1, got {self.blocksize}")
        if self.percdamp < 0:
            raise PipelineError(f"{self.name}: percdamp must be >= 0, got {self.percdamp}")

    def run(self, ctx: Context) -> PassResult:
        ids = calibration_ids(ctx, self.name, self.nsamples, self.seq_len, self.seed)
        out: dict[str, torch.Tensor] = {}
        losses: dict[str, float] = {}
        n = self.n if self.mode == "nm" else 0

        @torch.no_grad()
        def prune(name: str, layer: nn.Linear, stats: LayerStats) -> None:
            res = sparsegpt_prune(
                layer.weight, stats.hessian, self.ratio, n=n, m=self.m, blocksize=self.blocksize,
                percdamp=self.percdamp, per_row=self.per_row, name=name,
            )
            layer.weight.copy_(res.weight.to(layer.weight.dtype))
            out[f"{name}.weight"] = res.keep
            losses[name] = res.loss

        total = len(target_linears(ctx.model))
        with ctx.progress(total, f"sparsegpt {self.mode}") as bar:
            sequential_prune(ctx.model, ids, prune, hessian=True, batch_size=self.batch_size, bar=bar)
        masks = WeightMasks(out)
        store_masks(ctx.analyses, masks)
        stats: dict[str, float] = dict(masks.sparsity().as_dict())
        stats["obs_loss"] = sum(losses.values())
        what = f"{self.n}:{self.m}" if self.mode == "nm" else f"ratio {self.ratio}"
        return PassResult(
            changed=bool(masks),
            message=(
                f"sparsegpt {self.mode} ({what}) on {ids.shape[0]}x{ids.shape[1]} calibration tokens: "
                f"{stats['sparsity']:.1%} of the weights of {len(masks)} layers zeroed"
            ),
            stats=stats,
        )
