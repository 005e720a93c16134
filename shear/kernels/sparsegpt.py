"""SparseGPT's arithmetic (Frantar & Alistarh 2023), free of any pass machinery; the pass is
:mod:`shear.passes.baselines.sparsegpt`.

For a linear layer with calibration input ``X`` (``[tokens, in]``) SparseGPT minimises the
layer-wise reconstruction error ``‖WXᵀ − ŴXᵀ‖²`` over sparse ``Ŵ``, row by row with the Optimal
Brain Surgeon update, all rows sharing one Hessian ``H = 2XᵀX/tokens``:

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_:j = 0``; ``H += λI`` with
   ``λ = percdamp · mean(diag H)``;
2. ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse): row ``j`` of ``U`` holds the OBS
   update of the columns after ``j`` once columns ``< j`` are fixed;
3. columns are processed in blocks of ``blocksize``. At the start of each block the mask is
   chosen by the OBS saliency ``w²/U_jj²`` (adaptive mask selection: over the whole block for
   unstructured sparsity, over each group of ``m`` columns for N:M); then column by column, the
   pruned weights are set to zero, the error ``(w − q)/U_jj`` is spread over the remaining
   columns of the block, and the block's accumulated errors update all later columns at once
   (lazy batch update).

Unstructured sparsity is exact: every block prunes its share, so each layer (or each row, with
``per_row=true``) loses exactly ``round(ratio · size)`` weights. Calibration is sequential block
by block (:func:`shear.kernels.calibration.sequential_prune`), like the reference code.

Example:
    >>> import torch
    >>> w, x = torch.randn(4, 8), torch.randn(64, 8)
    >>> res = sparsegpt_prune(w, 2 * x.T @ x / 64, ratio=0.5, blocksize=4)
    >>> int((~res.keep).sum()), bool((res.weight[~res.keep] == 0).all())
    (16, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shear.errors import PassError, PipelineError
from shear.kernels.sparsity import check_nm, check_ratio

__all__ = ["SparseGPTResult", "sparsegpt_prune"]


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned weight (float32), its keep mask, and the OBS estimate of the error it caused."""

    weight: torch.Tensor
    keep: torch.Tensor
    loss: float
    """Σ over pruned weights of ``(w − q)² / (2 U_jj²)``: the layer-wise loss increase OBS predicts."""


def _inverse_cholesky(h: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ grows tenfold (up to 3 times) if H is not PD."""
    diag = torch.arange(h.shape[0], device=h.device)
    damp = percdamp * float(torch.mean(torch.diag(h)))
    for _ in range(4):
        hd = h.clone()
        hd[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            # cholesky_solve against I, not cholesky_inverse: the latter is ~70x slower on CPU (torch 2.x)
            inv = torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        damp = damp * 10 if damp > 0 else 1e-6
    raise PassError(
        f"sparsegpt: the Hessian of layer {name} is not positive definite even with damping {damp / 10:.3g}; "
        "raise percdamp or use more calibration samples"
    )


def _split(total: int, start: int, stop: int, cols: int) -> int:
    """Weights block ``[start, stop)`` of ``cols`` columns prunes so that the blocks add up to ``total``."""
    return round(total * stop / cols) - round(total * start / cols)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float = 0.5,
    *,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    per_row: bool = False,
    name: str = "layer",
) -> SparseGPTResult:
    """Prune ``weight`` ``[out, in]`` with SparseGPT given the Hessian ``[in, in]`` of its inputs.

    ``n > 0`` selects N:M sparsity (``n`` zeros per ``m`` consecutive columns; ``blocksize`` must
    be a multiple of ``m``); otherwise ``ratio`` of the weights are pruned, per layer or per row.
    """
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise PipelineError(f"sparsegpt: layer {name}: Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if n > 0:
        check_nm("sparsegpt", n, m)
        if cols % m or blocksize % m:
            raise PipelineError(
                f"sparsegpt: {n}:{m} sparsity needs the input width ({cols} for {name}) and blocksize ({blocksize}) "
                f"to be multiples of m={m}"
            )
    else:
        check_ratio("sparsegpt", ratio)
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, percdamp, name)

    prune = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    k_layer = round(ratio * rows * cols)
    k_row = round(ratio * cols)
    loss = torch.zeros(rows, dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if n == 0:
            saliency = w1.pow(2) / d1.pow(2).unsqueeze(0)
            if per_row:
                k = _split(k_row, i1, i2, cols)
                mask1.scatter_(1, torch.sort(saliency, dim=1, stable=True).indices[:, :k], True)
            else:
                k = _split(k_layer, i1, i2, cols)
                mask1.view(-1)[torch.sort(saliency.reshape(-1), stable=True).indices[:k]] = True
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if n > 0 and i % m == 0:
                saliency = w1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)
                low = torch.sort(saliency, dim=1, stable=True).indices[:, :n]
                mask1.scatter_(1, i + low, True)
            q = col.clone()
            q[mask1[:, i]] = 0.0
            q1[:, i] = q
            loss += (col - q).double().pow(2) / (2 * d.double().pow(2))
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        prune[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return SparseGPTResult(w, ~prune, float(loss.sum()))
