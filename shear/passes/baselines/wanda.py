"""The ``wanda`` pass: prune by weight times input activation norm (Sun et al. 2023, "Wanda").

A weight's importance is ``S_ij = |W_ij| · ‖X_j‖₂``, where ``‖X_j‖₂`` is the L2 norm of input
feature ``j`` over all calibration tokens: a small weight on a large activation matters more than
its magnitude says. Weights are compared within each output row (Wanda's default; every output
keeps the same count), or in groups of ``m`` consecutive inputs for N:M sparsity. No weight update.

Calibration is sequential, as in the reference code: block by block, each block's input is the
output of the already pruned blocks before it (:func:`shear.kernels.calibration.sequential_prune`).
``ctx.data`` is a :class:`shear.data.TextData` (``nsamples`` windows of ``seq_len`` tokens drawn
with ``seed``) or a ``[n, seq_len]`` long tensor of ids.

Example:
    >>> Wanda(ratio=0.5).per_row                            # "wanda{ratio=0.5}"
    True
    >>> w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    >>> wanda_mask(w, torch.tensor([4.0, 1.0, 1.0, 1.0]), ratio=0.5).int().tolist()   # scores 4, 2, 3, 4
    [[1, 0, 0, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from shear.data.text import calibration_ids
from shear.kernels.calibration import LayerStats, sequential_prune, target_linears
from shear.kernels.sparsity import WeightMasks, check_mode, check_nm, check_ratio, select_mask, store_masks
from shear.passes.base import Context, Pass, PassResult, register_pass

__all__ = ["Wanda", "wanda_scores", "wanda_mask"]


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` in float32 (``weight`` ``[out, in]``, ``col_norms`` ``[in]``)."""
    return weight.detach().float().abs() * col_norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    col_norms: torch.Tensor,
    ratio: float = 0.5,
    *,
    mode: str = "unstructured",
    n: int = 2,
    m: int = 4,
    per_row: bool = True,
) -> torch.Tensor:
    """Wanda's keep mask of ``weight`` given its input column norms ``‖X_j‖₂``."""
    return select_mask(wanda_scores(weight, col_norms), mode, ratio, n, m, per_row)


@register_pass
@dataclass(frozen=True)
class Wanda(Pass):
    """Prune the decoder linears by ``|W| · ‖X‖`` (unstructured per row, or N:M), block by block."""

    name: ClassVar[str] = "wanda"
    ensures: ClassVar[tuple[type, ...]] = (WeightMasks,)

    ratio: float = 0.5
    """Fraction of each row's weights to zero, in (0, 1) (ignored for N:M, which zeroes n/m)."""
    mode: Literal["unstructured", "nm"] = "unstructured"
    """``unstructured`` or ``nm`` (n of every m consecutive input weights of each row)."""
    n: int = 2
    """N:M: weights zeroed per group of ``m``."""
    m: int = 4
    """N:M: the group length."""
    per_row: bool = True
    """Unstructured: compare within each output row (Wanda's default) rather than the whole matrix."""
    nsamples: int = 32
    """Calibration windows drawn from ``ctx.data`` (the reference uses 128 of 2048 tokens)."""
    seq_len: int = 256
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration window draw."""
    batch_size: int = 4
    """Windows per forward chunk."""

    def __post_init__(self) -> None:
        check_mode(self.name, self.mode)
        if self.mode == "nm":
            check_nm(self.name, self.n, self.m)
        else:
            check_ratio(self.name, self.ratio)

    def run(self, ctx: Context) -> PassResult:
        ids = calibration_ids(ctx, self.name, self.nsamples, self.seq_len, self.seed)
        out: dict[str, torch.Tensor] = {}

        @torch.no_grad()
        def prune(name: str, layer: nn.Linear, stats: LayerStats) -> None:
            keep = wanda_mask(
                layer.weight, stats.col_norms, self.ratio, mode=self.mode, n=self.n, m=self.m, per_row=self.per_row
            )
            layer.weight.mul_(keep.to(layer.weight.dtype))
            out[f"{name}.weight"] = keep

        total = len(target_linears(ctx.model))
        with ctx.progress(total, f"wanda {self.mode}") as bar:
            sequential_prune(ctx.model, ids, prune, batch_size=self.batch_size, bar=bar)
        masks = WeightMasks(out)
        store_masks(ctx.analyses, masks)
        stats = masks.sparsity()
        what = f"{self.n}:{self.m}" if self.mode == "nm" else f"ratio {self.ratio}"
        return PassResult(
            changed=bool(masks),
            message=(
                f"wanda {self.mode} ({what}) on {ids.shape[0]}x{ids.shape[1]} calibration tokens: "
                f"{stats.total:.1%} of the weights of {len(masks)} layers zeroed"
            ),
            stats=stats.as_dict(),
        )
